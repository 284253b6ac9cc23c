"""The named experiments end to end, with the real dvc commands at the tiny scale, each started from a
workspace whose params.yaml holds leftover overrides: in the workspace, and in the DVC queue through
`make run` on a fresh clone with no git identity."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest
import yaml

from pipeline.experiments import FIXED, SCALES, expected_changes, experiment_revs
from pipeline.params import flatten
from tests.helpers import (REPO, checkpoint_in_progress, commit_all, copy_repo, interrupt_when, run, tool_env,
                           write_params)

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
EXPERIMENTS = [sys.executable, "-m", "pipeline.experiments"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("exp"))
    commit_all(repo, "baseline")
    return repo


def changed(repo, a: str, b: str) -> dict:
    """`dvc params diff a b` as key -> new value."""
    diff = json.loads(run(DVC + ["params", "diff", a, b, "--json"], repo).stdout or "{}").get("params.yaml", {})
    return {k: d["new"] for k, d in diff.items()}


def assert_stable_versus_fixed(repo) -> None:
    """The result itself: stable is HEAD plus the tiny scale, fixed is stable plus its overrides, the two
    measured differently, and the workspace back on HEAD's params.yaml."""
    committed = run(["git", "show", "HEAD:params.yaml"], repo).stdout
    base = flatten(yaml.safe_load(committed))
    tiny = SCALES["tiny"].overrides
    assert changed(repo, "HEAD", "stable") == expected_changes(tiny, base)
    assert changed(repo, "stable", "fixed") == expected_changes(FIXED, {**base, **tiny})
    metrics = json.loads(run(DVC + ["metrics", "diff", "stable", "fixed", "--json"], repo).stdout)
    assert metrics["metrics/train.json"] and metrics["metrics/gap.json"]
    assert (repo / "params.yaml").read_text() == committed


def test_workspace_after_a_failed_override(repo):
    accept = "validation.accept_broken_rules=[fixed-constant-temperature]"  # a list, as no-gumbel sets it
    failed = run(DVC + ["exp", "run", "-S", "model.hyperlora_rank=0", "-S", accept], repo, check=False)
    assert failed.returncode != 0
    for line in ("model.hyperlora_rank: committed 8, now 0",
                 "validation.accept_broken_rules: committed [], now ['fixed-constant-temperature']",
                 "git checkout -- params.yaml"):
        assert line in failed.stdout + failed.stderr
    assert "hyperlora_rank: 0" in (repo / "params.yaml").read_text()  # what DVC leaves behind

    out = run(EXPERIMENTS + ["run", "--scale", "tiny", "stable", "fixed"], repo, timeout=1200)
    assert "params.yaml differs from HEAD" in out.stderr and "model.hyperlora_rank: committed 8, now 0" in out.stderr
    [backup] = (repo / ".dvc" / "tmp").glob("params.yaml.*")
    assert "hyperlora_rank: 0" in backup.read_text()
    assert_stable_versus_fixed(repo)
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = dict(db.execute("select name, status from runs"))
    assert {n: runs.get(n) for n in ("stable", "fixed")} == {"stable": "FINISHED", "fixed": "FINISHED"}

    report = run(EXPERIMENTS + ["compare", "stable", "fixed"], repo).stdout
    assert "| gap | stable | fixed | smallest gap |" in report and "| training: attention_entropy_ratio |" in report
    assert (repo / "metrics/compare/compare.md").read_text().strip() == report.strip()
    assert (repo / "metrics/compare/attention_entropy.png").exists()


def runs_by_fingerprint(repo) -> dict[str, list[tuple[str, str]]]:
    """MLflow: fingerprint -> (name, status) of each run of that training."""
    if not (repo / "mlflow.db").exists():
        return {}
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute("select tags.value, runs.name, runs.status from runs join tags on tags.run_uuid = "
                          "runs.run_uuid and tags.key = 'fingerprint'").fetchall()
    out: dict[str, list[tuple[str, str]]] = {}
    for fingerprint, name, status in sorted(rows):
        out.setdefault(fingerprint, []).append((name, status))
    return out


def test_interrupted_runner_resumes_its_training(repo):
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)  # stable was trained above: train it afresh
    before = runs_by_fingerprint(repo)
    cmd = EXPERIMENTS + ["run", "--scale", "tiny", "stable"]
    code, out = interrupt_when(cmd, repo, checkpoint_in_progress(repo / "checkpoints", mid_epoch=False))
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert code == 130 and "Traceback" not in out, out
    assert any("train: stopped by SIGINT (Ctrl-C) after epoch" in line for line in errors), out
    assert errors[-1].endswith("interrupted (Ctrl-C): the same command resumes each interrupted training from its "
                               "checkpoint"), out
    assert (repo / "params.yaml").read_text() == run(["git", "show", "HEAD:params.yaml"], repo).stdout

    again = run(cmd, repo, timeout=1200)  # the same command resumes, in the same MLflow run
    assert "resuming this training after epoch" in again.stdout + again.stderr
    def stable(runs):
        return sorted(r for rs in runs.values() for r in rs if r[0] == "stable")

    assert stable(runs_by_fingerprint(repo)) == sorted([*stable(before), ("stable", "FINISHED")])  # one more run


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
    assert "queue after" in proc.stderr  # progress while the queue runs
    assert_stable_versus_fixed(clone)
    assert (clone / "metrics/compare/compare.md").exists()
    rev = experiment_revs(clone)["stable"]
    assert run(["git", "log", "-1", "--format=%an", rev], clone).stdout.strip() == "rlan-pipeline"

    # `make run` again trains nothing: both trainings are restored from their finished checkpoints
    checkpoints = {p: p.stat().st_mtime_ns for p in (clone / "checkpoints").glob("*/last.pt")}
    runs = runs_by_fingerprint(clone)
    assert len(checkpoints) == 2 and sorted(r for rs in runs.values() for r in rs) == [
        ("fixed", "FINISHED"), ("stable", "FINISHED")]
    again = subprocess.run(["make", "-o", ".venv/.installed", "run", "SCALE=tiny"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in (clone / "checkpoints").glob("*/last.pt")} == checkpoints
    assert runs_by_fingerprint(clone) == runs  # each training's finished run, continued
    assert_stable_versus_fixed(clone)
