"""The augmented views of a test input: `num_augmented_views` dihedral transforms (ids 0..k-1; 8 is
the whole group) x `num_color_perms` colour permutations (the first is the identity, the others
keep 0 fixed and are drawn from a generator keyed by the seed, the task and the test index). A view
transforms the demonstrations and the test input alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.arc import Pair, Task, task_key
from pipeline.augment import IDENTITY_CMAP, augment_grid, random_cmaps


@dataclass(frozen=True)
class View:
    task_id: str
    test_index: int
    dihedral: int
    cmap: np.ndarray  # (10,) new colour of each colour

    @property
    def is_identity(self) -> bool:
        return self.dihedral == 0 and bool((self.cmap == IDENTITY_CMAP).all())


def view_cmaps(seed: int, task_id: str, test_index: int, n: int) -> np.ndarray:
    """(n, 10) colour maps: the identity, then n - 1 permutations of 1..9."""
    rng = np.random.default_rng([seed, task_key(task_id), test_index])
    return np.concatenate([IDENTITY_CMAP[None], random_cmaps(rng, n - 1, 1.0)]) if n > 1 else IDENTITY_CMAP[None]


def views_of(task: Task, test_index: int, n_dihedral: int, n_colors: int, seed: int) -> list[View]:
    cmaps = view_cmaps(seed, task.id, test_index, n_colors)
    return [View(task.id, test_index, d, c) for d in range(n_dihedral) for c in cmaps]


def render(task: Task, view: View) -> tuple[list[Pair], np.ndarray, np.ndarray]:
    """(context pairs, query input, true output), all in the view's frame."""
    def f(g: np.ndarray) -> np.ndarray:
        return augment_grid(g, view.dihedral, view.cmap)

    q_in, q_out = task.tests[view.test_index]
    return [(f(a), f(b)) for a, b in task.demos], f(q_in), f(q_out)
