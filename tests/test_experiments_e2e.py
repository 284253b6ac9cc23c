"""The named experiments end to end, with the real dvc commands at the tiny scale: seed repeats made by
hand in the workspace, a CPU refusal before any training that leaves params.yaml as it was and names the
user's overrides, the runner interrupted and resumed, and your own experiment reusing the baseline.
(The queue of mixed scales: tests/test_queue_e2e.py; `make run`: tests/test_make_run_e2e.py.)"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time

import pytest
import torch
import yaml

from pipeline.experiments.runner import FIXED, SCALES, expected_changes, experiment_revs
from pipeline.params import flatten
from tests.helpers import (
    checkpoint_in_progress,
    commit_all,
    copy_repo,
    interrupt_when,
    run,
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


@pytest.mark.long
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
    rev = experiment_revs(repo)["stable-s2"]
    validation = json.loads(run(["git", "show", f"{rev}:metrics/params_validation.json"], repo).stdout)
    assert validation["keys_differing_from_head"] == len(expected_changes({**TINY, **seeds}, base))
    report = run(["git", "show", f"{rev}:metrics/params_validation.md"], repo).stdout
    [line] = [x for x in report.splitlines() if x.startswith("Differs from HEAD: ")]
    assert {c.strip("`.").split("=")[0] for c in line.removeprefix("Differs from HEAD: ").split(", ")} == \
        set(expected_changes({**TINY, **seeds}, base))
    table = run(EXPERIMENTS + ["diff", "stable-s1", "stable-s2"], repo).stdout
    assert "stable-s1 (1 seed(s)) vs stable-s2 (1 seed(s)), scale tiny" in table and "spread unknown (one seed)" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full scale runs on a GPU: nothing to refuse")
@pytest.mark.parametrize("value", ["0.05", "0.1"])  # an override, and the committed value (changes nothing)
def test_a_cpu_refusal_comes_before_any_training_and_leaves_params_as_they_were(repo, value):
    """The command this pipeline is for, on a CPU at full scale: the data stages run, then the train
    stage refuses it before training, naming the cpu-scale run with the user's override and each -S;
    DVC's rewrite of params.yaml is undone, no model or training metrics are left."""
    run(["git", "checkout", "--", "params.yaml"], repo)  # (the hand-made runs left their params there)
    before = (repo / "params.yaml").read_bytes()
    started = time.monotonic()
    failed = run(DVC + ["exp", "run", "-S", f"model.hyperlora_init_scale={value}"], repo, check=False, timeout=600)
    took = time.monotonic() - started
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "training refused before it starts" in out, out
    assert "Running stage 'train'" in out and "pipeline.train.loop" not in out and "Traceback" not in out
    if value == "0.05":
        assert "python -m pipeline.experiments run --scale cpu -S model.hyperlora_init_scale=0.05)" in out
        assert "your overrides: -S model.hyperlora_init_scale=0.05\n" in out
    else:
        assert "your overrides: -S model.hyperlora_init_scale=0.1 (HEAD's value already: it changes nothing)" in out
    assert "params.yaml is HEAD's again" in out
    assert (repo / "params.yaml").read_bytes() == before
    assert not (repo / "models" / "model.pt").exists() and not (repo / "metrics" / "train.json").exists()
    print(f"refused in {took:.1f} s")


def assert_stable_versus_fixed(repo) -> None:
    """The result itself: stable is HEAD plus the tiny scale, fixed is stable plus its overrides, the two
    measured differently, and the workspace back on HEAD's params.yaml."""
    base = committed(repo)
    assert changed(repo, "HEAD", "stable_tiny") == expected_changes(TINY, base)
    assert changed(repo, "stable_tiny", "fixed_tiny") == expected_changes(FIXED, {**base, **TINY})
    metrics = json.loads(run(DVC + ["metrics", "diff", "stable_tiny", "fixed_tiny", "--json"], repo).stdout)
    assert set(metrics) == {"metrics/summary.json"} and "entropy_ratio" in metrics["metrics/summary.json"]
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


def test_your_own_experiment_reuses_the_baseline_and_a_committed_value_runs_nothing(repo):
    """stable_tiny (same HEAD, code, scale, seed and params) is kept, not trained again, beside your own
    experiment; a -S of the committed value runs nothing; the runner prints no DVC hash warning."""
    if "stable_tiny" not in experiment_revs(repo):
        run(EXPERIMENTS + ["run", "--scale", "tiny", "stable"], repo, timeout=1200)
    stable = experiment_revs(repo)["stable_tiny"]
    same = run(EXPERIMENTS + ["run", "--scale", "tiny", "-S", "model.hyperlora_init_scale=0.1"], repo)
    out = same.stdout + same.stderr
    assert "-S model.hyperlora_init_scale=0.1 is the committed value (HEAD) already: it changes nothing" in out
    assert "nothing to run" in out and "Running stage" not in out
    own = run(EXPERIMENTS + ["run", "--scale", "tiny", "-S", "model.hyperlora_init_scale=0.2"], repo, timeout=1200)
    out = own.stdout + own.stderr
    assert "stable_tiny: reusing the finished experiment of HEAD" in out
    assert "running experiment stable_tiny" not in out and "running experiment hyperlora_init_scale=0.2_tiny" in out
    assert out.count("Running stage 'train'") == 1
    revs = experiment_revs(repo)
    assert revs["stable_tiny"] == stable and "hyperlora_init_scale=0.2_tiny" in revs
    assert changed(repo, "stable_tiny", "hyperlora_init_scale=0.2_tiny") == {"model.hyperlora_init_scale": 0.2}
    assert "No file hash info found" not in out and "It won't be created" not in out
