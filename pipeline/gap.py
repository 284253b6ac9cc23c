"""The train/eval gap of a trained and evaluated model, graded by the monitor.

Both sides come from the evaluation stage, measured identically: the training tasks' test pairs
(which the model trained on) and the evaluation tasks. Exact match is pass@1 after voting.
"""

from __future__ import annotations

from typing import Any

from pipeline import monitor
from pipeline.params import MonitoringParams


def side(metrics: dict[str, Any]) -> monitor.Side:
    return monitor.Side(metrics["pass@1"], metrics["attention_entropy"], metrics["stop_value"], metrics["loss"])


def gap_checks(evaluation: dict[str, dict[str, Any]], m: MonitoringParams) -> list[monitor.Check]:
    return monitor.gap_checks(side(evaluation["train"]), side(evaluation["eval"]), m)


def gap_metrics(checks: list[monitor.Check]) -> dict[str, float | int]:
    """Flat metrics for DVC: every gap, its status as a number (0 ok, 1 warning, 2 critical), overall."""
    out: dict[str, float | int] = {}
    for c in checks:
        out[c.name] = c.value
        out[f"{c.name}_status"] = c.code
    out["overall_status"] = monitor.STATUS_CODE[monitor.overall(checks)]
    return out
