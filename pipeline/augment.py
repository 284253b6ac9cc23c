"""Invertible augmentations of ARC grids: the 8 dihedral transforms and colour permutations.

Dihedral ids follow TRM: 0 identity, 1 rot90, 2 rot180, 3 rot270 (counter-clockwise, as
`np.rot90`), 4 flip left-right, 5 flip up-down, 6 transpose, 7 anti-transpose. The inverse of 1
is 3; every other transform is its own inverse.

A colour map is a length-10 array, `cmap[c]` the new colour of colour c; colour 0 (background)
stays fixed. An augmented grid is `dihedral(cmap[grid], d)` and its inverse
`dihedral(argsort(cmap)[grid], DIHEDRAL_INVERSE[d])`.

A version is named as in TRM, `"{task}|||t{d}|||{cmap as 10 digits}"`, e.g.
`007bbfb7|||t5|||0139267845`, so that the inverse is always recoverable from the name.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

NUM_DIHEDRAL = 8
DIHEDRAL_NAMES = ("identity", "rot90", "rot180", "rot270", "flip_lr", "flip_ud", "transpose", "anti_transpose")
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
SWAPS_AXES = (False, True, False, True, False, False, True, True)  # (h, w) -> (w, h)
IDENTITY_CMAP = np.arange(10, dtype=np.uint8)
_NAME_RE = re.compile(r"^(?P<task>.+)\|\|\|t(?P<d>[0-7])\|\|\|(?P<cmap>[0-9]{10})$")


def dihedral(grid: np.ndarray, d: int) -> np.ndarray:
    """Dihedral transform `d` of the last two axes of `grid` (a view where numpy allows)."""
    if d == 0:
        return grid
    if d == 1:
        return np.rot90(grid, 1, axes=(-2, -1))
    if d == 2:
        return np.rot90(grid, 2, axes=(-2, -1))
    if d == 3:
        return np.rot90(grid, 3, axes=(-2, -1))
    if d == 4:
        return np.flip(grid, -1)
    if d == 5:
        return np.flip(grid, -2)
    if d == 6:
        return np.swapaxes(grid, -2, -1)
    if d == 7:
        return np.flip(np.rot90(grid, 1, axes=(-2, -1)), -1)
    raise ValueError(f"dihedral id must be 0..7, got {d}")


def dihedral_shape(h: int, w: int, d: int) -> tuple[int, int]:
    return (w, h) if SWAPS_AXES[d] else (h, w)


@lru_cache(maxsize=8 * 30 * 30)
def dihedral_index(h: int, w: int, d: int) -> np.ndarray:
    """Flat gather index: `dihedral(g, d).ravel() == g.ravel()[dihedral_index(h, w, d)]` for g of shape (h, w)."""
    idx = np.ascontiguousarray(dihedral(np.arange(h * w, dtype=np.int32).reshape(h, w), d)).ravel()
    idx.setflags(write=False)
    return idx


def check_cmap(cmap: np.ndarray) -> np.ndarray:
    cmap = np.asarray(cmap)
    if cmap.shape != (10,) or sorted(cmap.tolist()) != list(range(10)) or cmap[0] != 0:
        raise ValueError(f"colour map must be a permutation of 0..9 that keeps 0 fixed, got {cmap.tolist()}")
    return cmap.astype(np.uint8)


def inverse_cmap(cmap: np.ndarray) -> np.ndarray:
    return np.argsort(check_cmap(cmap)).astype(np.uint8)


def random_cmaps(rng: np.random.Generator, n: int, prob: float) -> np.ndarray:
    """(n, 10) colour maps: with probability `prob` a uniform permutation of 1..9, else the identity."""
    perms = np.argsort(rng.random((n, 9)), axis=1).astype(np.uint8) + 1
    keep = rng.random(n) >= prob
    perms[keep] = np.arange(1, 10, dtype=np.uint8)
    return np.concatenate([np.zeros((n, 1), np.uint8), perms], axis=1)


def augment_grid(grid: np.ndarray, d: int, cmap: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(dihedral(check_cmap(cmap)[grid], d))


def inverse_grid(grid: np.ndarray, d: int, cmap: np.ndarray) -> np.ndarray:
    """Undo `augment_grid(., d, cmap)`: map a grid predicted in the augmented frame back."""
    return np.ascontiguousarray(dihedral(inverse_cmap(cmap)[grid], DIHEDRAL_INVERSE[d]))


def format_name(task_id: str, d: int, cmap: np.ndarray) -> str:
    return f"{task_id}|||t{int(d)}|||{''.join(str(int(c)) for c in check_cmap(cmap))}"


def parse_name(name: str) -> tuple[str, int, np.ndarray]:
    """(task id, dihedral id, colour map) from a version name; ValueError if malformed."""
    m = _NAME_RE.match(name)
    if m is None:
        raise ValueError(f"not an augmented-version name 'task|||t<0-7>|||<10 digits>': {name!r}")
    cmap = check_cmap(np.frombuffer(m["cmap"].encode(), np.uint8) - ord("0"))
    return m["task"], int(m["d"]), cmap
