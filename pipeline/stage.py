"""What every stage script does first: logging set-up and its command line."""

from __future__ import annotations

import argparse
import logging
import sys


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
