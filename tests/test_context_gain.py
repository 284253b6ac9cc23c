"""Context gain: each example borrows another task's demonstrations; a model that ignores its context
gains exactly nothing; the held-out sides it is measured on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.arc import Task
from pipeline.model import RLAN
from pipeline.model.rlan import family as rlan_family
from pipeline.train import context_gain
from pipeline.train.loop import heldout_examples
from tests.helpers import params_with

TINY = dict(model__hidden_dim=16, model__num_solver_steps=2, model__max_clues=2, model__spatial_downsample=2,
            model__dsc_num_heads=2, model__solver_context_heads=2, model__msre_encoding_dim=8, model__msre_num_freq=2,
            model__hyperlora_rank=2, model__dropout=0.0)


def grid(rng, side):
    return rng.integers(0, 10, (side, side)).astype(np.uint8)


def examples(rng, spec):
    """(task id, number of demonstrations, side of the grids) -> examples."""
    return [(t, [(grid(rng, s), grid(rng, s)) for _ in range(n)], grid(rng, s), grid(rng, s)) for t, n, s in spec]


def test_donor_is_another_task_with_as_many_demonstrations_and_the_nearest_size():
    rng = np.random.default_rng(0)
    exs = examples(rng, [("a", 2, 3), ("a", 2, 3), ("b", 3, 3), ("c", 2, 5), ("d", 2, 4), ("e", 3, 9)])
    who = context_gain.donors(exs)
    assert who == [4, 4, 5, 4, 0, 2]  # same count first (a -> d, not b), then size (a: 4 is nearer 3 than 5)
    for i, j in enumerate(who):
        assert exs[i][0] != exs[j][0]
    borrowed = context_gain.borrow_demonstrations(exs)
    for ex, b, j in zip(exs, borrowed, who):
        assert b[0] == ex[0] and b[2] is ex[2] and b[3] is ex[3] and b[1] is exs[j][1]  # only the demonstrations move
    assert context_gain.borrow_demonstrations(exs) == borrowed  # deterministic
    assert context_gain.donors(exs[:2]) is None and context_gain.borrow_demonstrations(exs[:2]) is None
    only_other = examples(rng, [("a", 2, 3), ("b", 4, 3)])
    assert context_gain.donors(only_other) == [1, 0]  # no task with as many: another one still


def test_gains_are_signed_so_that_reading_the_demonstrations_is_positive():
    g = context_gain.gains({"loss": 0.5, "exact": 0.75}, {"loss": 2.0, "exact": 0.25})
    assert g == {"context_gain_loss": 1.5, "context_gain_exact": 0.5}


def _split_tasks():
    rng = np.random.default_rng(1)
    tasks = []
    for split in ("train", "eval"):
        for k in range(4):
            n = 2 + k % 2
            tasks.append(Task(f"{split}{k}", split, tuple((grid(rng, 3), grid(rng, 3)) for _ in range(n)),
                              ((grid(rng, 3), grid(rng, 3)),)))
    return tasks


def test_heldout_has_an_evaluation_and_a_training_side_of_as_many_tasks():
    held = heldout_examples(_split_tasks(), 3, seed=7)
    assert set(held) == {"eval", "train"}
    for side, exs in held.items():
        assert len({t for t, *_ in exs}) == 3 and all(t.startswith(side) for t, *_ in exs)
    assert heldout_examples(_split_tasks(), 3, seed=7)["train"][0][0] == held["train"][0][0]
    assert heldout_examples(_split_tasks(), 0, seed=7) == {"eval": [], "train": []}


def test_a_model_blind_to_its_context_gains_nothing_and_one_that_reads_it_does():
    held = heldout_examples(_split_tasks(), 4, seed=0)
    torch.manual_seed(0)
    blind = RLAN(params_with(**TINY).model)
    encode = blind.context.encode_pairs

    def nothing_of_the_pairs(pair_in, pair_out):  # the same encoding whatever the demonstrations
        tokens, pooled = encode(pair_in, pair_out)
        return torch.zeros_like(tokens), torch.zeros_like(pooled)

    blind.context.encode_pairs = nothing_of_the_pairs
    m = rlan_family.measure_heldout(blind, held, 0.5, 4, torch.device("cpu"), "fp32")
    for side in ("train", "eval"):
        assert m[f"context_gain_loss_{side}"] == 0.0 and m[f"context_gain_exact_{side}"] == 0.0
    assert {"heldout_exact_match", "heldout_loss", "attention_entropy_eval", "stop_value_eval"} <= set(m)
    torch.manual_seed(0)
    reads = RLAN(params_with(**TINY).model)  # cross-attention to the support tokens
    m = rlan_family.measure_heldout(reads, held, 0.5, 4, torch.device("cpu"), "fp32")
    assert all(m[f"context_gain_loss_{side}"] != 0.0 for side in ("train", "eval"))
    assert m["heldout_loss"] == pytest.approx(
        rlan_family.measure_heldout(reads, {"eval": held["eval"]}, 0.5, 4, torch.device("cpu"), "fp32")["heldout_loss"])
