"""The gap report's pieces: graded gap metrics, curves (one run or overlaid), task pictures."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from pipeline.arc import Task
from pipeline.experiments.compare import distance
from pipeline.gap import gap_checks, gap_metrics
from pipeline.summary import FIELDS, summarize
from pipeline.report import CURVES, OVERLAID, curve_figure, plot_curves, task_picture
from stages.gap_report import pick_pictures
from tests.helpers import params_with

M = params_with().monitoring


def _side(pass1, ent, stop, loss):
    return {"pass@1": pass1, "attention_entropy": ent, "stop_value": stop, "loss": loss}


# the gap analysis's numbers (docs/sources.md): 20.7% train vs 0.2% eval exact match, entropy 0.02 vs 3.82, stop 0.574 vs 0.342
SEED_TRAINING = {"train_exact_match": 0.207, "heldout_exact_match": 0.002, "attention_entropy_train": 0.02,
                 "attention_entropy_eval": 3.82, "stop_value_train": 0.574, "stop_value_eval": 0.342,
                 "loss_task": 0.5, "heldout_loss": 0.6,
                 "context_gain_loss_train": 0.8, "context_gain_exact_train": 0.25,
                 "context_gain_loss_eval": -0.01, "context_gain_exact_eval": 0.0}


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
    c = m["context"]  # the demonstrations help on the training side, not on the evaluation side
    assert c["context_gain_train"] == 0.8 and c["context_gain_train_status"] == 0
    assert c["context_gain_eval"] == -0.01 and c["context_gain_eval_status"] == 1 and c["status"] == 1
    assert all(isinstance(v, (int, float)) for g in ("training", "evaluation", "context") for v in m[g].values())
    edge = gap_metrics(gap_checks({**SEED_TRAINING, "context_gain_loss_eval": M.context_gain_min}, evaluation, M))
    assert edge["context"]["context_gain_eval_status"] == 1  # at the threshold: not read
    nan = gap_metrics(gap_checks({**SEED_TRAINING, "context_gain_loss_train": float("nan")}, evaluation, M))
    assert nan["context"]["context_gain_train_status"] == 2


def test_summary_is_the_headline_of_the_stage_outputs():
    evaluation = {"train": {**_side(0.3, 2.0, 0.5, 0.4), "pass@2": 0.5},
                  "eval": {**_side(0.28, 2.1, 0.5, 0.45), "pass@2": 0.25}}
    gap = gap_metrics(gap_checks(SEED_TRAINING, evaluation, M))
    summary = summarize({"eval": evaluation, "gap": gap})
    assert summary == {"pass@2": 0.25, "train@2": 0.5, "em_gap": pytest.approx(0.02),
                       "entropy_ratio": pytest.approx(191.0), "stop_gap": pytest.approx(0.232),
                       "ctx_gain": 0.8, "status": 2}
    assert list(summary) == [f.key for f in FIELDS]  # every field found where it says: none renamed away


def test_summary_leaves_out_what_the_model_does_not_measure():
    """TRM: no DSC (no entropy, no stop value); a non-finite value is no number either."""
    evaluation = {"train": {**_side(0.3, None, None, 0.4), "pass@2": 0.5},
                  "eval": {**_side(0.3, None, None, 0.4), "pass@2": float("nan")}}
    training = {k: v for k, v in SEED_TRAINING.items() if not any(w in k for w in ("entropy", "stop", "context"))}
    gap = gap_metrics(gap_checks(training, evaluation, M))
    summary = summarize({"eval": evaluation, "gap": gap})
    assert set(summary) == {"train@2", "em_gap", "status"}
    assert all(isinstance(v, (int, float)) for v in summary.values())


def test_summary_fits_dvc_metrics_show_at_its_widest():
    """DVC's own table (one row, a column per name, five significant digits) with the widest values."""
    from dvc.compare import metrics_table

    widest = {f.key: -0.33333333 if f.key.endswith(("gap", "gain")) else (2 if f.key == "status" else 191.03456) for f in FIELDS}
    table = metrics_table({"workspace": {"data": {"metrics/summary.json": {"data": widest}}}}, precision=5,
                          round_digits=True)
    for markdown in (False, True):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            table.render(markdown=markdown)
        lines = out.getvalue().splitlines()
        assert len(lines) >= 2 and max(map(len, lines)) <= 120, (markdown, lines)


