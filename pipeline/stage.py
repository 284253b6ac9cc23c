"""What every stage script does: logging set-up, its command line, its params, and its end; how a
command that runs others (the experiment runner, `make run`) waits for them and ends.

`run(main)` runs a stage's main: first it removes what killed stages left beside the workspace's
outputs (`pipeline.io.remove_stale_temporaries` over the folders of the outputs dvc.yaml declares),
then the known failures end the stage with their one line and no traceback: a bad params.yaml, an
output that cannot be written, damaged data, an MLflow store that cannot be used or was lost, another
experiment in the workspace.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline.experiments import runlock
from pipeline.integrity import IntegrityError
from pipeline.io import OutputError, remove_stale_temporaries
from pipeline.params import Params, ParamsError, load_params
from pipeline.tracking import TrackingError
from pipeline.tracking.client import TrackingLost

log = logging.getLogger("stage")
FAILURES = (ParamsError, OutputError, IntegrityError, TrackingError, TrackingLost, runlock.WorkspaceError)


# Set by the experiment runner for a run outside the queue: every log line names the experiment first
# (in the queue, the runner reads each task's log and puts the name in front itself)
EXPERIMENT_ENV = "PIPELINE_EXPERIMENT"


def setup_logging(level: int = logging.INFO) -> None:
    experiment = os.environ.get(EXPERIMENT_ENV, "").replace("%", "%%")
    logging.basicConfig(
        level=level,
        format=(f"{experiment}: " if experiment else "") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


def fail(message: str, code: int = 1) -> None:
    """End a stage with a clear error line and no traceback."""
    log.error(message)
    sys.exit(code)


def stage_params(path: str | Path) -> Params:
    """The stage's params: read defensively and validated (ParamsError), and, when DVC runs the stage,
    this workspace checked to be this experiment's (pipeline.experiments.runlock, WorkspaceError)."""
    loaded = load_params(path)
    runlock.check_stage(path)
    return loaded


def output_folders(dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    """The folders that hold the outputs of the pipeline in this workspace (from dvc.yaml; none without it)."""
    try:
        stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    paths = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() if isinstance(s, dict)
             for kind in ("outs", "metrics", "plots") for o in s.get(kind) or []}
    return sorted({Path(p).parent for p in paths if isinstance(p, str)})


def run(main: Callable[[], None]) -> None:
    """Run a stage (see the module's doc)."""
    setup_logging()
    try:
        for path in remove_stale_temporaries(output_folders()):
            log.info("removed %s, left by a stage that was killed", path)
    except OSError as err:  # a sweep that cannot remove something does not stop the stage
        log.warning("could not remove a temporary output left by a killed stage: %s", err)
    try:
        main()
    except FAILURES as err:
        fail(str(err))


INTERRUPTED = 128 + signal.SIGINT  # the exit status after Ctrl-C
TERMINATED = 128 + signal.SIGTERM  # the exit status after SIGTERM (a batch scheduler's end, `timeout`, `kill`)


class Stopped(KeyboardInterrupt):
    """SIGTERM to a command that runs others (the runner, `make run`): handled where Ctrl-C is, so that
    it stops what it started the same way; `signum` tells which."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """In the block, SIGTERM raises Stopped (a KeyboardInterrupt) in the main thread, as Ctrl-C raises
    KeyboardInterrupt."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stopped) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def run_foreground(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` for a child in this terminal's process group. Ctrl-C reaches the child as
    well, which stops on its own (a training saying where it will resume, DVC cleaning up): this
    process waits for it instead of killing it half way, then raises KeyboardInterrupt. SIGTERM to
    this process is passed on to the child (a signal to the process alone, as `make` sends it, would
    not reach it), waited for in the same way, then raises Stopped."""
    caught: list[int] = []
    proc: subprocess.Popen | None = None

    def on_signal(signum: int, frame: Any) -> None:
        caught.append(signum)
        if signum == signal.SIGTERM and proc is not None:
            proc.send_signal(signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    try:
        with subprocess.Popen(cmd, **kwargs) as proc:
            if signal.SIGTERM in caught:  # before the child existed
                proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in caught:
        raise Stopped(signal.SIGTERM)
    if caught:
        raise KeyboardInterrupt
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
