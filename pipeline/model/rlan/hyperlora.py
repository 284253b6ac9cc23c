"""HyperLoRA: task-specific low-rank weight deltas predicted from the pooled context.

For each target t with input size n_in and output size n_out, the module predicts per sample
A (B, n_out, r) and B (B, n_in, r) from the pooled context; the target's delta is
scaling * A B^T (scaling = `hyperlora_scaling`), acting on a map x as scaling * A (B^T x). Two forms
(`hyperlora_delta`):

- `dense` (the public module at 74a42b0): the context goes through a fusion MLP (Linear H -> 2H,
  GELU, dropout, Linear 2H -> H, LayerNorm) and dropout; each target has two MLPs of its own
  (Linear H -> H, GELU, Linear H -> H r), one for each factor. Every target is H x H and acts on the
  target's output features, y + delta y (the solver's reset, update and candidate pre-activations and
  the output head's input). The public code forms the dense H x H matrix and multiplies every cell
  by it; here the same function is computed through the factors (2 H r instead of H^2 per cell).
- `factored` (this project's earlier form): a LayerNorm, Linear, GELU trunk, dropout and LayerNorm,
  then one linear head per factor; the gates' deltas act on their inputs ([x, h], 2H or 3H wide).

Both forms are initialised to this project's definition of `hyperlora_init_scale`: the first deltas
A B^T have a root-mean-square gain of init_scale on a unit-variance input
(E||A B^T||_F^2 / n_out = init_scale^2, before `hyperlora_scaling`).

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


def gelu_mean_square(var: float) -> float:
    """E[GELU(u)^2] for u ~ N(0, var), by quadrature (for the init of the dense form's last layers)."""
    u = torch.linspace(-12.0, 12.0, 24_001, dtype=torch.float64, device="cpu")  # also under a meta default device
    density = torch.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
    return float((F.gelu(u * math.sqrt(var)) ** 2 * density).sum() * (u[1] - u[0]))


class HyperLoRA(nn.Module):
    def __init__(self, cfg: ModelParams, dims: dict[str, tuple[int, int]]):
        """dims: target -> (n_in, n_out)."""
        super().__init__()
        H, r = cfg.hidden_dim, cfg.hyperlora_rank
        self.rank, self.scaling, self.dims = r, cfg.hyperlora_scaling, dims
        self.dense = cfg.hyperlora_delta == "dense"
        self.dropout = cfg.hyperlora_dropout
        init = cfg.hyperlora_init_scale
        # The context z fed to the last layers has unit mean square per sample (a final LayerNorm).
        # A's entries get variance init^2 and B's 1 / (r n_in): E||A B^T||_F^2 = n_out init^2.
        if self.dense:
            self.fuse_in, self.fuse_out, self.norm = nn.Linear(H, 2 * H), nn.Linear(2 * H, H), nn.LayerNorm(H)
            self.head_a = nn.ModuleDict({t: self._mlp(H, n_out * r) for t, (_, n_out) in dims.items()})
            self.head_b = nn.ModuleDict({t: self._mlp(H, n_in * r) for t, (n_in, _) in dims.items()})
            # The last layers read GELU(Linear(z)): torch's default init gives Linear(z) the variance
            # (H + 1) / 3H per unit, so the GELU outputs have H * gelu_mean_square of it in all.
            width = math.sqrt(H * gelu_mean_square((H + 1) / (3 * H)))
            last_a = {t: m[-1] for t, m in self.head_a.items()}
            last_b = {t: m[-1] for t, m in self.head_b.items()}
        else:
            self.trunk = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H), nn.GELU())
            self.norm = nn.LayerNorm(H)
            self.head_a = nn.ModuleDict({t: nn.Linear(H, n_out * r) for t, (_, n_out) in dims.items()})
            self.head_b = nn.ModuleDict({t: nn.Linear(H, n_in * r) for t, (n_in, _) in dims.items()})
            width = math.sqrt(H)
            last_a, last_b = dict(self.head_a.items()), dict(self.head_b.items())
        for t, (n_in, _) in dims.items():
            nn.init.normal_(last_a[t].weight, std=init / width)
            nn.init.normal_(last_b[t].weight, std=1.0 / (width * math.sqrt(r * n_in)))
            nn.init.zeros_(last_a[t].bias)
            nn.init.zeros_(last_b[t].bias)

    @staticmethod
    def _mlp(width: int, n_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, n_out))

    def forward(self, pooled: torch.Tensor, dropout: bool = True) -> LoRA:
        """Deltas for (B, H) pooled contexts; `dropout=False` leaves out `hyperlora_dropout` (the
        equivariance comparison)."""
        drop = self.training and dropout
        if self.dense:
            fused = self.fuse_out(F.dropout(F.gelu(self.fuse_in(pooled)), self.dropout, drop))
            z = F.dropout(self.norm(fused), self.dropout, drop)
        else:
            z = self.norm(F.dropout(self.trunk(pooled), self.dropout, drop))
        B = pooled.shape[0]
        a = {t: self.head_a[t](z).view(B, n_out, self.rank) for t, (_, n_out) in self.dims.items()}
        b = {t: self.head_b[t](z).view(B, n_in, self.rank) for t, (n_in, _) in self.dims.items()}
        return LoRA(a, b, self.scaling)
