"""Voting over the predictions of one evaluation, with pass@K.

Per test input, identical grids (same size and cells) pool their votes; a candidate's confidence
is the mean confidence of its votes. Candidates rank by votes, then mean confidence, then their
hash (a stable key), all descending except the hash. A task scores, for each K, the fraction of its
test inputs whose true output is among the top K; the figure is the mean over tasks.

The pool lives in one `Voting` object: `begin()` empties it, so two evaluations never share votes
(TRM's evaluator keeps votes across evaluation rounds unless told not to).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


def grid_key(grid: np.ndarray) -> str:
    return hashlib.blake2b(bytes(grid.shape) + np.ascontiguousarray(grid, np.uint8).tobytes(), digest_size=12).hexdigest()


@dataclass
class Candidate:
    grid: np.ndarray
    key: str
    votes: int = 0
    confidence_sum: float = 0.0

    @property
    def confidence(self) -> float:
        return self.confidence_sum / max(self.votes, 1)


@dataclass
class Ranked:
    task_id: str
    test_index: int
    candidates: list[Candidate]  # best first
    truth_key: str | None = None

    @property
    def truth_rank(self) -> int | None:
        """1-based rank of the true output among the candidates, None if absent."""
        return next((i + 1 for i, c in enumerate(self.candidates) if c.key == self.truth_key), None)

    def solved_at(self, k: int) -> bool:
        r = self.truth_rank
        return r is not None and r <= k


@dataclass
class Voting:
    """`use_votes=False` ranks by confidence alone (every view still adds its grid)."""

    use_votes: bool = True
    pool: dict[tuple[str, int], dict[str, Candidate]] = field(default_factory=dict)

    def begin(self) -> None:
        self.pool = {}

    def update(self, task_id: str, test_index: int, grid: np.ndarray, confidence: float) -> None:
        cands = self.pool.setdefault((task_id, test_index), {})
        key = grid_key(grid)
        c = cands.setdefault(key, Candidate(np.ascontiguousarray(grid, np.uint8), key))
        c.votes += 1
        c.confidence_sum += float(confidence)

    def ranked(self, truths: dict[tuple[str, int], np.ndarray]) -> list[Ranked]:
        """Every test input of `truths` (in their order), its candidates ranked."""
        out = []
        for (task_id, idx), truth in truths.items():
            cands = sorted(self.pool.get((task_id, idx), {}).values(),
                           key=lambda c: (-c.votes if self.use_votes else 0, -c.confidence, c.key))
            out.append(Ranked(task_id, idx, cands, grid_key(truth)))
        return out


def pass_at_k(ranked: list[Ranked], ks: tuple[int, ...]) -> dict[str, float]:
    """Mean over tasks of the fraction of each task's test inputs solved within the top K."""
    per_task: dict[str, list[Ranked]] = defaultdict(list)
    for r in ranked:
        per_task[r.task_id].append(r)
    if not per_task:
        return {f"pass@{k}": float("nan") for k in ks}
    return {f"pass@{k}": float(np.mean([np.mean([r.solved_at(k) for r in rs]) for rs in per_task.values()]))
            for k in ks}


def task_mean(values: dict[tuple[str, int], float]) -> float:
    """Mean over tasks of the mean over each task's test inputs."""
    per_task: dict[str, list[float]] = defaultdict(list)
    for (task_id, _), v in values.items():
        per_task[task_id].append(v)
    return float(np.mean([np.mean(v) for v in per_task.values()])) if per_task else float("nan")
