"""The augmentation cache: contents, inverse, leakage, distinctness, determinism, and its loader."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

import pipeline.cache as cache_mod
from pipeline.arc import Task
from pipeline.augment import dihedral, inverse_grid, parse_name
from pipeline.cache import LeakError, build_cache, plan_task
from pipeline.canvas import decode_canvas, grid_to_canvas
from pipeline.integrity import IntegrityError, describe
from pipeline.loader import AugmentedCache
from tests.helpers import grid, params_with

N = 24  # versions per task in these tests


def aug_params(**kw):
    return params_with(augment__samples_per_task=N, **{f"augment__{k}": v for k, v in kw.items()}).augment


@pytest.fixture
def tasks(tiny_tasks) -> list[Task]:
    """Tiny tasks whose evaluation test outputs are 9x9 (no other grid is), so any leak is visible."""
    rng = np.random.default_rng(3)
    out = []
    for t in tiny_tasks:
        if t.split == "eval":
            t = replace(t, tests=tuple((i, rng.integers(1, 10, (9, 9)).astype(np.uint8)) for i, _ in t.tests))
        out.append(t)
    return out


@pytest.fixture
def built(tmp_path, tasks):
    manifest = build_cache(tasks, aug_params(), tmp_path / "cache")
    return AugmentedCache(tmp_path / "cache"), manifest


def test_counts_and_identity_first(built, tasks):
    cache, manifest = built
    assert len(cache) == manifest["samples"] == N * len(tasks)
    s = cache.samples
    first = s[s["version"] == 0]
    assert (first["dihedral"] == 0).all() and (first["color_map"] == "0123456789").all()
    for t_idx, task in enumerate(tasks):
        pairs = cache.pairs(t_idx * N)
        originals = task.demos + (task.tests if task.split == "train" else ())
        assert all(p["offset"] == (0, 0) for p in pairs)
        assert all(np.array_equal(p["input"], a) and np.array_equal(p["output"], b)
                   for p, (a, b) in zip(pairs, originals))


def test_every_sample_is_recorded_and_inverts(built, tasks):
    cache, _ = built
    by_id = {t.id: t for t in tasks}
    for s, row in enumerate(cache.samples.itertuples()):
        task_id, d, cmap = parse_name(row.name)
        assert (task_id, d, "".join(map(str, cmap))) == (row.task_id, row.dihedral, row.color_map)
        task = by_id[task_id]
        expected = task.demos + (task.tests if task.split == "train" else ())
        pairs = cache.pairs(s)
        assert len(pairs) == len(expected) and sum(p["is_test"] for p in pairs) == row.n_test
        for p, (a, b) in zip(pairs, expected):
            assert np.array_equal(inverse_grid(p["input"], d, cmap), a)
            assert np.array_equal(inverse_grid(p["output"], d, cmap), b)
            h = max(p["input"].shape[0], p["output"].shape[0])
            w = max(p["input"].shape[1], p["output"].shape[1])
            assert p["offset"][0] + h <= 30 and p["offset"][1] + w <= 30


def test_no_evaluation_test_output_in_cache(built, tasks):
    cache, _ = built
    secret = {bytes(g.shape) + g.tobytes() for t in tasks if t.split == "eval" for _, g in t.tests}
    assert all(g.shape == (9, 9) for t in tasks if t.split == "eval" for _, g in t.tests)
    eval_rows = cache.samples["split"] == "eval"
    assert (cache.samples.loc[eval_rows, "n_test"] == 0).all()
    for s in range(len(cache)):
        _, d, cmap = parse_name(cache.samples["name"].iat[s])
        for p in cache.pairs(s):
            for g in (p["input"], p["output"]):
                back = inverse_grid(g, d, cmap)
                assert bytes(back.shape) + back.tobytes() not in secret
                assert g.shape != (9, 9)  # no 9x9 grid at all, in any frame


def test_leak_guard_stops_the_build(tmp_path, tasks, monkeypatch):
    def leaky_plan(task):
        return plan_task(replace(task, split="train")) if task.split == "eval" else plan_task(task)

    def plan_keeping_split(task):
        plan = leaky_plan(task)
        return replace(plan, task=task)

    monkeypatch.setattr(cache_mod, "plan_task", plan_keeping_split)
    with pytest.raises(LeakError, match="ev00: test pair 0 output"):
        build_cache(tasks, aug_params(), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("cache.tmp-*"))


def test_test_output_equal_to_a_demo_is_not_a_leak(tmp_path):
    a, b = grid([[1, 2]]), grid([[3], [4]])
    task = Task("ev", "eval", ((a, b), (b, a)), ((a, b),))  # test output b is also a demonstration output
    manifest = build_cache([task], aug_params(), tmp_path / "cache")
    cache = AugmentedCache(tmp_path / "cache")
    assert manifest["samples"] == len(cache) == N and (cache.n_test == 0).all()
    for s in range(N):  # every version holds exactly the two demonstrations, mapped back
        _, d, cmap = parse_name(cache.samples["name"].iat[s])
        back = [(inverse_grid(p["input"], d, cmap), inverse_grid(p["output"], d, cmap)) for p in cache.pairs(s)]
        assert len(back) == 2 and all(np.array_equal(x, y) for pair, demo in zip(back, task.demos)
                                      for x, y in zip(pair, demo))


def _fingerprints(cache, s):
    return b"".join(bytes(p["input"].shape) + p["input"].tobytes() + bytes(p["output"].shape) + p["output"].tobytes()
                    for p in cache.pairs(s))


def test_versions_are_distinct(built, tasks):
    cache, manifest = built
    assert manifest["shortfall_tasks"] == []
    for t in range(len(tasks)):
        prints = {_fingerprints(cache, s) for s in range(t * N, (t + 1) * N)}
        assert len(prints) == N


def test_symmetric_task_versions_distinct_by_content(tmp_path):
    # invariant under transpose, rot180 and anti-transpose: versions with those ids coincide
    x, y = grid([[1, 0], [0, 1]]), grid([[2, 0], [0, 2]])
    task = Task("sym", "train", ((x, y),), ((y, x),))
    assert cache_mod._has_symmetry(plan_task(task))
    build_cache([task], aug_params(), tmp_path / "cache")
    cache = AugmentedCache(tmp_path / "cache")
    assert len({_fingerprints(cache, s) for s in range(N)}) == N
    assert not cache.samples["repeat"].any()


def test_shortfall_is_reported_and_repeats_flagged(tmp_path):
    one = grid([[1]])
    task = Task("mono", "train", ((one, one),), ((one, one),))  # 9 colourings, dihedral-invariant
    manifest = build_cache([task], aug_params(), tmp_path / "cache")
    assert manifest["shortfall_tasks"] == [{"task_id": "mono", "distinct_versions": 9}]
    cache = AugmentedCache(tmp_path / "cache")
    assert cache.samples["repeat"].sum() == N - 9
    assert len({_fingerprints(cache, s) for s in range(N)}) == 9


def test_no_augmentation_gives_identity_versions(tmp_path, tasks):
    p = aug_params(dihedral=False, color_permutation_prob=0.0, translation=False)
    manifest = build_cache(tasks[:1], p, tmp_path / "cache")
    cache = AugmentedCache(tmp_path / "cache")
    assert (cache.samples["color_map"] == "0123456789").all() and (cache.samples["dihedral"] == 0).all()
    assert manifest["shortfall_tasks"][0]["distinct_versions"] == 1


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.slow
def test_build_is_deterministic_in_seed(tmp_path, tasks):
    build_cache(tasks, aug_params(), tmp_path / "a")
    build_cache(tasks, aug_params(), tmp_path / "b")
    build_cache(tasks, aug_params(seed=7), tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["cells.npy"] != _digest(tmp_path / "c")["cells.npy"]


def test_a_task_versions_do_not_depend_on_other_tasks(tmp_path, tasks):
    build_cache(tasks, aug_params(), tmp_path / "all")
    build_cache(tasks[2:3], aug_params(), tmp_path / "one")
    full, alone = AugmentedCache(tmp_path / "all"), AugmentedCache(tmp_path / "one")
    assert list(full.samples["name"][2 * N : 3 * N]) == list(alone.samples["name"])


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an augmentation cache"):
        AugmentedCache(tmp_path)


# --- integrity: every reader checks the files against the manifest ---------------------------


@pytest.mark.parametrize("damage", ["in_place", "truncated", "appended"])
@pytest.mark.parametrize("name", [cache_mod.CELLS_FILE, cache_mod.SAMPLES_FILE, cache_mod.PAIRS_FILE])
def test_damaged_cache_file_is_named_with_the_fix(tmp_path, tasks, name, damage):
    build_cache(tasks, aug_params(), tmp_path / "cache")
    path = tmp_path / "cache" / name
    data = bytearray(path.read_bytes())
    if damage == "in_place":  # same size: only the digest can tell
        data[len(data) // 2] ^= 0x01
    path.write_bytes(data[:-1] if damage == "truncated" else data + b"\0" if damage == "appended" else data)
    with pytest.raises(IntegrityError) as err:
        AugmentedCache(tmp_path / "cache")
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "dvc repro -f -s augment" in message and "\n" not in message
    assert ("changed in place" if damage == "in_place" else "manifest records") in message


def test_manifest_records_every_file_and_a_rebuild_verifies(tmp_path, tasks):
    manifest = build_cache(tasks, aug_params(), tmp_path / "cache")
    assert set(manifest["files"]) == {cache_mod.CELLS_FILE, cache_mod.SAMPLES_FILE, cache_mod.PAIRS_FILE}
    for name, record in manifest["files"].items():
        assert record == describe(tmp_path / "cache" / name)
    (tmp_path / "cache" / cache_mod.CELLS_FILE).write_bytes(b"broken")
    build_cache(tasks, aug_params(), tmp_path / "cache")  # what `dvc repro -f -s augment` runs
    assert len(AugmentedCache(tmp_path / "cache")) == N * len(tasks)


def test_build_removes_what_killed_builds_left(tmp_path, tasks):
    """A killed augment leaves data/cache.tmp-*: the next build removes those of dead processes."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f"cache.tmp-{dead.pid}-0123abcd", tmp_path / "cache.tmp-89abcdef",  # this and the older form
             tmp_path / f"cache.tmp-{dead.pid}-4567abcd-old"]
    live = tmp_path / f"cache.tmp-{os.getpid()}-feedbeef"  # a build still running
    other = tmp_path / f"cache2.tmp-{dead.pid}-0123abcd"  # another output's
    for d in [*stale, live, other]:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "cells.npy").write_bytes(b"half written")
    build_cache(tasks, aug_params(), tmp_path / "cache")
    assert not any(d.exists() for d in stale) and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", live.name, other.name])


