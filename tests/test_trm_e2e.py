"""TRM end to end beside RLAN: the `trm` experiment runs through the same DVC stages (`dvc exp run`
at the tiny scale), votes over the cached versions, reports its gaps, logs its own measures and its
model to MLflow (registered as `trm`), `compare` shows it beside stable fairly (what TRM does not
measure counts in no status), and DVC's metrics views and the experiments table stay readable."""

from __future__ import annotations

import io
import json
import sqlite3
import sys

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from dvc.api import DVCFileSystem

from pipeline.experiments.compare import read_at
from pipeline.experiments.runner import SCALES, experiment_revs
from pipeline.loader import AugmentedCache
from pipeline.params import flatten
from pipeline.tracking import using_tracking_uri
from tests.helpers import commit_all, copy_repo, run

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
EXPERIMENTS = [sys.executable, "-m", "pipeline.experiments"]


def show(repo, rev: str, path: str) -> str:
    """A file of an experiment commit: in git, or (outputs, metrics) in DVC's cache by its dvc.lock."""
    return read_at(rev, path, repo)


def test_trm_experiment_beside_stable(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    commit_all(repo, "baseline")
    run(EXPERIMENTS + ["run", "--scale", "tiny", "stable", "trm"], repo, timeout=3000)
    revs = experiment_revs(repo)
    diff = json.loads(run(DVC + ["params", "diff", "stable_tiny", "trm_tiny", "--json"], repo).stdout)["params.yaml"]
    assert {k: d["new"] for k, d in diff.items()} == {"model.family": "trm", "evaluate.views": "cache"}

    # the same train, evaluate and gap_report stages, TRM's measures in place of the DSC's
    series = pd.read_csv(io.StringIO(show(repo, revs["trm_tiny"], "metrics/train/epochs.tsv")), sep="\t")
    assert {"halt_steps", "q_halt_accuracy", "loss_q_halt", "heldout_exact_match"} <= set(series.columns)
    assert "lora_diversity" not in series.columns and len(series) == SCALES["tiny"].overrides["train.epochs"]
    assert series["halt_steps"].between(1, SCALES["tiny"].overrides["trm.halt_max_steps"]).all()
    evaluation = json.loads(show(repo, revs["trm_tiny"], "metrics/eval.json"))
    base = flatten(yaml.safe_load(show(repo, revs["trm_tiny"], "params.yaml")))
    versions = base["augment.samples_per_task"]
    for side in ("train", "eval"):  # every cached version of every test input voted
        assert evaluation[side]["views"] == versions * evaluation[side]["test_inputs"]
        assert "halt_steps" in evaluation[side] and "attention_entropy" not in evaluation[side]
    gap = json.loads(show(repo, revs["trm_tiny"], "metrics/gap.json"))
    assert {"exact_match_gap", "loss_ratio"} <= set(gap["evaluation"]) and "stop_value_gap" not in gap["evaluation"]
    stable = json.loads(show(repo, revs["stable_tiny"], "metrics/eval.json"))
    assert stable["eval"]["views"] == 32 * stable["eval"]["test_inputs"]  # RLAN unchanged: fresh views

    # MLflow: TRM's own measures beside the shared ones, and its model behind one tensor
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = dict(db.execute("select name, status from runs"))
        logged = {k for (k,) in db.execute("select distinct m.key from metrics m join runs r on m.run_uuid = "
                                           "r.run_uuid where r.name = 'trm_tiny'")}
    assert runs["trm_tiny"] == runs["stable_tiny"] == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    [trm_run] = client.search_runs([client.get_experiment_by_name("rlan").experiment_id], "attributes.run_name = 'trm_tiny'")
    assert "gap_report/halting.png" in {a.path for a in client.list_artifacts(trm_run.info.run_id, "gap_report")}
    assert {"halt_steps", "q_halt_accuracy", "halt_steps_eval", "train_exact_match", "eval.pass_at_1",
            "eval.halt_steps", "gap.evaluation.exact_match_gap"} <= logged
    with using_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}"):
        model = mlflow.pytorch.load_model("models:/trm@trm_tiny")  # its family's registered model
        assert mlflow.pytorch.load_model("models:/rlan@stable_tiny") is not None
        assert [v.tags["dvc_exp_name"] for v in client.search_model_versions("name = 'rlan'")] == ["stable_tiny"]
    DVCFileSystem(str(repo), rev=revs["trm_tiny"]).get("data/cache", str(tmp_path / "cache"), recursive=True)
    inputs, _ = AugmentedCache(tmp_path / "cache").pair_canvases([0, 1])
    rows = torch.cat([torch.tensor([[1], [1]]), inputs.flatten(1).long()], 1)  # sample 0's first two pairs
    assert model(rows).shape == (2, 12, 30, 30)

    report = run(EXPERIMENTS + ["compare", "stable", "trm"], repo).stdout
    assert "| gap | stable_tiny | trm_tiny | closest to no gap |" in report
    stop = next(line for line in report.splitlines() if line.startswith("| evaluation: stop_value_gap |"))
    assert stop.endswith("| not measured | not compared (not measured by trm_tiny) |")  # TRM has no DSC
    assert "| eval.halt_steps | not measured |" in report and "| eval.attention_entropy |" in report
    assert "| status over the measures every group has |" in report and "overall status" not in report
    assert " ± " not in report.split("## trm_tiny against stable_tiny")[1]  # one seed each; statuses never averaged
    curves = report.split("## Curves")[1]
    assert "not drawn: attention_entropy_eval" in curves and "lora.png" not in curves and "loo.png" not in curves

    # DVC's own views: numbers only in every metrics file, lines a terminal can show
    for rev in (revs["stable_tiny"], revs["trm_tiny"]):
        for path in ("metrics/params_validation.json", "metrics/prepare.json", "metrics/augment.json",
                     "metrics/train.json", "metrics/eval.json", "metrics/gap.json", "metrics/summary.json"):
            leaves = flatten(json.loads(show(repo, rev, path)))
            assert all(isinstance(v, (int, float)) for v in leaves.values()), (path, leaves)
    diff = ["metrics", "diff", "stable_tiny", "trm_tiny"]
    for args in (diff, [*diff, "--md"]):
        out = run(DVC + args, repo).stdout
        assert "entropy_ratio" in out and "status" in out and max(map(len, out.splitlines())) <= 120, args
    table = run(EXPERIMENTS + ["table"], repo).stdout
    assert max(map(len, table.splitlines())) <= 100
    assert [line.split()[:3] for line in table.splitlines()[1:3]] == [["stable_tiny", "tiny", "42"],
                                                                       ["trm_tiny", "tiny", "42"]]
    for name in ("stable_tiny", "trm_tiny"):  # `dvc metrics show` reads the workspace: one row, the headline
        run(DVC + ["exp", "apply", name], repo)
        for args in (["metrics", "show"], ["metrics", "show", "--md"]):
            shown = run(DVC + args, repo).stdout
            assert "metrics/summary.json" in shown and max(map(len, shown.splitlines())) <= 120, (name, args)
    assert "entropy_ratio" not in shown  # TRM has no DSC: the column is not there, no number made up
