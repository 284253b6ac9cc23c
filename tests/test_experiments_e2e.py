"""The named experiments end to end, with the real dvc commands at the tiny scale: seed repeats made by
hand in the workspace, the runner from a dirty workspace with a queue of mixed scales, seeds and a
sweep, and `make run` on a fresh clone with no git identity."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest
import yaml

from pipeline.experiments.runner import FIXED, SCALES, expected_changes, experiment_revs
from pipeline.params import SEED_KEYS, flatten
from tests.helpers import (
    REPO,
    checkpoint_in_progress,
    commit_all,
    copy_repo,
    interrupt_when,
    run,
    tool_env,
    write_params,
)

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
EXPERIMENTS = [sys.executable, "-m", "pipeline.experiments"]
TINY = SCALES["tiny"].overrides


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("exp"))
    commit_all(repo, "baseline")
    return repo


def changed(repo, a: str, b: str) -> dict:
    """`dvc params diff a b` as key -> new value."""
    diff = json.loads(run(DVC + ["params", "diff", a, b, "--json"], repo).stdout or "{}").get("params.yaml", {})
    return {k: d["new"] for k, d in diff.items()}


def committed(repo) -> dict:
    return flatten(yaml.safe_load(run(["git", "show", "HEAD:params.yaml"], repo).stdout))


def mlflow_tags(repo, run_name: str) -> dict:
    with sqlite3.connect(repo / "mlflow.db") as db:
        return dict(db.execute("select t.key, t.value from tags t join runs r on t.run_uuid = r.run_uuid "
                               "where r.name = ?", (run_name,)))


def test_seed_repeats_by_hand_each_run_exactly_the_baseline_plus_their_overrides(repo):
    """Three `dvc exp run`s in the workspace, in order, each with the `overrides` it names: the third must
    not inherit the second's fixed configuration (DVC leaves each run's params in the workspace)."""
    outputs = {}
    for name, exp, seed in (("stable-s1", "stable", 1), ("fixed-s1", "fixed", 1), ("stable-s2", "stable", 2)):
        cmd = (f"dvc exp run -n {name} -S train.seed={seed} -S augment.seed={seed} "
               f"$(python -m pipeline.experiments overrides {exp} --scale tiny)")
        outputs[name] = run(["bash", "-c", cmd], repo, timeout=1200)
    base, seeds = committed(repo), {"train.seed": 2, "augment.seed": 2}
    assert changed(repo, "HEAD", "stable-s2") == expected_changes({**TINY, **seeds}, base)
    assert changed(repo, "HEAD", "fixed-s1") == expected_changes({**TINY, **FIXED, "train.seed": 1,
                                                                  "augment.seed": 1}, base)
    third = outputs["stable-s2"].stdout + outputs["stable-s2"].stderr
    assert "params.yaml differs from HEAD" in third and "model.use_gumbel_softmax: committed True, now False" in third
    [line] = [x for x in third.splitlines() if "this run differs from HEAD in:" in x]
    assert "train.seed (42 -> 2)" in line and "use_gumbel_softmax" not in line
    tag = mlflow_tags(repo, "stable-s2")["differs_from_head"]
    assert "train.seed=2" in tag and "augment.seed=2" in tag and "use_gumbel_softmax" not in tag
    validation = json.loads(run(["git", "show", f"{experiment_revs(repo)['stable-s2']}:metrics/params_validation.json"],
                                repo).stdout)
    assert set(validation["differs_from_head"].split(", ")) == set(expected_changes({**TINY, **seeds}, base))
    table = run(EXPERIMENTS + ["diff", "stable-s1", "stable-s2"], repo).stdout
    assert "stable-s1 (1 seed(s)) vs stable-s2 (1 seed(s)), scale tiny" in table and "spread unknown (one seed)" in table


def test_a_cpu_refusal_keeps_the_users_override_and_says_how_to_restore_params(repo):
    """The command this pipeline is for, on a CPU at full scale: refused by the pre-flight, which names the
    cpu-scale run with the override kept; DVC leaves the override in params.yaml, and the message says so."""
    run(["git", "checkout", "--", "params.yaml"], repo)  # (the hand-made runs left their params there)
    failed = run(DVC + ["exp", "run", "-S", "model.hyperlora_init_scale=0.05"], repo, check=False, timeout=1800)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "training refused" in out and "Traceback" not in out
    assert "python -m pipeline.experiments run --scale cpu -S model.hyperlora_init_scale=0.05)" in out
    assert "model.hyperlora_init_scale: committed 0.1, now 0.05" in out and "git checkout -- params.yaml" in out
    assert "hyperlora_init_scale: 0.05" in (repo / "params.yaml").read_text()  # what DVC leaves behind
    run(["git", "checkout", "--", "params.yaml"], repo)


def test_runner_from_a_dirty_workspace_with_a_queue_of_mixed_scales_seeds_and_a_sweep(repo):
    # the user's own experiment, queued: a cut-down stand-in for the cpu scale's stable (names carry the scale)
    mine = ["-S", "data.max_tasks=3", "-S", "augment.samples_per_task=4", "-S", "train.epochs=1",
            "-S", "train.steps_per_epoch=1", "-S", "train.batch_size=2", "-S", "train.heldout_tasks=2",
            "-S", "evaluate.max_tasks=1", "-S", "evaluate.num_color_perms=1"]
    cpu = run(EXPERIMENTS + ["overrides", "stable", "--scale", "cpu"], repo).stdout.split()
    run(DVC + ["exp", "run", "--queue", "-n", "stable_cpu", *cpu, *mine], repo)
    write_params(repo, train__learning_rate=0.001)  # an edit left in the workspace
    lock = (repo / "dvc.lock").read_text()

    out = run(EXPERIMENTS + ["run", "--scale", "tiny", "--seeds", "2", "--queue", "-j", "2",
                             "-S", "model.hyperlora_init_scale=0.05,0.1"], repo, timeout=3600)
    log = out.stderr
    assert "train.learning_rate: committed 0.0005, now 0.001" in log  # restored, and kept in .dvc/tmp
    assert "-S model.hyperlora_init_scale=0.1 is the committed value (HEAD) already" in log and "not run twice" in log
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
    assert (repo / "dvc.lock").read_text() == lock and "the workspace is as before" in log

    # scales are never mixed silently
    refused = run(EXPERIMENTS + ["compare", "stable_tiny", "stable_cpu"], repo, check=False)
    assert refused.returncode != 0 and "different scales (stable_tiny: tiny, stable_cpu: cpu)" in refused.stderr
    which = run(EXPERIMENTS + ["compare", "stable", mine_tiny.removesuffix("_tiny")], repo, check=False)
    assert which.returncode != 0 and "stable ran at the scales cpu, tiny: choose one with --scale" in which.stderr
    table = run(EXPERIMENTS + ["diff", "--scale", "tiny", "stable", mine_tiny.removesuffix("_tiny")], repo).stdout
    assert f"stable_tiny (2 seed(s)) vs {mine_tiny} (2 seed(s)), scale tiny" in table and " ± " in table
    assert "EXEC_" not in run(EXPERIMENTS + ["runs"], repo).stdout


def assert_stable_versus_fixed(repo) -> None:
    """The result itself: stable is HEAD plus the tiny scale, fixed is stable plus its overrides, the two
    measured differently, and the workspace back on HEAD's params.yaml."""
    base = committed(repo)
    assert changed(repo, "HEAD", "stable_tiny") == expected_changes(TINY, base)
    assert changed(repo, "stable_tiny", "fixed_tiny") == expected_changes(FIXED, {**base, **TINY})
    metrics = json.loads(run(DVC + ["metrics", "diff", "stable_tiny", "fixed_tiny", "--json"], repo).stdout)
    assert metrics["metrics/train.json"] and metrics["metrics/gap.json"]
    assert (repo / "params.yaml").read_text() == run(["git", "show", "HEAD:params.yaml"], repo).stdout


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
        return sorted(r for rs in runs.values() for r in rs if r[0] == "stable_tiny")

    assert stable(runs_by_fingerprint(repo)) == sorted([*stable(before), ("stable_tiny", "FINISHED")])  # one more


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
