"""The headline of an experiment: `metrics/summary.json`, the one metrics file DVC declares.

DVC lays out `dvc metrics show` as one row per metrics file and one column per metric name, and
`dvc exp show` as one column per metric: with every stage's numbers declared (about a hundred) no
terminal shows either. So dvc.yaml declares this file alone, a handful of numbers a reader compares
first, each under a short name; every stage's own numbers stay in its JSON output
(`metrics/train.json`, `eval.json`, `gap.json`, ...), which the compare reports read and MLflow logs.

`dvc metrics show` lays the file out as one row: with these names and five significant digits it is
at most 102 characters wide (`--md` 115; a test renders it with DVC's own table at its widest values:
120 at most), and one name more would pass 120: the evaluation's loss ratio stays in `gap.json`. A measure the experiment's model does not have (TRM has no DSC: no attention
entropy, no stop value) is left out of the file: DVC shows `-`, never a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.params import flatten

PATH = "metrics/summary.json"  # as dvc.yaml declares it


@dataclass(frozen=True)
class Field:
    key: str  # the name DVC shows
    source: str  # "eval" or "gap": the stage output it comes from
    path: str  # dotted key in that output
    about: str


FIELDS = (
    Field("pass@2", "eval", "eval.pass@2", "pass@2 on the evaluation tasks"),
    Field("train@2", "eval", "train.pass@2", "pass@2 on the training tasks' test pairs"),
    Field("em_gap", "gap", "evaluation.exact_match_gap",
          "exact match (pass@1) on the training tasks' test pairs minus on the evaluation tasks"),
    Field("entropy_ratio", "gap", "training.attention_entropy_ratio",
          "attention entropy in eval mode (held-out tasks) over train mode, last epoch (1: no gap)"),
    Field("stop_gap", "gap", "training.stop_value_gap",
          "stop value, train mode against eval mode (held-out tasks), last epoch, absolute (0: no gap)"),
    Field("ctx_gain", "gap", "context.context_gain_train",
          "context gain on the training tasks' test pairs, last epoch: task loss with another task's "
          "demonstrations minus with their own (0: the demonstrations are not read)"),
    Field("status", "gap", "overall_status",
          "over the experiment's own gaps, 0 ok, 1 warning, 2 critical (a TRM has not the DSC's: `compare` "
          "grades the shared ones)"),
)


def summarize(outputs: dict[str, dict[str, Any]]) -> dict[str, float | int]:
    """The headline from the stage outputs (`{"eval": ..., "gap": ...}`, as their JSON files hold them): FIELDS in order, a measure that is missing or not a finite number left out."""
    flat = {source: flatten(tree) for source, tree in outputs.items()}
    out: dict[str, float | int] = {}
    for f in FIELDS:
        value = flat.get(f.source, {}).get(f.path)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f.key] = value
    return out
