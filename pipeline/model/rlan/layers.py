"""Building blocks shared by the RLAN modules: grid embedding, 2D positions, norms, cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def run(fn, *args, recompute: bool = False):
    """fn(*args); with `recompute` (and gradients on) its activations are not kept but recomputed in
    the backward pass (torch.utils.checkpoint; the RNG state is restored: the same dropout and noise)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


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


ATTENTION_CHUNK_BYTES = 128 * 1024**2


class CrossAttention2d(nn.Module):
    """Every cell of a (B, C, H, W) map reads a set of tokens (B, T, C); returns the residual update.
    `memory` projects the tokens to keys and values once, so a map that reads the same tokens at
    every step (the solver) does not project them again. `prenorm=False` leaves out the LayerNorms of
    the queries and the tokens (torch's MultiheadAttention, as the public injector uses it)."""

    def __init__(self, dim: int, heads: int, dropout: float, prenorm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by {heads} attention heads")
        self.heads, self.dropout = heads, dropout
        self.norm_q = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.norm_kv = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def memory(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, T, C / heads) of the tokens, and the attention bias (B, 1, 1, T):
        0 for the valid tokens, -inf for the others."""
        B, T, C = tokens.shape
        k, v = self.kv(self.norm_kv(tokens)).view(B, T, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(valid.shape, dtype=k.dtype, device=k.device).masked_fill(~valid, float("-inf"))
        return k, v, bias[:, None, None, :]

    def read(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, C, H, W = x.shape
        k, v, bias = memory
        q = self.q(self.norm_q(x.flatten(2).transpose(1, 2))).view(B, H * W, self.heads, C // self.heads).transpose(1, 2)
        k, v, bias = k.to(q.dtype), v.to(q.dtype), bias.to(q.dtype)
        rows = self._rows(q, k)
        if rows >= B:
            out = self._attend(q, k, v, bias)
        else:  # each chunk recomputed on its own in the backward pass: its weights are never all kept
            out = torch.cat([run(self._attend, q[i : i + rows], k[i : i + rows], v[i : i + rows], bias[i : i + rows],
                                 recompute=True) for i in range(0, B, rows)])
        return self.out(out.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)

    def _attend(self, q, k, v, bias) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)

    def _rows(self, q: torch.Tensor, k: torch.Tensor) -> int:
        """Samples per attention call. On the CPU, attention with dropout in training takes the math path,
        which keeps the (B, heads, HW, T) weights (and their dropout) for the backward pass: split the
        batch so that one call's weights stay under ATTENTION_CHUNK_BYTES, whatever T (the number of
        context pairs) is. Elsewhere, and for torch.compile, one call."""
        if not (self.training and self.dropout and q.device.type == "cpu" and torch.is_grad_enabled()) \
                or torch.compiler.is_compiling():
            return q.shape[0]
        per_sample = q.shape[1] * q.shape[2] * k.shape[2] * q.element_size()
        return max(1, ATTENTION_CHUNK_BYTES // per_sample)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.read(x, self.memory(tokens, valid))
