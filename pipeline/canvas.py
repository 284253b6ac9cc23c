"""The 30x30 canvas the model reads and writes, and the placement of grids on it.

Token scheme (TRM's): PAD = 0 outside every grid, EOS = 1 on the row just below and the column
just right of a grid (where they fit on the canvas), colour c -> c + 2. The EOS markers give the
size of an output grid, so a prediction on a fixed canvas decodes to a grid of the right size.

`place_grids` puts many grids on many canvases with one scatter (no Python loop per grid or
cell), optionally under a dihedral transform, which is what makes batch loading fast.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

CANVAS = 30
PAD, EOS, COLOR_OFFSET = 0, 1, 2
NUM_TOKENS = 12  # PAD, EOS, 10 colours


def segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of the given lengths laid end to end: (segment id, index within segment) per element."""
    lengths = np.asarray(lengths, np.int64)
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return seg, ranges(lengths)


_ARANGE = np.arange(2 * CANVAS * CANVAS, dtype=np.int64)
# _LAYOUT[w, k]: canvas offset of cell k of a grid of width w placed at the canvas origin
_LAYOUT = np.zeros((CANVAS + 1, CANVAS * CANVAS), np.int64)
for _w in range(1, CANVAS + 1):
    _LAYOUT[_w] = (_ARANGE[: CANVAS * CANVAS] // _w) * CANVAS + _ARANGE[: CANVAS * CANVAS] % _w


@lru_cache(maxsize=8 * CANVAS * CANVAS)
def _layout(d: int, h: int, w: int) -> np.ndarray:
    """Canvas offsets of the cells of an (h, w) grid (row-major) once transformed by d and placed at the origin."""
    k = _ARANGE[: h * w]
    i, j = transformed_coords(k // w, k % w, h, w, np.full(h * w, d))
    return i * CANVAS + j


def ranges(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in `lengths`, laid end to end (slices of a table: no per-element division)."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) == 0:
        return np.zeros(0, np.int64)
    if lengths.max() <= len(_ARANGE):
        return np.concatenate([_ARANGE[:n] for n in lengths.tolist()])
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def transformed_coords(i: np.ndarray, j: np.ndarray, h: np.ndarray, w: np.ndarray, d: np.ndarray):
    """Where cell (i, j) of an (h, w) grid lands under dihedral transform d (ids as in pipeline.augment)."""
    i2 = np.select(
        [d == 0, d == 1, d == 2, d == 3, d == 4, d == 5, d == 6, d == 7],
        [i, w - 1 - j, h - 1 - i, j, i, h - 1 - i, j, w - 1 - j],
    )
    j2 = np.select(
        [d == 0, d == 1, d == 2, d == 3, d == 4, d == 5, d == 6, d == 7],
        [j, i, w - 1 - j, h - 1 - i, w - 1 - j, j, i, h - 1 - i],
    )
    return i2, j2


def place_grids(
    out: np.ndarray,
    slot: np.ndarray,
    cells: np.ndarray,
    h: np.ndarray,
    w: np.ndarray,
    row0: np.ndarray,
    col0: np.ndarray,
    dihedral: np.ndarray | None = None,
) -> None:
    """Write grids onto canvases in place.

    out: (N, 30, 30) uint8 canvases, PAD where nothing is written.
    slot: (G,) canvas index of each grid; cells: the grids' colours 0..9 laid end to end (row-major);
    h, w: (G,) grid sizes; row0, col0: (G,) top-left corner on the canvas;
    dihedral: (G,) optional transform applied to each grid before placing it (sizes are the
    transformed grid's, so (h, w) -> (w, h) for transposing transforms).
    """
    flat = out.reshape(-1)
    h, w = np.asarray(h, np.int64), np.asarray(w, np.int64)
    r0, c0 = np.asarray(row0, np.int64), np.asarray(col0, np.int64)
    base = np.asarray(slot, np.int64) * (CANVAS * CANVAS) + r0 * CANVAS + c0  # canvas origin of each grid
    n = h * w
    if dihedral is None:
        th, tw = h, w
        local = np.concatenate([_LAYOUT[wi, :ni] for wi, ni in zip(w.tolist(), n.tolist())]) if len(n) else n
    else:
        d = np.asarray(dihedral, np.int64)
        swap = np.isin(d, (1, 3, 6, 7))
        th, tw = np.where(swap, w, h), np.where(swap, h, w)
        local = np.concatenate([_layout(*key) for key in zip(d.tolist(), h.tolist(), w.tolist())]) if len(n) else n
    if np.any(r0 + th > CANVAS) or np.any(c0 + tw > CANVAS):
        raise ValueError("a grid does not fit on the 30x30 canvas at its offset")
    flat[np.repeat(base, n) + local] = cells + COLOR_OFFSET

    # EOS: the row below (tw cells) and the column to the right (th cells), where on the canvas
    below = np.where(r0 + th < CANVAS, tw, 0)
    flat[np.repeat(base + th * CANVAS, below) + ranges(below)] = EOS
    right = np.where(c0 + tw < CANVAS, th, 0)
    flat[np.repeat(base + tw, right) + ranges(right) * CANVAS] = EOS


def grid_to_canvas(grid: np.ndarray, row0: int = 0, col0: int = 0) -> np.ndarray:
    """One grid on its own (30, 30) canvas; convenience for tests and evaluation."""
    out = np.zeros((1, CANVAS, CANVAS), np.uint8)
    h, w = grid.shape
    place_grids(out, np.zeros(1), np.ascontiguousarray(grid, np.uint8).ravel(), np.array([h]), np.array([w]),
                np.array([row0]), np.array([col0]))
    return out[0]


def decode_canvas(tokens: np.ndarray, row0: int = 0, col0: int = 0) -> np.ndarray:
    """The grid a predicted canvas encodes: the largest rectangle of colour cells whose top-left
    corner is (row0, col0), TRM's crop rule. An empty prediction decodes to a (0, 0) grid."""
    t = np.asarray(tokens)[row0:, col0:]
    is_color = (t >= COLOR_OFFSET) & (t < COLOR_OFFSET + 10)
    # run[r] = length of the colour run at the start of row r, capped by the rows above it
    first_bad = np.where(is_color.all(1), is_color.shape[1], np.argmin(is_color, axis=1))
    widths = np.minimum.accumulate(first_bad)
    areas = widths * np.arange(1, len(widths) + 1)
    if len(areas) == 0 or areas.max() == 0:
        return np.zeros((0, 0), np.uint8)
    nr = int(np.argmax(areas)) + 1
    return (t[:nr, : widths[nr - 1]] - COLOR_OFFSET).astype(np.uint8)
