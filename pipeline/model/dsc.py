"""DSC (Dynamic Saliency Controller): K clue queries attend over the query's feature map.

As in the public RLAN module: per clue, the scores are q_k . key(cell) / sqrt(d) (averaged over
`dsc_num_heads` heads) plus the log of the cumulative mask, clamped to +-50, and a softmax over the
cells at temperature tau. The cumulative mask starts as the query grid's cells (the PAD canvas
around the grid gets a mask of 1e-6, so clues attend to the grid) and after each clue is multiplied
by `1 - 0.9 * attention.detach()` (clamped at 1e-6): later clues prefer what earlier ones left.
Each clue has a stop logit from an MLP over [attended features, attention entropy / log(h*w)], whose
last bias starts at -1 and whose entropy weights start around +1.5. The clue queries are a static
learned bank (stable) or projected from the task context (`task_conditioned_clues`).

Gumbel noise is added to the scores only in training mode and only with `use_gumbel_softmax`,
always drawn and added in float32 (also under bf16 autocast). The noise-free ("raw") maps of the same
forward pass, with their own progressive masking, are returned too: the entropy measured before the
noise and the noisy-versus-clean KL term read them. They share the forward pass's features, so in
training they are not the maps eval mode would give (dropout upstream still acts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.params import ModelParams

MASK_FLOOR = 1e-6
SCORE_CLAMP = 50.0


@dataclass
class Clues:
    attention: torch.Tensor  # (B, K, H, W) the maps used downstream (noisy in training with Gumbel)
    raw_attention: torch.Tensor  # (B, K, H, W) the maps of the same scores without any noise
    centroids: torch.Tensor  # (B, K, 2) expected (row, col) under each map
    stop_logits: torch.Tensor  # (B, K)

    @property
    def stop_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.stop_logits)

    def rows(self, sl: slice) -> Clues:
        return Clues(self.attention[sl], self.raw_attention[sl], self.centroids[sl], self.stop_logits[sl])


def attention_entropy(maps: torch.Tensor) -> torch.Tensor:
    """(B,) mean entropy (nats) of the K maps of each sample, each a distribution over the cells."""
    return _entropy(maps.flatten(2)).mean(-1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1)


def gumbel_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard Gumbel samples in float32: -log(-log(u)), u uniform in (0, 1). torch.rand never
    returns 1 and u is floored at the smallest normal float, so every sample is finite."""
    u = torch.rand(shape, device=device, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


class DSC(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, self.K, self.heads = cfg.hidden_dim, cfg.max_clues, cfg.dsc_num_heads
        if H % self.heads:  # validate_params checks this first (rule model-dsc-heads)
            raise ValueError(f"model.hidden_dim {H} is not divisible by model.dsc_num_heads {self.heads}")
        self.gumbel = cfg.use_gumbel_softmax
        self.conditioned = cfg.task_conditioned_clues
        if self.conditioned:
            self.query_proj = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, self.K * H))
        else:
            self.query_bank = nn.Parameter(torch.randn(self.K, H) * 0.02)
        self.q = nn.Linear(H, H)
        self.k = nn.Conv2d(H, H, 1)
        self.stop = nn.Sequential(nn.Linear(H + 1, H), nn.GELU(), nn.Linear(H, 1))
        with torch.no_grad():  # the public initialisation: clues start likely to be used
            nn.init.normal_(self.stop[0].weight[:, H], mean=1.5, std=0.1)
            self.stop[2].bias.fill_(-1.0)

    def clue_queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, K, H): projected from the task context, or the static bank for every task."""
        B, H = pooled.shape
        if self.conditioned:
            return self.query_proj(pooled).view(B, self.K, H)
        return self.query_bank.expand(B, -1, -1)

    def forward(self, feats: torch.Tensor, pooled: torch.Tensor, temperature: float, valid: torch.Tensor) -> Clues:
        """feats (B, H, h, w), pooled (B, H), valid (B, h*w) bool: the query grid's cells."""
        B, H, h, w = feats.shape
        dh = H // self.heads
        q = self.q(self.clue_queries(pooled)).view(B, self.K, self.heads, dh)
        k = self.k(feats).view(B, self.heads, dh, h * w)
        scores = torch.einsum("bkhd,bhdn->bkn", q, k).float() / (self.heads * math.sqrt(dh))  # head-averaged
        noise = gumbel_noise(scores.shape, scores.device) if self.gumbel and self.training else None
        flat = feats.flatten(2)  # (B, H, N)
        rows = torch.arange(h, device=feats.device, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, device=feats.device, dtype=torch.float32).repeat(h)
        mask = valid.float().clamp_min(MASK_FLOOR)  # (B, N) cumulative mask of the maps used
        mask_raw = mask  # and of the noise-free chain
        max_entropy = math.log(h * w)
        maps, raws, cents, stops = [], [], [], []
        for c in range(self.K):  # progressive masking: later clues see what earlier ones left
            raw = torch.softmax((scores[:, c] + mask_raw.log()).clamp(-SCORE_CLAMP, SCORE_CLAMP) / temperature, -1)
            if noise is None:
                att = raw
            else:
                s = (scores[:, c] + mask.log()).clamp(-SCORE_CLAMP, SCORE_CLAMP)
                att = torch.softmax((s + noise[:, c]) / temperature, -1)
            attended = torch.einsum("bn,bhn->bh", att.to(flat.dtype), flat)
            ent = (_entropy(att) / max_entropy)[:, None]
            stops.append(self.stop(torch.cat([attended, ent.to(attended.dtype)], -1)).squeeze(-1).float())
            cents.append(torch.stack([(att * rows).sum(-1), (att * cols).sum(-1)], -1))
            maps.append(att)
            raws.append(raw)
            mask = (mask * (1 - 0.9 * att.detach())).clamp_min(MASK_FLOOR)
            mask_raw = mask if noise is None else (mask_raw * (1 - 0.9 * raw.detach())).clamp_min(MASK_FLOOR)
        shape = (B, self.K, h, w)
        return Clues(torch.stack(maps, 1).view(shape), torch.stack(raws, 1).view(shape),
                     torch.stack(cents, 1), torch.stack(stops, 1))
