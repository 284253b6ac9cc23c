"""Outputs that cannot be written: a full disk, a folder without write permission. Every stage ends in
one line naming the output and what to do, with nothing half-written; a checkpoint of known size is
refused before it is written when it does not fit, and the previous one stays and resumes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline import io
from pipeline.arc import read_raw
from pipeline.io import OutputError, atomic_path, ensure_room, write_json
from pipeline.model import RLAN
from pipeline.model.io import save_model
from pipeline.params import load_params
from pipeline.tracking import Tracker
from pipeline.train import checkpoint, loop
from tests.helpers import tiny_workspace, train_cmd
from tests.test_faults import one_error_line, other_stages, stage
from tests.test_tracking import make_read_only, make_writable


@contextlib.contextmanager
def small_disk(path, size: int):
    """A filesystem of `size` bytes mounted at `path` (a tmpfs; root only), to fill up for real."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path) -> None:
    """Fill the filesystem of `path` to the last block."""
    with (path / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


# --- the translation, anywhere ---------------------------------------------------------------------


def test_a_failed_write_becomes_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full)
    with pytest.raises(OutputError) as err:
        write_json(tmp_path / "m" / "eval.json", {"a": 1})
    message = str(err.value)
    assert message.startswith(f"cannot write {tmp_path / 'm' / 'eval.json'}: no space left on the device (")
    assert "free space there" in message and "\n" not in message
    assert list((tmp_path / "m").iterdir()) == []  # the temporary file is gone too

    monkeypatch.undo()
    with pytest.raises(OSError) as other:  # an error that is not about room or permission stays as it is
        with atomic_path(tmp_path / "x"):
            raise OSError(errno.EIO, "I/O error")
    assert other.value.errno == errno.EIO


def test_room_is_checked_before_a_file_of_known_size(tmp_path, monkeypatch):
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(OutputError, match="it needs 2,000 bytes and .* has 5,000 bytes free; free space there"):
        ensure_room(tmp_path / "last.pt", 2000)
    assert not (tmp_path / "last.pt").exists()


# --- stages ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("disk"), tracking__required=False, tracking__timeout_s=2)


@pytest.mark.slow
def test_metrics_folder_not_writable(ws, tmp_path):
    """prepare with its metrics folder read-only (chattr +i as root, chmod otherwise)."""
    source = tmp_path / "tasks.json"
    source.write_text('{"train": {"t1": {"train": [{"input": [[1]], "output": [[2]]}], '
                      '"test": [{"input": [[1]], "output": [[2]]}]}}}')
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    if not make_read_only(metrics):
        pytest.skip("cannot make a folder read-only here")
    try:
        proc = stage([sys.executable, "-m", "stages.prepare", "--params", str(ws["params"]), "--out",
                      str(tmp_path / "raw"), "--metrics", str(metrics / "prepare.json"), "--input", str(source)])
    finally:
        make_writable(metrics)
    line = one_error_line(proc)
    assert f"cannot write {metrics / 'prepare.json'}: " in line and f"make {metrics} writable" in line
    assert list(metrics.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_in_evaluate(ws, tmp_path):
    save_model(tmp_path / "model.pt", RLAN(load_params(ws["params"]).model), {"temperature": 0.5, "epochs": 1})
    out = tmp_path / "out"
    with small_disk(out, 1 << 20):
        fill(out)
        cmd = other_stages(ws, out)[0]
        cmd[cmd.index("--model") + 1] = str(tmp_path / "model.pt")
        proc = stage(cmd, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # not required: runs without MLflow
        line = one_error_line(proc)
        assert f"cannot write {out / 'eval.json'}: no space left on the device (" in line
        assert sorted(p.name for p in out.iterdir()) == ["filler"]  # nothing half-written
        (out / "filler").unlink()  # room again: the same command succeeds
        again = stage(cmd, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
        assert again.returncode == 0, again.stderr[-3000:]
        assert (out / "eval.json").is_file() and (out / "s.json").is_file()


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_stops_training_and_the_last_one_resumes(tmp_path):
    ws = tiny_workspace(tmp_path / "ws", train__epochs=2)
    params = load_params(ws["params"]).override({"train.epochs": 1})
    probe = tmp_path / "probe"  # the size of this training's checkpoint, measured
    loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), loop.TrainPaths(
        ws["cache"], probe / "ckpt", probe / "model.pt", probe / "train.json", probe / "plots"), Tracker(params, False))
    size = next((probe / "ckpt").glob(f"*/{checkpoint.LAST}")).stat().st_size
    out = tmp_path / "out"
    ckpt = out / "ckpt"  # the store; the training's checkpoint goes to ckpt/<fingerprint>/
    with small_disk(ckpt, size + io.ROOM_MARGIN + (64 << 10)):  # room for one checkpoint and the margin, not two
        proc = stage(train_cmd(ws, out))
        line = one_error_line(proc)
        [folder] = [p.parent for p in ckpt.glob(f"*/{checkpoint.MANIFEST}")]
        assert f"cannot write {folder / 'last.pt'}: it needs " in line and f"and {ckpt} has " in line
        assert "free space there" in line and "unexpected pos" not in proc.stderr
        checkpoint.verify(folder)  # the first epoch's checkpoint is whole
        kept = shutil.copytree(folder, tmp_path / "kept")
    assert torch.load(kept / "last.pt", weights_only=True)["epoch"] == 1
    shutil.move(kept, folder)  # the small disk is gone, its checkpoint kept: room again, training resumes
    done = stage(train_cmd(ws, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming this training" in done.stderr and "after epoch 1 of 2" in done.stderr
    assert os.path.exists(out / "model.pt")
