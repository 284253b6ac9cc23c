"""Atomic output: write to a temporary sibling path, rename on success, remove it on failure.

A stage that fails half way therefore never leaves a half-written file or directory at the
declared output path. A process killed outright (SIGKILL, power loss) cannot remove its temporary
sibling: the next write of the same path does, once the process that made it is gone. A
temporary name records its writer, `<name>.tmp-<pid>-<8 hex>` (`...-old` while a directory is
being replaced), so that a sibling being written by a live process is never touched.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import resource
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "the file size limit (ulimit -f) is reached"}
NO_PERMISSION = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (an immutable file or "
                 "folder, chattr +i?)", errno.EROFS: "the filesystem is read-only"}
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)  # pyarrow and torch name the errno in the text
ROOM_MARGIN = 1 << 20  # bytes kept free beyond a file of known size (its manifest, the filesystem's own)


class OutputError(RuntimeError):
    """An output that cannot be written; the message is one line naming it and what to do."""


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount(path: Path) -> Path:
    path = _existing(path.resolve())
    while not os.path.ismount(path):
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n:,} bytes"


def output_error(err: OSError, path: Path) -> OutputError | None:
    """The one-line OutputError for a failed write of `path` when the cause is room or permission, else None."""
    code = err.errno
    if code is None:
        found = _ERRNO_IN_TEXT.search(str(err))
        code = int(found.group(1)) if found else None
    if code in NO_ROOM:
        mount = _mount(path.parent)
        return OutputError(f"cannot write {path}: {NO_ROOM[code]} ({_size(shutil.disk_usage(mount).free)} free on "
                           f"{mount}); free space there (or raise the limit) and run the stage again")
    if code in NO_PERMISSION:
        where = Path(err.filename).resolve() if err.filename else path.resolve()
        out = path.resolve()
        if not (where == out or out.parent in (where, *where.parents) or where in out.parents
                or where.name.startswith(f"{out.name}.tmp-")):
            return None  # a file the output is made from cannot be read: not a failed write
        folder = where if where in out.parents else _existing(path.parent)
        return OutputError(f"cannot write {path}: {NO_PERMISSION[code]} in {folder}; make {folder} writable for "
                           "this user (chmod, chown, chattr -i, a read-write mount) and run the stage again")
    return None


def ensure_room(path: str | Path, n_bytes: int) -> None:
    """OutputError unless the filesystem of `path` has room for a new file of `n_bytes` (and a margin),
    and the file size limit allows it."""
    path = Path(path)
    mount = _mount(path.parent)
    free = shutil.disk_usage(_existing(path.parent)).free
    if free < n_bytes + ROOM_MARGIN:
        raise OutputError(f"cannot write {path}: it needs {_size(n_bytes)} and {mount} has {_size(free)} free; free "
                          "space there and run the stage again")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and n_bytes > limit:
        raise OutputError(f"cannot write {path}: it needs {_size(n_bytes)}, more than the file size limit "
                          f"({_size(limit)}, ulimit -f); raise the limit and run the stage again")


def reserve(path: str | Path) -> None:
    """Allocate a sparse file's blocks now: writes through a memory map to a disk that fills up end the
    process with SIGBUS; allocating first makes the full disk an ordinary error (ENOSPC)."""
    if hasattr(os, "posix_fallocate"):
        with Path(path).open("r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove the temporary siblings of `path` left by processes that no longer run (and those of
    the older `<name>.tmp-<8 hex>` form, which record no process); returns what was removed."""
    pattern = re.compile(re.escape(path.name) + r"\.tmp-(?:(\d+)-)?(?:old-)?[0-9a-f]{8}(?:-old)?")
    removed = []
    for sibling in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        m = pattern.fullmatch(sibling.name)
        if m and (m.group(1) is None or not pid_alive(int(m.group(1)))):
            _remove(sibling)
            removed.append(sibling)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it replaces `path` (file or directory).
    Temporary siblings of `path` left by killed writers are removed first."""
    path = Path(path)
    tmp = _sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)
        yield tmp
        if tmp.is_dir() and path.exists():
            old = _sibling(path, "-old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        translated = output_error(err, path)
        if translated is None:
            raise
        raise translated from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    """Remove a temporary path on the way out of a failed write; a removal that fails too (the same
    read-only folder) leaves it to the next write's sweep, and the first error is the one reported."""
    try:
        _remove(path)
    except OSError:
        pass


def remove_stale_temporaries(folders: Iterable[str | Path]) -> list[Path]:
    """Remove, in each folder, the temporary siblings of any output left by processes that are gone
    (a killed stage's `cache.tmp-<pid>-<hex>`, which DVC never sees: it restores outputs beside it)."""
    pattern = re.compile(r"(.+)\.tmp-\d+-(?:old-)?[0-9a-f]{8}(?:-old)?")
    removed = []
    for folder in map(Path, folders):
        names = {m.group(1) for f in (folder.iterdir() if folder.is_dir() else []) if (m := pattern.fullmatch(f.name))}
        for name in sorted(names):
            removed += remove_stale_siblings(folder / name)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file of known size, checking first that it fits (`ensure_room`)."""
    ensure_room(path, len(data))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    with Path(path).open() as f:
        return json.load(f)
