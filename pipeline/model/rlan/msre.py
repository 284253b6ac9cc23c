"""MSRE (Multi-Scale Relative Encoding): the query's features seen from each clue's centroid, and
their aggregation over the clues.

As the public RLAN modules. Per cell and clue, six coordinates of the offset (dr, dc) in cells from
the centroid: the offset / 30 (the canvas), the offset / max(h, w) of the query grid, the log
radius log(1 + |offset|) / log(1 + grid diagonal), and the angle atan2(dc, dr) mapped to [0, 1].
Each coordinate also enters as sin and cos at `msre_num_freq` frequencies 2^i * pi. An MLP encodes
them to `msre_encoding_dim` (layer-normalised), and each clue's features are the cell features fused
with that encoding (linear, GELU, layer norm): (B, K, hidden, h, w).

The clue features are aggregated as the public solver does: weighted per cell by the clue's attention
map and per clue by how much it is used (1 - stop probability), divided by the expected number of
clues in use, detached (the output keeps its size whatever the clue count, and the gradient still
reaches the stop head through the weights), then a 1x1 convolution, GELU and GroupNorm(8).
The clues are visited one at a time, so the (B, K, hidden, h, w) features are never all held at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.canvas import CANVAS
from pipeline.params import ModelParams

N_COORDS = 6


def frequencies(n: int) -> torch.Tensor:
    """(n,) angular frequencies 2^i * pi, i = 0 .. n - 1."""
    return math.pi * 2.0 ** torch.arange(n, dtype=torch.float32)


def relative_coords(centroids: torch.Tensor, h: int, w: int, grid_hw: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w, 6) float32: for every cell and centroid (B, K, 2), the offset / canvas (2), the
    offset / max grid side (2), the normalised log radius and the angle in [0, 1]."""
    dev = centroids.device
    c = centroids.float()
    dr = torch.arange(h, device=dev, dtype=torch.float32)[None, None, :, None] - c[..., 0, None, None]
    dc = torch.arange(w, device=dev, dtype=torch.float32)[None, None, None, :] - c[..., 1, None, None]
    dr, dc = torch.broadcast_tensors(dr, dc)  # (B, K, h, w) offsets in cells
    size = grid_hw.float()[:, None, None, None, :]  # (B, 1, 1, 1, 2)
    side = size.amax(-1)  # max(h, w) of the query grid
    diagonal = size.pow(2).sum(-1).sqrt()
    log_radius = torch.log(torch.sqrt(dr**2 + dc**2 + 1e-6) + 1) / (torch.log(diagonal + 1) + 1e-6)
    angle = (torch.atan2(dc, dr) + math.pi) / (2 * math.pi)
    return torch.stack([dr / CANVAS, dc / CANVAS, dr / (side + 1e-6), dc / (side + 1e-6), log_radius, angle], -1)


def fourier(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C + 2 C F): the coordinates and their sine and cosine at each frequency."""
    phase = (coords[..., None] * freqs).flatten(-2)
    return torch.cat([coords, phase.sin(), phase.cos()], -1)


class MSRE(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, E, n = cfg.hidden_dim, cfg.msre_encoding_dim, cfg.msre_num_freq
        self.register_buffer("freqs", frequencies(n), persistent=False)
        self.encode = nn.Sequential(nn.Linear(N_COORDS * (1 + 2 * n), H), nn.GELU(), nn.Linear(H, E), nn.LayerNorm(E))
        self.fusion = nn.Sequential(nn.Linear(H + E, H), nn.GELU(), nn.LayerNorm(H))
        self.aggregate = nn.Sequential(nn.Conv2d(H, H, 1), nn.GELU(), nn.GroupNorm(8, H))

    def clue_features(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """feats (B, h, w, H) channels-last, coords (B, h, w, 6) of one clue -> (B, h, w, H)."""
        enc = self.encode(fourier(coords, self.freqs).to(feats.dtype))
        return self.fusion(torch.cat([feats, enc], -1))

    def forward(self, feats: torch.Tensor, centroids: torch.Tensor, attention: torch.Tensor, stop_prob: torch.Tensor,
                grid_hw: torch.Tensor) -> torch.Tensor:
        """feats (B, H, h, w), centroids (B, K, 2), attention (B, K, h, w), stop_prob (B, K), grid_hw
        (B, 2) the query grid's size -> the aggregated clue features (B, H, h, w)."""
        B, H, h, w = feats.shape
        coords = relative_coords(centroids, h, w, grid_hw)
        cells = feats.permute(0, 2, 3, 1)
        usage = 1 - stop_prob.float()  # (B, K)
        weights = attention.float() * usage[:, :, None, None]  # (B, K, h, w)
        total = None
        for k in range(centroids.shape[1]):
            part = self.clue_features(cells, coords[:, k]) * weights[:, k, :, :, None].to(cells.dtype)
            total = part if total is None else total + part
        expected = usage.sum(1).detach()[:, None, None, None]  # clues in use, no gradient through the divisor
        agg = (total.float() / (expected + 1e-6)).to(feats.dtype).permute(0, 3, 1, 2)
        return self.aggregate(agg)

