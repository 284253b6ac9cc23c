"""One experiment at a time in a workspace.

`dvc exp run -S key=value` writes the experiment's params.yaml into the workspace before it waits
for anything, and DVC releases its own lock while a stage's command runs: a second `dvc exp run`
started meanwhile rewrites params.yaml under the first one's stages, which then train with the
other's params and log them under their own name. The project cannot make DVC wait, so it refuses:

- **The runner** (`python -m pipeline.experiments run`) holds a lock of its own on the workspace for
  the whole run (`hold`): a second runner, or a stage of any other DVC process, stops in one line
  naming the run that holds it.
- **Every stage run by DVC in a workspace** (`check_stage`) claims the workspace for the DVC process
  that runs it (`<workspace>/.dvc/tmp/rlan-workspace.json`: the process, the experiment, the text of
  params.yaml). A stage of another live DVC process stops in one line naming the running experiment;
  a later stage of the same process stops when params.yaml no longer is what the first one read.
  When a workspace experiment claims the workspace, its params.yaml must also be the one DVC staged
  for it (the stash commit `refs/exps/exec/EXEC_MERGE`, whose subject names the experiment): so a
  second experiment that overwrote it before the first stage started is caught too.
- The train stage checks again after training, before it registers the model under the experiment's
  name (`stages/train.py`).

Stages run by hand (no DVC process above them, e.g. the second node of a multi-node run) are not
checked; the queue's temporary copies are workspaces of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.params import differences, flatten, parse_yaml, shorten
from pipeline.tracking import process_alive

CLAIM = "rlan-workspace.json"  # in <workspace>/.dvc/tmp
RUNNER = "rlan-experiments"  # <workspace>/.dvc/tmp/rlan-experiments.lock and .json (who holds it)
EXEC_MERGE = "refs/exps/exec/EXEC_MERGE"  # DVC's stash commit of the experiment running in the workspace
_STASH_SUBJECT = re.compile(r"dvc-exp:[0-9a-f]+:[0-9a-f]*:(?P<name>[^:]*)(?::.*)?")
QUEUE = ("queue experiments instead (`dvc exp run --queue ...` then `dvc queue start`, or `python -m "
         "pipeline.experiments run --queue`): each runs in a copy of its own")
QUEUE_HINT = f"run one experiment at a time in a workspace, or {QUEUE}"
RESTORE_HINT = "restore the workspace with `git checkout -- params.yaml dvc.lock metrics && dvc checkout --force`"


class WorkspaceError(RuntimeError):
    """Another experiment holds this workspace, or params.yaml changed under a running one; one line."""


# --- processes ---------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of a process, None when it is gone or off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def _argv(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


DVC_MODULES = ("dvc", "pipeline.experiments.dvc_cli")  # `python -m` either is DVC (the second: the runner's)


def _is_dvc(argv: list[str]) -> bool:
    names = [os.path.basename(a) for a in argv[:2]]
    return bool(names) and (names[0] == "dvc" or names[1:] == ["dvc"]
                            or any(argv[1:3] == ["-m", m] for m in DVC_MODULES))


def _shown(argv: list[str]) -> str:
    """A command line as a user typed it (`dvc exp run -n e1 ...`), cut when long."""
    for i, a in enumerate(argv):
        if os.path.basename(a) == "dvc" or (a == "-m" and argv[i + 1 : i + 2] in [[m] for m in DVC_MODULES]):
            argv = ["dvc", *argv[i + (2 if a == "-m" else 1):]]
            break
    return shorten(" ".join(argv), 120)


def _ancestors() -> list[int]:
    pids, pid = [], os.getpid()
    while (found := _stat(pid)) is not None and found[0] > 1 and len(pids) < 64:
        pid = found[0]
        pids.append(pid)
    return pids


def _owner(pid: int) -> dict[str, str]:
    """How a claim records a process (the form of `pipeline.tracking.process_tags`)."""
    found = _stat(pid)
    return {"host": socket.gethostname(), "pid": str(pid), "pid_start": found[1] if found else "",
            "command": _shown(_argv(pid))}


def dvc_process() -> dict[str, str] | None:
    """The DVC process that runs this stage (the nearest `dvc` above it), None outside DVC."""
    if "DVC_STAGE" not in os.environ:
        return None
    return next((_owner(pid) for pid in _ancestors() if _is_dvc(_argv(pid))), None)


def dvc_args() -> list[str]:
    """The arguments of the DVC command that runs this stage (`exp run -S key=value ...`); [] outside DVC."""
    if "DVC_STAGE" not in os.environ:
        return []
    for pid in _ancestors():
        argv = _argv(pid)
        if _is_dvc(argv):
            return argv[1:] if os.path.basename(argv[0]) == "dvc" else argv[3:] if argv[1] == "-m" else argv[2:]
    return []


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "pid_start"))


# --- the runner's lock -----------------------------------------------------------------------------


def _tmp(workspace: Path) -> Path:
    return workspace / ".dvc" / "tmp"


def _read(path: Path) -> dict[str, Any] | None:
    """A small JSON record of this module; None when absent or unreadable (a half-written one is stale)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _since(record: dict[str, Any]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))


