"""The stable and fixed configurations as named DVC experiments, and their side-by-side comparison.

`params.yaml` is the stable configuration. The fixed configuration is declared once, here, as the
overrides of seed 004 section 8 (plus the faster EMA of the public fixed config): no Gumbel noise,
task-conditioned clue queries, a constant temperature of 0.5, entropy on the raw softmax, KL
consistency 0.1, inverse augmentation and voting at evaluation, evaluation every epoch.

    python -m pipeline.experiments run [--queue -j 2] [NAME ...]   # dvc exp run -n NAME -S ... from HEAD
    python -m pipeline.experiments compare stable fixed [--out metrics/compare]
    python -m pipeline.experiments overrides fixed                 # the -S arguments, to use by hand

then `dvc metrics diff stable fixed`, `dvc params diff stable fixed`, `dvc plots diff stable fixed`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.io import atomic_path
from pipeline.monitor import STATUS_CODE

log = logging.getLogger(__name__)

FIXED: dict[str, Any] = {
    "model.use_gumbel_softmax": False,  # train like eval: no Gumbel noise
    "model.task_conditioned_clues": True,  # clue queries projected from the task context
    "train.temperature_start": 0.5,  # no temperature decay
    "train.temperature_end": 0.5,
    "train.entropy_on_raw_logits": True,  # entropy of the raw softmax, not of the noise
    "train.lambda_kl_consistency": 0.1,
    "train.eval_every": 1,  # gap visible every epoch
    "train.ema_decay": 0.99,  # the EMA follows the weights closely (seed 004 section 6)
    "evaluate.use_inverse_aug": True,
    "evaluate.num_augmented_views": 8,
    "evaluate.use_voting": True,
}
EXPERIMENTS: dict[str, dict[str, Any]] = {"stable": {}, "fixed": FIXED}
GAP_MEASURES = ("exact_match_gap", "exact_match_relative_gap", "attention_entropy_ratio", "stop_value_gap", "loss_ratio")
RATIOS = {"attention_entropy_ratio", "loss_ratio"}  # 1 is no gap


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments, values written as YAML scalars (what dvc parses)."""
    out = []
    for k, v in overrides.items():
        out += ["-S", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


def _dvc(args: list[str], cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=capture, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{proc.stdout if capture else ''}{proc.stderr if capture else ''}")
    return proc


def existing(cwd: Path) -> set[str]:
    out = _dvc(["exp", "list", "--name-only"], cwd).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def run(names: list[str], cwd: Path, queue: bool = False, jobs: int = 1) -> None:
    """Run the named experiments from the committed baseline, replacing earlier ones of those names.
    Every stage of each runs (`--force`: the data stages take seconds), so each experiment has its own
    MLflow run; a training identical to one already finished is restored from its checkpoint, not
    repeated. In the workspace they run one after the other, `stable` last so that the workspace
    ends on the committed params; with `queue`, in temporary copies, `jobs` at a time."""
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; declared: {sorted(EXPERIMENTS)}")
    stale = sorted(set(names) & existing(cwd))
    if stale:
        _dvc(["exp", "remove", *stale], cwd)
    ordered = sorted(names, key=lambda n: n == "stable")
    for name in ordered:
        log.info("%s experiment %s %s", "queueing" if queue else "running", name, " ".join(set_args(EXPERIMENTS[name])))
        _dvc(["exp", "run", "--force", *(["--queue"] if queue else []), "-n", name, *set_args(EXPERIMENTS[name])],
             cwd, capture=queue)
    if queue:
        _dvc(["queue", "start", "-j", str(jobs)], cwd)
        wait_for_queue(cwd)
        missing = sorted(set(names) - existing(cwd))
        if missing:
            logs = _dvc(["queue", "status"], cwd).stdout
            raise RuntimeError(f"queued experiment(s) {missing} did not finish:\n{logs}")


def wait_for_queue(cwd: Path, poll: float = 2.0, timeout: float = 7 * 24 * 3600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _dvc(["queue", "status"], cwd).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return
        time.sleep(poll)
    raise TimeoutError("the experiment queue did not finish")


# --- comparison ---------------------------------------------------------------------------


def experiment_revs(cwd: Path) -> dict[str, str]:
    """Name -> commit of every experiment of the current baseline."""
    shown = json.loads(_dvc(["exp", "show", "--json"], cwd).stdout)
    revs = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            if exp.get("name") and exp.get("revs"):
                revs[exp["name"]] = exp["revs"][0]["rev"]
    return revs


def read_at(rev: str, path: str, cwd: Path) -> str:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FileNotFoundError(f"{path} is not in experiment commit {rev[:7]}: {proc.stderr.strip()}")
    return proc.stdout


def distance(measure: str, value: float) -> float:
    """How far a gap is from none: |value|, or |log ratio| for ratios."""
    if measure in RATIOS:
        return abs(math.log(max(value, 1e-12)))
    return abs(value)


def compare(a: str, b: str, cwd: Path, out: Path) -> str:
    """Write `out/compare.md` and overlaid curves for experiments a and b; return the Markdown."""
    from pipeline.report import plot_curves

    revs = experiment_revs(cwd)
    for name in (a, b):
        if name not in revs:
            raise SystemExit(f"no experiment named {name!r}; run `python -m pipeline.experiments run {name}`")
    gaps = {n: json.loads(read_at(revs[n], "metrics/gap.json", cwd)) for n in (a, b)}
    evals = {n: json.loads(read_at(revs[n], "metrics/eval.json", cwd)) for n in (a, b)}
    series = {n: pd.read_csv(io.StringIO(read_at(revs[n], "metrics/train/epochs.tsv", cwd)), sep="\t") for n in (a, b)}
    status = {v: k for k, v in STATUS_CODE.items()}
    lines = [f"# {a} vs {b}", "", f"Experiments {a} ({revs[a][:7]}) and {b} ({revs[b][:7]}).", "",
             f"| gap | {a} | {b} | smaller gap |", "|---|---|---|---|"]
    verdicts = []
    for group in [g for g in ("training", "evaluation") if g in gaps[a] and g in gaps[b]]:
        for m in GAP_MEASURES:
            ga, gb = gaps[a][group], gaps[b][group]
            va, vb = ga[m], gb[m]
            da, db = distance(m, va), distance(m, vb)
            winner = a if da < db else b if db < da else "tie"
            lines.append(f"| {group}: {m} | {va:.4f} ({status[ga[m + '_status']]}) | "
                         f"{vb:.4f} ({status[gb[m + '_status']]}) | {winner} |")
            verdicts.append(f"- {group}: {m}: " + (
                f"{winner} has the smaller gap ({min(da, db):.4f} vs {max(da, db):.4f} from none)"
                if winner != "tie" else f"the same gap in both ({va:.4f})"))
    lines += ["", f"Overall status: {a} {status[gaps[a]['overall_status']]}, {b} {status[gaps[b]['overall_status']]}.",
              "", *verdicts, "", "| evaluation | " + " | ".join(f"{n} {s}" for n in (a, b) for s in ("train", "eval")) + " |",
              "|---|" + "---|" * 4]
    for k in evals[a]["eval"]:
        lines.append(f"| {k} | " + " | ".join(f"{evals[n][s][k]:.4g}" for n in (a, b) for s in ("train", "eval")) + " |")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        figures = plot_curves(series, tmp)
        lines += ["", "## Curves", ""] + [f"![{title}]({name})" for name, title in figures]
        text = "\n".join(lines) + "\n"
        (tmp / "compare.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    from pipeline.stage import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run named experiments with dvc exp run")
    r.add_argument("names", nargs="*", default=list(EXPERIMENTS))
    r.add_argument("--queue", action="store_true", help="queue them and run with dvc queue start")
    r.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers")
    c = sub.add_parser("compare", help="gap reports of two experiments side by side")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--out", default="metrics/compare")
    o = sub.add_parser("overrides", help="print the -S arguments of an experiment")
    o.add_argument("name", choices=sorted(EXPERIMENTS))
    args = ap.parse_args(argv)
    cwd = Path(os.getcwd())
    if args.cmd == "run":
        run(args.names, cwd, args.queue, args.jobs)
    elif args.cmd == "compare":
        print(compare(args.a, args.b, cwd, Path(args.out)))
    else:
        print(" ".join(set_args(EXPERIMENTS[args.name])))


if __name__ == "__main__":
    main()
