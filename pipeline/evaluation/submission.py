"""The ARC Prize submission: {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}, one entry per
test input in order, from the two best candidates (a lone candidate fills both attempts)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.arc import Task
from pipeline.evaluation.voting import Ranked


class SubmissionError(ValueError):
    """A submission that does not match the tasks it answers."""


def _as_list(grid: np.ndarray | None) -> list[list[int]]:
    # ARC grids are at least 1x1: an empty prediction becomes [[0]]
    return grid.astype(int).tolist() if grid is not None and grid.size else [[0]]


def build(ranked: list[Ranked]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(ranked, key=lambda r: (r.task_id, r.test_index)):
        first = r.candidates[0].grid if r.candidates else None
        second = r.candidates[1].grid if len(r.candidates) > 1 else first
        out.setdefault(r.task_id, []).append({"attempt_1": _as_list(first), "attempt_2": _as_list(second)})
    return out


def validate(sub: Any, tasks: list[Task]) -> None:
    """Every task once, one entry per test input, two 1..30 x 1..30 grids of colours 0..9 each."""
    if not isinstance(sub, dict):
        raise SubmissionError("submission must be an object mapping task ids to lists of attempts")
    want = {t.id: len(t.tests) for t in tasks}
    if set(sub) != set(want):
        missing, extra = sorted(set(want) - set(sub)), sorted(set(sub) - set(want))
        raise SubmissionError(f"task ids differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for task_id, entries in sub.items():
        if not isinstance(entries, list) or len(entries) != want[task_id]:
            raise SubmissionError(f"task {task_id}: {want[task_id]} test input(s), got "
                                  f"{len(entries) if isinstance(entries, list) else type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != {"attempt_1", "attempt_2"}:
                raise SubmissionError(f"task {task_id} test {i}: needs exactly attempt_1 and attempt_2")
            for name, grid in entry.items():
                g = np.asarray(grid)
                if g.ndim != 2 or not (1 <= g.shape[0] <= 30 and 1 <= g.shape[1] <= 30) or g.dtype.kind not in "iu" \
                        or g.min() < 0 or g.max() > 9:
                    raise SubmissionError(f"task {task_id} test {i} {name}: not a 1..30 x 1..30 grid of colours 0..9")
