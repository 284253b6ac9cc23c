"""A first pre-flight check of a training run, made by the train stage before it reads its data or
writes anything: it refuses in seconds a run that this CPU cannot finish, instead of after loading
the cache and timing steps on it (pipeline.train.preflight, the second pre-flight). The stages that do
not train (validate_params, prepare, augment) never make it: they run on any machine.

It bounds the run's time from below, without training anything: the FLOPs of the family's heaviest
training step (forward and backward, meta-learning on), counted on torch's meta device for a cache
of a few synthetic tasks (random 10x10 grids, three demonstrations: ARC's typical task; the model
works on the 30x30 canvas whatever the grid), times the samples the run trains, at the speed of a
float32 matrix product on this CPU's `train.cpu_threads` threads (measured for a fraction of a
second): no training step computes faster than that product. The samples: `train.epochs` times
`train.steps_per_epoch` optimizer steps, or, when that is null, one pass per epoch over the cache the
params make (every task of `data.source`, at most `data.max_tasks` per split, each with
`augment.samples_per_task` versions).

Only a run on the CPU is checked (on CUDA the train stage's pre-flight decides), and only one too
long to finish within `train.max_cpu_hours` at 10 samples/s (the cpu and tiny scales count nothing
here). The train stage's pre-flight, on the real data, still decides for every run this check lets
through, memory included.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.experiments import committed
from pipeline.params import Params

log = logging.getLogger(__name__)

SOURCE_TASKS = {"arc-agi-1": {"train": 400, "eval": 400}, "arc-agi-2": {"train": 1000, "eval": 120}}
SKIP_BELOW_SAMPLES_PER_S = 10.0  # a run that would finish at this speed is left to the train stage's pre-flight
SYNTHETIC_TASKS, SYNTHETIC_VERSIONS = 2, 4


def planned_samples(params: Params, items_per_sample: float = 1.0, micro_batch: int | None = None) -> int:
    """The samples (items: RLAN's cache samples, TRM's pairs) the run trains: its optimizer steps
    times the items of a step. `items_per_sample`: items per cache sample; `micro_batch`: items per
    micro-batch (default train.batch_size)."""
    tp = params.train
    per_step = (micro_batch or tp.batch_size) * tp.grad_accumulation_steps
    if tp.steps_per_epoch:
        steps = tp.steps_per_epoch
    else:
        tasks = sum(min(n, params.data.max_tasks or n) for n in SOURCE_TASKS[params.data.source].values())
        steps = max(1, int(tasks * params.augment.samples_per_task * items_per_sample) // per_step)
    return steps * tp.epochs * per_step


def synthetic_tasks(seed: int = 0) -> list:
    from pipeline.arc import Task

    rng = np.random.default_rng(seed)

    def grid() -> np.ndarray:
        return rng.integers(0, 10, (10, 10)).astype(np.uint8)

    return [Task(f"synthetic{i}", "train", tuple((grid(), grid()) for _ in range(3)), ((grid(), grid()),))
            for i in range(SYNTHETIC_TASKS)]


def step_flops(params: Params) -> tuple[float, int, float, int]:
    """(FLOPs per item of the heaviest training step, items per micro-batch, items per cache sample,
    items of the synthetic cache), counted on the meta device: nothing is computed."""
    import torch
    from pipeline.train import preflight

    from pipeline.cache import build_cache
    from pipeline.loader import AugmentedCache
    from pipeline.model import family as families
    from pipeline.train.sampler import MicroBatch, Sampler

    meta = torch.device("meta")
    with tempfile.TemporaryDirectory(prefix="rlan-feasibility-") as tmp:
        augment = params.augment.model_copy(update={"samples_per_task": SYNTHETIC_VERSIONS})
        build_cache(synthetic_tasks(), augment, Path(tmp) / "cache")
        cache = AugmentedCache(Path(tmp) / "cache")
        with meta:
            run = families.get(params.model.family).training(params, cache, meta)
        sampler = Sampler(run.items, params.train.seed, run.micro_batch, params.train.grad_accumulation_steps, 1)
        first = sampler.micro_batches(sampler.order(0), 0, 0, 0)[0]
        n = min(2, run.micro_batch)
        batch = run.prepare(MicroBatch(first.index, first.ids[:n], first.key), None).to(meta)
        def step(_: int) -> None:
            loss, _ = run.objective(batch, params.train.temperature_start)
            loss.backward()

        return preflight.flops(step, n) / n, run.micro_batch, run.items / len(cache), run.items


def matmul_flops_per_s(threads: int, seconds: float = 0.3, flush_denormals: bool = True) -> float:
    """This CPU's float32 matrix-product speed on `threads` threads, now (as training computes there)."""
    import torch

    from pipeline.runtime import use_cpu

    use_cpu(threads, flush_denormals)
    a = torch.randn(512, 512)
    a @ a  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count == 0:
        a @ a
        count += 1
    return 2 * 512**3 * count / elapsed


def refusal(params: Params) -> str | None:
    """Why this run cannot finish on this machine's CPU (a message in the train stage's pre-flight's
    form); None when it trains on CUDA or the lower bound of its time is within train.max_cpu_hours."""
    tp = params.train
    processes = tp.nproc_per_node * tp.nnodes
    limit_h = tp.max_cpu_hours
    if planned_samples(params) / processes / SKIP_BELOW_SAMPLES_PER_S <= limit_h * 3600 or \
            _device(tp.device) != "cpu":  # (the samples first: torch is imported only when needed)
        return None
    flops, micro_batch, per_sample, _ = step_flops(params)
    samples = planned_samples(params, per_sample, micro_batch)
    speed = matmul_flops_per_s(tp.cpu_threads, flush_denormals=tp.flush_denormals)
    hours = samples * flops / speed / processes / 3600
    log.info("pre-flight before training starts: %s samples of %.1f GFLOP each (forward and backward, counted), "
             "at this CPU's %.1f GFLOP/s (a matrix product on %d threads): at least %s", f"{samples:,}", flops / 1e9,
             speed / 1e9, tp.cpu_threads, _hours(hours))
    if hours <= limit_h:
        return None
    from pipeline.train import preflight

    return (f"training refused before it starts: at least {_hours(hours)} for {samples:,} samples on the "
            f"CPU ({flops / 1e9:.1f} GFLOP each, at most {speed / 1e9:.1f} GFLOP/s here), more than "
            f"train.max_cpu_hours={limit_h:g}. To go on: train on a GPU, run it at the CPU scale instead "
            f"({preflight.CPU_RUN}), or raise train.max_cpu_hours")


def _device(name: str) -> str:
    from pipeline.runtime import resolve_device

    return resolve_device(name).type


def _hours(hours: float) -> str:
    from pipeline.train import preflight

    return preflight.format_hours(hours)


def with_own_overrides(message: str, params_path: str | Path) -> str:
    """A refusal with this run's own overrides (what its params.yaml changes from HEAD's) in the
    CPU-scale command it suggests (pipeline.train.preflight.CPU_RUN's place)."""
    from pipeline.train.preflight import with_cpu_run

    changes = committed.changes_from_head(params_path) or {}
    kept = {k: new for k, (_, new) in changes.items() if new != "(absent)"}
    if not kept:
        return message
    command = " ".join(["python -m pipeline.experiments run --scale cpu", *map(shlex.quote, committed.set_args(kept))])
    return with_cpu_run(message, command)
