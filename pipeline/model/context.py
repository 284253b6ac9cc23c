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
from torch import nn

from pipeline.model.layers import ChannelNorm, CrossAttention2d, EmbeddedPairConv, conv_block, sinusoid_2d
from pipeline.params import ModelParams


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
    """The encoded context of B samples: S*S tokens per context slot and the pooled task vector."""

    tokens: torch.Tensor  # (B, D*S*S, H), zeros in empty slots
    token_mask: torch.Tensor  # (B, D*S*S) bool, tokens of real pairs
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
    return (weights @ pair_pooled.float()) / weights.sum(1, keepdim=True).clamp_min(1.0)


class ContextEncoder(nn.Module):
    """Each pair (input and output canvases together) is encoded to a feature map, pooled to
    S x S tokens (S = spatial_downsample) with a learned refinement and re-encoded positions.
    No dropout, as in the public SpatialPairEncoder: a pair's encoding is a function of the pair."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, self.S = cfg.hidden_dim, cfg.spatial_downsample
        self.first = EmbeddedPairConv(H)  # conv over [embed(input), embed(output)]
        self.pair = nn.Sequential(ChannelNorm(H), nn.GELU(), conv_block(H, H))
        self.pool = nn.AdaptiveAvgPool2d(self.S)
        self.refine = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H))

    def encode_pairs(self, pair_in: torch.Tensor, pair_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pair_in/out (N, h, w) tokens -> tokens (N, S*S, H), pooled (N, H) float32."""
        f = self.pair(self.first(pair_in, pair_out))  # (N, H, h, w)
        t = self.pool(f)  # (N, H, S, S)
        t = t + sinusoid_2d(self.S, self.S, t.shape[1], t.device).to(t.dtype)
        t = t.flatten(2).transpose(1, 2)  # (N, S*S, H)
        return t + self.refine(t), f.float().mean(dim=(2, 3))  # AdaptiveAvgPool2d(1) of every pair

    def layout(self, tokens: torch.Tensor, pooled: torch.Tensor, where: PairLayout) -> Support:
        """Packed pair encodings -> the Support of each sample (slots in `where`)."""
        B, D, S2 = where.n_samples, where.n_slots, self.S * self.S
        row = where.sample * D + where.slot
        slots = tokens.new_zeros(B * D, S2, tokens.shape[-1]).index_copy(0, row, tokens)
        filled = torch.zeros(B * D, dtype=torch.bool, device=tokens.device).index_fill(0, row, True)
        total = pooled.new_zeros(B, pooled.shape[-1]).index_add(0, where.sample, pooled)
        count = pooled.new_zeros(B).index_add(0, where.sample, torch.ones_like(where.sample, dtype=pooled.dtype))
        return Support(slots.view(B, D * S2, -1), filled.view(B, D).repeat_interleave(S2, dim=1),
                       total / count.clamp_min(1.0)[:, None], S2)


class ContextInjector(nn.Module):
    """Query features read the task: cross-attention to the support tokens, or FiLM from the
    pooled vector (`use_cross_attention_context: false`)."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        H = cfg.hidden_dim
        self.cross = cfg.use_cross_attention_context
        if self.cross:
            self.attn = CrossAttention2d(H, cfg.solver_context_heads, cfg.dropout)
        else:
            self.film = nn.Linear(H, 2 * H)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x, tokens, token_mask, pooled):
        if self.cross:
            return x + self.attn(x, tokens, token_mask)
        gamma, beta = self.film(pooled.to(x.dtype))[..., None, None].chunk(2, dim=1)
        return x * (1 + gamma) + beta
