"""Reading the augmentation cache: one sample's grids, or padded batches of tensors for the model.

A training example is a sample's demonstrations plus one query pair. A sample of a training task
has test pairs: the query is one of them and every demonstration is context. A sample of an
evaluation task has demonstrations only: the query is one demonstration, held out, and the others
are context. The choice is drawn from the generator passed in, so batches are reproducible.

`AugmentedCache.batch` returns (all uint8 token canvases, see pipeline.canvas):

| key | shape | meaning |
|---|---|---|
| demo_in, demo_out | (B, D, 30, 30) | context pairs, D = most context pairs in the batch |
| demo_mask | (B, D) bool | which context slots hold a pair |
| query_in, query_out | (B, 30, 30) | the query input and its target output |
| query_offset | (B, 2) int64 | top-left corner of the query grids on the canvas |
| query_hw | (B, 2) int64 | size of the target output |
| query_is_test | (B,) bool | the query is a test pair (else a held-out demonstration) |
| sample | (B,) int64 | sample ids |
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.arc import Pair
from pipeline.cache import CacheReader
from pipeline.canvas import CANVAS, place_grids, segments, transformed_coords


class AugmentedCache(CacheReader):
    """The cache written by `pipeline.cache.build_cache`, served as padded tensor batches (RLAN: a
    sample's context pairs and one query pair) or as single pairs (TRM: `pair_canvases`)."""

    @property
    def pair_sample(self) -> np.ndarray:
        """(P,) the sample of each stored pair (pairs are numbered sample by sample, demonstrations first)."""
        return np.repeat(np.arange(len(self)), self.n_demo + self.n_test)

    def pair_canvases(self, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, outputs), each (N, 30, 30) uint8: stored pairs `pairs` at their recorded offsets."""
        pairs = np.asarray(pairs, np.int64)
        N = len(pairs)
        canv = np.zeros((2 * N, CANVAS, CANVAS), np.uint8)
        hw, off, start = self.hw[pairs], self.offset[pairs], self.cell_start[pairs]
        g_h, g_w = np.stack([hw[:, 0], hw[:, 2]], 1).ravel(), np.stack([hw[:, 1], hw[:, 3]], 1).ravel()
        g_start = np.stack([start, start + hw[:, 0] * hw[:, 1]], 1).ravel()
        g_slot = np.stack([np.arange(N), N + np.arange(N)], 1).ravel()
        place_grids(canv, g_slot, self.read_cells(g_start, g_h * g_w), g_h, g_w, np.repeat(off[:, 0], 2),
                    np.repeat(off[:, 1], 2))
        t = torch.from_numpy(canv)
        return t[:N], t[N:]

    def max_context(self) -> int:
        """The most context pairs a sample can have (the D of a batch is at most this)."""
        return int(np.where(self.n_test > 0, self.n_demo, self.n_demo - 1).max(initial=1))

    def batch(
        self, ids: np.ndarray, rng: np.random.Generator, dihedral: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Padded tensors for samples `ids`. `dihedral` (B,) optionally transforms sample b by
        dihedral id dihedral[b] (the equivariance loss uses it): every grid is transformed, and each
        pair's box (the extent of both its grids) moves as if the whole canvas were transformed."""
        ids = np.asarray(ids, np.int64)
        B = len(ids)
        n_demo, n_test, first = self.n_demo[ids], self.n_test[ids], self.pair_start[ids]
        has_test = n_test > 0
        u = rng.random(B)
        q_local = np.where(has_test, n_demo + np.floor(u * np.maximum(n_test, 1)), np.floor(u * n_demo)).astype(np.int64)

        # context pairs: all demonstrations, minus the held-out one when the query is a demonstration
        seg, k = segments(n_demo)
        keep = has_test[seg] | (k != q_local[seg])
        seg, k = seg[keep], k[keep]
        pos = k - ((k > q_local[seg]) & ~has_test[seg])
        n_ctx = n_demo - (~has_test)
        D = max(int(n_ctx.max()), 1)

        # canvases: [demo_in (B*D) | demo_out (B*D) | query_in (B) | query_out (B)]
        canv = np.zeros((2 * B * D + 2 * B, CANVAS, CANVAS), np.uint8)
        pair = np.concatenate([first[seg] + k, first + q_local])
        slot_in = np.concatenate([seg * D + pos, 2 * B * D + np.arange(B)])
        slot_out = np.concatenate([B * D + seg * D + pos, 2 * B * D + B + np.arange(B)])
        owner = np.concatenate([seg, np.arange(B)])
        hw, off, start = self.hw[pair], self.offset[pair], self.cell_start[pair]
        n_in = hw[:, 0] * hw[:, 1]
        # grids in pair order: input g -> row 2g, output g -> row 2g + 1
        g_h = np.stack([hw[:, 0], hw[:, 2]], 1).ravel()
        g_w = np.stack([hw[:, 1], hw[:, 3]], 1).ravel()
        g_start = np.stack([start, start + n_in], 1).ravel()
        g_slot = np.stack([slot_in, slot_out], 1).ravel()
        r0, c0, g_d = off[:, 0], off[:, 1], None
        if dihedral is not None:
            # the pair's box (both grids) moves as the canvas turns; both grids keep its corner
            d = np.asarray(dihedral, np.int64)[owner]
            r0, c0 = _transformed_offset(r0, c0, hw[:, [0, 2]].max(1), hw[:, [1, 3]].max(1), d)
            g_d = np.repeat(d, 2)
        g_r0, g_c0 = np.repeat(r0, 2), np.repeat(c0, 2)
        cells = self.read_cells(g_start, g_h * g_w)
        place_grids(canv, g_slot, cells, g_h, g_w, g_r0, g_c0, dihedral=g_d)

        demo_mask = np.zeros((B, D), bool)
        demo_mask[seg, pos] = True
        q_off = np.stack([g_r0[-2 * B :: 2], g_c0[-2 * B :: 2]], 1)
        q_hw = hw[-B:, 2:4]
        if dihedral is not None:
            swap = np.isin(np.asarray(dihedral), (1, 3, 6, 7))
            q_hw = np.where(swap[:, None], q_hw[:, ::-1], q_hw)
        return {**_tensors(canv, demo_mask, q_off, q_hw),
                "query_is_test": torch.from_numpy(has_test.copy()), "sample": torch.from_numpy(ids.copy())}


def _tensors(canv: np.ndarray, demo_mask: np.ndarray, q_off: np.ndarray, q_hw: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch's tensors from its canvases, laid out [demo_in (B*D) | demo_out (B*D) | query_in (B) | query_out (B)]."""
    B, D = demo_mask.shape
    t = torch.from_numpy(canv)
    return {
        "demo_in": t[: B * D].view(B, D, CANVAS, CANVAS),
        "demo_out": t[B * D : 2 * B * D].view(B, D, CANVAS, CANVAS),
        "demo_mask": torch.from_numpy(demo_mask),
        "query_in": t[2 * B * D : 2 * B * D + B],
        "query_out": t[2 * B * D + B :],
        "query_offset": torch.from_numpy(np.ascontiguousarray(q_off, np.int64)),
        "query_hw": torch.from_numpy(np.ascontiguousarray(q_hw, np.int64)),
    }


def _transformed_offset(r0, c0, h, w, d):
    """Top-left corner of an (h, w) box at (r0, c0) after transforming the whole canvas by d."""
    n = np.full_like(r0, CANVAS)
    a_i, a_j = transformed_coords(r0, c0, n, n, d)
    b_i, b_j = transformed_coords(r0 + h - 1, c0 + w - 1, n, n, d)
    return np.minimum(a_i, b_i), np.minimum(a_j, b_j)



def batch_from_pairs(examples: list[tuple[list[Pair], np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
    """Padded tensors, in `AugmentedCache.batch`'s format, for examples given as grids:
    (context pairs, query input, query output or None). Every grid sits at the canvas origin.
    Evaluation builds its views with this, after transforming the grids."""
    B = len(examples)
    D = max(max(len(ctx) for ctx, _, _ in examples), 1)
    canv = np.zeros((2 * B * D + 2 * B, CANVAS, CANVAS), np.uint8)
    grids, slots = [], []
    demo_mask = np.zeros((B, D), bool)
    q_hw = np.zeros((B, 2), np.int64)
    for b, (ctx, q_in, q_out) in enumerate(examples):
        for j, (gi, go) in enumerate(ctx):
            grids += [gi, go]
            slots += [b * D + j, B * D + b * D + j]
            demo_mask[b, j] = True
        grids.append(q_in)
        slots.append(2 * B * D + b)
        if q_out is not None:
            grids.append(q_out)
            slots.append(2 * B * D + B + b)
            q_hw[b] = q_out.shape
    h = np.array([g.shape[0] for g in grids])
    w = np.array([g.shape[1] for g in grids])
    zeros = np.zeros(len(grids), np.int64)
    cells = np.concatenate([np.ascontiguousarray(g, np.uint8).ravel() for g in grids])
    place_grids(canv, np.array(slots), cells, h, w, zeros, zeros)
    return _tensors(canv, demo_mask, np.zeros((B, 2), np.int64), q_hw)


def crop_canvas(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The batch on a smaller canvas (the model works at any canvas size): for small grids at the
    origin, where nothing lies beyond `size`. Used for fast CPU runs on small tasks."""
    out = dict(batch)
    for k in ("demo_in", "demo_out", "query_in", "query_out"):
        if (batch[k][..., size:, :] != 0).any() or (batch[k][..., :, size:] != 0).any():
            raise ValueError(f"{k}: grids extend beyond a {size}x{size} canvas")
        out[k] = batch[k][..., :size, :size]
    return out
