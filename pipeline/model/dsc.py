"""DSC (Dynamic Saliency Controller): K clue queries attend over the query's feature map.

One 2D softmax map per clue at temperature tau, with regions already claimed masked
progressively; a stop logit per clue and the centroid of each map. The clue queries are a static
learned bank (stable) or projected from the task context (`task_conditioned_clues`). Gumbel noise
is added to the logits only in training mode and only with `use_gumbel_softmax`; the noise-free
("raw") maps, with their own progressive masking, are returned too: they are what eval mode
computes, for the entropy measured before the noise and the noisy-versus-clean KL term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.params import ModelParams


@dataclass
class Clues:
    attention: torch.Tensor  # (B, K, H, W) the maps used downstream (noisy in training with Gumbel)
    raw_attention: torch.Tensor  # (B, K, H, W) the maps without any noise (what eval mode computes)
    centroids: torch.Tensor  # (B, K, 2) expected (row, col) under each map
    stop_logits: torch.Tensor  # (B, K)

    @property
    def stop_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.stop_logits)


def attention_entropy(maps: torch.Tensor) -> torch.Tensor:
    """(B,) mean entropy (nats) of the K maps of each sample, each a distribution over the cells."""
    p = maps.flatten(2).float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean(-1)


class DSC(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, self.K, self.heads = cfg.hidden_dim, cfg.max_clues, cfg.dsc_num_heads
        if H % self.heads:
            raise ValueError(f"hidden_dim {H} is not divisible by dsc_num_heads {self.heads}")
        self.gumbel = cfg.use_gumbel_softmax
        self.conditioned = cfg.task_conditioned_clues
        if self.conditioned:
            self.query_proj = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, self.K * H))
        else:
            self.query_bank = nn.Parameter(torch.randn(self.K, H) * 0.02)
        self.q = nn.Linear(H, H)
        self.k = nn.Conv2d(H, H, 1)
        self.stop = nn.Sequential(nn.Linear(2 * H, H), nn.GELU(), nn.Linear(H, 1))

    def clue_queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, K, H): projected from the task context, or the static bank for every task."""
        B, H = pooled.shape
        if self.conditioned:
            return self.query_proj(pooled).view(B, self.K, H)
        return self.query_bank.expand(B, -1, -1)

    def forward(self, feats: torch.Tensor, pooled: torch.Tensor, temperature: float) -> Clues:
        B, H, h, w = feats.shape
        dh = H // self.heads
        queries = self.clue_queries(pooled)  # (B, K, H)
        q = self.q(queries).view(B, self.K, self.heads, dh)
        k = self.k(feats).view(B, self.heads, dh, h * w)
        logits = torch.einsum("bkhd,bhdn->bkn", q, k) / (self.heads * math.sqrt(dh))  # head-averaged
        flat = feats.flatten(2)  # (B, H, N)
        rows = torch.arange(h, device=feats.device, dtype=feats.dtype).repeat_interleave(w)
        cols = torch.arange(w, device=feats.device, dtype=feats.dtype).repeat(h)
        noisy_on = self.gumbel and self.training
        available = torch.ones(B, h * w, device=feats.device, dtype=logits.dtype)
        available_raw = available  # the noise-free chain: exactly the maps of eval mode
        maps, raws, cents, stops = [], [], [], []
        for c in range(self.K):  # progressive masking: later clues see what earlier ones left
            raw = torch.softmax((logits[:, c] + available_raw.clamp_min(1e-6).log()) / temperature, dim=-1)
            if noisy_on:
                lc = logits[:, c] + available.clamp_min(1e-6).log()
                u = torch.rand_like(lc).clamp(1e-10, 1 - 1e-10)
                att = torch.softmax((lc - (-u.log()).log()) / temperature, dim=-1)
            else:
                att = raw
            available_raw = available_raw * (1 - raw)
            attended = torch.einsum("bn,bhn->bh", att, flat)
            stops.append(self.stop(torch.cat([attended, queries[:, c]], -1)).squeeze(-1))
            cents.append(torch.stack([(att * rows).sum(-1), (att * cols).sum(-1)], -1))
            maps.append(att)
            raws.append(raw)
            available = available * (1 - att)
        shape = (B, self.K, h, w)
        return Clues(torch.stack(maps, 1).view(shape), torch.stack(raws, 1).view(shape),
                     torch.stack(cents, 1), torch.stack(stops, 1))
