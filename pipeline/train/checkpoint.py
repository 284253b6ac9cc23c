"""Training checkpoints: everything needed to resume exactly, written atomically, loaded with
`weights_only=True`. A checkpoint resumes only a run with the same fingerprint (the params that
shape training), and only if that run had not finished."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_path
from pipeline.model.io import ModelFileError, safe_load
from pipeline.params import Params

log = logging.getLogger(__name__)
FORMAT = 1
LAST = "last.pt"


# How many processes train, and how they meet, does not change the result: a run resumes on any world size.
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id", "dist_timeout_s")


def fingerprint(params: Params) -> str:
    """Hash of what shapes the trained weights: data, augment, model and train (less LAUNCH_KEYS)."""
    keep = {k: params.model_dump()[k] for k in ("data", "augment", "model", "train")}
    for k in LAUNCH_KEYS:
        keep["train"].pop(k)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / LAST
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_resumable(directory: str | Path, fp: str, epochs: int) -> dict[str, Any] | None:
    """The last checkpoint if it continues this run; None to start fresh. A corrupt checkpoint is an
    error (it names the file) rather than a silent restart."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    state = safe_load(path)
    if state.get("format") != FORMAT:
        raise ModelFileError(f"{path}: checkpoint format {state.get('format')}, this code reads {FORMAT}")
    if state.get("fingerprint") != fp:
        log.info("checkpoint %s belongs to other params: starting fresh", path)
        return None
    if state.get("epoch", 0) >= epochs:
        log.info("checkpoint %s is of a finished run: starting fresh", path)
        return None
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return state
