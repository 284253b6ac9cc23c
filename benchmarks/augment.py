"""Benchmark of the data stages: the full 400K cache build, the loader, and a no-op `dvc repro`.

    python -m benchmarks.augment [--skip-dvc]

Builds the cache from `data/raw` (run `dvc repro prepare` first) into a temporary directory with
the stage's own command, so wall time and peak memory are the stage's, import time included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, Row, dir_size_gb, print_table, run_child


def bench_build(tmp: Path) -> list[Row]:
    cache = tmp / "cache"
    wall, peak = run_child([sys.executable, "-m", "stages.augment", "--raw", "data/raw", "--out", str(cache),
                            "--metrics", str(tmp / "augment.json")])
    from pipeline.cache import CacheReader

    n = len(CacheReader(cache))
    return [
        Row("cache build: samples", n, "samples"),
        Row("cache build: wall time (2 cores)", wall, "s", "<= 15", wall <= 15),
        Row("cache build: size on disk", dir_size_gb(cache), "GB", "<= 0.6", dir_size_gb(cache) <= 0.6),
        Row("cache build: peak memory (RSS)", peak, "GB", "<= 2", peak <= 2),
    ]


def bench_loader(tmp: Path, batch: int = 256, seconds: float = 5.0) -> list[Row]:
    from pipeline.loader import AugmentedCache

    cache = AugmentedCache(tmp / "cache")
    rng = np.random.default_rng(0)
    rows = []
    for label, with_dihedral in (("loader: random batches", False), ("loader: batches under a dihedral", True)):
        for _ in range(3):  # warm-up
            cache.batch(rng.integers(0, len(cache), batch), rng)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ids = rng.integers(0, len(cache), batch)
            cache.batch(ids, rng, dihedral=rng.integers(0, 8, batch) if with_dihedral else None)
            n += batch
        rate = n / (time.perf_counter() - t0)
        rows.append(Row(f"{label} of {batch}", rate, "samples/s", ">= 20000" if not with_dihedral else "",
                        rate >= 20000 if not with_dihedral else None))
    return rows


def bench_dvc_noop() -> list[Row]:
    dvc = [sys.executable, "-m", "dvc", "repro", "validate_params", "prepare", "augment"]
    run_child(dvc)  # bring the data stages up to date first
    wall, _ = run_child(dvc)
    return [Row("dvc repro, nothing changed (data stages)", wall, "s", "<= 3", wall <= 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-dvc", action="store_true", help="do not time `dvc repro` in this repository")
    args = ap.parse_args()
    if not (REPO / "data/raw/pairs.parquet").exists():
        sys.exit("data/raw is missing: run `dvc repro prepare` first")
    with tempfile.TemporaryDirectory(dir=REPO / "data") as d:
        tmp = Path(d)
        rows = bench_build(tmp) + bench_loader(tmp)
    if not args.skip_dvc:
        rows += bench_dvc_noop()
    print_table("Data stages (augmentation cache, loader, DVC)", rows)


if __name__ == "__main__":
    main()
