"""Watching DVC's queue for what no one will finish: a task whose worker process is gone, and the
tasks an earlier run of the runner left when it was killed.

DVC lists a task as `Running` until its worker reports its end; a worker killed with SIGKILL (or a
machine that lost it) never does, and a runner waiting for the queue would wait forever. The facts
used here: DVC records each task's process (`.dvc/tmp/exps/run/<task>/<task>.json`: its pid and, once
it ended, its return code) and its log (`<task>.out` beside it). A `Running` task whose process is
gone (no such pid, or a pid now used by another program), or which has no process while no worker
is active, and whose log has not grown, for `DEAD_POLLS` polls in a row, is dead: it is marked failed
in the queue (`dvc queue kill`, which finds the process gone; its record is first closed so that no
signal can reach a process that reuses the pid) and the MLflow runs its stages left RUNNING are
marked KILLED. Its training's checkpoint stays: the same command resumes it.

The runner holds the workspace (pipeline.experiments.runlock), so a task that is `Running` or
`Queued` under the name of an experiment it is about to queue was left by an earlier runner that was
killed; queueing it again would run it twice. `orphans` stops such a running task as Ctrl-C would
(its training saves and the next run resumes it), waits for it within `STOP_WAIT_S`, saying so, and
removes such a queued one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEAD_POLLS = 3  # polls in a row (5 s apart in the runner) that a task must look dead before it is called so
STOP_WAIT_S = 120.0  # how long an interrupted orphan may take to stop before it is killed
Dvc = Callable[[list[str]], str]  # runs `dvc ARGS` in the workspace and returns its output


@dataclass(frozen=True)
class Task:
    """One row of `dvc queue status`."""
    rev: str  # DVC's short task id (the queue entry's stash commit)
    name: str
    status: str  # Queued, Running, Success, Failed


def tasks(status: str) -> list[Task]:
    """The rows of `dvc queue status` (its table, not the worker line)."""
    out = []
    for row in status.splitlines()[1:]:
        parts = row.split()
        if len(parts) >= 4 and not row.startswith("Worker") and re.fullmatch(r"[0-9a-f]{7,}", parts[0]):
            out.append(Task(parts[0], parts[1], parts[-1]))
    return out


class QueueError(RuntimeError):
    """Tasks an earlier run left in the queue would not stop."""


def task_id(cwd: Path, task: Task) -> str:
    """The task's full id where DVC's folder of it shows it (dvc commands take it where two tasks share
    a name), else its short one."""
    folder = task_dir(cwd, task)
    return folder.name if folder is not None else task.rev


def active_workers(status: str) -> int:
    m = re.search(r"Worker status: (\d+) active", status)
    return int(m.group(1)) if m else 0


def task_dir(cwd: Path, task: Task) -> Path | None:
    """DVC's folder of the task's process record and log (`.dvc/tmp/exps/run/<full task id>`)."""
    return next(iter(sorted((cwd / ".dvc" / "tmp" / "exps" / "run").glob(f"{task.rev}*"))), None)


def process_record(cwd: Path, task: Task) -> tuple[Path, dict] | None:
    """(path, content) of DVC's record of the task's process: pid, returncode (None while it runs)."""
    folder = task_dir(cwd, task)
    path = folder / f"{folder.name}.json" if folder is not None else None
    try:
        return (path, json.loads(path.read_text())) if path is not None else None
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def runs_task(pid: int) -> bool:
    """Whether process `pid` exists and is DVC running a queued task (`dvc exp exec-run`): a pid that a
    new process reuses is not the task's."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: whether the pid exists is all that can be told
        from pipeline.tracking import pid_exists  # here: the tracking package loads MLflow

        return pid_exists(pid)
    return b"exec-run" in cmdline or not cmdline  # empty while a process is being started: cannot tell


def log_size(cwd: Path, task: Task) -> int:
    folder = task_dir(cwd, task)
    try:
        return sum(p.stat().st_size for p in folder.glob("*.out")) if folder is not None else 0
    except OSError:
        return 0


def looks_dead(cwd: Path, task: Task, workers: int) -> bool:
    """One poll's facts: a running task whose process is gone, or that has no process while no worker
    is active (one that has just taken it has not started it yet)."""
    record = process_record(cwd, task)
    if record is None:
        return workers == 0
    info = record[1]
    if info.get("returncode") is not None:  # the process ended; its worker should have reported it
        return workers == 0
    return not runs_task(int(info.get("pid", 0)))


class Watch:
    """Dead running tasks over successive polls of `dvc queue status` (`dead`)."""

    def __init__(self, cwd: Path, polls: int = DEAD_POLLS):
        self.cwd, self.polls = cwd, polls
        self.suspect: dict[str, tuple[int, int]] = {}  # task -> (polls in a row it looked dead, its log's size)

    def dead(self, status: str) -> list[Task]:
        """The running tasks that looked dead, with a log that did not grow, for `polls` polls in a row."""
        workers, found, seen = active_workers(status), [], {}
        for task in (t for t in tasks(status) if t.status == "Running"):
            size = log_size(self.cwd, task)
            count, before = self.suspect.get(task.rev, (0, size))
            count = count + 1 if looks_dead(self.cwd, task, workers) and size == before else 0
            seen[task.rev] = (count, size)
            if count >= self.polls:
                found.append(task)
        self.suspect = seen
        return found


