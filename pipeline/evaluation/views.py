"""The augmented views of a test input, from one of two sources (`evaluate.views`):

- `fresh`: `num_augmented_views` dihedral transforms (ids 0..k-1; 8 is the whole group) x
  `num_color_perms` colour permutations (the first is the identity, the others keep 0 fixed and are
  drawn from a generator keyed by the seed, the task and the test index);
- `cache`: the versions of the task in the augmentation cache (`evaluate.max_versions` of them,
  version 0 the identity first), each view carrying its cache sample: TRM's evaluation, where a
  version's puzzle embedding exists only for the versions trained on.

A view transforms the demonstrations and the test input alike, every grid at the canvas origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.arc import Pair, Task, task_key
from pipeline.augment import IDENTITY_CMAP, augment_grid, check_cmap, random_cmaps


@dataclass(frozen=True)
class View:
    task_id: str
    test_index: int
    dihedral: int
    cmap: np.ndarray  # (10,) new colour of each colour
    version: int = -1  # the cache sample this view is (cache views), -1 for a fresh view

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


Version = tuple[int, int, np.ndarray]  # (cache sample, dihedral id, colour map)


def cached_versions(samples: pd.DataFrame, max_versions: int | None) -> dict[str, list[Version]]:
    """Per task id, its versions in the cache's index (pipeline.cache `samples.parquet`) in version
    order, at most `max_versions` of them."""
    df = samples[["task_id", "version", "dihedral", "color_map"]].assign(sample=np.arange(len(samples)))
    if max_versions is not None:
        df = df[df["version"] < max_versions]
    out: dict[str, list[Version]] = {}
    for task_id, rows in df.sort_values(["task_id", "version"]).groupby("task_id", sort=False):
        out[str(task_id)] = [(int(s), int(d), check_cmap(np.frombuffer(c.encode(), np.uint8) - ord("0")))
                             for s, d, c in zip(rows["sample"], rows["dihedral"], rows["color_map"])]
    return out


def cache_views(task: Task, test_index: int, versions: dict[str, list[Version]]) -> list[View]:
    if task.id not in versions:
        raise ValueError(f"task {task.id}: no version of it in the augmentation cache, so no cache views "
                         "(the cache was built from other tasks: rebuild it with `dvc repro augment`)")
    return [View(task.id, test_index, d, cmap, sample) for sample, d, cmap in versions[task.id]]


def render(task: Task, view: View) -> tuple[list[Pair], np.ndarray, np.ndarray]:
    """(context pairs, query input, true output), all in the view's frame."""
    def f(g: np.ndarray) -> np.ndarray:
        return augment_grid(g, view.dihedral, view.cmap)

    q_in, q_out = task.tests[view.test_index]
    return [(f(a), f(b)) for a, b in task.demos], f(q_in), f(q_out)
