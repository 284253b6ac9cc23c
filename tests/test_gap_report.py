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


# seed 004's numbers: 20.7% train vs 0.2% eval exact match, entropy 0.02 vs 3.82, stop 0.574 vs 0.342
SEED_TRAINING = {"train_exact_match": 0.207, "heldout_exact_match": 0.002, "attention_entropy_train": 0.02,
                 "attention_entropy_eval": 3.82, "stop_value_train": 0.574, "stop_value_eval": 0.342,
                 "loss_task": 0.5, "heldout_loss": 0.6}


def test_both_views_graded_and_flattened_for_dvc():
    evaluation = {"train": _side(0.3, 2.0, 0.5, 0.4), "eval": _side(0.28, 2.1, 0.5, 0.45)}
    groups = gap_checks(SEED_TRAINING, evaluation, M)
    m = gap_metrics(groups)
    t = m["training"]
    assert t["exact_match_gap"] == pytest.approx(0.205) and t["exact_match_gap_status"] == 2
    assert t["attention_entropy_ratio"] == pytest.approx(191.0) and t["attention_entropy_ratio_status"] == 2
    assert t["stop_value_gap_status"] == 1 and t["loss_ratio_status"] == 0 and t["status"] == 2
    assert m["evaluation"]["status"] == 0 and m["evaluation"]["exact_match_gap"] == pytest.approx(0.02)
    assert m["overall_status"] == 2
    assert all(isinstance(v, (int, float)) for g in ("training", "evaluation") for v in m[g].values())


def test_training_view_needs_a_held_out_measurement():
    evaluation = {"train": _side(0.3, 2.0, 0.5, 0.4), "eval": _side(0.3, 2.0, 0.5, 0.4)}
    groups = gap_checks({**SEED_TRAINING, "heldout_exact_match": None}, evaluation, M)
    assert set(groups) == {"evaluation"}


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
