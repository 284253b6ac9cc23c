"""Evaluation over the cached versions (`evaluate.views: cache`): the views are exactly the cache's
versions, each predictor gets its version's cache sample, and the vote over them, mapped back,
agrees with an independent count of the answers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.augment import augment_grid
from pipeline.cache import CacheReader, build_cache
from pipeline.canvas import grid_to_canvas
from pipeline.evaluation.predictor import Prediction
from pipeline.evaluation.runner import evaluate_side, plan_views
from pipeline.evaluation.views import cached_versions, render
from tests.helpers import params_with, tiny_task_set

VERSIONS = 6
EP = params_with(evaluate__views="cache").evaluate


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "cache"
    build_cache(tiny_task_set(), params_with(augment__samples_per_task=VERSIONS).augment, path)
    return CacheReader(path)


def table(cache: CacheReader) -> dict[int, tuple[str, int, int, np.ndarray]]:
    """sample -> (task, version, dihedral, colour map), read straight from the index."""
    s = cache.samples
    return {i: (t, int(v), int(d), np.array([int(c) for c in m], np.uint8))
            for i, (t, v, d, m) in enumerate(zip(s["task_id"], s["version"], s["dihedral"], s["color_map"]))}


def test_the_views_are_the_cached_versions(cache):
    tasks = tiny_task_set()
    rows = table(cache)
    plan = plan_views(tasks, EP, cached_versions(cache.samples, None))
    assert len(plan) == VERSIONS * sum(len(t.tests) for t in tasks)
    for task, view in plan:
        t, version, d, cmap = rows[view.version]
        assert (t, d) == (task.id, view.dihedral) and np.array_equal(cmap, view.cmap)
        assert view.is_identity == (version == 0)
        demos, _, _ = render(task, view)  # the view's demonstrations are the cached version's pairs
        stored = [p for p in cache.pairs(view.version) if not p["is_test"]]
        assert [(a.tolist(), b.tolist()) for a, b in demos] == [(p["input"].tolist(), p["output"].tolist())
                                                                for p in stored]
    few = plan_views(tasks, EP, cached_versions(cache.samples, 2))
    assert {rows[v.version][1] for _, v in few} == {0, 1} and len(few) == 2 * len(plan) // VERSIONS
    with pytest.raises(ValueError, match="no version of it in the augmentation cache"):
        plan_views(tasks, EP, {})


def right_versions(task_index: int) -> int:
    """How many versions (the first ones) the scripted model answers right: 0, 2, 4 or 6 of 6."""
    return 2 * (task_index % 4)


def scripted(cache: CacheReader, tasks, wrong: np.ndarray, seen: list):
    """Right (the view's true output) on a task's first right_versions versions, else `wrong` in the
    view's frame (so every wrong view maps back to the same grid); records the versions it is given."""
    rows = table(cache)
    index = {t.id: i for i, t in enumerate(tasks)}

    def predict(batch):
        toks = []
        for i, sample in enumerate(batch["version"].tolist()):
            seen.append(sample)
            task, version, d, cmap = rows[sample]
            right = version < right_versions(index[task])
            toks.append(batch["query_out"][i].numpy() if right else grid_to_canvas(augment_grid(wrong, d, cmap)))
        B = len(toks)
        return Prediction(np.stack(toks), np.full((B, 30, 30), -0.1, np.float32), np.zeros(B, np.float32))

    return predict


def independent_pass_at(tasks, k: int) -> float:
    """pass@k counted by hand: per test input the right answer has right_versions votes and the one
    wrong answer the rest; the truth is within the top k when it has votes and k >= its rank."""
    per_task = []
    for i, task in enumerate(tasks):
        votes = Counter({"truth": right_versions(i), "wrong": VERSIONS - right_versions(i)})
        ranked = [name for name, n in sorted(votes.items(), key=lambda kv: -kv[1]) if n]
        per_task.append(np.mean(["truth" in ranked[:k] for _ in task.tests]))
    return float(np.mean(per_task))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_vote_over_the_cached_versions_agrees_with_an_independent_count(cache, split):
    tasks = [t for t in tiny_task_set() if t.split == split]
    wrong = np.full((2, 3), 5, np.uint8)
    assert not any(np.array_equal(out, wrong) for t in tasks for _, out in t.tests)
    seen: list[int] = []
    res = evaluate_side(tasks, scripted(cache, tasks, wrong, seen), EP, versions=cached_versions(cache.samples, None))
    for k in (1, 2):
        assert res.metrics[f"pass@{k}"] == independent_pass_at(tasks, k)
    assert 0 < res.metrics["pass@1"] < res.metrics["pass@2"] <= 1  # both outcomes occur
    index = {t.id: i for i, t in enumerate(tasks)}
    for r in res.ranked:  # every view mapped back to one of two grids, the truth ranked by its votes
        right = right_versions(index[r.task_id])
        assert sum(c.votes for c in r.candidates) == VERSIONS and len(r.candidates) <= 2
        assert r.truth_rank == (None if right == 0 else 1 if right > VERSIONS - right else 2)
    rows = table(cache)  # each test input got every version of its task, once
    assert sorted(seen) == sorted(i for t in tasks for i, row in rows.items() if row[0] == t.id for _ in t.tests)


def test_fresh_views_carry_no_version(cache):
    tasks = tiny_task_set()[:1]
    seen: list[int] = []

    def predict(batch):
        seen.extend(batch["version"].tolist())
        B = len(batch["query_in"])
        return Prediction(batch["query_out"].numpy(), np.zeros((B, 30, 30), np.float32), np.zeros(B, np.float32))

    res = evaluate_side(tasks, predict, EP.model_copy(update={"views": "fresh"}))
    assert set(seen) == {-1} and res.metrics["pass@1"] == 1.0
