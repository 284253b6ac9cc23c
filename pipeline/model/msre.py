"""MSRE (Multi-Scale Relative Encoding): every cell's position relative to each clue centroid.

Per cell and clue: the offset (rows, columns) normalised by the canvas size, the polar radius
and angle (as its sine and cosine), and sine/cosine of the offsets at `msre_num_freq` octaves; projected to
`msre_encoding_dim`, averaged over the clues weighted by how much each clue is used
(1 - stop probability), and mapped to hidden channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.canvas import CANVAS
from pipeline.params import ModelParams


class MSRE(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        self.n_freq = cfg.msre_num_freq
        E = cfg.msre_encoding_dim
        self.proj = nn.Sequential(nn.Linear(5 + 4 * self.n_freq, E), nn.GELU(), nn.Linear(E, E))
        self.out = nn.Conv2d(E, cfg.hidden_dim, 1)

    def forward(self, centroids: torch.Tensor, stop_prob: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """centroids (B, K, 2), stop_prob (B, K) -> (B, hidden, h, w)."""
        dev, dt = centroids.device, centroids.dtype
        r = torch.arange(h, device=dev, dtype=dt)[None, None, :, None]
        c = torch.arange(w, device=dev, dtype=dt)[None, None, None, :]
        dr = (r - centroids[..., 0, None, None]) / CANVAS  # (B, K, h, w)
        dc = (c - centroids[..., 1, None, None]) / CANVAS
        dr, dc = torch.broadcast_tensors(dr, dc)
        radius = torch.sqrt(dr**2 + dc**2 + 1e-8)  # sine and cosine of the angle, smooth at the centroid
        feats = [dr, dc, radius, dr / radius, dc / radius]
        octaves = math.pi * 2.0 ** torch.arange(self.n_freq, device=dev, dtype=dt)
        for x in (dr, dc):
            phase = x[..., None] * octaves  # (B, K, h, w, F)
            feats += [phase.sin(), phase.cos()]
        f = torch.cat([t if t.dim() == 5 else t[..., None] for t in feats], -1)
        e = self.proj(f)  # (B, K, h, w, E)
        weight = (1 - stop_prob)[..., None, None, None]  # clues in use count more
        e = (e * weight).sum(1) / weight.sum(1).clamp_min(1e-6)
        return self.out(e.permute(0, 3, 1, 2))
