"""Atomic output: write to a temporary sibling path, rename on success, remove it on failure.

A stage that fails half way therefore never leaves a half-written file or directory at the
declared output path. A process killed outright (SIGKILL, power loss) cannot remove its temporary
sibling: the next write of the same path does, once the process that made it is gone. A
temporary name records its writer, `<name>.tmp-<pid>-<8 hex>` (`...-old` while a directory is
being replaced), so that a sibling being written by a live process is never touched.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pid_alive(pid: int) -> bool:
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
        if m and (m.group(1) is None or not _pid_alive(int(m.group(1)))):
            _remove(sibling)
            removed.append(sibling)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it replaces `path` (file or directory).
    Temporary siblings of `path` left by killed writers are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = _sibling(path, "-old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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
