"""DVC's command line as the experiments runner runs it: `python -m pipeline.experiments.dvc_cli ARGS`
is `dvc ARGS`, without DVC's "No file hash info found for '...'. It won't be created." warnings.

Why they come and why they say nothing here: before it runs an experiment, DVC's executor checks
out every cached output that the baseline's dvc.lock records, and warns once per output that the
lock records no hash for. The repository commits no dvc.lock (docs/experiments.md#a-fresh-clone), so
every experiment begins with one warning per cached output (12), although there is nothing to check
out: the runner runs every stage (`--force`) and each writes its outputs. DVC has no option to skip
that checkout, so the two loggers that emit the warning drop exactly that message; everything else
DVC logs, other warnings included, passes.
"""

from __future__ import annotations

import logging
import sys

MODULE = "pipeline.experiments.dvc_cli"
CHECKOUT_LOGGERS = ("dvc_data.index.checkout", "dvc_data.hashfile.checkout")
NO_HASH = "No file hash info found for "


class NoHashInfo(logging.Filter):
    """Drops DVC's warning about an output without a recorded hash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_HASH)


def quiet_checkout() -> None:
    for name in CHECKOUT_LOGGERS:
        logging.getLogger(name).addFilter(NoHashInfo())


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main

    quiet_checkout()
    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
