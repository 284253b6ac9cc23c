"""The experiments runner from a dirty workspace with a queue of mixed scales, seeds and a sweep, and
the queue when its runner is stopped (SIGTERM) or killed (SIGKILL) (the real dvc commands, tiny
scale)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from pipeline.experiments import supervise
from pipeline.experiments.runner import expected_changes, experiment_revs
from pipeline.params import SEED_KEYS
from tests.helpers import run, tool_env, write_params
from tests.test_experiments_e2e import repo  # noqa: F401 (the fixture: a fresh copy of the repository, per module)
from tests.test_experiments_e2e import (
    DVC,
    EXPERIMENTS,
    TINY,
    changed,
    committed,
)

pytestmark = pytest.mark.e2e


@pytest.mark.long
def test_runner_from_a_dirty_workspace_with_a_queue_of_mixed_scales_seeds_and_a_sweep(repo):
    # the user's own experiment, queued: a cut-down stand-in for the cpu scale's stable (names carry the scale)
    mine = ["-S", "data.max_tasks=3", "-S", "augment.samples_per_task=4", "-S", "train.epochs=1",
            "-S", "train.steps_per_epoch=1", "-S", "train.batch_size=2", "-S", "train.heldout_tasks=2",
            "-S", "evaluate.max_tasks=1", "-S", "evaluate.num_color_perms=1"]
    cpu = run(EXPERIMENTS + ["overrides", "stable", "--scale", "cpu"], repo).stdout.split()
    run(DVC + ["exp", "run", "--queue", "-n", "stable_cpu", *cpu, *mine], repo)
    write_params(repo, train__learning_rate=0.001)  # an edit left in the workspace
    lock = (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None  # none on a fresh clone

    out = run(EXPERIMENTS + ["run", "--scale", "tiny", "--seeds", "2", "--queue", "-j", "2",
                             "-S", "model.hyperlora_init_scale=0.05,0.1"], repo, timeout=3600)
    log = out.stderr
    assert "train.learning_rate: committed 0.0005, now 0.001" in log  # restored, and kept in .dvc/tmp
    assert "-S model.hyperlora_init_scale=0.1 is the committed value (HEAD) already" in log
    assert "hyperlora_init_scale=0.1 is the baseline at the tiny scale, stable_tiny: not an experiment of its own" in log
    assert "dvc queue logs -f NAME" in log and "stable_tiny_s43: epoch 3/3: loss" in log  # progress while queued
    revs = experiment_revs(repo)
    mine_tiny = "hyperlora_init_scale=0.05_tiny"
    assert {"stable_cpu", "stable_tiny", "stable_tiny_s43", mine_tiny, f"{mine_tiny}_s43"} <= set(revs)
    assert "hyperlora_init_scale=0.1_tiny" not in revs
    base = committed(repo)
    assert changed(repo, "HEAD", "stable_tiny_s43") == expected_changes({**TINY, **{k: 43 for k in SEED_KEYS}}, base)
    assert changed(repo, "stable_tiny", mine_tiny) == {"model.hyperlora_init_scale": 0.05}

    # yours against stable, compared at once, in a directory of its own; the workspace as before
    report = (repo / "metrics" / "compare" / f"stable_tiny-vs-{mine_tiny}" / "compare.md").read_text()
    assert "Scale: tiny." in report and f"Seeds: stable_tiny 42, 43; {mine_tiny} 42, 43." in report
    assert f"| {mine_tiny} | {mine_tiny} (" in report and "| model.hyperlora_init_scale=0.05 |" in report
    assert report.strip() in out.stdout
    assert (repo / "params.yaml").read_text() == run(["git", "show", "HEAD:params.yaml"], repo).stdout
    after = (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None
    assert after == lock and "the workspace is as before" in log

    # scales are never mixed silently
    refused = run(EXPERIMENTS + ["compare", "stable_tiny", "stable_cpu"], repo, check=False)
    assert refused.returncode != 0 and "different scales (stable_tiny: tiny, stable_cpu: cpu)" in refused.stderr
    which = run(EXPERIMENTS + ["compare", "stable", mine_tiny.removesuffix("_tiny")], repo, check=False)
    assert which.returncode != 0 and "stable ran at the scales cpu, tiny: choose one with --scale" in which.stderr
    table = run(EXPERIMENTS + ["diff", "--scale", "tiny", "stable", mine_tiny.removesuffix("_tiny")], repo).stdout
    assert f"stable_tiny (2 seed(s)) vs {mine_tiny} (2 seed(s)), scale tiny" in table and " ± " in table
    assert "EXEC_" not in run(EXPERIMENTS + ["runs"], repo).stdout


# --- the queue when its runner is stopped or killed ------------------------------------------------


def processes_under(root) -> list[int]:
    """The pids of this user's processes working in `root` or below (the runner, DVC's queue workers, the
    experiments they run in DVC's temporary copies, their stages)."""
    root, found = str(root.resolve()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + os.sep):
                found.append(int(entry))
    return found


