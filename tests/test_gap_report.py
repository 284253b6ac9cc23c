"""The gap report's pieces: graded gap metrics, curves (one run or overlaid), task pictures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.arc import Task
from pipeline.gap import gap_checks, gap_metrics
from pipeline.report import CURVES, plot_curves, task_picture
from stages.gap_report import pick_pictures
from tests.helpers import params_with

M = params_with().monitoring


def _side(pass1, ent, stop, loss):
    return {"pass@1": pass1, "attention_entropy": ent, "stop_value": stop, "loss": loss}


def test_gap_metrics_are_flat_numbers_with_statuses():
    checks = gap_checks({"train": _side(0.207, 0.02, 0.574, 0.5), "eval": _side(0.002, 3.82, 0.342, 0.6)}, M)
    m = gap_metrics(checks)
    assert m["exact_match_gap"] == pytest.approx(0.205)
    assert m["exact_match_gap_status"] == 2 and m["stop_value_gap_status"] == 1 and m["loss_ratio_status"] == 0
    assert m["overall_status"] == 2
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_curves_for_one_run_and_overlaid(tmp_path):
    df = pd.DataFrame({"epoch": [0, 1, 2], **{c: [0.1, 0.2, 0.3] for _, _, cols in CURVES for c in cols}})
    one = plot_curves({"run": df}, tmp_path / "one")
    two = plot_curves({"stable": df, "fixed": df * 1.5}, tmp_path / "two")
    assert len(one) == len(two) == len(CURVES)
    assert all((tmp_path / "two" / name).read_bytes()[:4] == b"\x89PNG" for name, _ in two)


def test_task_picture_and_selection(tmp_path):
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    task = Task("abc", "eval", ((g, g.T), (g, g)), ((g, g.T),))
    cands = [{"grid": g.T.tolist(), "votes": 20, "confidence": 0.9}, {"grid": [[1]], "votes": 3, "confidence": 0.2}]
    task_picture(task, 0, cands, 1, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    candidates = {"b": [{"test_index": 0, "truth_rank": None}], "a": [{"test_index": 0, "truth_rank": None}],
                  "c": [{"test_index": 0, "truth_rank": 2}, {"test_index": 1, "truth_rank": None}]}
    assert pick_pictures(candidates, 3) == [("c", 0), ("a", 0), ("b", 0)]  # solved first, then by id
