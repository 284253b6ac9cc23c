"""Health checks with thresholds from `monitoring.*`: the train/eval gap monitor and the HyperLoRA
"items to monitor" of the stable configuration's report. One implementation, used by training
every epoch and by the gap report.

A check has a value and a status: ok, warning or critical (0, 1, 2 as a number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.params import MonitoringParams

Status = Literal["ok", "warning", "critical"]
STATUS_CODE = {"ok": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    status: Status
    message: str

    @property
    def code(self) -> int:
        return STATUS_CODE[self.status]


def grade(value: float, warning: float, critical: float) -> Status:
    """Higher is worse: ok up to `warning`, warning above it, critical above `critical`. A value
    that is not finite (a diverged loss, nothing measured) is critical."""
    if not math.isfinite(value):
        return "critical"
    return "critical" if value > critical else "warning" if value > warning else "ok"


def overall(checks: list[Check]) -> Status:
    return max((c.status for c in checks), key=STATUS_CODE.__getitem__, default="ok")


@dataclass(frozen=True)
class Side:
    """What the gap monitor compares, measured the same way on the train and the eval side. RLAN's
    DSC measures (attention entropy, stop value) are None for a family without them (TRM)."""

    exact_match: float
    attention_entropy: float | None
    stop_value: float | None
    loss: float


def gap_checks(train: Side, ev: Side, m: MonitoringParams) -> list[Check]:
    """The gaps both sides measured: exact match (absolute and relative), loss ratio, and the DSC's
    attention entropy ratio and stop value gap where the model has a DSC."""
    gap = train.exact_match - ev.exact_match
    rel = gap / max(train.exact_match, 0.01)
    loss = ev.loss / max(train.loss, 1e-8)
    checks = [
        Check("exact_match_gap", gap, grade(gap, m.exact_match_gap_warning, m.exact_match_gap_critical),
              f"train {train.exact_match:.4f} vs eval {ev.exact_match:.4f} exact match"),
        Check("exact_match_relative_gap", rel, grade(rel, m.relative_gap_warning, m.relative_gap_critical),
              f"gap is {rel:.1%} of the train exact match"),
    ]
    if train.attention_entropy is not None and ev.attention_entropy is not None:
        ent = ev.attention_entropy / max(train.attention_entropy, 1e-6)
        checks.append(Check("attention_entropy_ratio", ent, grade(ent, m.entropy_ratio_warning, m.entropy_ratio_critical),
                            f"eval attention entropy {ev.attention_entropy:.3f} vs train {train.attention_entropy:.3f}"))
    if train.stop_value is not None and ev.stop_value is not None:
        stop = abs(train.stop_value - ev.stop_value)
        checks.append(Check("stop_value_gap", stop, grade(stop, m.stop_value_gap_warning, m.stop_value_gap_critical),
                            f"eval stop value {ev.stop_value:.3f} vs train {train.stop_value:.3f}"))
    checks.append(Check("loss_ratio", loss, grade(loss, m.loss_ratio_warning, m.loss_ratio_critical),
                        f"eval loss {ev.loss:.4f} vs train {train.loss:.4f}"))
    return checks


LORA_TARGETS = ("gru_reset", "gru_update", "gru_candidate", "output_head")


def lora_growth(row: dict[str, float | None], first: dict[str, float | None]) -> float | None:
    """The largest ratio of a LoRA magnitude to its value in the first logged epoch (None before any)."""
    ratios = []
    for t in LORA_TARGETS:
        v, v0 = row.get(f"lora_magnitude_{t}"), first.get(f"lora_magnitude_{t}")
        if v is None or v0 is None or not v0 > 0:
            continue
        ratios.append(v / v0 if math.isfinite(v) else math.inf)
    return max(ratios) if ratios else None


def lora_checks(row: dict[str, float | None], m: MonitoringParams, first: dict[str, float | None] | None = None
                ) -> list[Check]:
    """The report's warning signs: LoRA magnitudes collapsing to 0 or exploding (relative to their
    first logged values, so that the check means the same at every model width), diversity going to
    0, LOO accuracy (pixel accuracy) below 0.5, many tasks skipped by LOO, large equivariance deltas."""
    out = []
    growth = lora_growth(row, first if first is not None else row)
    if growth is not None:
        if growth < m.lora_collapse_ratio:
            out.append(Check("lora_collapse", growth, "warning",
                             f"every LoRA magnitude fell below {m.lora_collapse_ratio:g} of its first value: "
                             "HyperLoRA is collapsing"))
        if growth > m.lora_growth_max:
            out.append(Check("lora_explosion", growth, "critical",
                             f"a LoRA magnitude grew {growth:.3g}x from its first value, more than "
                             f"monitoring.lora_growth_max={m.lora_growth_max:g}: unstable"))
    limits = [("lora_diversity", lambda v: v < m.lora_diversity_min, "every task gets the same LoRA"),
              ("loo_accuracy", lambda v: v < m.loo_accuracy_min, "HyperLoRA is not learning to generalise"),
              ("loo_skipped_ratio", lambda v: v > m.loo_skipped_ratio_max, "many tasks too small for LOO"),
              ("equiv_delta_norm", lambda v: v > m.equiv_delta_norm_max, "LoRA differs across orientations")]
    for name, bad, meaning in limits:
        v = row.get(name)
        if v is not None and math.isfinite(v) and bad(v):
            out.append(Check(name, v, "warning", f"{name} = {v:.4g}: {meaning}"))
    return out
