"""The pieces of TRM's one network: linear layers with a truncated LeCun-normal initialisation,
root-mean-square normalisation without a learned scale, rotary position codes, bidirectional
self-attention, SwiGLU, and the post-norm block that mixes positions (attention, or an MLP over the
positions) and then channels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Standard deviation of a standard normal truncated to [-2, 2]: a draw there is rescaled by
# 1 / TRUNCATED_STD so that the initialised tensor has the standard deviation asked for.
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)  # density of the standard normal at 2
TRUNCATED_STD = math.sqrt(1 - 4 * _PHI2 / math.erf(2 / math.sqrt(2)))


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """In place: normal values truncated at two standard deviations, with standard deviation `std`."""
    with torch.no_grad():
        if std == 0:
            return t.zero_()
        nn.init.trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0)
        return t.mul_(std / TRUNCATED_STD)


class Linear(nn.Module):
    """y = x W^T (+ b); W truncated normal with std 1/sqrt(fan_in), b zero."""

    def __init__(self, n_in: int, n_out: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(n_out, n_in), 1 / math.sqrt(n_in)))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, computed in float32, returned in x's dtype."""
    y = x.float()
    return (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(head_dim: int, positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (positions, head_dim): frequency i of a head's channel pair (i, i + head_dim/2)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position code of x (B, L, heads, head_dim): each channel pair turned by its position's angle."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    y = x.float() * cos[:, None] + turned.float() * sin[:, None]
    return y.to(x.dtype)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over every position, with the rotary code on queries and keys."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.out = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).unbind(2)
        q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


def swiglu_width(width: int, expansion: float) -> int:
    """The inner width: expansion x width x 2/3, rounded, then up to a multiple of 256."""
    return -(-round(expansion * width * 2 / 3) // 256) * 256


class SwiGLU(nn.Module):
    def __init__(self, width: int, expansion: float):
        super().__init__()
        inner = swiglu_width(width, expansion)
        self.gate_up = Linear(width, 2 * inner)
        self.down = Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm: x = norm(x + mix(x)) over positions, then x = norm(x + SwiGLU(x)) over channels.
    `mixer` "attention" attends across positions; "mlp" applies a SwiGLU along the positions axis
    (every channel alike), TRM's attention-free variant for a fixed sequence length."""

    def __init__(self, hidden: int, heads: int, expansion: float, mixer: str, seq_len: int, eps: float):
        super().__init__()
        self.mixer, self.eps = mixer, eps
        self.mix = Attention(hidden, heads) if mixer == "attention" else SwiGLU(seq_len, expansion)
        self.mlp = SwiGLU(hidden, expansion)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.mixer == "attention":
            x = rms_norm(x + self.mix(x, rope), self.eps)
        else:
            t = x.transpose(1, 2)
            x = rms_norm(t + self.mix(t), self.eps).transpose(1, 2)
        return rms_norm(x + self.mlp(x), self.eps)
