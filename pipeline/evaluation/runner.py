"""One side of the evaluation (the evaluation tasks, or the training tasks' test pairs), measured
the same way: every view predicted in large batches, decoded, mapped back, voted on."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.arc import Task
from pipeline.augment import inverse_grid
from pipeline.canvas import decode_canvas
from pipeline.distributed import World, gather_to_main, single
from pipeline.evaluation.predictor import Predictor
from pipeline.evaluation.views import Version, View, cache_views, render, views_of
from pipeline.evaluation.voting import Ranked, Voting, pass_at_k, task_mean
from pipeline.loader import batch_from_pairs
from pipeline.params import EvaluateParams

log = logging.getLogger(__name__)


@dataclass
class SideResult:
    metrics: dict[str, float]
    ranked: list[Ranked]
    rows: list[dict[str, Any]]


def confidence(grid: np.ndarray, logp: np.ndarray) -> float:
    """The model's probability of its own prediction, per cell: exp of the mean log-probability of
    the predicted colours over the decoded grid (the geometric mean cell probability); 0 if empty."""
    h, w = grid.shape
    return float(np.exp(logp[:h, :w].mean())) if h and w else 0.0


def pixel_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean()) if pred.shape == truth.shape else 0.0


def plan_views(tasks: list[Task], ep: EvaluateParams,
               versions: dict[str, list[Version]] | None = None) -> list[tuple[Task, View]]:
    """Every view of every test input: the cached versions of each task (`evaluate.views: cache`,
    `versions` from pipeline.evaluation.views.cached_versions), or fresh ones."""
    if ep.views == "cache":
        if versions is None:
            raise ValueError("evaluate.views is cache: the cache's versions are needed")
        return [(t, v) for t in tasks for i in range(len(t.tests)) for v in cache_views(t, i, versions)]
    if ep.use_trm_style_eval:
        n_d, n_c = ep.num_augmented_views, ep.num_color_perms
    else:
        n_d, n_c = 1, 1
    return [(t, v) for t in tasks for i in range(len(t.tests)) for v in views_of(t, i, n_d, n_c, ep.seed)]


def evaluate_side(tasks: list[Task], predict: Predictor, ep: EvaluateParams, desc: str = "evaluate",
                  world: World | None = None, versions: dict[str, list[Version]] | None = None
                  ) -> SideResult | None:
    """Predict every view of every test input of `tasks` and vote. With several processes, rank r
    predicts batches r, r + W, ... (the very batches a single process would form, so every number
    is the same), the outcomes meet on rank 0, which votes; other ranks return None."""
    world = world or single()
    plan = plan_views(tasks, ep, versions)
    n_batches = -(-len(plan) // ep.batch_size)
    local = predict_views(plan, predict, ep, range(world.rank, n_batches, world.size), desc, world.is_main)
    parts = gather_to_main(world, local)
    if parts is None:
        return None
    outcomes = [o for _, o in sorted((i, o) for part in parts for i, o in part.items())]
    return vote(tasks, outcomes, ep)


def predict_views(plan: list[tuple[Task, View]], predict: Predictor, ep: EvaluateParams, batches: range,
                  desc: str = "evaluate", progress: bool = True) -> dict[int, dict[str, Any]]:
    """Per view (by its index in the plan), for the given batches of the plan: the grid mapped back to
    the task's frame, its confidence and the measures."""
    out: dict[int, dict[str, Any]] = {}
    tasks_of = [{t.id for t, _ in plan[b * ep.batch_size : (b + 1) * ep.batch_size]} for b in batches]
    with tqdm(total=len(set().union(*tasks_of)) if tasks_of else 0, desc=desc, unit="task", mininterval=2.0,
              disable=not progress) as bar:
        done: set[str] = set()
        for b, ids in zip(batches, tasks_of):
            start = b * ep.batch_size
            chunk = plan[start : start + ep.batch_size]
            batch = batch_from_pairs([render(t, v) for t, v in chunk])
            batch["version"] = torch.tensor([v.version for _, v in chunk], dtype=torch.int64)
            pred = predict(batch)
            for i, (task, view) in enumerate(chunk):
                grid = decode_canvas(pred.tokens[i])
                conf = confidence(grid, pred.logp[i]) if pred.confidence is None else float(pred.confidence[i])
                if ep.use_inverse_aug and grid.size:
                    grid = inverse_grid(grid, view.dihedral, view.cmap)
                out[start + i] = {"task_id": task.id, "test_index": view.test_index, "identity": view.is_identity,
                                  "grid": grid, "confidence": conf, "loss": float(pred.loss[i]),
                                  "measures": {k: float(v[i]) for k, v in pred.measures.items()}}
            bar.update(len(ids - done))
            done |= ids
    return out


def vote(tasks: list[Task], outcomes: list[dict[str, Any]], ep: EvaluateParams) -> SideResult:
    """A fresh pool of votes over the views' outcomes; metrics, ranked candidates and per-input rows."""
    voting = Voting(use_votes=ep.use_voting)
    voting.begin()
    identity: dict[tuple[str, int], float] = {}
    for o in outcomes:
        if o["grid"].size:  # a view whose prediction decodes to no grid casts no vote (it still counts below)
            voting.update(o["task_id"], o["test_index"], o["grid"], o["confidence"])
    truths = {(t.id, i): out for t in tasks for i, (_, out) in enumerate(t.tests)}
    for o in outcomes:
        if o["identity"]:
            identity[(o["task_id"], o["test_index"])] = float(np.array_equal(o["grid"], truths[(o["task_id"], o["test_index"])]))
    ranked = voting.ranked(truths)
    top1_pixel = {(r.task_id, r.test_index): pixel_accuracy(r.candidates[0].grid, truths[(r.task_id, r.test_index)])
                  if r.candidates else 0.0 for r in ranked}
    measures = {k: float(np.mean([o["measures"][k] for o in outcomes])) for k in outcomes[0]["measures"]} \
        if outcomes else {}
    metrics = {**pass_at_k(ranked, ep.pass_ks), "exact_match_identity": task_mean(identity),
               "pixel_accuracy": task_mean(top1_pixel), **measures,
               "loss": float(np.mean([o["loss"] for o in outcomes])) if outcomes else math.nan,
               "tasks": len({t.id for t in tasks}), "test_inputs": len(truths), "views": len(outcomes)}
    rows = [{"task_id": r.task_id, "test_index": r.test_index,
             "winner_votes": r.candidates[0].votes if r.candidates else 0,
             "winner_confidence": round(r.candidates[0].confidence, 6) if r.candidates else 0.0,
             "distinct_candidates": len(r.candidates), "truth_rank": r.truth_rank,
             "identity_correct": bool(identity.get((r.task_id, r.test_index), 0.0))} for r in ranked]
    return SideResult(metrics, ranked, rows)
