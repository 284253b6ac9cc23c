"""Training checkpoints: everything needed to resume exactly, written atomically, loaded with
`weights_only=True`, one directory per training in a store that DVC does not manage.

**Where.** `<store>/<fingerprint>/last.pt`; the train stage's store is `checkpoints/` at the root of
the repository, also for `dvc exp run --temp/--queue`, which run in copies under `.dvc/tmp/exps/`.
Not a DVC output, because DVC resets its outputs when an experiment starts: `dvc exp run` first
checks every output out as its `dvc.lock` records it (a persistent output written by an interrupted
run is replaced by the last committed one, or removed when the lock has none), and a queued run
starts in a fresh copy. The fingerprint covers what shapes training (the params less the neutral keys
below, the training code, the cache and the held-out slice), so a checkpoint resumes exactly its own
training whichever command runs it, and a finished one gives its outputs back without training.

**When.** At an optimizer-step boundary: at the end of every `save_every` epochs and of the last,
and at the first step after `checkpoint_minutes` since the last checkpoint, mid-epoch too. A
checkpoint holds model, EMA, optimizer, the finished epochs' history and, mid-epoch, the epoch's
measurements so far; no RNG state is needed (every micro-batch seeds itself, pipeline.train.loop).

**Checked.** `manifest.json` beside `last.pt` records its size and digest (pipeline.integrity) and
what it is (`about`: position, params, digests of code and data, to say why another training does
not resume it); a checkpoint that does not match is an error, never a silent restart. While
`last.pt` is being replaced the manifest accepts the old and the new file. One process at a time
trains a fingerprint (a lock in its directory): a second one waits, then resumes or restores.
No MLflow run id is stored: the run is found again by the fingerprint (pipeline.tracking)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from pipeline import integrity
from pipeline.io import atomic_path, ensure_room, write_json
from pipeline.model.io import ModelFileError, safe_load
from pipeline.params import Params, flatten

log = logging.getLogger(__name__)
FORMAT = 2
LAST = "last.pt"
MANIFEST = "manifest.json"
LOCK = ".lock"


# Keys that do not change what training produces: how many processes run and how they meet, how
# often checkpoints are written, when to give up on NaN or on a long CPU run. A run resumes whatever
# they are. (`train.cpu_threads` is not one: a CPU run's bytes depend on torch's thread count.)
NEUTRAL_TRAIN_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id", "dist_timeout_s", "save_every",
                      "checkpoint_minutes", "max_consecutive_nonfinite", "max_cpu_hours")
NEUTRAL_DATA_KEYS = ("max_input_mb",)  # a limit on what prepare reads: the data itself is in the fingerprint
# The code that shapes training, relative to the pipeline package.
TRAINING_CODE = ("model", "train", "loader.py", "cache.py", "canvas.py", "augment.py", "arc.py", "params.py",
                 "runtime.py", "distributed.py")


def _digest_files(h: "hashlib._Hash", files: list[Path]) -> None:
    for f in sorted(files):
        h.update(str(f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)


@dataclass(frozen=True)
class Identity:
    """What a training is: the params that shape it (flat, less the neutral keys) and the digests of
    its code and of its data (the cache and the held-out slice)."""
    params: dict[str, Any]
    code: str
    data: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(json.dumps(self.params, sort_keys=True).encode(), digest_size=16)
        h.update(self.code.encode())
        h.update(self.data.encode())
        return h.hexdigest()

    def differences(self, other: dict[str, Any]) -> str | None:
        """What differs from another checkpoint's `about` (None when nothing that it records)."""
        theirs = other.get("params", {})
        keys = sorted(set(self.params) | set(theirs))
        changed = [f"{k} {theirs.get(k)!r} -> {self.params.get(k)!r}" for k in keys
                   if theirs.get(k) != self.params.get(k)]
        if changed:
            more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
            return "params " + ", ".join(changed[:3]) + more
        if other.get("code") != self.code:
            return "the training code"
        if other.get("data") != self.data:
            return "the data (augmentation cache or held-out tasks)"
        return None


def identity(params: Params, data: list[Path], extra: bytes = b"") -> Identity:
    """The identity of a training on the files in `data` (the cache) and `extra` (the held-out slice):
    the data, augment, model, trm and train params (less the neutral keys) and the training code."""
    keep = {k: params.model_dump()[k] for k in ("data", "augment", "model", "trm", "train")}
    for k in NEUTRAL_TRAIN_KEYS:
        keep["train"].pop(k)
    for k in NEUTRAL_DATA_KEYS:
        keep["data"].pop(k)
    root = Path(__file__).resolve().parents[1]
    code = hashlib.blake2b(digest_size=16)
    _digest_files(code, [f for part in TRAINING_CODE
                         for f in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])])
    files = hashlib.blake2b(digest_size=16)
    _digest_files(files, [f for d in data for f in (sorted(d.rglob("*")) if d.is_dir() else [d]) if f.is_file()])
    files.update(extra)
    return Identity(json.loads(json.dumps(flatten(keep))), code.hexdigest(), files.hexdigest())


