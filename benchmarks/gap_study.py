"""A small CPU study: the stable and the fixed configuration trained for the same budget on a
subset of ARC-AGI-1, through the real workflow (a clone of HEAD, `dvc repro`, the two named
experiments, the compare report). Prints the compare report with the gap table.

    python -m benchmarks.gap_study [--tasks 20] [--samples 100] [--epochs 12] [--steps 30] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO

TINY_MODEL = {"model.hidden_dim": 32, "model.num_solver_steps": 3, "model.max_clues": 3, "model.spatial_downsample": 4,
              "model.dsc_num_heads": 2, "model.solver_context_heads": 2}


def sh(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=20, help="tasks per split")
    ap.add_argument("--samples", type=int, default=100, help="augmented versions per task")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary dir)")
    args = ap.parse_args()

    from pipeline.params import load_params

    overrides = {**TINY_MODEL, "data.max_tasks": args.tasks, "augment.samples_per_task": args.samples,
                 "train.epochs": args.epochs, "train.steps_per_epoch": args.steps, "train.batch_size": 16,
                 "train.grad_accumulation_steps": 1, "train.heldout_tasks": args.tasks, "train.device": "cpu",
                 "train.save_every": args.epochs, "evaluate.device": "cpu", "evaluate.batch_size": 128}
    params = load_params(REPO / "params.yaml").override(overrides)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gap_study_"))
    repo = work / "repo"
    t0 = time.perf_counter()
    sh(["git", "clone", "-q", str(REPO), str(repo)], work)
    (repo / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    for cmd in (["git", "commit", "-qam", "gap study params"], [sys.executable, "-m", "dvc", "repro", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "baseline outputs"],
                [sys.executable, "-m", "pipeline.experiments", "run", "--queue", "-j", "2"]):
        sh(cmd, repo)
    report = subprocess.run([sys.executable, "-m", "pipeline.experiments", "compare", "stable", "fixed"], cwd=repo,
                            check=True, capture_output=True, text=True).stdout
    print(f"\nGap study: {args.tasks}+{args.tasks} tasks, {args.samples} versions each, {args.epochs} epochs x "
          f"{args.steps} steps of batch 16, tiny model ({time.perf_counter() - t0:.0f} s, work dir {work})\n")
    print(report)


if __name__ == "__main__":
    main()
