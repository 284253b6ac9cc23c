"""Benchmark of what the integrity checks and the MLflow model cost: verifying the full cache,
saving and verifying a production-size checkpoint, logging and registering the model.

    python -m benchmarks.integrity [--cache data/cache]

Needs the full cache (`dvc repro augment`). Verification times are with the files in the page
cache (right after a build or a read); from a cold disk add the time to read 260 MB.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Row, print_table


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cache(cache: Path) -> list[Row]:
    from pipeline import integrity
    from pipeline.cache import CELLS_FILE, CacheReader
    from pipeline.io import read_json

    files = read_json(cache / "manifest.json")["files"]
    cells = cache / CELLS_FILE
    mb = cells.stat().st_size / 1e6
    integrity.digest(cells)  # into the page cache
    verify = best_of(lambda: integrity.verify(cache, files, ""))
    rows = [Row(f"verify the cache ({sum(f['size'] for f in files.values()) / 1e6:.0f} MB, 2 threads)", verify, "s",
                "<= 0.5", verify <= 0.5)]
    for threads in (1, 2):
        integrity.THREADS = threads
        t = best_of(lambda: integrity.digest(cells))
        rows.append(Row(f"sha256-16m of cells.npy, {threads} thread(s)", mb / 1e3 / t, "GB/s"))
    rows.append(Row("open CacheReader (verification included)", best_of(lambda: CacheReader(cache), 3), "s"))
    return rows


def bench_checkpoint_and_model(cache: Path) -> list[Row]:
    from pipeline.model import RLAN
    from pipeline.model.io import save_model
    from pipeline.params import load_params
    from pipeline.tracking import Tracker, mlflow_model
    from pipeline.train import checkpoint

    params = load_params(REPO / "params.yaml")
    model = RLAN(params.model)
    n = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = {"fingerprint": "fp", "epoch": 1, "model": model.state_dict(), "ema": model.state_dict(),
                 "optimizer": {k: [v.clone(), v.clone()] for k, v in model.state_dict().items()}}
        save = best_of(lambda: checkpoint.save(tmp / "ckpt", state, {}), 3)
        size = (tmp / "ckpt" / checkpoint.LAST).stat().st_size / 1e6
        rows.append(Row(f"save a checkpoint ({size:.0f} MB, digest included)", save, "s"))
        rows.append(Row("verify it before resuming", best_of(lambda: checkpoint.verify(tmp / "ckpt")), "s"))

        save_model(tmp / "model.pt", model, {"temperature": 0.5, "epochs": 1, "fingerprint": "fp"})
        tracker = Tracker(params.override({"tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}))
        tracker.start("benchmark")
        import mlflow.pytorch  # noqa: F401 - imports warm: the stage has imported them by then

        t0 = time.perf_counter()
        mlflow_model.publish(tracker, tmp / "model.pt", cache)
        rows.append(Row(f"log + register the model ({n / 1e6:.1f}M params), CPU", time.perf_counter() - t0, "s",
                        "<= 10", time.perf_counter() - t0 <= 10))
        tracker.end()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(REPO / "data" / "cache"))
    args = ap.parse_args()
    cache = Path(args.cache)
    print_table("Integrity checks and the MLflow model", bench_cache(cache) + bench_checkpoint_and_model(cache))


if __name__ == "__main__":
    main()
