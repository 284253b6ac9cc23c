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
    """What the gap monitor compares, measured the same way on the train and the eval side."""

    exact_match: float
    attention_entropy: float
    stop_value: float
    loss: float


def gap_checks(train: Side, ev: Side, m: MonitoringParams) -> list[Check]:
    gap = train.exact_match - ev.exact_match
    rel = gap / max(train.exact_match, 0.01)
    ent = ev.attention_entropy / max(train.attention_entropy, 1e-6)
    stop = abs(train.stop_value - ev.stop_value)
    loss = ev.loss / max(train.loss, 1e-8)
    return [
        Check("exact_match_gap", gap, grade(gap, m.exact_match_gap_warning, m.exact_match_gap_critical),
              f"train {train.exact_match:.4f} vs eval {ev.exact_match:.4f} exact match"),
        Check("exact_match_relative_gap", rel, grade(rel, m.relative_gap_warning, m.relative_gap_critical),
              f"gap is {rel:.1%} of the train exact match"),
        Check("attention_entropy_ratio", ent, grade(ent, m.entropy_ratio_warning, m.entropy_ratio_critical),
              f"eval attention entropy {ev.attention_entropy:.3f} vs train {train.attention_entropy:.3f}"),
        Check("stop_value_gap", stop, grade(stop, m.stop_value_gap_warning, m.stop_value_gap_critical),
              f"eval stop value {ev.stop_value:.3f} vs train {train.stop_value:.3f}"),
        Check("loss_ratio", loss, grade(loss, m.loss_ratio_warning, m.loss_ratio_critical),
              f"eval loss {ev.loss:.4f} vs train {train.loss:.4f}"),
    ]


def lora_checks(row: dict[str, float | None], m: MonitoringParams) -> list[Check]:
    """The report's warning signs: magnitudes collapsing to 0 or exploding, diversity going to 0,
    LOO accuracy below 0.5, many tasks skipped by LOO, large equivariance deltas."""
    out = []
    mags = [row.get(f"lora_magnitude_{t}") for t in ("gru_reset", "gru_update", "gru_candidate", "output_head")]
    mags = [v for v in mags if v is not None and math.isfinite(v)]
    if mags:
        if max(mags) < m.lora_magnitude_min:
            out.append(Check("lora_collapse", max(mags), "warning",
                             f"all LoRA magnitudes below {m.lora_magnitude_min}: HyperLoRA is collapsing"))
        if max(mags) > m.lora_magnitude_max:
            out.append(Check("lora_explosion", max(mags), "critical",
                             f"a LoRA magnitude of {max(mags):.3g} exceeds {m.lora_magnitude_max}: unstable"))
    limits = [("lora_diversity", lambda v: v < m.lora_diversity_min, "every task gets the same LoRA"),
              ("loo_accuracy", lambda v: v < m.loo_accuracy_min, "HyperLoRA is not learning to generalise"),
              ("loo_skipped_ratio", lambda v: v > m.loo_skipped_ratio_max, "many tasks too small for LOO"),
              ("equiv_delta_norm", lambda v: v > m.equiv_delta_norm_max, "LoRA differs across orientations")]
    for name, bad, meaning in limits:
        v = row.get(name)
        if v is not None and math.isfinite(v) and bad(v):
            out.append(Check(name, v, "warning", f"{name} = {v:.4g}: {meaning}"))
    return out
