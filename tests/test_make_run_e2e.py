"""`make run` on a fresh clone with no git identity, twice: the second trains nothing; `make run` ended
by SIGTERM."""

from __future__ import annotations

import signal
import sqlite3
import subprocess

import pytest

from pipeline.experiments.runner import experiment_revs
from tests.helpers import REPO, run, tool_env, write_params
from tests.test_experiments_e2e import repo  # noqa: F401 (the fixture: a fresh copy of the repository, per module)
from tests.test_experiments_e2e import (
    assert_stable_versus_fixed,
    runs_by_fingerprint,
)
from tests.test_queue_e2e import processes_under, queue_rows, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.long
def test_make_run_on_a_fresh_clone_without_git_identity(repo, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    (clone / ".venv").symlink_to(REPO / ".venv")  # set up already: `-o` below keeps make from reinstalling
    write_params(clone, train__learning_rate=0.001, model__use_gumbel_softmax=False)  # leftovers
    env = {k: v for k, v in tool_env().items()  # no git identity; not a make inside `make test` either
           if not k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_")) and k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1")  # no git identity anywhere
    proc = subprocess.run(["make", "-o", ".venv/.installed", "run", "SCALE=tiny"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("make run: SCALE=tiny: the stable-versus-fixed workflow at the tiny scale")
    assert "train.learning_rate: committed 0.0005, now 0.001" in proc.stderr
    assert "queue after" in proc.stderr and "fixed_tiny: epoch 1/3" in proc.stderr  # progress while the queue runs
    assert_stable_versus_fixed(clone)
    report = (clone / "metrics" / "compare" / "stable_tiny-vs-fixed_tiny" / "compare.md").read_text()
    assert "Scale: tiny." in report and "| training: attention_entropy_ratio |" in report
    assert (clone / "metrics" / "compare" / "stable_tiny-vs-fixed_tiny" / "attention_entropy.png").exists()
    rev = experiment_revs(clone)["stable_tiny"]
    assert run(["git", "log", "-1", "--format=%an", rev], clone).stdout.strip() == "rlan-pipeline"
    with sqlite3.connect(clone / "mlflow.db") as db:
        runs = dict(db.execute("select name, status from runs"))
    assert {n: runs.get(n) for n in ("stable_tiny", "fixed_tiny")} == {"stable_tiny": "FINISHED",
                                                                       "fixed_tiny": "FINISHED"}

    # `make run` again trains nothing: both trainings are restored from their finished checkpoints
    checkpoints = {p: p.stat().st_mtime_ns for p in (clone / "checkpoints").glob("*/last.pt")}
    runs = runs_by_fingerprint(clone)
    assert len(checkpoints) == 2 and sorted(r for rs in runs.values() for r in rs) == [
        ("fixed_tiny", "FINISHED"), ("stable_tiny", "FINISHED")]
    again = subprocess.run(["make", "-o", ".venv/.installed", "run", "SCALE=tiny"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in (clone / "checkpoints").glob("*/last.pt")} == checkpoints
    assert runs_by_fingerprint(clone) == runs  # each training's finished run, continued
    assert_stable_versus_fixed(clone)


@pytest.mark.long
def test_make_run_ended_by_sigterm_stops_the_queue(repo, tmp_path):
    """SIGTERM to make alone (a batch scheduler's end; make passes it on to its child): the runner stops
    the queue's experiments as Ctrl-C does, and nothing is left running."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    (clone / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in tool_env().items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = tmp_path / "make.log"
    proc = subprocess.Popen(["make", "-o", ".venv/.installed", "run", "SCALE=tiny"], cwd=clone, env=env,
                            stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: "Running stage 'train'" in out.read_text(), what="a training")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)  # make ends by the signal once its child has ended
    text = out.read_text()
    assert "stopped by SIGTERM: the same command resumes each interrupted training" in text, text
    assert "make run: stopped by SIGTERM" in text and "Traceback" not in text
    wait_until(lambda: not any(s == "Running" for _, s in queue_rows(clone)), timeout=120, what="the queue to stop")
    wait_until(lambda: not processes_under(clone), timeout=60, what="every process to end")
