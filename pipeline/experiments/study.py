"""The stable-versus-fixed study written from its runs: every figure of its page comes from the
experiments' outputs, none is typed.

    python -m pipeline.experiments study stable fixed --scale cpu --write docs/cpu-study.md

For each group (a configuration at a scale, one experiment per seed, as `compare` reads them):

- per epoch, from each run's `metrics/train/epochs.tsv`: the LoRA growth (the largest ratio of a LoRA
  magnitude to its first-epoch value: what the collapse and explosion checks grade), the equivariance
  share of the objective (its weighted term over `loss_total`), `loss_total` and `loss_task`;
- the training view's gaps at the last epoch (exact-match gap, attention entropy ratio, stop-value
  gap, loss ratio), the context gain on both sides there (pipeline.train.context_gain: whether the
  model reads the demonstrations), and the evaluation's pass@2 on both sides (`metrics/eval.json`);
- the health checks each run tripped while training (the monitor's, re-graded from the series with the
  run's own thresholds): how many seeds, from which epoch.

Every value is the mean ± sd over the seeds. The page states the scale, the seeds, the commits and the
command; `--write` replaces the file whole (written to a temporary path, then renamed).
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
import pandas as pd

from pipeline import gap, monitor
from pipeline.experiments.compare import Group, Outputs, Spread, read_groups
from pipeline.io import write_text
from pipeline.params import Params, parse_params

COMMAND = "python -m pipeline.experiments study {names} --scale {scale} --write {out}"
GAPS = ("exact_match_gap", "attention_entropy_ratio", "stop_value_gap", "loss_ratio")
CONTEXT = ("context_gain_loss_train", "context_gain_exact_train", "context_gain_loss_eval", "context_gain_exact_eval")
RANGES = ("lora_growth", "lora_diversity", "loo_accuracy", "equiv_delta_norm")


def _params(run: Outputs) -> Params:
    """The run's params.yaml (read flat from its commit), validated."""
    tree: dict = {}
    for key, value in run.params.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_params(tree, f"params.yaml of {run.rev[:7]}")


def epoch_table(run: Outputs) -> pd.DataFrame:
    """Per epoch of one run: lora_growth, equiv_share, loss_total, loss_task, and the checks that fired
    (names with their status) that epoch."""
    p = _params(run)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in run.series.to_dict("records")]
    weight = p.train.equivariance_training.loss_weight
    out = []
    for row in rows:
        growth = monitor.lora_growth(row, rows[0])
        equiv, total = row.get("loss_equiv"), row.get("loss_total")
        checks = monitor.lora_checks(row, p.monitoring, rows[0]) + gap.training_checks(row, p.monitoring)
        out.append({"epoch": int(row["epoch"]), "lora_growth": growth,
                    "equiv_share": weight * equiv / total if equiv is not None and total else None,
                    "loss_total": total, "loss_task": row.get("loss_task"),
                    "fired": tuple(f"{c.name} {c.status}" for c in checks if c.status != "ok")})
    return pd.DataFrame(out)


def final_gaps(run: Outputs) -> dict[str, float]:
    """The training view's gaps at the last epoch, graded as gap_report grades them."""
    p = _params(run)
    last = {k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in run.series.to_dict("records")[-1].items()}
    return {c.name: c.value for c in gap.training_checks(last, p.monitoring)}


def _spread(values: list[float | None]) -> Spread | None:
    found = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
    return Spread(found) if found else None


def _cell(s: Spread | None, fmt: str = ".3g") -> str:
    return "—" if s is None else s.text(fmt)


