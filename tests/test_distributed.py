"""torch.distributed on the CPU (gloo, 2 processes via torchrun): training matches one process with
the same effective batch, evaluation matches exactly, a failing rank stops the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from pipeline.model.io import load_model
from tests.helpers import (
    REPO,
    TINY_MODEL,
    TINY_TRAIN,
    checkpoint_of,
    tiny_workspace,
    tool_env,
    train_cmd,
    write_params,
)

pytestmark = pytest.mark.e2e

# Two micro-batches per optimizer step: one process runs both, or two processes one each.
SETTINGS = dict(train__epochs=3, train__grad_accumulation_steps=2, train__dist_timeout_s=60,
                evaluate__max_tasks=3, evaluate__batch_size=24, evaluate__device="cpu")
# Only the order of float sums differs between one process and two: 1e-4 relative or 1e-5 absolute
# (the absolute part for quantities near 0 that come from differences, such as lora_diversity).
TOLERANCE = dict(rel=1e-4, abs=1e-5, nan_ok=True)  # NaN: a term not computed in that epoch


def _stage(cmd, env_extra=None, timeout=600):
    env = {**tool_env(), **(env_extra or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _with_procs(ws, n, port):
    write_params(ws["root"], **{**ws["settings"], "train__nproc_per_node": n, "train__rdzv_endpoint": f"localhost:{port}"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    w = tiny_workspace(root, **SETTINGS)
    w["settings"] = {**TINY_MODEL, **TINY_TRAIN, "tracking__tracking_uri": f"sqlite:///{root / 'mlflow.db'}", **SETTINGS}
    return w


def test_two_processes_train_like_one(ws, tmp_path):
    _with_procs(ws, 1, 29611)
    one = _stage(train_cmd(ws, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    _with_procs(ws, 2, 29612)
    two = _stage(train_cmd(ws, tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "launching 2 processes" in two.stderr and "backend gloo" in two.stderr
    a = pd.read_csv(tmp_path / "one/plots/epochs.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "two/plots/epochs.tsv", sep="\t")
    for col in ("loss_total", "loss_task", "loss_loo", "train_pixel_accuracy", "heldout_loss"):
        assert b[col].tolist() == pytest.approx(a[col].tolist(), **TOLERANCE), col
    ma, _ = load_model(tmp_path / "one/model.pt")
    mb, _ = load_model(tmp_path / "two/model.pt")
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5), k


def test_resume_on_another_world_size(ws, tmp_path):
    _with_procs(ws, 1, 29621)
    straight = _stage(train_cmd(ws, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    _with_procs(ws, 2, 29622)
    proc = subprocess.Popen(train_cmd(ws, tmp_path / "b"), cwd=REPO, env=tool_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = checkpoint_of(ws, tmp_path / "b/ckpt") / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _with_procs(ws, 1, 29623)
    resumed = _stage(train_cmd(ws, tmp_path / "b"))
    assert resumed.returncode == 0 and "resuming this training" in resumed.stderr, resumed.stderr
    a = json.loads((tmp_path / "a/train.json").read_text())
    b = json.loads((tmp_path / "b/train.json").read_text())
    assert {k: v for k, v in b.items() if v is not None} == pytest.approx(
        {k: v for k, v in a.items() if v is not None}, **TOLERANCE)


def _evaluate(ws, out, n, port):
    _with_procs(ws, n, port)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "stages.evaluate", "--params", str(ws["params"]), "--model", str(ws["model"]),
           "--raw", str(ws["raw"]), "--cache", str(ws["cache"]), "--metrics", str(out / "eval.json"), "--tasks-table", str(out / "tasks.csv"),
           "--submission", str(out / "submission.json"), "--candidates", str(out / "candidates.json")]
    return _stage(cmd)


def test_two_processes_evaluate_exactly_like_one(ws, tmp_path):
    from pipeline.model import RLAN
    from pipeline.model.io import save_model
    from pipeline.params import load_params

    torch.manual_seed(0)
    ws["model"] = tmp_path / "model.pt"
    save_model(ws["model"], RLAN(load_params(ws["params"]).model), {"temperature": 0.5, "epochs": 0})
    one = _evaluate(ws, tmp_path / "one", 1, 29631)
    two = _evaluate(ws, tmp_path / "two", 2, 29632)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert "launching 2 processes" in two.stderr
    for f in ("eval.json", "tasks.csv", "submission.json", "candidates.json"):
        assert (tmp_path / "one" / f).read_text() == (tmp_path / "two" / f).read_text(), f
    assert json.loads((tmp_path / "two/eval.json").read_text())["eval"]["views"] >= 3 * 32


def test_a_failing_rank_stops_the_job(ws, tmp_path):
    _with_procs(ws, 2, 29641)
    t0 = time.time()
    proc = _stage(train_cmd(ws, tmp_path / "f"), env_extra={"PIPELINE_FAULT_RANK": "1"}, timeout=300)
    assert proc.returncode != 0
    assert "rank 1: failure injected" in proc.stderr
    assert time.time() - t0 < 120
    assert not (tmp_path / "f/model.pt").exists()
