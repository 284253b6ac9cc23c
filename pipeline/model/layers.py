"""Building blocks shared by the RLAN modules: grid embedding, 2D positions, norms, cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.canvas import NUM_TOKENS


def sinusoid_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(dim, h, w) sine/cosine position code: half the channels for the row, half for the column."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10_000.0) * torch.arange(quarter, device=device) / max(quarter, 1))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # (h, q)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # (w, q)
    r = torch.cat([rows.sin(), rows.cos()], 1).T[:, :, None].expand(-1, h, w)
    c = torch.cat([cols.sin(), cols.cos()], 1).T[:, None, :].expand(-1, h, w)
    pe = torch.cat([r, c], 0)
    return F.pad(pe, (0, 0, 0, 0, 0, dim - pe.shape[0]))  # dims not divisible by 4: zero channels


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of every cell of a (B, C, H, W) map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GridEmbedding(nn.Module):
    """Token canvas (..., H, W) -> features (..., dim, H, W): token embedding plus 2D position."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(NUM_TOKENS, dim)

    def forward(self, canvas: torch.Tensor) -> torch.Tensor:
        h, w = canvas.shape[-2:]
        x = self.tokens(canvas.long()).movedim(-1, -3)  # (..., dim, H, W)
        return x + sinusoid_2d(h, w, self.dim, canvas.device).to(x.dtype)


class CrossAttention2d(nn.Module):
    """Every cell of a (B, C, H, W) map reads a set of tokens (B, T, C); returns the residual update."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by {heads} attention heads")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.norm_q(x.flatten(2).transpose(1, 2))  # (B, HW, C)
        kv = self.norm_kv(tokens)
        out, _ = self.attn(q, kv, kv, key_padding_mask=~valid, need_weights=False)
        return out.transpose(1, 2).reshape(B, C, H, W)


def conv_block(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), ChannelNorm(c_out), nn.GELU(), nn.Dropout(dropout))