def render(groups: dict[str, Group], outputs: dict[str, list[Outputs]], command: str,
           bases: list[str] | None = None) -> str:
    """The page; `bases`: the commits the experiments ran from (their parents)."""
    bases = bases or ["unknown"]
    names = list(groups)
    tables = {g: [epoch_table(r) for r in runs] for g, runs in outputs.items()}
    seeds = {g: [r.seed for r in runs] for g, runs in outputs.items()}
    scale = next(iter(groups.values())).scale or "unknown"
    epochs = sorted({int(e) for ts in tables.values() for t in ts for e in t["epoch"]})
    starts = {g: int(runs[0].params["train.meta_learning_start_epoch"]) for g, runs in outputs.items()}
    lines = [
        "<!-- written by: " + command + " (do not edit: run the command again) -->",
        f"# The {scale}-scale study: " + " against ".join(names),
        "",
        f"Written by `{command}` from the experiments' outputs. Scale `{scale}`; seeds "
        + "; ".join(f"{g}: {', '.join(s)}" for g, s in seeds.items())
        + f"; the experiments ran from commit {', '.join(bases)} (their own commits: "
        + "; ".join(f"{g}: {', '.join(r.rev[:7] for r in runs)}" for g, runs in outputs.items())
        + "). Every value is the mean ± sd over the seeds.",
        "",
        "## Per epoch",
        "",
        "LoRA growth is the largest ratio of a LoRA magnitude to its first-epoch value (the explosion check "
        "fires above `monitoring.lora_growth_max`); the equivariance share is the weighted equivariance term "
        "over the whole objective; meta-learning runs from epoch "
        + ", ".join(f"{starts[g] + 1} ({g})" for g in names) + ".",
        "",
        "| epoch | " + " | ".join(f"{g} LoRA growth | {g} equivariance share | {g} loss total / task" for g in names) + " |",
        "|---|" + "---|---|---|" * len(names),
    ]
    for e in epochs:
        cells = []
        for g in names:
            rows = [t[t["epoch"] == e].iloc[0] for t in tables[g] if (t["epoch"] == e).any()]
            growth = _spread([r["lora_growth"] for r in rows])
            share = _spread([r["equiv_share"] for r in rows])
            total, task = _spread([r["loss_total"] for r in rows]), _spread([r["loss_task"] for r in rows])
            cells += [_cell(growth), "—" if share is None else _cell(Spread(tuple(100 * v for v in share.values)),
                                                                      ".2g") + " %",
                      f"{_cell(total)} / {_cell(task)}"]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "## Health checks while training", "",
              "| group | check | seeds that tripped it | first epoch (per seed) |", "|---|---|---|---|"]
    for g in names:
        fired: dict[str, dict[str, int]] = {}
        for seed, t in zip(seeds[g], tables[g]):
            for _, row in t.iterrows():
                for check in row["fired"]:
                    fired.setdefault(check, {}).setdefault(seed, int(row["epoch"]))
        if not fired:
            lines.append(f"| {g} | none | 0 of {len(tables[g])} | — |")
        for check, first in sorted(fired.items()):
            lines.append(f"| {g} | {check} | {len(first)} of {len(tables[g])} | "
                         + ", ".join(f"{e} (seed {s})" for s, e in first.items()) + " |")
    lines += ["", "## At the end of training", "",
              "The training view's gaps at the last epoch (train mode on training batches against eval mode on "
              "held-out tasks), the context gain there (the held-out test inputs measured again with another "
              "task's demonstrations: loss with them minus with their own, and exact match with their own "
              "minus with them; 0 for a model that ignores its context) on the training tasks' test pairs "
              "and on the evaluation tasks', and the evaluation's pass@2 on both sides.", "",
              "| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    finals = {g: [final_gaps(r) for r in runs] for g, runs in outputs.items()}
    for m in GAPS:
        lines.append(f"| {m} | " + " | ".join(_cell(_spread([f.get(m) for f in finals[g]])) for g in names) + " |")
    for m in CONTEXT:
        lines.append(f"| {m} | " + " | ".join(_cell(_spread([_last(r, m) for r in outputs[g]])) for g in names) + " |")
    for side in ("train", "eval"):
        key = f"eval.{side}.pass@2"
        lines.append(f"| pass@2, {side} tasks | "
                     + " | ".join(_cell(_spread([r.metrics.get(key) for r in outputs[g]])) for g in names) + " |")
    growth_max = {g: _spread([t["lora_growth"].max() for t in tables[g]]) for g in names}
    lines += ["", "Largest LoRA growth of a run: " + "; ".join(f"{g} {_cell(growth_max[g])}" for g in names) + ".",
              "", "## Ranges behind the thresholds", "",
              "Smallest and largest value over every seed and epoch that logged it (the monitor's thresholds "
              "in `params.yaml`, section `monitoring`, rest on such ranges).", "",
              "| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in RANGES:
        cells = []
        for g in names:
            values = [v for r, t in zip(outputs[g], tables[g]) for v in _column(r, t, m)]
            cells.append(f"{min(values):.3g} to {max(values):.3g}" if values else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _last(run: Outputs, name: str) -> float | None:
    """A logged measure's value at the run's last epoch that logged it (None if none did)."""
    values = _column(run, pd.DataFrame(), name)
    return values[-1] if values else None


def _column(run: Outputs, table: pd.DataFrame, name: str) -> list[float]:
    """A measure's values over the run's epochs (`table`: its epoch_table; growth after the first)."""
    if name == "lora_growth":
        return [v for v in table["lora_growth"].tolist()[1:] if v is not None and math.isfinite(v)]
    if name not in run.series:
        return []
    return [float(v) for v in run.series[name].tolist() if v == v]  # NaN: not logged that epoch


def study(groups: dict[str, Group], cwd: Path, out: Path | None) -> str:
    names = " ".join(g.label.rsplit("_", 1)[0] for g in groups.values())
    scale = next(iter(groups.values())).scale or "full"
    command = COMMAND.format(names=names, scale=scale, out=out if out is not None else "PATH")
    if out is not None and out.is_absolute():
        try:
            command = COMMAND.format(names=names, scale=scale, out=out.relative_to(cwd))
        except ValueError:
            pass
    outputs = read_groups(groups, cwd)
    parents = [subprocess.run(["git", "rev-parse", "--short=7", f"{r.rev}^"], cwd=cwd, capture_output=True,
                              text=True).stdout.strip() or "unknown" for runs in outputs.values() for r in runs]
    text = render(groups, outputs, command, sorted(set(parents)))
    if out is not None:
        write_text(out, text)
    return text

