"""Context gain: does the model read the demonstrations?

An ARC task is told only by its demonstration pairs, so a model that learns in context must do worse
on a test input when it is shown another task's demonstrations. The context gain of a set of
(task id, demonstrations, test input, test output) examples is measured twice in eval mode, once
with each example's own demonstrations and once with those of another task (`borrow_demonstrations`),
and reported as

- `context_gain_loss`: task loss with the borrowed demonstrations minus with its own (nats per
  cell; > 0: the own demonstrations help),
- `context_gain_exact`: exact match with its own minus with the borrowed ones.

A model that ignores its context has both gains exactly 0 (its output does not depend on them); one
that has memorised a task's test input without reading the demonstrations has them near 0 too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Example = tuple[str, list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]


def _area(demos: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return float(np.mean([gi.size for gi, _ in demos])) if demos else 0.0


def donors(examples: list[Example]) -> list[int] | None:
    """For each example, the index of the example whose demonstrations it borrows: one of another
    task, with the same number of demonstrations where there is one, then the nearest mean input
    size, then the next in order (deterministic: no random draw). None when all are of one task."""
    tasks = [ex[0] for ex in examples]
    if len(set(tasks)) < 2:
        return None
    n, count, area = len(examples), [len(ex[1]) for ex in examples], [_area(ex[1]) for ex in examples]
    return [min((j for j in range(n) if tasks[j] != tasks[i]),
                key=lambda j: (count[j] != count[i], abs(area[j] - area[i]), (j - i) % n)) for i in range(n)]


def borrow_demonstrations(examples: list[Example]) -> list[Example] | None:
    """The examples with another task's demonstrations (`donors`); None when there is no other task."""
    who = donors(examples)
    if who is None:
        return None
    return [(task, examples[j][1], q_in, q_out) for (task, _, q_in, q_out), j in zip(examples, who)]


def gains(own: dict[str, Any], borrowed: dict[str, Any]) -> dict[str, float]:
    """The two gains from mean `loss` and `exact` measured with the own and the borrowed demonstrations."""
    return {"context_gain_loss": float(borrowed["loss"]) - float(own["loss"]),
            "context_gain_exact": float(own["exact"]) - float(borrowed["exact"])}
