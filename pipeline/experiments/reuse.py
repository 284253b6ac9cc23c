"""Whether a finished experiment is the one a run would make again: same baseline commit (HEAD), same
code, same params (the scale's, the seed's and its own overrides included). The runner then keeps it
instead of training it again (the stable experiment your own overrides are compared with).

An experiment's commit differs from its baseline only in params.yaml, dvc.lock and the outputs of
dvc.yaml's stages; any other file it changes, and any uncommitted change of the workspace (which DVC
copies into a new experiment), means different code: not reused.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.experiments.committed import committed_text
from pipeline.params import ParamsError, flatten, parse_yaml

RUN_FILES = ("params.yaml", "dvc.lock")  # what running an experiment changes besides its stages' outputs


def _git(args: list[str], cwd: Path) -> list[str]:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def output_paths(cwd: Path) -> list[str]:
    """Every output, metric and plot path of dvc.yaml's stages."""
    stages = (yaml.safe_load((cwd / "dvc.yaml").read_text()) or {}).get("stages") or {}
    paths = []
    for stage in stages.values():
        for field in ("outs", "metrics", "plots"):
            for entry in stage.get(field) or []:
                paths += list(entry) if isinstance(entry, dict) else [entry]
    return paths


def is_run_file(path: str, outputs: list[str]) -> bool:
    """Whether a changed path is one that running the pipeline writes (not code or configuration)."""
    return (path in RUN_FILES or Path(path).name == ".gitignore"
            or any(path == o or path.startswith(o.rstrip("/") + "/") for o in outputs))


def other_changes(rev: str, cwd: Path) -> list[str]:
    """Files that the experiment's commit `rev` changes from HEAD, or that the workspace changes
    (uncommitted, untracked included), other than the pipeline's run files."""
    outputs = output_paths(cwd)
    changed = _git(["diff", "--name-only", "HEAD", rev], cwd)
    changed += [line[3:] for line in _git(["status", "--porcelain", "--untracked-files=all"], cwd)]
    return sorted({p for p in changed if not is_run_file(p, outputs)})


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return norm(a) == norm(b)


def why_not_reused(rev: str, expected: dict[str, Any], cwd: Path) -> str | None:
    """Why the experiment at commit `rev` is not what running params `expected` (flat: HEAD's plus the
    overrides) from HEAD would make; None when it is."""
    try:
        params = flatten(parse_yaml(committed_text(cwd / "params.yaml", rev) or "{}") or {})
    except ParamsError as err:
        return f"its params.yaml is not readable ({err})"
    differ = sorted(k for k in {*params, *expected} if not _same(params.get(k), expected.get(k)))
    if differ:
        return "its params differ in " + ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
    code = other_changes(rev, cwd)
    if code:
        return ("the code differs (" + ", ".join(code[:5]) + (" ..." if len(code) > 5 else "")
                + ": changed in the experiment or uncommitted in the workspace)")
    return None
