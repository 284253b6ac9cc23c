"""A small CPU study: the stable and the fixed configuration (or any named experiments) at the cpu
scale of `pipeline.experiments.runner.SCALES`, through the real workflow in a clone of HEAD (the named
experiments, each at one or more seeds, then the compare report: mean and spread over the seeds).
Prints the compare report with the gap table and the time; `--study PAGE` also writes the study page
(`python -m pipeline.experiments study`, every figure read from the runs) into this repository.

    python -m benchmarks.gap_study [--scale cpu] [--seeds 3] [--jobs 2] [--keep DIR] [--study PAGE] [NAME|GROUP ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO
from pipeline.experiments.runner import DEFAULT, SCALES, child_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=DEFAULT, help="experiments or groups (default: stable fixed)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--seeds", type=int, default=1, help="repeats of each experiment, one seed each")
    ap.add_argument("--jobs", type=int, default=1, help="> 1: run them in the DVC queue, this many at a time")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (created if missing)")
    ap.add_argument("--study", default=None, help="write the study page here, relative to this repository "
                                                   "(e.g. docs/cpu-study.md)")
    args = ap.parse_args()

    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="gap_study_"))
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo"
    if repo.exists():
        sys.exit(f"{repo} exists already: give --keep a new or empty directory")
    env = child_env(REPO)
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    queue = ["--queue", "-j", str(args.jobs)] if args.jobs > 1 else []
    subprocess.run([sys.executable, "-m", "pipeline.experiments", "run", "--scale", args.scale, "--seeds",
                    str(args.seeds), *queue, *args.names], cwd=repo, env=env, check=True)
    report = subprocess.run([sys.executable, "-m", "pipeline.experiments", "compare", "--scale", args.scale,
                             *args.names], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout
    print(f"\nGap study at the {args.scale} scale ({SCALES[args.scale].about}), {args.seeds} seed(s): "
          f"{time.perf_counter() - t0:.0f} s "
          f"on this machine, work dir {work}\n")
    print(report)
    if args.study:
        subprocess.run([sys.executable, "-m", "pipeline.experiments", "study", "--scale", args.scale, *args.names,
                        "--write", args.study], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        (REPO / args.study).write_text((repo / args.study).read_text())
        print(f"study page: {REPO / args.study}")


if __name__ == "__main__":
    main()
