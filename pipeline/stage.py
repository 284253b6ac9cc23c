"""What every stage script does first: logging set-up and its command line; how a command that
runs others (the experiment runner, `make run`) waits for them and ends."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from typing import Any


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
    logging.getLogger("stage").error(message)
    sys.exit(code)


INTERRUPTED = 128 + signal.SIGINT  # the exit status after Ctrl-C


def run_foreground(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` for a child in this terminal's process group. Ctrl-C reaches the child as
    well, which stops on its own (a training saying where it will resume, DVC cleaning up): this
    process waits for it instead of killing it half way, then raises KeyboardInterrupt."""
    caught: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum)) if main else None
    try:
        proc = subprocess.run(cmd, **kwargs)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
    return proc