def bury(cwd: Path, task: Task, dvc: Dvc, why: str = f"its log has not grown for {DEAD_POLLS} polls") -> None:
    """Mark a dead task failed in the queue and its stages' MLflow runs KILLED, in one line."""
    record = process_record(cwd, task)
    pid = record[1].get("pid") if record is not None else None
    if record is not None and record[1].get("returncode") is None:
        path, info = record
        info["returncode"] = -1  # closed, as DVC closes it when it finds the process gone: no signal is sent
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)
    dvc(["queue", "kill", task_id(cwd, task)])  # the process is gone: DVC marks the task failed
    closed = close_killed_runs(cwd)
    log.warning("queued experiment %s (task %s) is dead: its process%s is gone and %s; marked failed in the "
                "queue%s. Its training's checkpoint stays: the same command resumes it",
                task.name, task.rev, f" (pid {pid})" if pid else "", why,
                f", its MLflow run(s) {', '.join(closed)} marked KILLED" if closed else "")


def close_killed_runs(cwd: Path) -> list[str]:
    """Mark KILLED the MLflow runs of the store of HEAD's params.yaml that a process of this host left
    RUNNING and that is gone (pipeline.tracking.close_dead_runs); none when the store cannot be used."""
    from pipeline import tracking
    from pipeline.experiments.committed import committed_text
    from pipeline.params import ParamsError, parse_params, parse_yaml
    from pipeline.tracking.client import TrackingLost

    try:
        params = parse_params(parse_yaml(committed_text(cwd / "params.yaml") or "{}"))
        client = tracking.client_for(params.tracking)
        found = client.get_experiment_by_name(params.tracking.experiment_name)
        return tracking.close_dead_runs(client, found.experiment_id) if found is not None else []
    except (ParamsError, tracking.TrackingError, TrackingLost) as err:
        log.warning("could not mark the dead task's MLflow runs KILLED (%s); the next run of its experiment does", err)
        return []


def orphans(cwd: Path, names: list[str], status: str, dvc: Dvc, poll: float = 2.0,
            wait_s: float = STOP_WAIT_S, kill_wait_s: float = 30.0) -> None:
    """Before queueing `names`: the tasks of those names that an earlier runner left in the queue. A
    running one is interrupted as Ctrl-C would (its training saves, the next run resumes it) and
    waited for, at most `wait_s` (then killed, and `kill_wait_s` more), with a line every 10 s; a dead one is
    marked failed (`bury`); a queued one is removed. So no experiment is queued twice."""
    left = [t for t in tasks(status) if t.name in names and t.status in ("Running", "Queued")]
    if not left:
        return
    workers = active_workers(status)
    queued = [t for t in left if t.status == "Queued"]
    dead = [t for t in left if t.status == "Running" and looks_dead(cwd, t, workers)]
    running = [t for t in left if t.status == "Running" and t not in dead]
    for task in dead:
        bury(cwd, task, dvc, "no runner waits for it (an earlier run that was killed queued it)")
    if queued:
        log.warning("the queue still holds %s, queued by an earlier run that was stopped: removed, as this run "
                    "queues them again", ", ".join(t.name for t in queued))
        dvc(["queue", "remove", *(task_id(cwd, t) for t in queued)])
    if not running:
        return
    log.warning("the queue is still running %s, started by an earlier run that was killed: interrupting them as "
                "Ctrl-C would (each training saves; this run resumes it from its checkpoint) and waiting for them to "
                "stop (at most %.0f s)", ", ".join(t.name for t in running), wait_s)
    ids = {t.rev: task_id(cwd, t) for t in running}
    dvc(["queue", "kill", *ids.values()])
    t0, said, forced = time.time(), time.time(), False
    while True:
        still = [t for t in tasks(dvc(["queue", "status"])) if t.rev in ids and t.status == "Running"]
        if not still:
            log.info("the earlier run's experiments stopped after %.0f s", time.time() - t0)
            return
        if time.time() - t0 > wait_s + (kill_wait_s if forced else 0):
            if forced:
                raise QueueError(f"{', '.join(t.name for t in still)}, left running by an earlier run, did not stop "
                                 f"within {wait_s + kill_wait_s:.0f} s, even killed; see `dvc queue status` and "
                                 "`dvc queue logs NAME`")
            log.warning("%s did not stop within %.0f s: killing them", ", ".join(t.name for t in still), wait_s)
            dvc(["queue", "kill", "--force", *(ids[t.rev] for t in still)])
            forced = True
        elif time.time() - said >= 10:
            log.info("waiting for %s to stop (%.0f s so far)", ", ".join(t.name for t in still), time.time() - t0)
            said = time.time()
        time.sleep(poll)
