"""TRM's puzzle embeddings: one learned vector per cached version of a task (row 0 is the blank,
never trained), and the sign-SGD optimiser that trains them sparsely.

The table is a buffer, not a parameter: AdamW, gradient clipping and the weight average never see
it. In training, each forward pass reads the rows of its batch into a fresh leaf tensor that
receives their gradient; `SignSGD.step` gathers those gradients (every micro-batch of the step,
every process), sums them per row, and moves each row used by -lr x sign(gradient), after a
decoupled weight decay of those rows only. Rows not in the step do not change (Adam is close to
sign-SGD when a row's gradient is this sparse, which is why TRM uses it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class PuzzleEmbedding(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n, dim))  # zero-initialised, as TRM's
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, rows) read since the last step

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids]
        if self.training and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)
            self.pending.append((ids, rows))
        return rows

    def clear(self) -> None:
        self.pending.clear()


def _gather(t: torch.Tensor) -> torch.Tensor:
    """`t` of every process, concatenated (itself alone without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class SignSGD(torch.optim.Optimizer):
    """Sign-SGD with decoupled weight decay on the rows of a PuzzleEmbedding read since the last step."""

    def __init__(self, embedding: PuzzleEmbedding, lr: float, weight_decay: float):
        super().__init__([embedding.weight], {"lr": lr, "weight_decay": weight_decay})
        self.embedding = embedding

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        read = [(ids, rows.grad) for ids, rows in self.embedding.pending if rows.grad is not None]
        self.embedding.clear()
        weight = self.embedding.weight
        dim = weight.shape[1]
        ids = torch.cat([i for i, _ in read]) if read else weight.new_zeros(0, dtype=torch.long)
        grads = torch.cat([g for _, g in read]) if read else weight.new_zeros(0, dim)
        ids, grads = _gather(ids), _gather(grads.float())  # every process makes the same update
        if not len(ids):
            return
        rows, where = ids.unique(return_inverse=True)
        total = grads.new_zeros(len(rows), dim).index_add_(0, where, grads)
        group = self.param_groups[0]
        lr, decay = group["lr"], group["weight_decay"]
        weight[rows] = weight[rows] * (1 - lr * decay) - lr * total.sign().to(weight.dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.embedding.clear()