# --- the loader ---------------------------------------------------------------------------


def test_batch_shapes_and_query_rules(built):
    cache, _ = built
    ids = np.arange(len(cache))
    b = cache.batch(ids, np.random.default_rng(0))
    B = len(ids)
    n_ctx = cache.n_demo - (cache.n_test == 0)
    assert b["demo_in"].shape == (B, n_ctx.max(), 30, 30) and b["query_in"].shape == (B, 30, 30)
    assert b["demo_mask"].sum(1).tolist() == n_ctx.tolist()
    assert b["query_is_test"].tolist() == (cache.n_test > 0).tolist()
    for i in range(B):
        pairs = cache.pairs(i)
        r0, c0 = b["query_offset"][i].tolist()
        q_out = decode_canvas(b["query_out"][i].numpy(), r0, c0)
        q_in = decode_canvas(b["query_in"][i].numpy(), r0, c0)
        match = [k for k, p in enumerate(pairs)
                 if np.array_equal(p["input"], q_in) and np.array_equal(p["output"], q_out) and p["offset"] == (r0, c0)]
        assert match, f"query of sample {i} is not one of its pairs"
        k = match[0]
        assert pairs[k]["is_test"] == bool(b["query_is_test"][i])
        assert tuple(b["query_hw"][i].tolist()) == q_out.shape
        # context canvases are the other pairs, placed at their own offsets
        ctx = [grid_to_canvas(p["input"], *p["offset"]).tobytes() for j, p in enumerate(pairs)
               if not p["is_test"] and j != k]
        got = [b["demo_in"][i, j].numpy().tobytes() for j in range(int(b["demo_mask"][i].sum()))]
        assert got == ctx
        assert (b["demo_in"][i, len(got):] == 0).all()


