"""The compare report: mean and spread over seed repeats, a difference called real only beyond the
spread, no winner among ties, the scale and the seeds stated, a key inherited by one repeat shown; across
model families a measure one lacks is not measured and counts in no status, statuses are categories."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.experiments.compare import (
    ONE_SEED,
    STATUS,
    Group,
    Outputs,
    Spread,
    closest,
    differences_summary,
    is_status,
    mean_series,
    render,
    rows,
    shared_series,
    status_verdict,
    table,
    verdict,
)
from pipeline.experiments.runner import SCALES
from pipeline.monitor import STATUS_CODE

MEASURES = ("exact_match_gap", "exact_match_relative_gap", "attention_entropy_ratio", "stop_value_gap", "loss_ratio")


def outputs(entropy_ratio: float, seed: int, pixel: float = 0.4, changes: dict | None = None,
            entropy_status: str = "ok", measures: tuple[str, ...] = MEASURES) -> Outputs:
    """One experiment's outputs: every gap 0 (ratios 1) but the training entropy ratio; a TRM's
    `measures` leave out the DSC's."""
    views = {v: {**{m: 1.0 if m.endswith("ratio") else 0.0 for m in measures},
                 **{f"{m}_status": STATUS_CODE["ok"] for m in measures}} for v in ("training", "evaluation")}
    if "attention_entropy_ratio" in measures:
        views["training"]["attention_entropy_ratio"] = entropy_ratio
        views["training"]["attention_entropy_ratio_status"] = STATUS_CODE[entropy_status]
    for v in views.values():
        v["status"] = max(x for k, x in v.items() if k.endswith("_status"))
    gap = {**views, "overall_status": max(v["status"] for v in views.values())}
    metrics = {"eval.eval.pixel_accuracy": pixel, "eval.train.pixel_accuracy": pixel + 0.1,
               "train.loss_total": 1.0}
    if "attention_entropy_ratio" in measures:
        metrics["gap.training.attention_entropy_ratio"] = entropy_ratio
    statuses = {f"gap.{v}.{k}": STATUS[x] for v, d in views.items() for k, x in d.items() if is_status(k)}
    statuses["gap.overall_status"] = STATUS[gap["overall_status"]]
    params = {"train.seed": seed, "augment.seed": seed, "evaluate.seed": seed, "train.meta_learning_start_epoch": 1}
    series = pd.DataFrame({"epoch": [1, 2], "loss_total": [2.0 + seed, 1.0 + seed]})
    return Outputs(f"{seed:07d}abc", metrics, statuses, gap, series, params, changes or {})


TRM_MEASURES = ("exact_match_gap", "exact_match_relative_gap", "loss_ratio")


def group(label: str, n: int, scale: str | None = "cpu") -> Group:
    return Group(label, scale, {f"{label}_s{i}": f"{i:07d}" for i in range(n)}, SCALES[scale].overrides if scale else {})


def test_verdict_calls_a_difference_real_only_beyond_the_spread():
    a = Spread((1.0, 1.2, 1.4))  # mean 1.2, sd 0.2
    assert verdict(a, Spread((1.8, 2.0, 2.2))) == "real"  # 0.8 apart, spreads 0.2 + 0.2
    assert verdict(a, Spread((1.3, 1.5, 1.7))) == "within noise"  # 0.3 apart
    assert verdict(a, Spread((1.2,))) == "same"
    assert verdict(Spread((1.0,)), Spread((5.0,))) == ONE_SEED  # no spread measured: never real
    assert verdict(a, Spread((9.0,))) == ONE_SEED
    assert verdict(Spread((0.0, 0.0)), Spread((0.5, 0.5))) == "real"  # no spread at all: any difference


def test_no_winner_among_ties_nor_without_a_spread():
    # the report bolded the smallest of values equal to the 4 decimals it shows (float noise below)
    tied = {f"e{i}": Spread((0.8140 + i * 1e-13,)) for i in range(7)}
    assert closest(tied) == (None, "tie")
    assert closest({**tied, "kl": Spread((0.5,))}) == (None, ONE_SEED)
    near = {"a": Spread((1.0, 1.1)), "b": Spread((1.05, 1.15))}
    assert closest(near) == (None, "within noise")
    far = {"a": Spread((1.0, 1.1)), "b": Spread((3.0, 3.1)), "c": Spread((1.0, 1.1))}
    assert closest(far) == (None, "within noise")  # a and c tie at the top: no winner
    assert closest({"a": Spread((1.0, 1.1)), "b": Spread((3.0, 3.1))}) == ("a", "a")


