"""ContextEncoder: demonstration pairs -> support tokens and a pooled task vector; and the
injection of that context into the query features (cross-attention or FiLM)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.layers import CrossAttention2d, GridEmbedding, conv_block, sinusoid_2d
from pipeline.params import ModelParams


class ContextEncoder(nn.Module):
    """Each pair (input and output canvases together) is encoded to a feature map, pooled to
    S x S tokens (S = spatial_downsample) with a learned refinement and re-encoded positions."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, self.S = cfg.hidden_dim, cfg.spatial_downsample
        self.embed = GridEmbedding(H)
        self.pair = nn.Sequential(conv_block(2 * H, H, cfg.dropout), conv_block(H, H, cfg.dropout))
        self.pool = nn.AdaptiveAvgPool2d(self.S)
        self.refine = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H))

    def forward(self, demo_in: torch.Tensor, demo_out: torch.Tensor, demo_mask: torch.Tensor):
        """demo_in/out (B, D, h, w) tokens, demo_mask (B, D) ->
        tokens (B, D*S*S, H), token_mask (B, D*S*S), pooled (B, H)."""
        B, D, h, w = demo_in.shape
        x = torch.cat([self.embed(demo_in), self.embed(demo_out)], dim=2).flatten(0, 1)  # (B*D, 2H, h, w)
        f = self.pair(x)  # (B*D, H, h, w)
        t = self.pool(f)  # (B*D, H, S, S)
        t = t + sinusoid_2d(self.S, self.S, t.shape[1], t.device).to(t.dtype)
        t = t.flatten(2).transpose(1, 2)  # (B*D, S*S, H)
        t = t + self.refine(t)
        tokens = t.reshape(B, D * self.S * self.S, -1)
        token_mask = demo_mask.repeat_interleave(self.S * self.S, dim=1)
        m = demo_mask.to(f.dtype)[..., None]  # (B, D, 1)
        per_pair = f.mean(dim=(2, 3)).view(B, D, -1)  # AdaptiveAvgPool2d(1) of every pair
        pooled = (per_pair * m).sum(1) / m.sum(1).clamp_min(1.0)
        return tokens, token_mask, pooled


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
        gamma, beta = self.film(pooled)[..., None, None].chunk(2, dim=1)
        return x * (1 + gamma) + beta
