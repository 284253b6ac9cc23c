"""Training micro-batches, prepared on the host ahead of the step that uses them.

`prepare` turns one micro-batch of cache samples into a `TrainBatch`: the query pairs, the context
pairs packed (only real pairs: no work on padding slots), which packed pairs are held out for
leave-one-out, and the dihedrally transformed context pairs of the equivariance comparison. Every
random choice comes from the micro-batch's own key (seed, epoch, step, micro-batch), so a batch is
the same whoever prepares it and whenever: on a background thread (`Prefetcher`), after a resume,
on any number of processes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.loader import AugmentedCache
from pipeline.params import TrainParams
from pipeline.train.sampler import MicroBatch


@dataclass
class TrainBatch:
    """One micro-batch. Pair indices (`pair_*`, `loo_pair`, `equiv_group`) refer to the packed pairs."""

    query_in: torch.Tensor  # (B, 30, 30) uint8 canvases
    query_out: torch.Tensor  # (B, 30, 30)
    pair_in: torch.Tensor  # (N, 30, 30) the context pairs of every sample, packed
    pair_out: torch.Tensor  # (N, 30, 30)
    pair_sample: torch.Tensor  # (N,) int64 sample of each pair
    pair_slot: torch.Tensor  # (N,) int64 its context slot within the sample
    loo_pair: torch.Tensor  # (L,) int64 packed pairs held out for leave-one-out (0 when LOO is off)
    loo_eligible: torch.Tensor  # (B,) bool samples with enough pairs for LOO
    equiv_in: torch.Tensor  # (M, 30, 30) transformed context pairs, every augmentation packed
    equiv_out: torch.Tensor  # (M, 30, 30)
    equiv_group: torch.Tensor  # (M,) int64 a * B + b: augmentation a of sample b
    equiv_turn: torch.Tensor  # (A * B,) int64 the dihedral id (1..7) of augmentation a of sample b, row a * B + b
    n_slots: int  # D, the most context pairs of a sample
    n_equiv: int  # A, equivariance augmentations (0 when off)
    loo_on: bool  # leave-one-out measured for this batch

    @property
    def size(self) -> int:
        return len(self.query_in)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TrainBatch:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def pin(self) -> TrainBatch:
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device) -> TrainBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def mark_dynamic(self) -> TrainBatch:
        """For torch.compile: the numbers of pairs, held-out pairs and transformed pairs change from
        batch to batch (the canvas and the slots do not), so compile them as symbolic sizes once."""
        for name in ("pair_in", "pair_out", "pair_sample", "pair_slot", "loo_pair", "equiv_in", "equiv_out",
                     "equiv_group"):
            torch._dynamo.maybe_mark_dynamic(getattr(self, name), 0)
        return self


def _packed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    sample, slot = np.nonzero(batch["demo_mask"].numpy())
    return batch["demo_in"][sample, slot], batch["demo_out"][sample, slot], sample, slot


def pack(batch: dict[str, torch.Tensor]) -> TrainBatch:
    """A padded batch (pipeline.loader's format, on the CPU) as a TrainBatch without meta-learning parts."""
    pair_in, pair_out, sample, slot = _packed(batch)
    empty = pair_in[:0]
    none = torch.zeros(0, dtype=torch.int64)
    eligible = torch.zeros(len(batch["query_in"]), dtype=torch.bool)
    return TrainBatch(batch["query_in"], batch["query_out"], pair_in, pair_out, torch.from_numpy(sample),
                      torch.from_numpy(slot), none, eligible, empty, empty, none, none,
                      n_slots=int(batch["demo_mask"].shape[1]), n_equiv=0, loo_on=False)


def holdouts(sample: np.ndarray, eligible: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Packed pairs to hold out: every pair of each eligible sample, or `limit` of them drawn at random."""
    candidates = np.flatnonzero(eligible[sample])
    if limit is None:
        return candidates
    u = rng.random(len(sample))[candidates]
    order = candidates[np.lexsort((u, sample[candidates]))]  # grouped by sample, random within
    first = np.searchsorted(sample[order], sample[order], side="left")
    return np.sort(order[np.arange(len(order)) - first < limit])


def prepare(cache: AugmentedCache, mb: MicroBatch, tp: TrainParams, meta: bool, use_hyperlora: bool,
            slots: int | None = None) -> TrainBatch:
    """The micro-batch's tensors (on the CPU). LOO and equivariance parts only when `meta` is on.
    `slots` fixes the number of context slots of the layout (torch.compile: a static shape)."""
    tb = pack(cache.batch(mb.ids, np.random.default_rng(mb.key)))
    if slots is not None:
        tb = dataclasses.replace(tb, n_slots=max(tb.n_slots, slots))
    B, sample = tb.size, tb.pair_sample.numpy()
    loo = tp.loo_training
    if meta and loo.enabled:
        eligible = np.bincount(sample, minlength=B) >= loo.min_pairs_for_loo
        held = holdouts(sample, eligible, loo.max_holdouts, np.random.default_rng([*mb.key, 2]))
        tb = dataclasses.replace(tb, loo_pair=torch.from_numpy(held.astype(np.int64)),
                                 loo_eligible=torch.from_numpy(eligible), loo_on=True)
    eq = tp.equivariance_training
    if meta and eq.enabled and use_hyperlora:
        # per sample, num_augmentations distinct non-identity dihedral transforms (as the public code's
        # random.sample of augmentation types)
        turns = np.argsort(np.random.default_rng([*mb.key, 1]).random((B, 7)), axis=1)[:, :eq.num_augmentations] + 1
        parts = []
        for a in range(eq.num_augmentations):  # the same samples and query choice, every grid turned
            turned = pack(cache.batch(mb.ids, np.random.default_rng(mb.key), dihedral=turns[:, a]))
            parts.append((turned.pair_in, turned.pair_out, a * B + turned.pair_sample))
        e_in, e_out, group = (torch.cat(x) for x in zip(*parts))
        tb = dataclasses.replace(tb, equiv_in=e_in, equiv_out=e_out, equiv_group=group,
                                 equiv_turn=torch.from_numpy(turns.T.reshape(-1).astype(np.int64)),
                                 n_equiv=eq.num_augmentations)
    return tb


class Prefetcher(Iterator[Any]):
    """`fn(item)` for each item, computed `depth` items ahead on a background thread (the loader is
    numpy and releases the GIL), returned in order. Errors surface at the item that raised them."""

    def __init__(self, fn: Callable[[Any], Any], items: Iterable[Any], depth: int = 2):
        self._fn, self._items = fn, iter(items)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: deque = deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        item = next(self._items, None)
        if item is not None:
            self._pending.append(self._pool.submit(self._fn, item))

    def __next__(self) -> Any:
        if not self._pending:
            raise StopIteration
        result = self._pending.popleft().result()
        self._submit()
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
