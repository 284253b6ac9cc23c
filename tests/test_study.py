"""The study page is written from the runs: known series in, known figures out."""

from __future__ import annotations

import pandas as pd

from pipeline.experiments.compare import Group, Outputs
from pipeline.experiments.study import epoch_table, render
from pipeline.params import flatten
from tests.helpers import raw_params


def _run(seed: int, growth: list[float], equiv: list[float | None], total: list[float], rev: str,
         gain: list[float] | None = None) -> Outputs:
    params = flatten(raw_params())
    params.update({k: seed for k in ("augment.seed", "train.seed", "evaluate.seed")})
    series = pd.DataFrame({
        "epoch": range(1, len(growth) + 1), "loss_total": total, "loss_task": [1.0] * len(growth),
        "loss_equiv": equiv, **{f"lora_magnitude_{t}": [0.5 * g for g in growth]
                                 for t in ("gru_reset", "gru_update", "gru_candidate", "output_head")},
        **({"context_gain_loss_train": gain} if gain is not None else {}),
    })
    return Outputs(rev, {"eval.train.pass@2": 0.5, "eval.eval.pass@2": 0.25}, {}, {}, series, params, {})


def test_epoch_table_grows_from_the_first_epoch_and_shares_the_weighted_term():
    run = _run(42, [1.0, 4.0, 12.0], [None, 5.0, 20.0], [2.0, 2.5, 4.0], "a" * 40)
    t = epoch_table(run)
    assert t["lora_growth"].tolist() == [1.0, 4.0, 12.0]
    w = raw_params()["train"]["equivariance_training"]["loss_weight"]
    assert t["equiv_share"].tolist()[1:] == [w * 5.0 / 2.5, w * 20.0 / 4.0] and pd.isna(t["equiv_share"][0])
    assert t["fired"].tolist()[2] == ("lora_explosion critical",)  # 12x > lora_growth_max (10)
    assert t["fired"].tolist()[1] == ()


def test_render_gives_mean_and_spread_over_seeds_and_who_tripped_what():
    a = [_run(42, [1.0, 2.0], [None, 1.0], [2.0, 2.0], "a" * 40), _run(43, [1.0, 4.0], [None, 3.0], [2.0, 3.0], "b" * 40)]
    b = [_run(42, [1.0, 20.0], [None, 1.0], [2.0, 2.0], "c" * 40), _run(43, [1.0, 1.0], [None, 1.0], [2.0, 2.0], "d" * 40)]
    groups = {"stable_cpu": Group("stable_cpu", "cpu", {}), "fixed_cpu": Group("fixed_cpu", "cpu", {})}
    text = render(groups, {"stable_cpu": a, "fixed_cpu": b}, "CMD")
    row2 = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert row2.split(" | ")[1] == "3 ± 1.41"  # stable's growth at epoch 2: mean of 2 and 4, sd sqrt(2)
    assert "| fixed_cpu | lora_explosion critical | 1 of 2 | 2 (seed 42) |" in text
    assert "| stable_cpu | none | 0 of 2 | — |" in text
    assert "Written by `CMD`" in text and "seeds stable_cpu: 42, 43" in text
    assert "| lora_growth | 2 to 4 | 1 to 20 |" in text  # after the first epoch, over both seeds
    assert "| context_gain_loss_train | — | — |" in text  # not logged: no number made up


def test_render_takes_the_context_gain_of_the_last_epoch_that_measured_it():
    runs = [_run(42, [1.0, 2.0, 2.0], [None, 1.0, 1.0], [2.0, 2.0, 2.0], "a" * 40, gain=[0.1, 1.0, float("nan")]),
            _run(43, [1.0, 2.0, 2.0], [None, 1.0, 1.0], [2.0, 2.0, 2.0], "b" * 40, gain=[0.2, 0.3, 2.0])]
    text = render({"stable_cpu": Group("stable_cpu", "cpu", {})}, {"stable_cpu": runs}, "CMD")
    assert "| context_gain_loss_train | 1.5 ± 0.707 |" in text  # seed 42: epoch 2 (3 not measured), seed 43: epoch 3