def fingerprint(params: Params, data: list[Path], extra: bytes = b"") -> str:
    """Hash of what shapes training's outputs (see `identity`). A checkpoint is resumed only under the same one."""
    return identity(params, data, extra).fingerprint


def directory(store: str | Path, fp: str) -> Path:
    """The directory of one training's checkpoint in the store."""
    return Path(store) / fp


def fresh_hint(directory: str | Path) -> str:
    return f"delete {directory} to start this training afresh"


def _manifest(directory: Path) -> dict[str, Any]:
    """The directory's manifest, {} without one; a damaged one is an IntegrityError naming it."""
    path = directory / MANIFEST
    if not path.exists():
        return {}
    manifest = integrity.read_manifest(path, fresh_hint(directory))
    records = manifest.get(LAST)
    if records is not None and (not isinstance(records, list) or not records
                                or not all(integrity.is_record(r) for r in records)):
        raise integrity.IntegrityError(f"{path}: damaged (no valid record of {LAST}); {fresh_hint(directory)}")
    return manifest


def save(directory: str | Path, state: dict[str, Any], about: dict[str, Any]) -> Path:
    """Write `state` as the directory's last.pt; `about` (JSON) describes it in the manifest. The size
    is known before anything is written, so a disk without room for it stops training in one line
    (pipeline.io.OutputError) and the previous checkpoint stays."""
    directory = Path(directory)
    path = directory / LAST
    directory.mkdir(parents=True, exist_ok=True)
    about = {**about, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    buffer = BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getbuffer()
    ensure_room(path, len(data))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        record = integrity.describe(tmp)
        before = _manifest(directory)  # its `about` stays the old file's until the new one is in place
        write_json(directory / MANIFEST, {LAST: [record, *(before.get(LAST) or [])][:3], "about": before.get("about")})
    write_json(directory / MANIFEST, {LAST: [record], "about": about})
    return path


def about(directory: str | Path) -> dict[str, Any] | None:
    """What the directory's checkpoint is (`save`'s `about`: epoch, step, ...), None without one."""
    directory = Path(directory)
    return _manifest(directory).get("about") if (directory / LAST).exists() else None


def verify(directory: str | Path) -> None:
    """ModelFileError when last.pt does not match its manifest (a checkpoint without a manifest,
    from before there were manifests, is only loaded)."""
    directory = Path(directory)
    records = _manifest(directory).get(LAST)
    if records is None:
        log.warning("%s has no %s: the checkpoint is not verified", directory, MANIFEST)
        return
    found = integrity.problem(directory / LAST, *records)
    if found is not None:
        raise ModelFileError(f"{directory / LAST}: corrupt: {found}; {fresh_hint(directory)}")


def load_resumable(directory: str | Path, fp: str) -> dict[str, Any] | None:
    """The directory's checkpoint if it is of this training (same fingerprint), else None. A corrupt
    checkpoint, or one of another format, is an error naming the file and how to start afresh, rather
    than a silent restart."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    verify(directory)
    state = safe_load(path, hint=fresh_hint(directory))
    if state.get("format") != FORMAT:
        raise ModelFileError(f"{path}: checkpoint format {state.get('format')}, this code reads {FORMAT}; "
                             f"{fresh_hint(directory)}")
    if state.get("fingerprint") != fp:
        raise ModelFileError(f"{path}: holds training {state.get('fingerprint')}, not {fp} as its directory says; "
                             f"{fresh_hint(directory)}")
    state["path"] = str(path)
    return state


def why_fresh(store: str | Path, ident: Identity) -> str:
    """Why a training starts from scratch: no checkpoint in the store, or how the latest one differs."""
    store = Path(store)
    others = []
    for manifest in store.glob(f"*/{MANIFEST}"):
        found = about(manifest.parent)
        if found and manifest.parent.name != ident.fingerprint:
            others.append((found.get("saved", ""), manifest.parent, found))
    if not others:
        return f"no checkpoint in {store} yet"
    saved, latest, last = max(others, key=lambda o: o[0])
    where = (f"after epoch {last.get('epoch')} of {last.get('epochs')}" if not last.get("step")
             else f"in epoch {last.get('epoch', 0) + 1} of {last.get('epochs')}, step {last.get('step')}")
    return (f"none of the {len(others)} checkpoint(s) in {store} is of this training; the latest ({latest.name[:12]}, "
            f"{where}, saved {saved}) differs in {ident.differences(last) or 'what it records'}")


@contextlib.contextmanager
def exclusive(directory: str | Path) -> Iterator[None]:
    """Hold the training's directory: a second process training the same fingerprint waits here
    (then resumes or restores what the first one left). The lock goes with the process."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is training this very configuration (%s): waiting for it to end", directory)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