def test_training_view_needs_a_held_out_measurement():
    evaluation = {"train": _side(0.3, 2.0, 0.5, 0.4), "eval": _side(0.3, 2.0, 0.5, 0.4)}
    groups = gap_checks({**SEED_TRAINING, "heldout_exact_match": None}, evaluation, M)
    assert set(groups) == {"evaluation", "context"}


def _series(epochs: int, scale: float = 1.0, **cols) -> pd.DataFrame:
    """A training series with 1-based epochs; columns given as lists, the others empty."""
    return pd.DataFrame({"epoch": range(1, epochs + 1), **{c: [None] * epochs for _, _, cs in CURVES for c in cs},
                         **{c: [None if v is None else v * scale for v in vals] for c, vals in cols.items()}})


def _panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_curve_figure_has_a_panel_per_measured_series_and_marks_meta_learning():
    df = _series(4, train_exact_match=[0.1, 0.2, 0.3, 0.4], heldout_exact_match=[None, None, None, 0.1],
                 loo_accuracy=[None, None, 0.5, 0.6])
    fig = curve_figure({"run": df}, ["train_exact_match", "heldout_exact_match", "train_pixel_accuracy"], "t",
                       {"run": 2})
    panels = _panels(fig)
    # a column never measured gets no panel; one measured at some epochs is drawn where it was
    assert set(panels) == {"train_exact_match", "heldout_exact_match"}
    lines = {c: {ln.get_label(): ln for ln in ax.get_lines()} for c, ax in panels.items()}
    assert list(lines["train_exact_match"]["run"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["heldout_exact_match"]["run"].get_xdata()) == [4]
    assert list(lines["train_exact_match"]["meta-learning from epoch 3"].get_xdata()) == [2.5, 2.5]
    fig.canvas.draw()
    ticks = panels["train_exact_match"].get_xticks()
    assert all(float(t).is_integer() for t in ticks)  # whole epochs only
    assert curve_figure({"run": df}, ["loo_exact_match"], "t") is None  # nothing measured: no figure


def test_meta_learning_marker_only_when_it_starts_within_the_run():
    df = _series(3, loss_task=[3.0, 2.0, 1.0], loo_accuracy=[0.5, 0.5, 0.5])
    fig = curve_figure({"run": df}, ["loss_task"], "t", {"run": 3})
    labels = [ln.get_label() for ln in _panels(fig)["loss_task"].get_lines()]
    assert labels == ["run"]


def test_meta_learning_marker_only_for_a_run_that_meta_learned():
    """TRM never meta-learns (no LOO measured): no marker on its own curves, and beside RLAN the
    marker names the run it belongs to."""
    trm = _series(3, loss_task=[3.0, 2.0, 1.0])
    rlan = _series(3, loss_task=[3.0, 2.5, 2.0], loo_accuracy=[None, 0.4, 0.5])

    def labels(series, starts):
        fig = curve_figure(series, ["loss_task"], "t", starts)
        return [ln.get_label() for ln in _panels(fig)["loss_task"].get_lines()]

    assert labels({"trm": trm}, {"trm": 1}) == ["trm"]
    assert labels({"stable": rlan, "trm": trm}, {"stable": 1, "trm": 1}) == [
        "stable", "trm", "meta-learning from epoch 2 (stable)"]
    assert labels({"stable": rlan, "fixed": rlan}, {"stable": 1, "fixed": 1})[-1] == "meta-learning from epoch 2"


def test_several_runs_are_colours_with_one_legend_and_each_series_its_own_panel():
    a = _series(3, attention_entropy_train=[1.0, 1.1, 1.2], attention_entropy_eval=[6.0, 6.0, 6.0])
    b = _series(3, 0.5, attention_entropy_train=[1.0, 1.1, 1.2], attention_entropy_eval=[6.0, 6.0, 6.0])
    cols = ["attention_entropy_train", "attention_entropy_eval"]
    fig = curve_figure({"stable": a, "fixed": b}, cols, "t", {"stable": 1, "fixed": 1})
    panels = _panels(fig)
    assert set(panels) == set(cols)
    lines = {c: {ln.get_label(): ln for ln in panels[c].get_lines()} for c in cols}
    assert list(lines["attention_entropy_eval"]["fixed"].get_ydata()) == [3.0, 3.0, 3.0]
    assert lines["attention_entropy_train"]["stable"].get_color() == lines["attention_entropy_eval"]["stable"].get_color()
    assert lines["attention_entropy_train"]["stable"].get_color() != lines["attention_entropy_train"]["fixed"].get_color()
    assert len(fig.legends) == 1 and {t.get_text() for t in fig.legends[0].get_texts()} >= {"stable", "fixed"}
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend inside a panel


def test_train_and_eval_attention_entropy_overlaid_in_one_panel():
    """The pair a reader compares in one chart: per run one colour, train mode solid, eval mode dashed."""
    a = _series(3, attention_entropy_train=[1.0, 1.1, 1.2], attention_entropy_eval=[6.0, 6.0, 6.0])
    b = _series(3, 0.5, attention_entropy_train=[1.0, 1.1, 1.2], attention_entropy_eval=[6.0, 6.0, 6.0])
    [(_, title, cols)] = [c for c in CURVES if c[0] in OVERLAID]
    fig = curve_figure({"stable": a, "fixed": b}, cols, title, overlay=True)
    [ax] = [ax for ax in fig.axes if ax.get_title()]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {f"{run}: {c}" for run in ("stable", "fixed") for c in cols}
    train, held = lines["fixed: attention_entropy_train"], lines["fixed: attention_entropy_eval"]
    assert train.get_color() == held.get_color() != lines["stable: attention_entropy_eval"].get_color()
    assert (train.get_linestyle(), held.get_linestyle()) == ("-", "--")
    assert list(held.get_ydata()) == [3.0, 3.0, 3.0]


@pytest.mark.slow
def test_plot_curves_writes_one_png_per_measured_figure(tmp_path):
    df = _series(2, loss_task=[2.0, 1.0], heldout_loss=[2.5, 1.5], stop_value_train=[0.5, 0.4],
                 heldout_pixel_accuracy=[0.5, 0.6])
    written = plot_curves({"run": df}, tmp_path, {"run": 1})
    assert [name for name, _ in written] == ["pixel_accuracy.png", "loss.png", "stop_value.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "pixel_accuracy.png", "stop_value.png"]
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name, _ in written)


@pytest.mark.slow
def test_task_picture_and_selection(tmp_path):
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    task = Task("abc", "eval", ((g, g.T), (g, g)), ((g, g.T),))
    cands = [{"grid": g.T.tolist(), "votes": 20, "confidence": 0.9}, {"grid": [[1]], "votes": 3, "confidence": 0.2}]
    task_picture(task, 0, cands, 1, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    candidates = {"b": [{"test_index": 0, "truth_rank": None}], "a": [{"test_index": 0, "truth_rank": None}],
                  "c": [{"test_index": 0, "truth_rank": 2}, {"test_index": 1, "truth_rank": None}]}
    assert pick_pictures(candidates, 3) == [("c", 0), ("a", 0), ("b", 0)]  # solved first, then by id


def test_gap_distance():  # (the compare report, which ranks by it: tests/test_compare.py)
    assert distance("loss_ratio", 2.0) == pytest.approx(distance("loss_ratio", 0.5))
    assert distance("exact_match_gap", -0.1) == pytest.approx(0.1)
