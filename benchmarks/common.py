"""Helpers shared by the benchmark scripts: timing a child process and printing a result table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run a command from the repository root; (wall seconds, peak RSS of that child in GB)."""
    # stage commands call `python`: make it this interpreter
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # the resource usage of this child alone
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, usage.ru_maxrss / 1024**2


def dir_size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    width = max(44, *(len(r.name) for r in rows))
    print(f"| {'measure':<{width}} | {'value':>12} | {'unit':<10} | {'target':<10} | ok  |")
    print(f"|{'-' * (width + 2)}|{'-' * 14}|{'-' * 12}|{'-' * 12}|-----|")
    for r in rows:
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        value = f"{r.value:,.0f}" if abs(r.value) >= 1000 else f"{r.value:.3f}"
        print(f"| {r.name:<{width}} | {value:>12} | {r.unit:<10} | {r.target:<10} | {ok:<3} |")
