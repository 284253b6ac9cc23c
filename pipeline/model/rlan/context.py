"""ContextEncoder: demonstration pairs -> support tokens and a pooled task vector; `Support`, the
encoded context of a batch; and the injection of that context into the query features
(cross-attention or FiLM).

Pairs are encoded one by one, packed (only real pairs, no padding slots), then laid out per sample.
A pair's encoding does not depend on the other pairs, so one encoding of every pair serves the main
pass, each leave-one-out example (the held-out pair masked out and the pooled vector re-pooled) and,
as the target, the equivariance comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.canvas import CANVAS, NUM_TOKENS
from pipeline.model.rlan.layers import CrossAttention2d, run
from pipeline.params import ModelParams
from pipeline.runtime import without_autocast

PAIR_CHUNK = 256  # pairs encoded in one call (bounds the encoder's working memory)


@dataclass(frozen=True)
class PairLayout:
    """Where each of N packed pairs belongs: sample (N,) in 0..B-1 and context slot (N,) in 0..D-1."""

    sample: torch.Tensor
    slot: torch.Tensor
    n_samples: int
    n_slots: int

    @staticmethod
    def from_mask(mask: torch.Tensor) -> PairLayout:
        """From a (B, D) mask of the context slots that hold a pair (row-major order of the pairs)."""
        sample, slot = torch.nonzero(mask, as_tuple=True)
        return PairLayout(sample, slot, mask.shape[0], mask.shape[1])


@dataclass
class Support:
    """The encoded context of B samples: T tokens per context slot (S*S pooled, or every canvas cell
    at spatial_downsample 1) and the pooled task vector."""

    tokens: torch.Tensor  # (B, D*T, H), zeros in empty slots
    token_mask: torch.Tensor  # (B, D*T) bool, tokens of real pairs
    pooled: torch.Tensor  # (B, H) float32, mean over the sample's pairs of AdaptiveAvgPool2d(1) of each
    tokens_per_pair: int

    def select(self, rows: torch.Tensor) -> Support:
        return Support(self.tokens[rows], self.token_mask[rows], self.pooled[rows], self.tokens_per_pair)

    def without(self, slot: torch.Tensor, pooled: torch.Tensor) -> Support:
        """The same rows with the pair in `slot` (L,) taken out: its tokens masked (attention gives
        them exactly zero weight) and `pooled` (L, H), the mean of the other pairs, as the task vector.
        Leave-one-out contexts, without encoding anything again."""
        pos = torch.arange(self.token_mask.shape[1], device=slot.device) // self.tokens_per_pair
        return Support(self.tokens, self.token_mask & (pos[None, :] != slot[:, None]), pooled, self.tokens_per_pair)

    def detached(self) -> Support:
        """The same context with no gradient into the encoder."""
        return Support(self.tokens.detach(), self.token_mask, self.pooled.detach(), self.tokens_per_pair)

    @staticmethod
    def cat(parts: list[Support]) -> Support:
        return Support(torch.cat([p.tokens for p in parts]), torch.cat([p.token_mask for p in parts]),
                       torch.cat([p.pooled for p in parts]), parts[0].tokens_per_pair)


def pooled_without(pair_pooled: torch.Tensor, pair_sample: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """(L, H) for each held-out pair, the mean pooled vector of the other pairs of its sample: a sum
    over those pairs only, so the held-out pair's values cannot reach it, not even through rounding."""
    others = pair_sample[None, :] == pair_sample[held][:, None]  # (L, N)
    others[torch.arange(len(held), device=held.device), held] = False
    weights = others.float()
    with without_autocast(held.device.type):  # float32 like the main rows' pooled vectors, also under autocast
        return (weights @ pair_pooled.float()) / weights.sum(1, keepdim=True).clamp_min(1.0)


def conv_norm(c_in: int, c_out: int, kernel: int = 3) -> list[nn.Module]:
    """A convolution, GroupNorm(8) and GELU (the public encoder's unit)."""
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(8, c_out), nn.GELU()]


