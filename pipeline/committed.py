"""params.yaml against its committed version (git HEAD): which keys differ, one line each.

A failed `dvc exp run -S key=value` leaves its override in params.yaml (DVC writes it before the
stages run), and so does a `dvc exp run -S` in the workspace that succeeds: the next run inherits
it. The experiments runner and the validate_params stage use this module to say so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import flatten

_ABSENT = "(absent)"


def committed_text(path: str | Path, rev: str = "HEAD") -> str | None:
    """The file's text at `rev`, or None outside a git repository or when it is not committed there."""
    path = Path(path).resolve()
    try:
        proc = subprocess.run(["git", "show", f"{rev}:./{path.name}"], cwd=path.parent, capture_output=True,
                              text=True)
    except OSError:  # no git
        return None
    return proc.stdout if proc.returncode == 0 else None


def _flat(text: str) -> dict[str, Any]:
    tree = yaml.safe_load(text)
    return flatten(tree) if isinstance(tree, dict) else {"(top level)": tree}


def differences(committed: str, current: str) -> list[str]:
    """`key: committed X, now Y` for every dotted key whose value differs (an empty list when none)."""
    if committed == current:
        return []
    try:
        old, new = _flat(committed), _flat(current)
    except yaml.YAMLError:
        return ["(the file is not valid YAML)"]
    return [f"{k}: committed {old.get(k, _ABSENT)!r}, now {new.get(k, _ABSENT)!r}"
            for k in [*old, *(k for k in new if k not in old)] if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def restore_hint(path: str | Path) -> str:
    """Why a params file may be wrong when it differs from its committed version, and how to restore
    it; an empty string when it does not differ (or is not in git)."""
    committed = committed_text(path)
    lines = differences(committed, Path(path).read_text()) if committed is not None else []
    if not lines:
        return ""
    return (f"{path} differs from its committed version (a failed `dvc exp run -S` leaves its override "
            "there):\n" + "".join(f"    {line}\n" for line in lines)
            + f"  restore the committed version with: git checkout -- {Path(path).name}")
