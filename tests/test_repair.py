"""Repairs as the messages print them: damaged caches and manifests restored by the command the
error names, damaged checkpoints named with the folder to delete (in a real DVC repository at tiny
scale), stale temporary outputs removed by the next stage, and an evaluation refused for a model of
other params."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import CacheReader
from pipeline.integrity import IntegrityError
from pipeline.model import RLAN
from pipeline.model.io import ModelFileError, save_model
from pipeline.params import load_params
from pipeline.train import checkpoint
from tests.helpers import (
    TINY,
    TINY_MODEL,
    commit_all,
    copy_repo,
    run,
    tiny_workspace,
    write_params,
)
from tests.test_faults import one_error_line, other_stages, stage

DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("repair"))
    write_params(repo, **TINY)
    commit_all(repo, "tiny params")
    run(DVC + ["repro"], repo, timeout=1200)
    commit_all(repo, "outputs")
    return repo


def printed_command(message: str) -> list[str]:
    """The DVC command a message tells to run (between backticks), as argv."""
    found = re.search(r"`(dvc checkout[^`]*)`", message)
    assert found, message
    argv = shlex.split(found.group(1))
    return DVC + argv[1:]


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(data)


@pytest.mark.e2e
def test_damaged_cache_and_its_manifest_are_repaired_by_the_printed_command(repo, monkeypatch):
    monkeypatch.chdir(repo)  # the stages run from the repository root with these relative paths
    cache = Path("data/cache")
    flip_last_byte(cache / "cells.npy")
    with pytest.raises(IntegrityError) as err:
        CacheReader(cache)
    assert "`dvc checkout --force data/cache`" in str(err.value)
    plain = run(DVC + ["checkout", "data/cache"], repo, check=False)  # what the hint said before: refused
    assert plain.returncode != 0 and "Use `--force` to force" in plain.stderr
    run(printed_command(str(err.value)), repo)
    CacheReader(cache)

    (cache / "manifest.json").write_text('{"format_version": 2, "files": {')  # damaged: invalid JSON
    with pytest.raises(IntegrityError) as err:
        CacheReader(cache)
    assert str(err.value).startswith("data/cache/manifest.json: damaged, not a JSON manifest (JSONDecodeError")
    run(printed_command(str(err.value)), repo)
    CacheReader(cache)


@pytest.mark.e2e
def test_damaged_checkpoint_and_its_manifest_name_the_folder_that_starts_afresh(repo, monkeypatch):
    """Checkpoints are not DVC outputs (checkpoints/<fingerprint>/ at the root): a corrupt last.pt or
    a damaged manifest names the file and the folder to delete, and without it the training is fresh."""
    monkeypatch.chdir(repo)
    [ckpt] = [p.parent for p in Path("checkpoints").glob(f"*/{checkpoint.LAST}")]
    flip_last_byte(ckpt / checkpoint.LAST)
    with pytest.raises(ModelFileError) as err:
        checkpoint.verify(ckpt)
    assert str(err.value).startswith(f"{ckpt / checkpoint.LAST}: corrupt: ")
    assert str(err.value).endswith(f"delete {ckpt} to start this training afresh")

    (ckpt / checkpoint.MANIFEST).write_bytes(b"\xff\xfe not json")
    with pytest.raises(IntegrityError, match=rf"^{ckpt / checkpoint.MANIFEST}: damaged, not a JSON manifest") as err:
        checkpoint.verify(ckpt)
    assert str(err.value).endswith(f"delete {ckpt} to start this training afresh")
    shutil.rmtree(ckpt)
    assert checkpoint.load_resumable(ckpt, ckpt.name) is None


@pytest.mark.e2e
def test_a_stale_temporary_cache_is_removed_by_the_next_stage(repo):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: what it was writing is stale
    stale = repo / "data" / f"cache.tmp-{gone.pid}-0123abcd"
    (stale / "x").mkdir(parents=True)
    (stale / "x" / "cells.npy").write_bytes(b"\0" * 1000)
    live = repo / "metrics" / f"train.json.tmp-{subprocess.os.getpid()}-89abcdef"  # this process still writes it
    live.write_text("{}")
    out = run(DVC + ["repro", "-f", "-s", "validate_params"], repo)
    assert not stale.exists() and live.exists()
    assert f"removed data/cache.tmp-{gone.pid}-0123abcd, left by a stage that was killed" in out.stderr + out.stdout
    live.unlink()


@pytest.mark.slow
def test_evaluate_refuses_a_model_trained_with_another_model_section(tmp_path):
    ws = tiny_workspace(tmp_path / "ws", tracking__timeout_s=2, tracking__required=False)
    other = load_params(ws["params"]).override({"model.hidden_dim": 24, "model.max_clues": 3})
    save_model(tmp_path / "model.pt", RLAN(other.model), {"temperature": 0.5, "epochs": 1})
    out = tmp_path / "out"
    cmd = other_stages(ws, out)[0]
    cmd[cmd.index("--model") + 1] = str(tmp_path / "model.pt")
    line = one_error_line(stage(cmd, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}))
    assert f"{tmp_path / 'model.pt'} was trained with another model section than {ws['params']}" in line
    assert f"model.hidden_dim: the model has 24, params.yaml {TINY_MODEL['model__hidden_dim']}" in line
    assert "model.max_clues: the model has 3, params.yaml 2" in line and not out.exists()


@pytest.mark.slow
def test_evaluate_names_the_model_family_when_the_families_differ(tmp_path):
    """A TRM model evaluated with RLAN params: the family differs, not a trm section the params use."""
    from pipeline.model.trm import TRM

    ws = tiny_workspace(tmp_path / "ws", tracking__timeout_s=2, tracking__required=False)
    params = load_params(ws["params"])
    save_model(tmp_path / "model.pt", TRM(params.trm, num_puzzles=2), {"epochs": 1})
    cmd = other_stages(ws, tmp_path / "out")[0]
    cmd[cmd.index("--model") + 1] = str(tmp_path / "model.pt")
    line = one_error_line(stage(cmd, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}))
    assert f"{tmp_path / 'model.pt'} was trained with another model family than {ws['params']}" in line
    assert "model.family: the model has 'trm', params.yaml 'rlan'" in line
