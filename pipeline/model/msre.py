"""MSRE (Multi-Scale Relative Encoding): every cell's position relative to each clue centroid.

Per cell and clue, from the offset (dr, dc) in cells between the cell and the centroid:
- the offset normalised by the canvas size and by the query grid's own size (a cell at the grid's
  far edge is at 1 whatever the grid's size), the polar radius (canvas units) and the angle (its
  sine and cosine);
- sine and cosine of the offset at `msre_num_freq` scales: periods spaced geometrically from twice
  the canvas (60 cells: unambiguous over every offset) down to 2 cells, the finest pattern the cell
  grid resolves, so no scale aliases at cell resolution.
Projected to `msre_encoding_dim`, averaged over the clues weighted by how much each clue is used
(1 - stop probability), and mapped to hidden channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.canvas import CANVAS
from pipeline.params import ModelParams

LONGEST_PERIOD, SHORTEST_PERIOD = 2.0 * CANVAS, 2.0  # in cells


def periods(n: int) -> torch.Tensor:
    """(n,) periods in cells, from LONGEST_PERIOD down to SHORTEST_PERIOD (geometric)."""
    if n == 1:
        return torch.tensor([LONGEST_PERIOD])
    return LONGEST_PERIOD * (SHORTEST_PERIOD / LONGEST_PERIOD) ** (torch.arange(n) / (n - 1))


def relative_features(centroids: torch.Tensor, h: int, w: int, grid_hw: torch.Tensor,
                      cell_periods: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w, 7 + 4F) float32 features of every cell relative to every centroid (B, K, 2):
    offset / canvas (2), offset / grid size (2), radius / canvas, sine and cosine of the angle, then
    sine and cosine of the row and column offsets at each period (2F each)."""
    dev = centroids.device
    c = centroids.float()
    dr = torch.arange(h, device=dev, dtype=torch.float32)[None, None, :, None] - c[..., 0, None, None]
    dc = torch.arange(w, device=dev, dtype=torch.float32)[None, None, None, :] - c[..., 1, None, None]
    dr, dc = torch.broadcast_tensors(dr, dc)  # (B, K, h, w) offsets in cells
    size = grid_hw.float().clamp_min(1.0)[:, None, None, None, :]  # (B, 1, 1, 1, 2)
    radius = torch.sqrt(dr**2 + dc**2 + 1e-4)  # smooth at the centroid
    offsets = torch.stack([dr, dc], -1)  # (B, K, h, w, 2)
    phase = (offsets[..., None] * (2 * math.pi / cell_periods.to(dev))).flatten(-2)  # (B, K, h, w, 2F)
    return torch.cat([offsets / CANVAS, offsets / size, (radius / CANVAS)[..., None],
                      torch.stack([dr / radius, dc / radius], -1), phase.sin(), phase.cos()], -1)


class MSRE(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        E = cfg.msre_encoding_dim
        self.register_buffer("periods", periods(cfg.msre_num_freq), persistent=False)
        self.proj = nn.Sequential(nn.Linear(7 + 4 * cfg.msre_num_freq, E), nn.GELU(), nn.Linear(E, E))
        self.out = nn.Conv2d(E, cfg.hidden_dim, 1)

    def forward(self, centroids: torch.Tensor, stop_prob: torch.Tensor, h: int, w: int,
                grid_hw: torch.Tensor) -> torch.Tensor:
        """centroids (B, K, 2), stop_prob (B, K), grid_hw (B, 2) the query grid's size -> (B, hidden, h, w)."""
        e = self.proj(relative_features(centroids, h, w, grid_hw, self.periods))  # (B, K, h, w, E)
        weight = (1 - stop_prob)[..., None, None, None].to(e.dtype)  # clues in use count more
        e = (e * weight).sum(1) / weight.sum(1).clamp_min(1e-6)
        return self.out(e.permute(0, 3, 1, 2))