@contextlib.contextmanager
def hold(workspace: str | Path, command: str) -> Iterator[None]:
    """Hold the workspace for a run of experiments; WorkspaceError naming the holder when another has it.
    The lock is the kernel's (flock): it ends with the process, however that ends."""
    from filelock import FileLock, Timeout

    tmp = _tmp(Path(workspace))
    tmp.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(tmp / f"{RUNNER}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        found = _read(tmp / f"{RUNNER}.json") or {}
        raise WorkspaceError(f"this workspace is held by `{found.get('command', 'another run of experiments')}` "
                             f"(pid {found.get('pid', '?')}, since {_since(found)}); wait for it to end, or {QUEUE}") from None
    try:
        (tmp / f"{RUNNER}.json").write_text(json.dumps({**_owner(os.getpid()), "command": command,
                                                        "since": time.time()}))
        yield
    finally:
        (tmp / f"{RUNNER}.json").unlink(missing_ok=True)
        lock.release()


def runner(workspace: str | Path) -> dict[str, Any] | None:
    """The run of experiments holding the workspace (its record), None when none does."""
    tmp = _tmp(Path(workspace))
    found = _read(tmp / f"{RUNNER}.json")
    return found if found is not None and process_alive(found) is not False else None


# --- a stage's claim -------------------------------------------------------------------------------


def _flat(text: str) -> dict[str, Any]:
    tree = parse_yaml(text)
    return flatten(tree) if isinstance(tree, dict) else {"(top level)": tree}


def changed_keys(before: str, after: str, labels: tuple[str, str]) -> str:
    """`key: <before label> X, <after label> Y` for the first keys that differ, and how many more."""
    lines = differences(parse_yaml(before), parse_yaml(after), labels)
    return "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _staged(experiment: str, text: str) -> None:
    """WorkspaceError unless DVC's stash commit of the experiment running in this workspace is this
    experiment's and holds this params.yaml (nothing to check without one: `dvc repro`, a stage by hand)."""
    subject = _git("log", "-1", "--format=%s", EXEC_MERGE)
    found = _STASH_SUBJECT.fullmatch((subject or "").strip())
    if found is None:
        return
    if found.group("name") != experiment:
        raise WorkspaceError(f"experiment {found.group('name') or '(unnamed)'} started in this workspace while "
                             f"experiment {experiment} was starting, and DVC gave it params.yaml: {experiment} stops "
                             f"here rather than train with another experiment's params; {QUEUE_HINT}; "
                             f"{RESTORE_HINT}")
    staged = _git("show", f"{EXEC_MERGE}:params.yaml")
    if staged is not None and _flat(staged) != _flat(text):
        raise WorkspaceError(f"params.yaml is not what DVC staged for experiment {experiment} ("
                             f"{changed_keys(staged, text, ('staged', 'now'))}): another `dvc exp run` or an edit "
                             f"wrote it; {QUEUE_HINT}; {RESTORE_HINT}")


def check_stage(params_path: str | Path) -> None:
    """A stage run by DVC claims this workspace for its DVC process, or finds it claimed by that process
    with the same params.yaml; WorkspaceError (one line) otherwise. Outside DVC: nothing to check."""
    from filelock import FileLock

    owner = dvc_process()
    if owner is None:
        return
    workspace = Path.cwd()
    held = runner(workspace)
    if held is not None and held.get("host") == socket.gethostname() and int(held["pid"]) not in _ancestors():
        raise WorkspaceError(f"this workspace is held by `{held.get('command')}` (pid {held['pid']}, since "
                             f"{_since(held)}): this stage of `{owner['command']}` stops before it reads "
                             f"params.yaml that run writes; {QUEUE_HINT}")
    experiment = os.environ.get("DVC_EXP_NAME") or "workspace"
    text = Path(params_path).read_text(errors="replace")
    tmp = _tmp(workspace)
    tmp.mkdir(parents=True, exist_ok=True)
    with FileLock(str(tmp / f"{CLAIM}.lock"), timeout=60):
        claim = _read(tmp / CLAIM)
        if claim is not None and process_alive(claim) is not False and not _same(claim, owner):
            raise WorkspaceError(f"this workspace is running experiment {claim.get('experiment')} (`"
                                 f"{claim.get('command')}`, pid {claim.get('pid')}, since {_since(claim)}): DVC "
                                 "writes an experiment's params.yaml before it waits for another, so two experiments "
                                 f"in one workspace train with each other's params; wait for it to end, or {QUEUE}")
        if claim is not None and _same(claim, owner):
            if _flat(claim["params"]) != _flat(text):
                raise WorkspaceError(f"params.yaml changed while experiment {experiment} runs ("
                                     f"{changed_keys(claim['params'], text, ('at its start', 'now'))}): another "
                                     "`dvc exp run` in this workspace (DVC writes its params.yaml before it waits) "
                                     f"or an edit wrote it; {experiment} stops here rather than train or register "
                                     f"a model with params that are not its own; {QUEUE_HINT}; {RESTORE_HINT}")
            return
        if "DVC_EXP_NAME" in os.environ:
            _staged(experiment, text)
        record = {**owner, "experiment": experiment, "since": time.time(), "params": text}
        tmp_claim = tmp / f"{CLAIM}.{os.getpid()}"
        tmp_claim.write_text(json.dumps(record))
        os.replace(tmp_claim, tmp / CLAIM)
