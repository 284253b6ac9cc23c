"""The training sampler: shards that never overlap, one process's batches, a new order each epoch."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.train.sampler import Sampler


def test_ranks_share_exactly_what_one_process_trains_on():
    one = Sampler(1000, seed=3, batch_size=7, accumulation=4)
    two = Sampler(1000, seed=3, batch_size=7, accumulation=4, world_size=2)
    four = Sampler(1000, seed=3, batch_size=7, accumulation=4, world_size=4)
    order = one.order(5)
    for step in range(6):
        single = one.micro_batches(order, 5, step, 0)
        for s in (two, four):
            shards = [mb for r in range(s.world_size) for mb in s.micro_batches(order, 5, step, r)]
            assert [mb.index for mb in shards] == [mb.index for mb in single]
            assert all(np.array_equal(a.ids, b.ids) and a.key == b.key for a, b in zip(shards, single))
        ids = np.concatenate([mb.ids for mb in single])
        assert len(set(ids.tolist())) == len(ids) == 28  # no sample twice within a step


def test_an_epoch_is_a_permutation_and_epochs_differ():
    s = Sampler(60, seed=1, batch_size=5, accumulation=3)
    order = s.order(0)
    seen = np.concatenate([mb.ids for step in range(4) for mb in s.micro_batches(order, 0, step, 0)])
    assert sorted(seen.tolist()) == list(range(60))
    assert not np.array_equal(s.order(0), s.order(1))
    assert np.array_equal(s.order(1), Sampler(60, 1, 5, 3).order(1))  # seeded


def test_wraps_when_asked_for_more_than_one_pass():
    s = Sampler(10, seed=0, batch_size=4, accumulation=1)
    order = s.order(0)
    ids = s.micro_batches(order, 0, 2, 0)[0].ids  # samples 8..11 of a 10-sample permutation
    assert ids.tolist() == order[[8, 9, 0, 1]].tolist()


def test_world_size_must_divide_accumulation():
    with pytest.raises(ValueError, match="not a multiple of the world size 3"):
        Sampler(100, 0, 4, accumulation=4, world_size=3)
