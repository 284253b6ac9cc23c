"""Which samples each process trains on: a pure function of (seed, epoch, step, micro-batch).

Every epoch is a fresh permutation of the cache (seeded by seed and epoch). Optimizer step s takes
the next `grad_accumulation_steps` micro-batches of `batch_size` samples from it (wrapping round
when `steps_per_epoch` asks for more than one pass); with W processes, rank r takes micro-batches
r*k .. r*k + k - 1 of each step, k = grad_accumulation_steps / W. The ranks' shares never overlap
and together are exactly what one process would train on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MicroBatch:
    index: int  # position among the step's micro-batches, the same whatever the world size
    ids: np.ndarray  # sample ids
    key: tuple[int, int, int, int]  # (seed, epoch, step, index): seeds everything random about it


@dataclass(frozen=True)
class Sampler:
    n_samples: int
    seed: int
    batch_size: int
    accumulation: int
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.accumulation % self.world_size:
            raise ValueError(f"train.grad_accumulation_steps={self.accumulation} is not a multiple of the world "
                             f"size {self.world_size}")

    @property
    def per_rank(self) -> int:
        return self.accumulation // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)

    def micro_batches(self, order: np.ndarray, epoch: int, step: int, rank: int) -> list[MicroBatch]:
        out = []
        for j in range(self.per_rank):
            m = rank * self.per_rank + j
            first = (step * self.accumulation + m) * self.batch_size
            ids = np.take(order, np.arange(first, first + self.batch_size), mode="wrap")
            out.append(MicroBatch(m, ids, (self.seed, epoch, step, m)))
        return out
