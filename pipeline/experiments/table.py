"""`python -m pipeline.experiments table`: the experiments of HEAD in one table that fits 100 columns.

`dvc exp show` has every param and metric in a column of its own: at 100 columns it cuts every one,
the names included, to `…`. This table keeps what a reader compares first: the experiment, its scale
and seed, then its headline (`metrics/summary.json`, pipeline/summary.py): pass@2 on the evaluation
and the training tasks, the key gaps and the experiment's own status over them, one line each, sorted
by name so that seed repeats stand together.
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
from pipeline.summary import FIELDS
from pipeline.summary import PATH as SUMMARY

WIDTH = 100
NOT_MEASURED = "n/m"

@dataclass(frozen=True)
class Column:
    header: str
    key: str  # its name in the summary (pipeline/summary.py, whose description the legend gives)
    width: int


COLUMNS = (Column("pass@2", "pass@2", 6), Column("train@2", "train@2", 7), Column("em gap", "em_gap", 6),
           Column("H ratio", "entropy_ratio", 7), Column("stop gap", "stop_gap", 8),
           Column("ctx gain", "ctx_gain", 8), Column("status", "status", 8))
ABOUT = {f.key: f.about for f in FIELDS}
FIXED = (("scale", 5), ("seed", 4))


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return NOT_MEASURED
    return f"{value:.3f}"


def cells(params: dict[str, Any], summary: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """One experiment's values (scale, seed, then COLUMNS) from its flat params and its summary."""
    seeds = {str(params.get(k)) for k in SEED_KEYS}
    seed = seeds.pop() if len(seeds) == 1 else "/".join(str(params.get(k)) for k in SEED_KEYS)
    out = [infer_scale(params, base) or "?", seed]
    for c in COLUMNS:
        value = summary.get(c.key)
        if c.key == "status":
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
    legend = "; ".join(f"{c.header}: {ABOUT[c.key]}" for c in COLUMNS)
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
            summary = ((data.get("metrics") or {}).get(SUMMARY) or {}).get("data") or {}
            found[exp["name"]] = cells(params, summary, base)
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
