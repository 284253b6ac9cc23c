"""Named experiments side by side: one table of every gap measure with the smallest gap marked, the
evaluation metrics, and one set of overlaid training curves. Each experiment's outputs are read from
its DVC experiment commit (`python -m pipeline.experiments compare stable fixed ...`)."""

from __future__ import annotations

import io
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.io import atomic_path
from pipeline.monitor import STATUS_CODE

GAP_MEASURES = ("exact_match_gap", "exact_match_relative_gap", "attention_entropy_ratio", "stop_value_gap",
                "loss_ratio")
RATIOS = {"attention_entropy_ratio", "loss_ratio"}  # 1 is no gap
STATUS = {code: name for name, code in STATUS_CODE.items()}


@dataclass(frozen=True)
class Outputs:
    """What one experiment wrote, read from its commit."""
    rev: str
    gap: dict[str, Any]  # metrics/gap.json
    evaluation: dict[str, dict[str, Any]]  # metrics/eval.json
    series: pd.DataFrame  # metrics/train/epochs.tsv
    meta_learning_start: int  # train.meta_learning_start_epoch


def read_at(rev: str, path: str, cwd: Path) -> str:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FileNotFoundError(f"{path} is not in experiment commit {rev[:7]}: {proc.stderr.strip()}")
    return proc.stdout


def read_outputs(rev: str, cwd: Path) -> Outputs:
    params = yaml.safe_load(read_at(rev, "params.yaml", cwd))
    return Outputs(rev, json.loads(read_at(rev, "metrics/gap.json", cwd)),
                   json.loads(read_at(rev, "metrics/eval.json", cwd)),
                   pd.read_csv(io.StringIO(read_at(rev, "metrics/train/epochs.tsv", cwd)), sep="\t"),
                   params["train"]["meta_learning_start_epoch"])


def distance(measure: str, value: float) -> float:
    """How far a gap is from none: |value|, or |log ratio| for ratios."""
    if measure in RATIOS:
        return abs(math.log(max(value, 1e-12)))
    return abs(value)


def smallest(measure: str, values: dict[str, float]) -> list[str]:
    """The experiments whose gap is closest to none; empty when every one has the same gap."""
    d = {n: distance(measure, v) for n, v in values.items()}
    best = min(d.values())
    winners = [n for n, x in d.items() if x == best]
    return [] if len(winners) == len(d) else winners


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def render(runs: dict[str, Outputs]) -> str:
    """The Markdown tables: gaps per view and measure (smallest in bold; — where an experiment's model
    does not measure it, e.g. the DSC's attention entropy of a TRM), then the evaluation metrics (every
    metric of any experiment)."""
    names = list(runs)
    views = [v for v in ("training", "evaluation") if all(v in r.gap for r in runs.values())]
    lines = [f"# {' vs '.join(names)}", "", "Experiments " + ", ".join(f"{n} ({r.rev[:7]})" for n, r in runs.items())
             + ". Distance from no gap: |gap| for differences, |log ratio| for ratios; — not measured.", "",
             f"| gap | {' | '.join(names)} | smallest gap |", "|---|" + "---|" * (len(names) + 1)]
    for view in views:
        for m in GAP_MEASURES:
            values = {n: r.gap[view][m] for n, r in runs.items() if m in r.gap[view]}
            if not values:
                continue
            best = smallest(m, values) if len(values) > 1 else []
            cells = [(f"**{values[n]:.4f}**" if n in best else f"{values[n]:.4f}")
                     + f" ({STATUS[runs[n].gap[view][m + '_status']]})" if n in values else "—" for n in names]
            lines.append(f"| {view}: {m} | {' | '.join(cells)} | {', '.join(best) or 'tie'} |")
    lines.append(f"| overall status | {' | '.join(STATUS[r.gap['overall_status']] for r in runs.values())} | |")
    lines += ["", f"| evaluation | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for side in ("train", "eval"):
        keys = list(dict.fromkeys(k for r in runs.values() for k in r.evaluation[side]))
        for k in keys:
            lines.append(f"| {side}: {k} | " + " | ".join(_number(r.evaluation[side].get(k)) for r in runs.values())
                         + " |")
    return "\n".join(lines) + "\n"


def compare(revs: dict[str, str], cwd: Path, out: Path) -> str:
    """Write `out/compare.md` and the overlaid curves of the experiments (name -> commit); return the
    Markdown."""
    from pipeline.report import plot_curves

    runs = {name: read_outputs(rev, cwd) for name, rev in revs.items()}
    text = render(runs)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        figures = plot_curves({n: r.series for n, r in runs.items()}, tmp,
                              sorted({r.meta_learning_start for r in runs.values()}))
        text += "\n## Curves\n\n" + "".join(f"![{title}]({name})\n" for name, title in figures)
        (tmp / "compare.md").write_text(text)
    return text
