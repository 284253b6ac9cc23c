"""params.yaml against its committed version (git HEAD): which keys differ, one line each.

A failed `dvc exp run -S key=value` leaves its override in params.yaml (DVC writes it before the
stages run), and so does a `dvc exp run -S` in the workspace that succeeds: the next run inherits
it. The experiments runner and the validate_params stage use this module to say so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline import params

SHOWN = 20  # keys listed at most


def committed_text(path: str | Path, rev: str = "HEAD") -> str | None:
    """The file's text at `rev`, or None outside a git repository or when it is not committed there."""
    path = Path(path).resolve()
    try:
        proc = subprocess.run(["git", "show", f"{rev}:./{path.name}"], cwd=path.parent, capture_output=True,
                              text=True, errors="replace")
    except OSError:  # no git
        return None
    return proc.stdout if proc.returncode == 0 else None


def differences(committed: str, current: str) -> list[str]:
    """`key: committed X, now Y` for every dotted key whose value differs (an empty list when none)."""
    if committed == current:
        return []
    try:
        old, new = params.parse_yaml(committed), params.parse_yaml(current)
    except params.ParamsError as err:
        return [f"(the file is not valid YAML: {err.problems[0]})"]
    return params.differences(old, new, ("committed", "now"))


def restore_hint(path: str | Path) -> str:
    """Why a params file may be wrong when it differs from its committed version, and how to restore
    it; an empty string when it does not differ (or is not in git)."""
    committed = committed_text(path)
    try:
        too_large = Path(path).stat().st_size > params.MAX_PARAMS_BYTES
        current = "" if too_large else Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = differences(committed, current) if committed is not None and not too_large else []
    if committed is None or (not lines and not too_large):
        return ""
    shown = lines[:SHOWN] + ([f"and {len(lines) - SHOWN} more keys"] if len(lines) > SHOWN else [])
    return (f"{path} differs from its committed version (a failed `dvc exp run -S` leaves its override "
            "there):\n" + "".join(f"    {line}\n" for line in shown)
            + f"  restore the committed version with: git checkout -- {Path(path).name}")
