"""DSC (Dynamic Saliency Controller): K clue queries attend, one after another, over the query's cells.

The public RLAN module, step by step. The cell features are layer-normalised and projected to keys
and values. Clue k's query is its learned query (a static bank, or projected from the task context
with `task_conditioned_clues`) plus a recurrent state, layer-normalised and projected; the state is
a GRU cell fed with the previous clue's attended values, so each clue knows what the others found.
Its scores over the cells are

    s = clamp(q . key / sqrt(hidden_dim) + log(mask), -50, 50)
    attention = max(softmax(clamp((s + g) / tau, -50, 50)), 1e-8)
with Gumbel noise g only in training and only with `use_gumbel_softmax` (drawn and added in float32,
also under bf16 autocast), and g = 0 otherwise; each row's logits are also kept within 40 of its
largest (the same maps, without subnormal numbers: `clue_map`). One score per clue: `dsc_num_heads`
does not change the DSC, as in the public module. The cumulative mask starts as the query grid's cells (the PAD
canvas around it gets 1e-6) and after each clue is multiplied by `1 - 0.9 * attention.detach()`
(floored at 1e-6): later clues prefer what earlier ones left. A clue's centroid is the
attention-weighted mean (row, col). Its stop logit is `4 tanh(x / 4)` of an MLP over [attended
values, attention entropy / log(h*w)] (p floored at 1e-6 in the entropy; hidden width hidden_dim / 2, GELU, dropout; the entropy
input's weights start around +1.5 with spread 0.5, the last bias at -1: clues start likely to be used).

Each clue also returns its noise-free ("raw") map: the softmax of the same scores without the noise.
The entropy measured before the noise (`entropy_on_raw_logits`) and the noisy-versus-clean KL term
read it; without noise it is the map itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.params import ModelParams

MASK_FLOOR = 1e-6
SCORE_CLAMP = 50.0
ATTENTION_FLOOR = 1e-8
SOFTMAX_WINDOW = 40.0  # exp(-40) = 4e-18: below the floor, far above the subnormals (< 1.2e-38)
STOP_BOUND = 4.0
STOP_ENTROPY_FLOOR = 1e-6  # the stop head's entropy input: p floored here before p log p, as the public DSC


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


def _entropy(p: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    p = p.float().clamp_min(floor)
    return -(p * p.log()).sum(-1)


def gumbel_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard Gumbel samples in float32: -log(-log(u)), u uniform in (0, 1). torch.rand never
    returns 1 and u is floored at the smallest normal float, so every sample is finite."""
    u = torch.rand(shape, device=device, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def clue_map(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Attention over the cells from (noisy or clean) scores: the clamp after the temperature and the floor.

    The clamp's window is 100 wide, and exp(-100) is a subnormal float32: once a clue's scores
    saturate, the softmax writes subnormal probabilities and its backward pass subnormal gradients,
    slow on x86 CPUs (docs/training.md#denormal-numbers). Each row's logits are therefore also kept
    within SOFTMAX_WINDOW of its largest: a cell below that has a probability under 4e-18, floored
    at ATTENTION_FLOOR all the same, so the maps are the same; only such cells' gradient, under
    4e-18 of the others', becomes 0.
    """
    z = (scores / temperature).clamp(-SCORE_CLAMP, SCORE_CLAMP)
    z = z.clamp(min=z.detach().amax(-1, keepdim=True) - SOFTMAX_WINDOW)
    return torch.softmax(z, -1).clamp_min(ATTENTION_FLOOR)


class DSC(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H, self.K = cfg.hidden_dim, cfg.max_clues
        self.gumbel = cfg.use_gumbel_softmax
        self.conditioned = cfg.task_conditioned_clues
        if self.conditioned:
            self.query_proj = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, self.K * H))
        else:
            self.query_bank = nn.Parameter(torch.empty(self.K, H))
            nn.init.xavier_uniform_(self.query_bank.unsqueeze(0))
        self.feature_norm = nn.LayerNorm(H)
        self.query_norm = nn.LayerNorm(H)
        self.q = nn.Linear(H, H)
        self.k = nn.Linear(H, H)
        self.v = nn.Linear(H, H)
        self.recurrence = nn.GRUCell(H, H)
        self.stop = nn.Sequential(nn.Linear(H + 1, H // 2), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(H // 2, 1))
        with torch.no_grad():  # the public initialisation: clues start likely to be used
            first, last = self.stop[0], self.stop[3]
            nn.init.kaiming_normal_(first.weight[:, :H], mode="fan_in")
            nn.init.normal_(first.weight[:, H:], mean=1.5, std=0.5)
            first.bias.zero_()
            nn.init.normal_(last.weight, mean=0.0, std=0.1)
            last.bias.fill_(-1.0)

    def clue_queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, K, H): projected from the task context, or the static bank for every task."""
        B, H = pooled.shape
        if self.conditioned:
            return self.query_proj(pooled).view(B, self.K, H)
        return self.query_bank.expand(B, -1, -1)

    def forward(self, feats: torch.Tensor, pooled: torch.Tensor, temperature: float | torch.Tensor,
                valid: torch.Tensor) -> Clues:
        """feats (B, H, h, w), pooled (B, H), valid (B, h*w) bool: the query grid's cells; `temperature`
        one for every row or (B,) one per row (the leave-one-out rows' own)."""
        B, H, h, w = feats.shape
        if isinstance(temperature, torch.Tensor):
            temperature = temperature[:, None].float()
        cells = self.feature_norm(feats.flatten(2).transpose(1, 2))  # (B, N, H)
        keys, values = self.k(cells), self.v(cells)
        queries = self.clue_queries(pooled)
        rows = torch.arange(h, device=feats.device, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, device=feats.device, dtype=torch.float32).repeat(h)
        mask = valid.float().clamp_min(MASK_FLOOR)  # (B, N) cumulative mask
        state = feats.new_zeros(B, H)
        noisy = self.gumbel and self.training
        max_entropy = math.log(h * w + 1e-6)
        maps, raws, cents, stops = [], [], [], []
        for c in range(self.K):  # progressive masking and recurrence: each clue after the ones before
            q = self.q(self.query_norm(queries[:, c] + state))
            s = torch.einsum("bh,bnh->bn", q, keys).float() / math.sqrt(H)
            s = (s + mask.log()).clamp(-SCORE_CLAMP, SCORE_CLAMP)
            raw = clue_map(s, temperature)
            att = clue_map(s + gumbel_noise(s.shape, s.device), temperature) if noisy else raw
            attended = torch.einsum("bn,bnh->bh", att.to(values.dtype), values)
            if c < self.K - 1:  # the next clue's state
                state = self.recurrence(attended, state)
            ent = (_entropy(att, floor=STOP_ENTROPY_FLOOR) / max_entropy)[:, None]
            logit = self.stop(torch.cat([attended, ent.to(attended.dtype)], -1)).squeeze(-1).float()
            stops.append(STOP_BOUND * torch.tanh(logit / STOP_BOUND))
            cents.append(torch.stack([(att * rows).sum(-1), (att * cols).sum(-1)], -1))
            maps.append(att)
            raws.append(raw)
            mask = (mask * (1 - 0.9 * att.detach())).clamp_min(MASK_FLOOR)
        shape = (B, self.K, h, w)
        return Clues(torch.stack(maps, 1).view(shape), torch.stack(raws, 1).view(shape),
                     torch.stack(cents, 1), torch.stack(stops, 1))
