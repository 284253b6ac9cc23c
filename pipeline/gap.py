"""The train/eval gap, graded by the monitor, in two views:

- `training`: what the gap analysis measured (docs/sources.md). Train mode on training batches (with Gumbel noise when it
  is on) against eval mode (the EMA model) on the held-out evaluation tasks, from the last epoch of
  training: train vs held-out exact match, attention entropy and stop value in each mode, task loss
  vs held-out loss. This is where a train/eval *mode* mismatch shows.
- `evaluation`: both sides of the evaluation stage, measured identically (TRM protocol, eval mode,
  voting): the training tasks' test pairs against the evaluation tasks. This is the generalisation
  gap of the final model. Exact match is pass@1 after voting.

A third view, `context`, grades the context gain of the last epoch on each side (pipeline.train.context_gain:
the held-out test inputs again with another task's demonstrations): a model that does not read the
demonstrations gains nothing, and the check warns at or below `monitoring.context_gain_min`.

Training's per-epoch checks use `training_checks` too: one implementation.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline import monitor
from pipeline.params import MonitoringParams

TRAIN_KEYS = ("train_exact_match", "attention_entropy_train", "stop_value_train", "loss_task")
HELDOUT_KEYS = ("heldout_exact_match", "attention_entropy_eval", "stop_value_eval", "heldout_loss")


def training_checks(row: dict[str, Any], m: MonitoringParams) -> list[monitor.Check]:
    """Checks of one epoch's (or the final) training metrics; none if exact match or loss was not
    measured on a side (the DSC's measures only where the model has them)."""
    train, held = [row.get(k) for k in TRAIN_KEYS], [row.get(k) for k in HELDOUT_KEYS]
    if None in (train[0], train[3], held[0], held[3]):
        return []
    return monitor.gap_checks(monitor.Side(*train), monitor.Side(*held), m)


def context_checks(row: dict[str, Any], m: MonitoringParams) -> list[monitor.Check]:
    """The context gain (loss, nats per cell) of each side the training measured; none for a family
    that reads no demonstrations (TRM)."""
    checks = []
    for side, what in (("train", "training tasks' test pairs"), ("eval", "held-out evaluation tasks")):
        loss, exact = row.get(f"context_gain_loss_{side}"), row.get(f"context_gain_exact_{side}")
        if loss is None:
            continue
        status = "critical" if not math.isfinite(loss) else "ok" if loss > m.context_gain_min else "warning"
        detail = f"{what}: loss with another task's demonstrations minus with their own" + (
            f"; exact match {exact:+.4f}" if exact is not None else "")
        checks.append(monitor.Check(f"context_gain_{side}", loss, status, detail))
    return checks


def evaluation_checks(evaluation: dict[str, dict[str, Any]], m: MonitoringParams) -> list[monitor.Check]:
    def side(x: dict[str, Any]) -> monitor.Side:
        return monitor.Side(x["pass@1"], x.get("attention_entropy"), x.get("stop_value"), x["loss"])

    return monitor.gap_checks(side(evaluation["train"]), side(evaluation["eval"]), m)


def gap_checks(training: dict[str, Any], evaluation: dict[str, dict[str, Any]],
               m: MonitoringParams) -> dict[str, list[monitor.Check]]:
    groups = {"training": training_checks(training, m), "evaluation": evaluation_checks(evaluation, m),
              "context": context_checks(training, m)}
    return {k: v for k, v in groups.items() if v}


def gap_metrics(groups: dict[str, list[monitor.Check]]) -> dict[str, Any]:
    """For DVC: per view every gap and its status as a number (0 ok, 1 warning, 2 critical), and overall."""
    out: dict[str, Any] = {}
    for group, checks in groups.items():
        out[group] = {}
        for c in checks:
            out[group][c.name] = c.value
            out[group][f"{c.name}_status"] = c.code
        out[group]["status"] = monitor.STATUS_CODE[monitor.overall(checks)]
    out["overall_status"] = monitor.STATUS_CODE[monitor.overall([c for cs in groups.values() for c in cs])]
    return out