class PairEmbedding(nn.Module):
    """A token canvas (N, h, w) -> (N, H, h, w): the colour embedding (H / 2) and a learned position
    (H / 2) concatenated, then a linear layer and LayerNorm. The result depends on (token, row, col)
    only, so it is computed once per call as a table of NUM_TOKENS x h x w vectors and gathered: the
    same function as embedding every cell, without a matrix product per cell of every pair."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(NUM_TOKENS, dim // 2)
        self.position = nn.Parameter(torch.randn(CANVAS, CANVAS, dim - dim // 2) * 0.02)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def table(self, h: int, w: int) -> torch.Tensor:
        """(NUM_TOKENS * h * w, H): the embedding of token t at (row, col), row-major."""
        half = self.dim // 2
        colour = self.tokens.weight @ self.proj.weight[:, :half].T  # (T, H)
        where = self.position[:h, :w] @ self.proj.weight[:, half:].T + self.proj.bias  # (h, w, H)
        return self.norm(colour[:, None, None, :] + where[None]).reshape(-1, self.dim)

    def forward(self, canvas: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        h, w = canvas.shape[-2:]
        table = self.table(h, w) if table is None else table
        cell = torch.arange(h * w, device=canvas.device).view(h, w)
        return F.embedding(canvas.long() * (h * w) + cell, table).permute(0, 3, 1, 2)

    def reference(self, canvas: torch.Tensor) -> torch.Tensor:
        """The same function computed cell by cell (for tests)."""
        h, w = canvas.shape[-2:]
        x = torch.cat([self.tokens(canvas.long()), self.position[:h, :w].expand(*canvas.shape, -1)], -1)
        return self.norm(self.proj(x)).permute(0, 3, 1, 2)


class ContextEncoder(nn.Module):
    """The public SpatialPairEncoder and its downsampler. Input and output grids are embedded alike,
    encoded by two towers of their own (two 3x3 convolutions each, GroupNorm, GELU), and the pair by
    a 1x1 then a 3x3 convolution over [input, output, output - input]; with S = spatial_downsample > 1
    the map is pooled to S x S, refined by a 3x3 convolution and given a learned position code: the
    pair's S*S support tokens. With S = 1 it is not pooled (the public encoder's "no downsampling"):
    every cell of the canvas is a token, h*w per pair, and the cell keeps its own colours. The
    pooled task vector is the mean of a pair's tokens (HyperLoRA's AdaptiveAvgPool2d(1)). No dropout:
    a pair's encoding is a function of the pair.

    `pair_encoder: cells` (the default) adds to the map, before any pooling, a 1x1 convolution of
    each cell's own input and output embeddings: the public map mixes a 7x7 neighbourhood through
    three 3x3 convolutions with no skip, so no token says which colour became which at its own cell,
    and tasks told apart only by that pairing were not learned (docs/model.md#in-context-learning).
    `public` is the public encoder."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, self.S = cfg.hidden_dim, cfg.spatial_downsample
        self.embed = PairEmbedding(H)
        self.input_tower = nn.Sequential(*conv_norm(H, H), *conv_norm(H, H))
        self.output_tower = nn.Sequential(*conv_norm(H, H), *conv_norm(H, H))
        self.difference = nn.Sequential(*conv_norm(3 * H, H, kernel=1), *conv_norm(H, H))
        self.cell = nn.Conv2d(2 * H, H, 1) if cfg.pair_encoder == "cells" else None
        if self.S > 1:
            self.downsample = nn.Sequential(nn.AdaptiveAvgPool2d(self.S), *conv_norm(H, H))
            self.token_position = nn.Parameter(torch.randn(H, self.S, self.S) * 0.02)
        else:  # full resolution: the cells are the tokens, their positions already embedded
            self.downsample, self.token_position = nn.Identity(), None
        self.recompute = False  # train.activation_checkpointing

    def encode_pairs(self, pair_in: torch.Tensor, pair_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pair_in/out (N, h, w) tokens -> tokens (N, T, H) (T = S*S, or h*w unpooled), pooled (N, H) float32. In chunks of at
        most PAIR_CHUNK pairs, each recomputed on its own with activation checkpointing (and without
        gradient), so that the memory of an encoding does not grow with the number of pairs a batch
        draws (not under torch.compile, which sees one call of symbolic size)."""
        n = len(pair_in)
        if n <= PAIR_CHUNK or torch.compiler.is_compiling():
            return run(self._encode, pair_in, pair_out, recompute=self.recompute)
        parts = [run(self._encode, pair_in[i : i + PAIR_CHUNK], pair_out[i : i + PAIR_CHUNK], recompute=self.recompute)
                 for i in range(0, n, PAIR_CHUNK)]
        return torch.cat([t for t, _ in parts]), torch.cat([p for _, p in parts])

    def _encode(self, pair_in: torch.Tensor, pair_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.embed.table(*pair_in.shape[-2:])
        e_in, e_out = self.embed(pair_in, table), self.embed(pair_out, table)
        a, b = self.input_tower(e_in), self.output_tower(e_out)
        f = self.difference(torch.cat([a, b, b - a], 1))  # (N, H, h, w)
        if self.cell is not None:  # each cell's own colour pair
            f = f + self.cell(torch.cat([e_in, e_out], 1))
        t = self.downsample(f)  # (N, H, S, S), or (N, H, h, w) at full resolution
        if self.token_position is not None:
            t = t + self.token_position.to(f.dtype)
        return t.flatten(2).transpose(1, 2), t.float().mean(dim=(2, 3))  # tokens (N, T, H), pooled (N, H)

    def layout(self, tokens: torch.Tensor, pooled: torch.Tensor, where: PairLayout) -> Support:
        """Packed pair encodings -> the Support of each sample (slots in `where`)."""
        B, D, S2 = where.n_samples, where.n_slots, tokens.shape[1]  # S2 tokens per pair
        row = where.sample * D + where.slot
        slots = tokens.new_zeros(B * D, S2, tokens.shape[-1]).index_copy(0, row, tokens)
        filled = torch.zeros(B * D, dtype=torch.bool, device=tokens.device).index_fill(0, row, True)
        total = pooled.new_zeros(B, pooled.shape[-1]).index_add(0, where.sample, pooled)
        count = pooled.new_zeros(B).index_add(0, where.sample, torch.ones_like(where.sample, dtype=pooled.dtype))
        return Support(slots.view(B, D * S2, -1), filled.view(B, D).repeat_interleave(S2, dim=1),
                       total / count.clamp_min(1.0)[:, None], S2)


class ContextInjector(nn.Module):
    """Query features read the task: cross-attention to the support tokens, or FiLM from the
    pooled vector (`use_cross_attention_context: false`).

    The cross-attention has two forms (`context_injector`). `ffn`, the public injector: attention
    without pre-norms, x = LN(x + dropout(attn(x))), then x = LN(x + dropout(FFN(x))) with a 4x
    feed-forward layer (Linear, GELU, dropout, Linear), per cell. `attention`: the pre-norm attention's
    residual update alone, x + attn(x)."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        H = cfg.hidden_dim
        self.cross = cfg.use_cross_attention_context
        self.ffn = None
        if self.cross:
            public = cfg.context_injector == "ffn"
            self.attn = CrossAttention2d(H, cfg.solver_context_heads, cfg.dropout, prenorm=not public)
            if public:
                self.dropout = cfg.dropout
                self.norm1, self.norm2 = nn.LayerNorm(H), nn.LayerNorm(H)
                self.ffn = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(4 * H, H))
        else:
            self.film = nn.Linear(H, 2 * H)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x, tokens, token_mask, pooled):
        if not self.cross:
            gamma, beta = self.film(pooled.to(x.dtype))[..., None, None].chunk(2, dim=1)
            return x * (1 + gamma) + beta
        read = self.attn(x, tokens, token_mask)
        if self.ffn is None:
            return x + read
        drop = self.training and self.dropout > 0
        y = self.norm1((x + F.dropout(read, self.dropout, drop)).permute(0, 2, 3, 1))  # (B, h, w, H)
        y = self.norm2(y + F.dropout(self.ffn(y), self.dropout, drop))
        return y.permute(0, 3, 1, 2)
