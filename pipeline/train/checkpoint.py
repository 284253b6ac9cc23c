"""Training checkpoints: everything needed to resume exactly, written atomically, loaded with
`weights_only=True`. A checkpoint resumes only a run with the same fingerprint (the params that
shape training), and only if that run had not finished.

`manifest.json` beside `last.pt` records its size and digest (pipeline.integrity); a checkpoint that
does not match is an error, never a silent restart. While `last.pt` is being replaced the manifest
accepts the old and the new file, so a run killed at any point leaves a checkpoint that verifies.
No MLflow run id is stored: the run is found again by the fingerprint (pipeline.tracking)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline import integrity
from pipeline.io import atomic_path, read_json, write_json
from pipeline.model.io import ModelFileError, safe_load
from pipeline.params import Params

log = logging.getLogger(__name__)
FORMAT = 1
LAST = "last.pt"
MANIFEST = "manifest.json"


# Keys that do not change what training produces: how many processes run and how they meet, how
# often checkpoints are written, when to give up on NaN. A run resumes whatever they are.
NEUTRAL_TRAIN_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id", "dist_timeout_s", "save_every",
                      "max_consecutive_nonfinite", "max_cpu_hours")
# The code that shapes training, relative to the pipeline package.
TRAINING_CODE = ("model", "train", "loader.py", "cache.py", "canvas.py", "augment.py", "arc.py", "params.py",
                 "runtime.py", "distributed.py")


def _digest_files(h: "hashlib._Hash", files: list[Path]) -> None:
    for f in sorted(files):
        h.update(str(f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)


def fingerprint(params: Params, data: list[Path], extra: bytes = b"") -> str:
    """Hash of what shapes training's outputs: the data, augment, model, trm and train params (less the
    neutral keys), the training code, the files in `data` (the cache) and `extra` (the held-out slice).
    A checkpoint is resumed only under the same fingerprint."""
    keep = {k: params.model_dump()[k] for k in ("data", "augment", "model", "trm", "train")}
    for k in NEUTRAL_TRAIN_KEYS:
        keep["train"].pop(k)
    h = hashlib.blake2b(json.dumps(keep, sort_keys=True).encode(), digest_size=16)
    root = Path(__file__).resolve().parents[1]
    code = [f for part in TRAINING_CODE for f in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])]
    _digest_files(h, code)
    _digest_files(h, [f for d in data for f in (sorted(d.rglob("*")) if d.is_dir() else [d]) if f.is_file()])
    h.update(extra)
    return h.hexdigest()


def fresh_hint(directory: str | Path) -> str:
    return f"delete {directory} to start training afresh, or restore it with `dvc checkout {directory}`"


def _records(directory: Path) -> list[dict[str, Any]] | None:
    path = directory / MANIFEST
    return read_json(path).get(LAST) if path.exists() else None


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    path = directory / LAST
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
        record = integrity.describe(tmp)
        write_json(directory / MANIFEST, {LAST: [record, *(_records(directory) or [])][:3]})
    write_json(directory / MANIFEST, {LAST: [record]})
    return path


def verify(directory: str | Path) -> None:
    """ModelFileError when last.pt does not match its manifest (a checkpoint without a manifest,
    from before there were manifests, is only loaded)."""
    directory = Path(directory)
    records = _records(directory)
    if records is None:
        log.warning("%s has no %s: the checkpoint is not verified", directory, MANIFEST)
        return
    found = integrity.problem(directory / LAST, *records)
    if found is not None:
        raise ModelFileError(f"{directory / LAST}: corrupt: {found}; {fresh_hint(directory)}")


def load_resumable(directory: str | Path, fp: str, epochs: int) -> dict[str, Any] | None:
    """The last checkpoint if it belongs to this run (same fingerprint), else None to start fresh.
    A finished run's checkpoint is returned too: its outputs are rebuilt without training. A corrupt
    checkpoint is an error naming the file and how to start afresh, rather than a silent restart."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    verify(directory)
    state = safe_load(path, hint=fresh_hint(directory))
    if state.get("format") != FORMAT:
        raise ModelFileError(f"{path}: checkpoint format {state.get('format')}, this code reads {FORMAT}; "
                             f"{fresh_hint(directory)}")
    if state.get("fingerprint") != fp:
        log.info("checkpoint %s belongs to other params, code or data: starting fresh", path)
        return None
    if state.get("epoch", 0) >= epochs:
        log.info("checkpoint %s is of this very run, finished: restoring its outputs", path)
    else:
        log.info("resuming from %s after epoch %d of %d", path, state["epoch"], epochs)
    state["path"] = str(path)
    return state
