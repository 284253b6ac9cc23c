"""params.yaml against its committed version (git HEAD): which keys differ, and the command-line
overrides (`-S key=value`) that express a set of values.

A failed `dvc exp run -S key=value` leaves its override in params.yaml (DVC writes it before the
stages run), and so does a `dvc exp run -S` in the workspace that succeeds: the next run inherits
it. The experiments runner, the validate_params stage (which names the differing keys at the start
of every run) and the train stage (an MLflow tag, and the command a refused run can use instead) use
this module to say so.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import params
from pipeline.io import write_text

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


def _flat(text: str) -> dict[str, Any]:
    tree = params.parse_yaml(text)
    return params.flatten(tree) if isinstance(tree, dict) else {"(top level)": tree}


def changed_values(committed: str, current: str) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (committed value, current value) for every key whose value differs (params.ABSENT
    where one side lacks the key); raises params.ParamsError when either text is not (strict) YAML."""
    if committed == current:
        return {}
    old, new = _flat(committed), _flat(current)
    gone = params.ABSENT
    return {k: (old.get(k, gone), new.get(k, gone))
            for k in [*old, *(k for k in new if k not in old)] if old.get(k, gone) != new.get(k, gone)}


def differences(committed: str, current: str) -> list[str]:
    """`key: committed X, now Y` for every dotted key whose value differs (an empty list when none)."""
    try:
        old, new = params.parse_yaml(committed), params.parse_yaml(current)
    except params.ParamsError as err:
        return [f"(the file is {err.problems[0]})"]  # not valid YAML: where and why
    return params.differences(old, new, ("committed", "now"))


def changes_from_head(path: str | Path) -> dict[str, tuple[Any, Any]] | None:
    """`changed_values` of the file against its committed version; None when it is not committed (or
    not in a git repository); params.ParamsError when the file cannot be read or either version is
    not a params file (the defensive loader's one line, `params.read_yaml`)."""
    committed = committed_text(path)
    if committed is None:
        return None
    params.read_yaml(path)  # size, encoding, depth, aliases, repeated keys: the file's own problem first
    return changed_values(committed, Path(path).read_text(encoding="utf-8"))


def yaml_value(value: Any) -> str:
    """A value as DVC's `-S key=value` parses it: a YAML scalar, or a flow list without spaces (one
    word, also where a shell splits `$(...)` into arguments)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(yaml_value, value)) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def set_args(changes: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments, values written as YAML scalars or flow lists (what dvc parses)."""
    return [a for k, v in changes.items() for a in ("-S", f"{k}={yaml_value(v)}")]


def describe_changes(changes: dict[str, tuple[Any, Any]] | None) -> str:
    """One line: the keys a run's params.yaml changes from HEAD's, with both values (cut)."""
    if changes is None:
        return "params.yaml is not committed here: no baseline to compare with"
    if not changes:
        return "this run's params.yaml is HEAD's"
    return "this run differs from HEAD in: " + ", ".join(
        f"{params.shorten(k)} ({params.clip(old)} -> {params.clip(new)})" for k, (old, new) in changes.items())


def in_temporary_copy(path: str | Path) -> bool:
    """Whether the file is in DVC's temporary copy of the repository (`dvc exp run --queue/--temp`),
    which is discarded with it: the workspace's own file is not changed."""
    return f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}" in str(Path(path).resolve())


def restore_hint(path: str | Path) -> str:
    """Why a params file may be wrong when it differs from its committed version, and how to restore
    it; an empty string when it does not differ (or is not in git, or is in DVC's temporary copy)."""
    if in_temporary_copy(path):
        return ""
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


def set_params_of(args: list[str]) -> dict[str, str]:
    """key -> value text of the `-S key=value` (`--set-param`) arguments of a `dvc exp run` command."""
    found, it = {}, iter(args)
    for arg in it:
        if arg in ("-S", "--set-param"):
            text = next(it, "")
        elif arg.startswith("--set-param="):
            text = arg.removeprefix("--set-param=")
        elif arg.startswith("-S") and len(arg) > 2:
            text = arg[2:]
        else:
            continue
        key, sep, value = text.partition("=")
        if sep:
            found[key.removeprefix("params.yaml:")] = value
    return found


def describe_sets(sets: dict[str, str], committed: str | None) -> str:
    """One line: the user's `-S` overrides, each marked when it is HEAD's value already (it changes nothing)."""
    try:
        head = _flat(committed) if committed is not None else {}
    except params.ParamsError:
        head = {}

    def same(key: str, text: str) -> bool:
        try:
            return key in head and yaml.safe_load(text) == head[key]
        except yaml.YAMLError:
            return False

    return "your overrides: " + ", ".join(
        f"-S {k}={v}" + (" (HEAD's value already: it changes nothing)" if same(k, v) else "") for k, v in sets.items())


def undo_set_params(path: str | Path, sets: dict[str, str]) -> str | None:
    """Put HEAD's params.yaml back where `dvc exp run -S` rewrote it (reformatted, the overrides in) for a
    run refused before anything ran, when every key that differs from HEAD's is one of the `-S` keys
    (nothing else of the user's is lost); the rewritten file is kept in .dvc/tmp/. Returns what was
    done, in a line, or None when nothing was (DVC's temporary copy, no -S, other keys differ)."""
    path = Path(path)
    committed = committed_text(path)
    if not sets or committed is None or in_temporary_copy(path) or not path.is_file():
        return None
    try:
        changed = changed_values(committed, path.read_bytes().decode("utf-8", errors="replace"))
    except params.ParamsError:
        return None
    if not set(changed) <= set(sets):
        return None
    current = path.read_bytes()
    if current == committed.encode():
        return None
    kept = path.parent / ".dvc" / "tmp" / f"params.yaml.refused-{time.strftime('%Y%m%d-%H%M%S')}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(current)
    write_text(path, committed)
    return (f"{path.name} is HEAD's again (DVC had rewritten it with the overrides; that version is kept in "
            f"{kept.relative_to(path.parent)})")
