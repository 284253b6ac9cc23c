"""File integrity (digests and manifests), verified checkpoints, atomic writes that clean up after
killed writers, and input files that are not UTF-8."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from pipeline import integrity
from pipeline.arc import TaskError, load_path
from pipeline.io import atomic_path, remove_stale_siblings, write_text
from pipeline.model.io import ModelFileError
from pipeline.train import checkpoint


def test_digest_is_sha256_over_16_mib_blocks(tmp_path):
    block = integrity.BLOCK
    data = bytes(range(256)) * (block // 256) + b"tail"  # one whole block and 4 bytes
    (tmp_path / "f").write_bytes(data)
    expected = hashlib.sha256(hashlib.sha256(data[:block]).digest() + hashlib.sha256(data[block:]).digest())
    assert integrity.digest(tmp_path / "f") == expected.hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert integrity.digest(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    assert integrity.file_md5(tmp_path / "f") == hashlib.md5(data).hexdigest()


def test_problem_names_missing_truncated_and_changed(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    record = integrity.describe(f)
    assert integrity.problem(f, record) is None
    f.write_bytes(b"0123456780")
    assert "changed in place" in integrity.problem(f, record)
    f.write_bytes(b"01234")
    assert "5 bytes, its manifest records 10" in integrity.problem(f, record)
    f.unlink()
    assert integrity.problem(f, record) == "missing"
    with pytest.raises(integrity.IntegrityError, match=f"^{tmp_path / 'f'}: missing; do this$"):
        integrity.verify(tmp_path, {"f": record}, "do this")


def _state(value: float) -> dict:
    return {"fingerprint": "fp", "epoch": 1, "step": 0, "weights": torch.full((1000,), value)}


@pytest.mark.parametrize("damage", ["in_place", "truncated"])
def test_damaged_checkpoint_is_named_with_how_to_start_afresh(tmp_path, damage):
    path = checkpoint.save(tmp_path / "ckpt", _state(1.0), {})
    assert checkpoint.load_resumable(tmp_path / "ckpt", "fp")["weights"][0] == 1.0
    data = bytearray(path.read_bytes())
    if damage == "in_place":
        data[-100] ^= 0xFF
    path.write_bytes(data if damage == "in_place" else data[:-10])
    with pytest.raises(ModelFileError) as err:
        checkpoint.load_resumable(tmp_path / "ckpt", "fp")
    message = str(err.value)
    assert message.startswith(f"{path}: corrupt: ") and f"delete {tmp_path / 'ckpt'}" in message
    assert "weights_only" not in message and "\n" not in message


def test_checkpoint_killed_while_being_replaced_still_verifies(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, _state(1.0), {"epoch": 1})

    real_replace = os.replace

    def killed_before_renaming_the_checkpoint(src, dst):  # the manifest is written, the new file not in place
        if os.path.basename(dst) == checkpoint.LAST:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_renaming_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(ckpt, _state(2.0), {"epoch": 2})
    monkeypatch.undo()
    assert len(integrity_records(ckpt)) == 2  # old and new accepted while the file is replaced
    assert checkpoint.load_resumable(ckpt, "fp")["weights"][0] == 1.0  # the old one, still valid
    assert checkpoint.about(ckpt)["epoch"] == 1  # and described as such (a stop's message reads it)
    checkpoint.save(ckpt, _state(3.0), {})
    assert checkpoint.load_resumable(ckpt, "fp")["weights"][0] == 3.0
    assert len(integrity_records(ckpt)) == 1


def integrity_records(ckpt):
    import json

    return json.loads((ckpt / checkpoint.MANIFEST).read_text())[checkpoint.LAST]


def test_garbage_checkpoint_without_manifest_is_one_clear_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFileError) as err:
        checkpoint.load_resumable(tmp_path / "ckpt", "fp")
    assert "last.pt: corrupt" in str(err.value) and "weights_only" not in str(err.value)
    assert "delete" in str(err.value) and "\n" not in str(err.value)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_removes_only_stale_siblings_of_its_own_path(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f"out.json.tmp-{dead}-0123abcd", tmp_path / "out.json.tmp-0123abcd"]
    kept = [tmp_path / f"out.json.tmp-{os.getpid()}-0123abcd",  # a writer still running
            tmp_path / f"out.jsonl.tmp-{dead}-0123abcd",  # another path's
            tmp_path / "out.json.tmp-notours"]  # not a name atomic_path makes
    for f in stale + kept:
        f.write_text("partial")
    write_text(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
    assert remove_stale_siblings(tmp_path / "out.json") == []


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "d") as tmp:
        tmp.mkdir()
        raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []


def test_non_utf8_input_is_bad_input_not_a_traceback(tmp_path):
    (tmp_path / "tasks.json").write_bytes(b'{"train": {"t\xff": {}}}')
    with pytest.raises(TaskError, match=r"tasks.json: not UTF-8 text \(byte 0xff at offset 13\)"):
        load_path(tmp_path / "tasks.json")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "t1.json").write_bytes(b"\xfe\xff\x00{")  # a UTF-16 byte order mark, then garbage
    with pytest.raises(TaskError, match="t1.json: not"):
        load_path(tmp_path)
