"""The health monitor: gap checks and HyperLoRA warning signs, graded by monitoring.* thresholds."""

from __future__ import annotations

import math

import pytest

from pipeline.monitor import Side, gap_checks, grade, lora_checks, overall
from tests.helpers import params_with

M = params_with().monitoring


@pytest.mark.parametrize("value, expected", [(0.05, "ok"), (0.10, "ok"), (0.15, "warning"), (0.2, "warning"),
                                             (0.25, "critical"), (math.inf, "critical"), (math.nan, "critical")])
def test_grade(value, expected):
    assert grade(value, 0.10, 0.20) == expected


def test_the_seeds_gap_is_critical():
    # the gap analysis (docs/sources.md): 20.7% train against 0.2% eval exact match; entropy 0.02 vs 3.82; stop 0.574 vs 0.342
    checks = {c.name: c for c in gap_checks(Side(0.207, 0.02, 0.574, 0.5), Side(0.002, 3.82, 0.342, 2.0), M)}
    assert checks["exact_match_gap"].status == "critical" and checks["exact_match_gap"].value == pytest.approx(0.205)
    assert checks["exact_match_relative_gap"].value == pytest.approx(0.205 / 0.207)
    assert checks["attention_entropy_ratio"].value == pytest.approx(191.0)
    assert checks["stop_value_gap"].status == "warning"  # 0.232: above 0.15, below 0.25
    assert checks["loss_ratio"].status == "critical"
    assert overall(list(checks.values())) == "critical"


def test_no_gap_is_ok():
    s = Side(0.5, 1.0, 0.4, 0.3)
    assert overall(gap_checks(s, s, M)) == "ok"


def test_lora_warning_signs():
    healthy = {"lora_magnitude_gru_reset": 0.1, "lora_magnitude_gru_update": 0.2, "lora_magnitude_gru_candidate": 0.1,
               "lora_magnitude_output_head": 0.1, "lora_diversity": 0.05, "loo_accuracy": 0.8,
               "loo_skipped_ratio": 0.1, "equiv_delta_norm": 0.1}
    assert lora_checks(healthy, M, healthy) == []
    names = lambda row: {c.name for c in lora_checks({**healthy, **row}, M, healthy)}  # noqa: E731
    shrunk = {k: v * M.lora_collapse_ratio / 2 for k, v in healthy.items() if k.startswith("lora_magnitude")}
    assert names(shrunk) == {"lora_collapse"}
    assert names({"lora_magnitude_gru_update": 0.2 * M.lora_growth_max * 1.01}) == {"lora_explosion"}
    assert names({"lora_magnitude_gru_update": 0.2 * M.lora_growth_max * 0.99}) == set()
    assert names({"lora_magnitude_output_head": float("inf")}) == {"lora_explosion"}
    assert names({"lora_diversity": 0.0}) == {"lora_diversity"}
    assert names({"loo_accuracy": 0.3, "loo_skipped_ratio": 0.5, "equiv_delta_norm": 2.0}) == {
        "loo_accuracy", "loo_skipped_ratio", "equiv_delta_norm"}
    assert names({"loo_accuracy": None}) == set()  # not measured yet
    # growth is relative: the same magnitudes are healthy after a larger start, whatever the width
    big = {k: v * 50 for k, v in healthy.items() if k.startswith("lora_magnitude")}
    assert lora_checks({**healthy, **big}, M, {**healthy, **big}) == []
