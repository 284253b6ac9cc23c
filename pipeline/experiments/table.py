"""`python -m pipeline.experiments table`: the experiments of HEAD in one table that fits 100 columns.

`dvc exp show` has every param and metric in a column of its own: at 100 columns it cuts every one,
the names included, to `…`. This table keeps what a reader compares first: the experiment, its scale
and seed, pass@2 on the evaluation and the training tasks, the key gaps (metrics/gap.json) and the
experiment's own status over them, one line each, sorted by name so that seed repeats stand together.
A measure the experiment's model does not have (TRM has no DSC: no attention entropy, no stop value)
reads `n/m`, not measured. A name longer than its column gets a line of its own, the values below it.
The values are read from `dvc exp show --json` (finished experiments of HEAD).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.experiments.compare import STATUS
from pipeline.experiments.runner import ExperimentError, _dvc, finished, infer_scale
from pipeline.params import SEED_KEYS, flatten
from pipeline.stage import fail, setup_logging

WIDTH = 100
NOT_MEASURED = "n/m"


@dataclass(frozen=True)
class Column:
    header: str
    file: str  # a metrics file of dvc.yaml
    key: str  # dotted key in it
    width: int
    about: str  # for the legend under the table


COLUMNS = (
    Column("pass@2", "metrics/eval.json", "eval.pass@2", 6, "pass@2 on the evaluation tasks"),
    Column("train@2", "metrics/eval.json", "train.pass@2", 7, "pass@2 on the training tasks' test pairs"),
    Column("em gap", "metrics/gap.json", "evaluation.exact_match_gap", 6, "evaluation exact match gap"),
    Column("H ratio", "metrics/gap.json", "training.attention_entropy_ratio", 7,
           "training attention entropy ratio, eval/train (1: none)"),
    Column("stop gap", "metrics/gap.json", "training.stop_value_gap", 8, "training stop value gap"),
    Column("loss ratio", "metrics/gap.json", "evaluation.loss_ratio", 10, "evaluation loss ratio (1: none)"),
    Column("status", "metrics/gap.json", "overall_status", 8,
           "over the experiment's own gaps (a TRM has not the DSC's: `compare` grades the shared ones)"),
)
FIXED = (("scale", 5), ("seed", 4))


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return NOT_MEASURED
    return f"{value:.3f}"


def cells(params: dict[str, Any], metrics: dict[str, dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """One experiment's values (scale, seed, then COLUMNS) from its flat params and its metrics files
    (path -> flat dict)."""
    seeds = {str(params.get(k)) for k in SEED_KEYS}
    seed = seeds.pop() if len(seeds) == 1 else "/".join(str(params.get(k)) for k in SEED_KEYS)
    out = [infer_scale(params, base) or "?", seed]
    for c in COLUMNS:
        value = metrics.get(c.file, {}).get(c.key)
        if c.key.endswith("status"):
            out.append(STATUS.get(value, NOT_MEASURED) if isinstance(value, int) else NOT_MEASURED)
        else:
            out.append(_number(value))
    return out


def render(rows: dict[str, list[str]]) -> str:
    """The table: the name column as wide as the longest name where it fits, every line at most WIDTH
    characters; a legend of the columns below."""
    widths = [w for _, w in FIXED] + [c.width for c in COLUMNS]
    rest = sum(widths) + 2 * len(widths)
    name_width = max(10, min(WIDTH - rest, max((len(n) for n in rows), default=10)))
    headers = [h for h, _ in FIXED] + [c.header for c in COLUMNS]

    def line(name: str, values: list[str]) -> str:
        return (f"{name:<{name_width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths))).rstrip()

    lines = [line("experiment", headers)]
    for name, values in rows.items():
        if len(name) > name_width:
            lines += [name, line("", values)]
        else:
            lines.append(line(name, values))
    legend = "; ".join(f"{c.header}: {c.about}" for c in COLUMNS)
    lines += ["", f"{NOT_MEASURED}: not measured by the experiment's model. " + legend + "."]
    return "\n".join(_wrap(x) for x in lines) + "\n"


def _wrap(text: str) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, WIDTH)) if len(text) > WIDTH else text


def rows_of(shown: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Name -> cells of every finished experiment of HEAD in `dvc exp show --json`'s output."""
    done = finished(shown)
    baseline = next((e for e in shown if e.get("rev") != "workspace"), None)
    base = flatten(((baseline or {}).get("data") or {}).get("params", {}).get("params.yaml", {}).get("data") or {})
    found = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            if exp.get("name") not in done:
                continue
            data = exp["revs"][0].get("data") or {}
            params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
            metrics = {path: flatten(m.get("data") or {}) for path, m in (data.get("metrics") or {}).items()}
            found[exp["name"]] = cells(params, metrics, base)
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(prog="python -m pipeline.experiments table", description=__doc__.split("\n\n")[0])
    ap.parse_args(argv)
    try:
        rows = rows_of(json.loads(_dvc(["exp", "show", "--json"], Path.cwd()).stdout))
    except ExperimentError as err:
        fail(str(err))
        return
    if not rows:
        fail("no finished experiment of HEAD here: run some with `python -m pipeline.experiments run --scale tiny`")
    sys.stdout.write(render(rows))


if __name__ == "__main__":
    main()
