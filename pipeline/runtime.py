"""Where and how a stage computes: device choice, seeding, autocast. (Distributed set-up: pipeline.distributed.)"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_cpu(threads: int, flush_denormals: bool = True) -> None:
    """How torch computes on the CPU, for every stage and benchmark that computes there.

    - `threads`: intra-op threads. A CPU computation's bytes depend on how many threads split its
      sums, so the count is a param (`train.cpu_threads`), not whatever the machine offers.
    - `flush_denormals` (`train.flush_denormals`): float32 values below 2^-126 are read and written as 0.
      x86 CPUs compute with such subnormal numbers through microcode, 10-100x slower per operation;
      where training makes them: docs/training.md#denormal-numbers. Set here for this thread and
      torch's worker threads. NVIDIA GPUs compute them at full speed in hardware: the setting
      changes nothing there.
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not torch.set_flush_denormal(flush_denormals) and flush_denormals:
        log.warning("this CPU cannot flush denormal numbers (no SSE3): training may run much slower")
        return
    _restart_worker_threads()
    probe = torch.full((threads * 65536,), 1e-20)  # split over every worker thread
    if flush_denormals and bool((probe * probe).ne(0).any()):
        log.warning("torch's worker threads could not be made to flush denormal numbers (no OpenMP runtime "
                    "that releases them): set train.cpu_threads to 1 if CPU training runs slowly")


OPENMP_LIBRARIES = ("libgomp.so.1", "libomp.so", "libiomp5.so")  # GNU (torch's Linux wheels), LLVM, Intel
OMP_PAUSE_SOFT = 1  # omp_pause_soft: the worker threads end; the next parallel region starts new ones


def _restart_worker_threads() -> None:
    """The flush is a setting of the calling thread's floating-point control register, which torch's
    OpenMP worker threads copy when they start: workers started by an earlier parallel operation
    would keep computing with the old setting (half of a two-thread product's subnormals kept). They
    are released (OpenMP 5.0's omp_pause_resource_all), so that the next parallel operation starts
    them again from this thread. Without an OpenMP runtime that has it, nothing to release."""
    for name in OPENMP_LIBRARIES:
        try:
            runtime = ctypes.CDLL(name)  # the library already loaded under that name, torch's
            pause = runtime.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(OMP_PAUSE_SOFT) != 0:
            log.debug("%s could not release its worker threads", name)
        return


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; float32 elsewhere."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def without_autocast(device_type: str):
    """Autocast off for a float32 region. A device with no autocast (the "meta" device, on which the
    benchmarks count FLOPs without computing) has none to turn off."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
