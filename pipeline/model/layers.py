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
    """Every cell of a (B, C, H, W) map reads a set of tokens (B, T, C); returns the residual update.
    `memory` projects the tokens to keys and values once, so a map that reads the same tokens at
    every step (the solver) does not project them again."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by {heads} attention heads")
        self.heads, self.dropout = heads, dropout
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
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
        k, v, mask = memory
        q = self.q(self.norm_q(x.flatten(2).transpose(1, 2))).view(B, H * W, self.heads, C // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.read(x, self.memory(tokens, valid))


class EmbeddedPairConv(nn.Module):
    """The first layer of the pair encoder: a 3x3 convolution (2H -> H) over the two embedded grids of
    a pair, [embed(input), embed(output)], where embed is a token embedding plus the 2D position code.
    Computed as the same linear function in two cheaper parts: the convolution of the one-hot tokens
    (2 x NUM_TOKENS channels) with the embedding folded into its weights, and the convolution of the
    position code, which is the same for every pair and computed once."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(NUM_TOKENS, dim)
        self.conv = nn.Conv2d(2 * dim, dim, 3, padding=1)

    def forward(self, pair_in: torch.Tensor, pair_out: torch.Tensor) -> torch.Tensor:
        """pair_in/out (N, h, w) tokens -> (N, H, h, w)."""
        H, (h, w) = self.dim, pair_in.shape[-2:]
        weight = self.conv.weight.view(H, 2, H, 3, 3)
        folded = torch.einsum("oschw,tc->osthw", weight, self.tokens.weight).reshape(H, 2 * NUM_TOKENS, 3, 3)
        onehot = torch.cat([F.one_hot(pair_in.long(), NUM_TOKENS), F.one_hot(pair_out.long(), NUM_TOKENS)], -1)
        pos = sinusoid_2d(h, w, H, pair_in.device)
        position = F.conv2d(torch.cat([pos, pos])[None].to(weight.dtype), self.conv.weight, self.conv.bias, padding=1)
        return F.conv2d(onehot.permute(0, 3, 1, 2).to(folded.dtype), folded, padding=1) + position

    def reference(self, pair_in: torch.Tensor, pair_out: torch.Tensor) -> torch.Tensor:
        """The same function computed directly (for tests): the convolution of the concatenated embeddings."""
        def embed(t: torch.Tensor) -> torch.Tensor:
            return self.tokens(t.long()).movedim(-1, -3) + sinusoid_2d(*t.shape[-2:], self.dim, t.device)

        return self.conv(torch.cat([embed(pair_in), embed(pair_out)], 1))


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), ChannelNorm(c_out), nn.GELU())
