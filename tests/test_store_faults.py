"""The MLflow store failing after the check before compute: a tracking server killed mid-training (its
calls are kept and sent when it is back), bounded retries of every call, and the store check's
artifact folder and locked database."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from pipeline import tracking
from pipeline.params import load_params
from pipeline.tracking.client import BoundedClient, TrackingLost, buffer_dir, connect
from tests.helpers import REPO, params_with, tiny_workspace, tool_env, train_cmd
from tests.test_faults import one_error_line, stage
from tests.test_tracking import make_read_only, make_writable


@pytest.fixture(autouse=True)
def no_outside_store(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE"):
        monkeypatch.delenv(k, raising=False)


# --- bounded calls ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_call_gives_up_after_retry_s_and_logging_calls_are_kept(tmp_path):
    from mlflow.entities import Metric

    p = params_with(tracking__timeout_s=2, tracking__retry_s=2).tracking
    client = BoundedClient("http://127.0.0.1:9", p, tmp_path / "buffer")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(TrackingLost) as err:
        client.get_run("0" * 32)
    assert 1.5 < time.perf_counter() - t0 < 10  # MLflow's own retries took 256 s per call
    assert str(err.value).startswith("MLflow store http://127.0.0.1:9 is lost (Connection refused; retried for 2 s")
    t0 = time.perf_counter()
    for step in range(3):  # known lost: kept at once, no waiting
        client.log_batch("r1", metrics=[Metric("loss", 1.0 / (step + 1), 0, step)])
    client.set_terminated("r1", status="FAILED")
    assert time.perf_counter() - t0 < 1
    [kept] = (tmp_path / "buffer").glob(f"r1.{os.getpid()}.jsonl")
    assert len(kept.read_text().splitlines()) == 4 and client.kept == 4
    with pytest.raises(TrackingLost, match="4 logging call\\(s\\) are kept in"):
        client.log_artifact("r1", str(REPO / "params.yaml"))


@pytest.mark.slow
def test_kept_calls_of_a_process_that_ended_are_sent_into_their_run(tmp_path):
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = params_with(tracking__tracking_uri=uri).tracking
    store = mlflow.MlflowClient(uri)
    run_id = store.create_run(tracking.prepare_store(uri, "rlan")).info.run_id
    folder = buffer_dir(tmp_path, uri)  # one folder per store
    lost = BoundedClient(uri, p, folder)
    lost.lost, lost._lost_at = "Connection refused", time.monotonic()  # as after a call that failed for retry_s
    lost.log_batch(run_id, metrics=[Metric("loss", 0.5, 0, 2)])
    lost.set_terminated(run_id, status="FAILED")
    [kept] = folder.glob("*.jsonl")
    assert store.get_run(run_id).info.status == "RUNNING"
    connect(uri, p, tmp_path)  # this process is alive: what it keeps is its own to send
    assert kept.exists()
    kept.rename(folder / f"{run_id}.999999999.jsonl")  # kept by a process that is gone

    connect(uri, p, tmp_path)  # the next stage that uses the store
    assert not list(folder.iterdir())
    assert store.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in store.get_metric_history(run_id, "loss")] == [2]


# --- the store check before any compute ------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("store"), train__epochs=1, tracking__timeout_s=2)


@pytest.mark.slow
def test_unwritable_artifact_folder_stops_training_before_compute(ws, tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracking.prepare_store(uri, "rlan")
    folder = tmp_path / "mlruns" / "rlan"
    folder.mkdir(parents=True)
    if not make_read_only(folder):
        pytest.skip("cannot make a folder read-only here")
    try:
        line = one_error_line(stage(train_cmd(ws, tmp_path / "out"), {"MLFLOW_TRACKING_URI": uri}))
    finally:
        make_writable(folder)
    assert f"MLflow artifact folder {folder} cannot be written" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_database_locked_longer_than_timeout_s_stops_training_before_compute(ws, tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracking.prepare_store(uri, "rlan")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's transaction that does not end
    try:
        t0 = time.perf_counter()
        line = one_error_line(stage(train_cmd(ws, tmp_path / "out"), {"MLFLOW_TRACKING_URI": uri}))
        took = time.perf_counter() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert f"MLflow store {db} is locked by another process for more than 2 s" in line and took < 60
    assert not (tmp_path / "out").exists()


# --- a tracking server lost mid-training -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(root, port) -> subprocess.Popen:
    """`mlflow server` on loopback, its store in `root`; returns once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=root, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                mlflow.MlflowClient(f"http://127.0.0.1:{port}").search_experiments()  # its store is ready too
                return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _kill(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_server_killed_after_the_first_epoch(tmp_path):
    """Training goes on with its metrics kept; the stage ends in one line, without minutes of retries;
    with the server back, the next run sends the kept metrics into the run and registers the model."""
    ws = tiny_workspace(tmp_path / "ws", train__epochs=5, tracking__timeout_s=10, tracking__retry_s=3)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**tool_env(), "MLFLOW_TRACKING_URI": uri, "DVC_ROOT": str(tmp_path)}  # DVC_ROOT: where calls are kept
    out = tmp_path / "out"
    server = _server(tmp_path, port)
    try:
        proc = subprocess.Popen(train_cmd(ws, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not list((out / "ckpt").glob("*/manifest.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        _kill(server)  # after epoch 1: its metrics were sent, its checkpoint saved
        t_kill = time.perf_counter()
        _, err = proc.communicate(timeout=600)
        after_kill = time.perf_counter() - t_kill
    finally:
        if server.poll() is None:
            _kill(server)
    errors = [x for x in err.splitlines() if " ERROR " in x]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err[-4000:]
    assert f"MLflow store {uri} is lost (Connection refused; retried for 3 s, tracking.retry_s)" in errors[0]
    assert "the training itself finished and its checkpoint is saved" in errors[0]
    assert "logging calls are kept in" in err  # the warning when it was lost, training went on
    assert after_kill < 120  # was 512 s of retries
    assert (out / "model.pt").exists() and len((out / "plots" / "epochs.tsv").read_text().splitlines()) == 6
    kept = list((tmp_path / ".dvc" / "tmp" / "mlflow-buffer").rglob("*.jsonl"))
    assert len(kept) == 1
    lost_run = kept[0].name.split(".")[0]

    server = _server(tmp_path, port)  # the server is back
    try:
        done = subprocess.run(train_cmd(ws, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert f"into run {lost_run}" in done.stderr and not list(kept[0].parent.iterdir())
        client = mlflow.MlflowClient(uri)
        run = client.get_run(lost_run)
        assert run.info.status == "FAILED"
        assert sorted(m.step for m in client.get_metric_history(lost_run, "loss_total")) == [1, 2, 3, 4, 5]
        version = client.get_model_version_by_alias("rlan", "workspace")
        assert version.run_id != lost_run and client.get_run(version.run_id).info.status == "FINISHED"
        assert load_params(ws["params"]).tracking.retry_s == 3
    finally:
        _kill(server)


# --- a deleted store -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_deleted_store_is_replaced_with_a_warning_naming_the_earlier_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare = [sys.executable, "-c", f"from pipeline import tracking; tracking.prepare_store({uri!r}, 'rlan')"]
    first = subprocess.run(prepare, cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "deleted or replaced" not in first.stderr  # a first store: nothing to say
    run_id = mlflow.MlflowClient(uri).create_run(tracking.prepare_store(uri, "rlan")).info.run_id
    mlflow.MlflowClient(uri).log_artifact(run_id, str(REPO / "params.yaml"))
    (tmp_path / "mlflow.db").unlink()  # another process (MLflow keeps this one's database open)
    again = subprocess.run(prepare, cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (f"MLflow store {tmp_path / 'mlflow.db'} has no experiment rlan, but its artifact folder "
            f"{tmp_path / 'mlruns' / 'rlan'} holds the artifacts of 1 earlier run(s): the store was deleted or replaced"
            in again.stderr.replace("\n", " ")), again.stderr