def test_report_states_scale_and_seeds_and_bolds_only_a_real_winner():
    groups = {"stable_cpu": group("stable_cpu", 3), "fixed_cpu": group("fixed_cpu", 3)}
    runs = {"stable_cpu": [outputs(3.9 + d, s) for d, s in ((0.0, 42), (0.2, 43), (-0.2, 44))],
            "fixed_cpu": [outputs(1.45 + d, s, pixel=0.41) for d, s in ((0.0, 42), (0.05, 43), (-0.05, 44))]}
    text = render(groups, runs)
    assert "Scale: cpu." in text and "WARNING" not in text
    assert "Seeds: stable_cpu 42, 43, 44; fixed_cpu 42, 43, 44." in text
    assert "| training: attention_entropy_ratio | 3.9000 ± 0.2000 (ok) | **1.4500 ± 0.0500** (ok) | fixed_cpu |" in text
    assert "| training: stop_value_gap | 0.0000 ± 0.0000 (ok) | 0.0000 ± 0.0000 (ok) | tie |" in text
    assert text.count("**") == 2  # one winner in the whole table
    assert "| eval.pixel_accuracy | 0.4 ± 0 | 0.41 ± 0 |" in text
    # against the first group: the entropy ratio differs for real, pixel accuracy too (no spread at all)
    assert "## fixed_cpu against stable_cpu" in text
    assert "| gap.training.attention_entropy_ratio | 3.9 ± 0.2 | 1.45 ± 0.05 | -2.45 | real |" in text


def test_report_flags_mixed_or_unknown_scales_and_a_key_one_repeat_inherited():
    groups = {"stable_cpu": group("stable_cpu", 2), "mine": group("mine", 2, scale=None)}
    runs = {"stable_cpu": [outputs(3.9, 42, changes={"model.hidden_dim": (256, 32)}),
                           outputs(3.8, 43, changes={"model.hidden_dim": (256, 32), "train.seed": (42, 43)})],
            "mine": [outputs(2.0, 1, changes={"model.use_gumbel_softmax": (True, False)}),
                     outputs(2.1, 2, changes={"train.seed": (42, 2)})]}
    text = render(groups, runs)
    assert "Scale: cpu, unknown. WARNING: experiments of different or unknown scales" in text
    assert "| stable_cpu | stable_cpu_s0 (0000000), stable_cpu_s1 (0000001) | none (the baseline) |" in text
    runs["stable_cpu"][1] = outputs(3.8, 43, changes={"model.hidden_dim": (256, 64)})  # the scale's key, changed
    assert "| stable_cpu | stable_cpu_s0 (0000000), stable_cpu_s1 (0000001) | none (the baseline) -- WARNING: its " \
           "repeats differ in model.hidden_dim |" in render(groups, runs)
    assert "model.use_gumbel_softmax=false -- WARNING: its repeats differ in model.use_gumbel_softmax" in text


def test_rows_pair_every_metric_and_the_table_shows_the_difference():
    a, b = [outputs(3.0, 1), outputs(3.2, 2)], [outputs(1.0, 1), outputs(1.2, 2)]
    found = {r.metric: r.verdict for r in rows(a, b) if not is_status(r.metric)}
    assert found == {"eval.eval.pixel_accuracy": "same", "eval.train.pixel_accuracy": "same",
                     "gap.training.attention_entropy_ratio": "real", "train.loss_total": "same"}
    text = table(rows(a, b), ("stable_cpu", "fixed_cpu"))
    assert text.startswith("| metric | stable_cpu | fixed_cpu | difference | verdict |")
    assert "| gap.training.attention_entropy_ratio | 3.1 ± 0.1414 | 1.1 ± 0.1414 | -2 | real |" in text


