"""File integrity: the size and digest of each file of an output, recorded when it is written and
checked by every reader, so that damaged data stops a stage instead of training silently.

The digest is SHA-256 over 16 MiB blocks, the block digests hashed again in order ("sha256-16m"):
blocks are hashed on two threads (hashlib releases the GIL), so the 243 MB of cells of the full
cache verify in about a tenth of a second when the file is in the page cache
(`python -m benchmarks.integrity`). Reading maps the file; nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ALGORITHM = "sha256-16m"
BLOCK = 1 << 24
THREADS = 2


class IntegrityError(RuntimeError):
    """A file that differs from what its manifest recorded; the message names the file and the fix."""


def digest(path: str | Path) -> str:
    """The "sha256-16m" digest of a file."""
    with Path(path).open("rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                with ThreadPoolExecutor(THREADS) as pool:
                    blocks = pool.map(lambda i: _block_digest(view, i), range(0, size, BLOCK))
                    return hashlib.sha256(b"".join(blocks)).hexdigest()
            finally:
                view.release()


def _block_digest(view: memoryview, start: int) -> bytes:
    with view[start : start + BLOCK] as block:
        return hashlib.sha256(block).digest()


def is_record(record: Any) -> bool:
    """Whether a manifest entry has the size and digest `describe` records."""
    return (isinstance(record, dict) and type(record.get("size")) is int
            and isinstance(record.get(ALGORITHM), str))


def read_manifest(path: str | Path, fix: str) -> dict[str, Any]:
    """A manifest (a JSON object); IntegrityError naming it and `fix` when it is not one (damaged,
    truncated, not UTF-8), like any other damaged file."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise IntegrityError(f"{path}: damaged, not a JSON manifest ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:120]}); {fix}") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path}: damaged, a JSON {type(manifest).__name__} where a manifest (an object) "
                             f"belongs; {fix}")
    return manifest


def describe(path: str | Path) -> dict[str, Any]:
    """What a manifest records of one file."""
    path = Path(path)
    return {"size": path.stat().st_size, ALGORITHM: digest(path)}


def describe_all(directory: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: describe(Path(directory) / name) for name in names}


def problem(path: str | Path, *accepted: dict[str, Any]) -> str | None:
    """What is wrong with `path` against its record, or against any of several acceptable ones
    (missing, size, digest); None when it matches one."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    sized = [r for r in accepted if r["size"] == size]
    if not sized:
        return f"{size} bytes, its manifest records {accepted[0]['size']} (truncated or overwritten)"
    if digest(path) not in {r[ALGORITHM] for r in sized}:
        return "its content differs from the digest its manifest records (changed in place)"
    return None


def verify(directory: str | Path, files: Any, fix: str) -> None:
    """Check every recorded file of `directory`; IntegrityError naming the first bad file and `fix`
    (also when the records themselves are damaged)."""
    if not isinstance(files, dict) or not files or not all(is_record(r) for r in files.values()):
        raise IntegrityError(f"{directory}: its manifest's file records are damaged; {fix}")
    for name, recorded in files.items():
        found = problem(Path(directory) / name, recorded)
        if found is not None:
            raise IntegrityError(f"{Path(directory) / name}: {found}; {fix}")


def file_md5(path: str | Path) -> str:
    """The MD5 of a file's bytes: the hash DVC 3 records for it in dvc.lock (`md5:`)."""
    h = hashlib.md5()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