def start_runner(repo, out):
    """The runner in a session of its own (as a terminal or a batch job starts it), its output in `out`."""
    cmd = EXPERIMENTS + ["run", "--scale", "tiny", "--queue", "-j", "1", "stable"]
    return subprocess.Popen(cmd, cwd=repo, env=tool_env(), stdout=out.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(predicate, timeout=900, what=""):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def training(out):
    return lambda: "stable_tiny: Running stage 'train'" in out.read_text()


def queue_rows(repo) -> list[tuple[str, str]]:
    return [(t.name, t.status) for t in supervise.tasks(run(DVC + ["queue", "status"], repo).stdout)]


@pytest.mark.long
def test_a_stopped_or_killed_runner_leaves_no_queue_running_and_its_rerun_ends(repo, tmp_path):
    # SIGTERM to the runner alone (as `make` passes it on, or a batch scheduler's end): the queue stops too
    out = tmp_path / "first.log"
    proc = start_runner(repo, out)
    wait_until(training(out), what="the training")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, out.read_text()
    assert "stopped by SIGTERM: the same command resumes each interrupted training" in out.read_text()
    assert "Traceback" not in out.read_text()
    wait_until(lambda: ("stable_tiny", "Running") not in queue_rows(repo), timeout=120, what="the queue to stop")

    # SIGKILL of the runner's process group: DVC's worker goes on; the next run stops it, never runs it twice
    out = tmp_path / "second.log"
    proc = start_runner(repo, out)
    wait_until(training(out), what="the training")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ("stable_tiny", "Running") in queue_rows(repo)  # an orphan: the worker still trains
    again = run(EXPERIMENTS + ["run", "--scale", "tiny", "--queue", "-j", "1", "stable"], repo, timeout=1200)
    assert "the queue is still running stable_tiny, started by an earlier run that was killed" in again.stderr
    rows = queue_rows(repo)
    assert [s for n, s in rows if n == "stable_tiny"].count("Success") == 1 and ("stable_tiny", "Running") not in rows

    # SIGKILL of every process, the queue's too: its task stays `Running` for DVC; the next run ends
    out = tmp_path / "third.log"
    shutil.rmtree(repo / "checkpoints")  # train afresh, so that there is a training to kill
    proc = start_runner(repo, out)
    wait_until(training(out), what="the training")
    for pid in processes_under(repo):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert ("stable_tiny", "Running") in queue_rows(repo)  # for DVC; its process is gone
    t0 = time.time()
    again = run(EXPERIMENTS + ["run", "--scale", "tiny", "--queue", "-j", "1", "stable"], repo, timeout=1200)
    assert "queued experiment stable_tiny (task " in again.stderr and ") is dead: its process (pid " in again.stderr
    assert ("stable_tiny", "Running") not in queue_rows(repo) and time.time() - t0 < 900
    with sqlite3.connect(repo / "mlflow.db") as db:
        assert db.execute("select count(*) from runs where status = 'RUNNING'").fetchone() == (0,)
    assert "stable_tiny" in experiment_revs(repo)


def test_a_commit_made_while_the_queue_runs_leaves_the_run_and_its_comparison_whole(repo, tmp_path):
    """The user commits while their experiments run in the queue (HEAD moves): the runner still finds
    its experiments at the commit they were queued from (not "did not finish"), and `compare` finds
    them at that earlier commit, saying so, since HEAD has none."""
    out = tmp_path / "runner.log"
    runner = start_runner(repo, out)
    try:
        wait_until(training(out), what="the queued experiment to train")
        queued_from = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
        (repo / "NOTES.md").write_text("an unrelated note, committed while the queue runs\n")
        run(["git", "add", "NOTES.md"], repo)
        run(["git", "commit", "-q", "-m", "a note"], repo)
        assert runner.wait(timeout=900) == 0, out.read_text()[-4000:]
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    log = out.read_text()
    assert "did not finish" not in log and f"ran from {queued_from[:7]} at the tiny scale" in log
    compared = run(EXPERIMENTS + ["compare", "--scale", "tiny", "stable"], repo)
    assert f"HEAD has none of its experiments; those of the earlier commit {queued_from[:7]}" in compared.stderr
    assert "stable_tiny" in compared.stdout
