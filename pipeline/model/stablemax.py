"""TRM's stablemax: probabilities s(x) / sum s(x), with s(x) = x + 1 for x >= 0 and 1 / (1 - x)
below, in place of exp. The model's probabilities are these, in training and in evaluation."""

from __future__ import annotations

import torch


def log_stablemax(x: torch.Tensor, dim: int) -> torch.Tensor:
    # both branches on clamped inputs: torch.where would otherwise pass 0 * inf = NaN gradients
    s = torch.where(x >= 0, x.clamp_min(0) + 1, 1 / (1 - x.clamp_max(0)))
    return s.log() - s.sum(dim, keepdim=True).log()
