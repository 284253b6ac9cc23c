"""Stage `augment`: the augmentation cache (samples_per_task versions of every task)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import arc
from pipeline.cache import build_cache
from pipeline.io import write_json
from pipeline.stage import parser, run, setup_logging, stage_params

log = logging.getLogger("augment")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--raw", required=True, help="raw data directory (stage prepare)")
    ap.add_argument("--out", required=True, help="cache directory")
    ap.add_argument("--metrics", required=True, help="cache counts (JSON)")
    args = ap.parse_args()
    setup_logging()
    p = stage_params(args.params).augment

    tasks = arc.read_raw(Path(args.raw) / "pairs.parquet")
    manifest = build_cache(tasks, p, args.out)
    if manifest["shortfall_tasks"]:
        log.warning("%d task(s) have fewer than %d distinct versions (%d repeated samples): %s",
                    len(manifest["shortfall_tasks"]), p.samples_per_task, manifest["repeated_samples"],
                    ", ".join(f"{s['task_id']}={s['distinct_versions']}" for s in manifest["shortfall_tasks"][:10]))
    write_json(args.metrics, {
        "samples": manifest["samples"],
        "tasks": manifest["tasks"]["train"] + manifest["tasks"]["eval"],
        "pairs": manifest["pairs"],
        "cells_bytes": manifest["cells_bytes"],
        "shortfall_tasks": len(manifest["shortfall_tasks"]),
        "repeated_samples": manifest["repeated_samples"],
    })
    log.info("cache: %d samples, %.1f MB of cells", manifest["samples"], manifest["cells_bytes"] / 1e6)


if __name__ == "__main__":
    run(main)
