"""Stable versus fixed as named DVC experiments, at tiny scale, with the real dvc commands."""

from __future__ import annotations

import json
import re
import sqlite3
import sys

import pytest

from pipeline.experiments import EXPERIMENTS, FIXED, distance, set_args
from pipeline.rules import check_rules
from tests.helpers import TINY_MODEL, TINY_TRAIN, commit_all, copy_repo, params_with, run, write_params

DVC = [sys.executable, "-m", "dvc"]
TINY = {**TINY_MODEL, **TINY_TRAIN, "data__max_tasks": 3, "augment__samples_per_task": 8, "evaluate__max_tasks": 2,
        "evaluate__batch_size": 64, "evaluate__device": "cpu"}


def test_fixed_configuration_is_valid_and_is_the_seeds():
    p = params_with().override(FIXED)
    assert not [v for v in check_rules(p) if v.severity == "error"]
    assert not p.model.use_gumbel_softmax and p.model.task_conditioned_clues
    assert p.train.temperature_start == p.train.temperature_end == 0.5
    assert p.train.entropy_on_raw_logits and p.train.lambda_kl_consistency == 0.1 and p.train.eval_every == 1
    assert EXPERIMENTS["stable"] == {}
    assert set_args({"a.b": False, "c": 0.5}) == ["-S", "a.b=false", "-S", "c=0.5"]


def test_gap_distance():
    assert distance("loss_ratio", 2.0) == distance("loss_ratio", 0.5)
    assert distance("exact_match_gap", -0.1) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("exp"))
    write_params(repo, **TINY)
    commit_all(repo, "tiny params")
    run(DVC + ["repro"], repo)
    commit_all(repo, "baseline outputs")
    return repo


@pytest.mark.e2e
def test_stable_and_fixed_queued_in_parallel_then_compared(repo):
    run([sys.executable, "-m", "pipeline.experiments", "run", "--queue", "-j", "2"], repo, timeout=900)
    assert {"stable", "fixed"} <= set(run(DVC + ["exp", "list", "--name-only"], repo).stdout.split())

    # both queued runs logged to the one MLflow store of the main repository, named after the experiments
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = dict(db.execute("select name, status from runs where name in ('stable', 'fixed')"))
    assert runs == {"stable": "FINISHED", "fixed": "FINISHED"}

    diff = json.loads(run(DVC + ["metrics", "diff", "stable", "fixed", "--all", "--json"], repo).stdout)
    gap = diff["metrics/gap.json"]
    for view in ("training", "evaluation"):
        assert {f"{view}.{m}" for m in ("exact_match_gap", "attention_entropy_ratio", "stop_value_gap",
                                        "loss_ratio", "status")} <= set(gap)
    assert "overall_status" in gap
    # Gumbel noise in training mode only: the stable configuration's train/eval entropy ratio differs
    assert gap["training.attention_entropy_ratio"]["old"] != gap["training.attention_entropy_ratio"]["new"]
    kl = diff["metrics/train.json"]["loss_kl"]
    assert kl["old"] > 0 and kl["new"] == 0  # no Gumbel noise in the fixed configuration: nothing for KL to see

    params = json.loads(run(DVC + ["params", "diff", "stable", "fixed", "--json"], repo).stdout)["params.yaml"]
    assert (params["model.use_gumbel_softmax"]["old"], params["model.use_gumbel_softmax"]["new"]) == (True, False)
    assert (params["train.temperature_start"]["old"], params["train.temperature_start"]["new"]) == (1.0, 0.5)

    run(DVC + ["plots", "diff", "stable", "fixed", "-o", "plots_diff"], repo)
    assert (repo / "plots_diff" / "index.html").exists()

    report = run([sys.executable, "-m", "pipeline.experiments", "compare", "stable", "fixed"], repo).stdout
    assert "| gap | stable | fixed | smaller gap |" in report
    assert len(re.findall(r"^- (training|evaluation): (exact_match_gap|exact_match_relative_gap|"
                          r"attention_entropy_ratio|stop_value_gap|loss_ratio): ", report, flags=re.M)) == 10
    assert (repo / "metrics/compare/attention_entropy.png").exists()


@pytest.mark.e2e
def test_single_override_from_a_fresh_clone(repo, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    out = run(DVC + ["exp", "run", "-S", "model.hyperlora_init_scale=0.05"], clone, timeout=900).stdout
    assert "Running stage 'gap_report'" in out
    before = json.loads((repo / "metrics/params_validation.json").read_text())["warnings"]
    assert json.loads((clone / "metrics/params_validation.json").read_text())["warnings"] == before + 1  # init scale