def test_batch_is_reproducible(built):
    cache, _ = built
    ids = np.array([5, 1, 77, 30])
    a = cache.batch(ids, np.random.default_rng(3))
    b = cache.batch(ids, np.random.default_rng(3))
    assert all((a[k] == b[k]).all() for k in a)


def _corner(canvas: np.ndarray) -> tuple[int, int]:
    return tuple(np.argwhere(canvas >= 2).min(0).tolist())


def test_batch_with_dihedral_transforms_every_pair(built):
    """Each grid is transformed; the pair's box moves as if the whole canvas were transformed."""
    cache, _ = built
    ids = np.arange(0, len(cache), 5)
    ds = np.arange(len(ids)) % 8
    plain = cache.batch(ids, np.random.default_rng(1))
    turned = cache.batch(ids, np.random.default_rng(1), dihedral=ds)
    for i, d in enumerate(ds):
        pairs = [("query_in", "query_out", None)]
        pairs += [("demo_in", "demo_out", j) for j in range(int(plain["demo_mask"][i].sum()))]
        for a, b, j in pairs:
            ca, cb = (plain[k][i].numpy() if j is None else plain[k][i, j].numpy() for k in (a, b))
            (r0, c0) = _corner(ca)
            ga, gb = decode_canvas(ca, r0, c0), decode_canvas(cb, r0, c0)
            box = np.zeros((30, 30), bool)
            box[r0 : r0 + max(ga.shape[0], gb.shape[0]), c0 : c0 + max(ga.shape[1], gb.shape[1])] = True
            corner = tuple(np.argwhere(dihedral(box, d)).min(0).tolist())
            ta, tb = (turned[k][i].numpy() if j is None else turned[k][i, j].numpy() for k in (a, b))
            assert np.array_equal(ta, grid_to_canvas(dihedral(ga, d), *corner))
            assert np.array_equal(tb, grid_to_canvas(dihedral(gb, d), *corner))
            if j is None:
                assert tuple(turned["query_offset"][i].tolist()) == corner
                assert tuple(turned["query_hw"][i].tolist()) == dihedral(gb, d).shape
