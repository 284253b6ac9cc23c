"""HyperLoRA: task-specific low-rank weight deltas predicted from the pooled context.

For each target layer t with input size n_in and output size n_out, small heads predict
A (B, n_out, r) and B (B, n_in, r) from the pooled context; the layer computes
W x + scaling * (A B^T) x, with scaling = `hyperlora_scaling`. The heads are initialised so that
the first deltas A B^T have a root-mean-square gain of `hyperlora_init_scale` on a unit-variance
input (||A B^T||_F / sqrt(n_out) = init_scale): the project's definition of the init scale. The
targets are the GRU reset, update and candidate gates (on their [x, h] input) and the output head
(on its input, h + delta_W h).

What is logged is what the public module logs: the magnitude ||scaling * A B^T||_F of each sample's
delta (mean over the batch), and the diversity, the standard deviation over the batch of each entry
of the delta, averaged over the entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.params import HYPERLORA_CODE_DEFAULTS, ModelParams
from pipeline.runtime import without_autocast

TARGETS = ("gru_reset", "gru_update", "gru_candidate", "output_head")
DEFAULT_INIT_SCALE = HYPERLORA_CODE_DEFAULTS["init_scale"]
DEFAULT_SCALING = HYPERLORA_CODE_DEFAULTS["scaling"]


@dataclass
class LoRA:
    """Per-sample low-rank deltas: a[t] (B, n_out, r), b[t] (B, n_in, r)."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scaling: float

    @property
    def _device_type(self) -> str:
        return next(iter(self.a.values())).device.type

    def rows(self, sl: slice | torch.Tensor) -> LoRA:
        return LoRA({t: v[sl] for t, v in self.a.items()}, {t: v[sl] for t, v in self.b.items()}, self.scaling)

    def apply(self, target: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * delta_W x for a (B, n_in, H, W) map -> (B, n_out, H, W)."""
        return self.apply_part(target, x, 0)

    def apply_part(self, target: str, x: torch.Tensor, start: int) -> torch.Tensor:
        """The delta's action on input channels start .. start + C of its input (x (B, C, H, W)): by
        linearity, the action on a concatenated input is the sum of its parts'."""
        b = self.b[target][:, start : start + x.shape[1]]
        u = torch.einsum("bir,bihw->brhw", b, x)
        return self.scaling * torch.einsum("bor,brhw->bohw", self.a[target], u)

    def magnitudes(self) -> dict[str, torch.Tensor]:
        """(B,) ||scaling * A B^T||_F per target: the public module's LoRA magnitude (the Frobenius norm
        of each sample's weight delta), from r x r Gram matrices, in float32 whatever the autocast
        (differentiable: the equivariance loss reads it)."""
        out = {}
        with without_autocast(self._device_type):
            for t, a in self.a.items():
                a, b = a.float(), self.b[t].float()
                sq = ((a.transpose(1, 2) @ a) * (b.transpose(1, 2) @ b)).sum((1, 2))
                out[t] = self.scaling * (sq.clamp_min(0) + 1e-12).sqrt()  # eps: finite gradient at 0
        return out

    def inner(self, other: LoRA) -> dict[str, torch.Tensor]:
        """(B,) Frobenius inner product <scaling A B^T, scaling A' B'^T> per target, row by row, float32."""
        out = {}
        with without_autocast(self._device_type):
            for t, a in self.a.items():
                ga = a.float().transpose(1, 2) @ other.a[t].float()
                gb = self.b[t].float().transpose(1, 2) @ other.b[t].float()
                out[t] = self.scaling * other.scaling * (ga * gb).sum((1, 2))
        return out

    def deltas(self, target: str) -> torch.Tensor:
        """(B, n_out, n_in) scaling * A B^T of one target (formed explicitly: measurements only)."""
        return self.scaling * torch.einsum("bor,bir->boi", self.a[target].float(), self.b[target].float())

    def diversity(self) -> torch.Tensor:
        """The public module's weight diversity: the standard deviation over the batch of every entry of
        scaling * A B^T, averaged over the entries and the targets; 0 when every task gets the same
        delta, NaN for a single sample. A measurement (no gradient)."""
        if len(next(iter(self.a.values()))) < 2:
            return torch.tensor(math.nan)
        with torch.no_grad(), without_autocast(self._device_type):
            return torch.stack([self.deltas(t).std(0).mean() for t in self.a]).mean()


class HyperLoRA(nn.Module):
    def __init__(self, cfg: ModelParams, dims: dict[str, tuple[int, int]]):
        """dims: target -> (n_in, n_out)."""
        super().__init__()
        H, r = cfg.hidden_dim, cfg.hyperlora_rank
        self.rank, self.scaling, self.dims = r, cfg.hyperlora_scaling, dims
        self.trunk = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H), nn.GELU())
        self.dropout = cfg.hyperlora_dropout
        self.norm = nn.LayerNorm(H)
        self.head_a = nn.ModuleDict({t: nn.Linear(H, n_out * r) for t, (_, n_out) in dims.items()})
        self.head_b = nn.ModuleDict({t: nn.Linear(H, n_in * r) for t, (n_in, _) in dims.items()})
        # z = trunk(ctx) has unit mean square per sample (final LayerNorm), so with these weights
        # A has entries of variance init_scale^2 and B of 1 / (r n_in): E||A B^T||_F^2 = n_out init_scale^2.
        for t, (n_in, _) in dims.items():
            nn.init.normal_(self.head_a[t].weight, std=cfg.hyperlora_init_scale / math.sqrt(H))
            nn.init.normal_(self.head_b[t].weight, std=1.0 / math.sqrt(H * r * n_in))
            nn.init.zeros_(self.head_a[t].bias)
            nn.init.zeros_(self.head_b[t].bias)

    def forward(self, pooled: torch.Tensor, dropout: bool = True) -> LoRA:
        """Deltas for (B, H) pooled contexts; `dropout=False` leaves out `hyperlora_dropout` (the
        equivariance comparison)."""
        z = self.norm(F.dropout(self.trunk(pooled), self.dropout, self.training and dropout))
        B = pooled.shape[0]
        a = {t: self.head_a[t](z).view(B, n_out, self.rank) for t, (_, n_out) in self.dims.items()}
        b = {t: self.head_b[t](z).view(B, n_in, self.rank) for t, (n_in, _) in self.dims.items()}
        return LoRA(a, b, self.scaling)