def test_curves_are_the_mean_over_the_repeats():
    series = mean_series([outputs(1.0, 0), outputs(1.0, 2)])
    assert series["loss_total"].tolist() == [3.0, 2.0] and series["epoch"].tolist() == [1, 2]


@pytest.mark.parametrize("values", [(1.0, 2.0, 4.0), (0.5,)])
def test_spread_text(values):
    s = Spread(values)
    assert s.text(".2f") == (f"{s.mean:.2f} ± {s.sd:.2f}" if len(values) > 1 else "0.50")


def test_statuses_are_categories_never_averaged():
    assert status_verdict({"warning"}, {"warning"}) == "same"
    assert status_verdict({"warning"}, {"ok"}) == "different"
    assert status_verdict({"ok", "warning"}, {"warning"}) == "mixed"
    assert status_verdict({"ok", "warning"}, {"ok", "warning"}) == "mixed"  # the repeats themselves disagree
    a = [outputs(3.0, 1, entropy_status="warning"), outputs(3.0, 2, entropy_status="warning")]
    b = [outputs(3.0, 1), outputs(3.0, 2, entropy_status="critical")]
    found = {r.metric: r for r in rows(a, b)}
    row = found["gap.training.attention_entropy_ratio_status"]
    assert (row.a, row.b, row.difference, row.verdict) == ("warning", "ok/critical", "", "different")
    assert found["gap.evaluation.loss_ratio_status"].verdict == "same"
    text = differences_summary(a, b, ("stable_cpu", "fixed_cpu"))
    assert "| gap.overall_status | warning | ok/critical |  | different |" in text
    assert "± 0 |" not in text  # no status as a mean and a spread


def test_a_measure_one_family_lacks_is_not_measured_and_counts_in_no_status():
    """RLAN's attention entropy warning against a TRM without the DSC: graded over the shared measures,
    both are ok; TRM is not called ok for what it does not measure."""
    groups = {"stable_cpu": group("stable_cpu", 1), "trm_cpu": group("trm_cpu", 1)}
    runs = {"stable_cpu": [outputs(3.9, 42, entropy_status="warning")],
            "trm_cpu": [outputs(0.0, 42, measures=TRM_MEASURES)]}
    text = render(groups, runs)
    assert ("| training: attention_entropy_ratio | 3.9000 (warning) | not measured | not compared (not measured by "
            "trm_cpu) |") in text
    assert "| evaluation: stop_value_gap | 0.0000 (ok) | not measured | not compared" in text
    assert "| status over the measures every group has | ok | ok | same |" in text
    assert "overall status" not in text and "—" not in text.split("| evaluation |")[1]
    summary = differences_summary(runs["stable_cpu"], runs["trm_cpu"], ("stable_cpu", "trm_cpu"))
    assert "measured by one of them only" in summary and "0 of " in summary  # the own statuses differ, not these
    assert "gap.overall_status (over the gaps both measured) | ok | ok |  | same |" in table(
        rows(runs["stable_cpu"], runs["trm_cpu"]), ("stable_cpu", "trm_cpu"))
    # a shared measure graded worse still shows in the status row
    runs["trm_cpu"][0].gap["evaluation"]["loss_ratio_status"] = STATUS_CODE["critical"]
    assert "| status over the measures every group has | ok | critical | different |" in render(groups, runs)


def test_curves_only_for_the_measures_every_group_has():
    stable = pd.DataFrame({"epoch": [1, 2], "loss_total": [2.0, 1.0], "loo_accuracy": [None, 0.5],
                           "lora_diversity": [0.1, 0.2], "halt_steps": [None, None]})
    trm = pd.DataFrame({"epoch": [1, 2], "loss_total": [1.5, 1.2], "halt_steps": [2.0, 2.0]})
    kept, left_out = shared_series({"stable": stable, "trm": trm})
    assert [list(df.columns) for df in kept.values()] == [["epoch", "loss_total"], ["epoch", "loss_total"]]
    assert left_out == ["halt_steps", "loo_accuracy", "lora_diversity"]
    kept, left_out = shared_series({"stable": stable, "fixed": stable})
    assert list(kept["fixed"].columns) == ["epoch", "loss_total", "loo_accuracy", "lora_diversity"] and not left_out
