"""Pre-flight check of a training run: measure steps, project the whole run, refuse what the machine
cannot finish.

Before the first epoch, the training objective runs forward and backward (no optimizer step, so the
run is unchanged) on micro-batches of 2 and 4 samples, the family's heaviest step (RLAN: with
meta-learning on; TRM: a segment, always the same work):
peak memory grows linearly with the micro-batch, so two sizes give the projected peak of a full
micro-batch (a cautious one: two small batches can hold more pairs than the average). When that
fits, and on CUDA in any case (an out-of-memory error is caught there), one full micro-batch is
measured as well, for its peak and its speed.
The projection (wall time of the remaining training steps, peak memory) is logged; the run is
refused when the projected peak exceeds the memory available, or, on the CPU, when the projected
time exceeds `train.max_cpu_hours`.

Peak memory: on CUDA torch's allocator peak; on the CPU the process's resident set size, sampled
every few milliseconds during the step (the allocator of a CPU tensor has no peak counter).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
GB = 1024**3
MEMORY_MARGIN = 0.9  # use at most this share of the memory available
# what a run refused on the CPU can run instead; `with_cpu_run` puts the run's own overrides in
CPU_RUN = "python -m pipeline.experiments run --scale cpu stable fixed"


class PreflightError(RuntimeError):
    """The run as configured would not finish on this machine."""


@dataclass(frozen=True)
class Projection:
    device: str
    batch_size: int
    samples: int  # samples still to train
    seconds_per_sample: float
    peak_bytes: float  # one micro-batch of batch_size, meta-learning on
    available_bytes: float
    measured: str  # what the projection rests on

    @property
    def hours(self) -> float:
        return self.samples * self.seconds_per_sample / 3600

    def describe(self) -> str:
        return (f"projected {format_hours(self.hours)} for {self.samples:,} samples at "
                f"{1 / self.seconds_per_sample:,.2f} samples/s on {self.device}, peak memory "
                f"{self.peak_bytes / GB:.1f} GB per micro-batch of {self.batch_size} of {self.available_bytes / GB:.1f} GB "
                f"available ({self.measured})")


def format_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days" if h < 24 * 365 else f"{h / (24 * 365):.1f} years"


def available_memory(device: torch.device) -> float:
    """Bytes this process can use: free GPU memory plus what it holds, or the host's available
    memory (within a cgroup limit when one is set) plus this process's resident set."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device))
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    avail = float(info["MemAvailable"].split()[0]) * 1024
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.exists() and cgroup.read_text().strip() != "max":
        used = float(Path("/sys/fs/cgroup/memory.current").read_text())
        avail = min(avail, float(cgroup.read_text()) - used)
    return avail + _rss()


def _rss() -> float:
    return float(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssPeak:
    """The largest resident set size seen while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> _RssPeak:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(step: Callable[[int], None], n: int, device: torch.device) -> tuple[float, float]:
    """(seconds, peak bytes) of `step(n)`: one forward and backward of n samples."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step(n)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, float(torch.cuda.max_memory_allocated(device))
    with _RssPeak() as rss:
        t0 = time.perf_counter()
        step(n)
        seconds = time.perf_counter() - t0
    return seconds, rss.peak


def flops(step: Callable[[int], None], n: int) -> float:
    """The floating-point operations torch counts in `step(n)` (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(n)
    return float(counter.get_total_flops())


def out_of_memory(err: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, the CPU allocator's error, or Python's MemoryError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "not enough memory" in str(err))


def _probe(step: Callable[[int], None], n: int, device: torch.device, available: float) -> tuple[float, float]:
    """measure(step, n), or PreflightError in one line when even n samples do not fit."""
    try:
        return measure(step, n, device)
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise PreflightError(
            f"training refused: a micro-batch of only {n} samples ran out of memory on {device} "
            f"({available / MEMORY_MARGIN / GB:.1f} GB available). To go on: set train.activation_checkpointing: true, "
            "lower model.hidden_dim or train.batch_size, or use a machine with more memory") from None


def project(step: Callable[[int], None], batch_size: int, samples: int, device: torch.device,
            per_process: float = 1.0, max_cpu_hours: float | None = None) -> Projection:
    """Measure `step` at 2 and 4 samples (and at `batch_size` when it is projected to fit, and on
    the CPU to finish within `max_cpu_hours`) and project `samples` samples; `per_process` is the
    share of the samples this process trains."""
    available = available_memory(device) * MEMORY_MARGIN
    small = sorted({min(2, batch_size), min(4, batch_size)})
    _probe(step, small[0], device, available)  # warm-up: first-call allocations and kernel choices
    runs = {n: _probe(step, n, device, available) for n in small}
    if len(small) == 2:
        (n1, (_, p1)), (n2, (t2, p2)) = runs.items()
        per_sample = max((p2 - p1) / (n2 - n1), 0.0)
        peak = p2 + (batch_size - n2) * per_sample
        seconds, basis = t2 / n2, f"measured at {n1} and {n2} samples"
    else:
        (n2, (t2, peak)), = runs.items()
        seconds, basis = t2 / n2, f"measured at {n2} samples"
    too_long = device.type == "cpu" and max_cpu_hours is not None and \
        samples * seconds * per_process / 3600 > 2 * max_cpu_hours  # refused anyway: no need to measure more
    # measure the full micro-batch when it is projected to fit; on CUDA also when not (an out-of-memory
    # error is caught there, while a process that exhausts the host's memory is killed)
    if batch_size > small[-1] and not too_long and (peak <= available or device.type == "cuda"):
        try:
            t, peak = measure(step, batch_size, device)
            seconds, basis = t / batch_size, f"measured at {', '.join(map(str, small))} and {batch_size} samples"
        except (RuntimeError, MemoryError) as err:
            if not out_of_memory(err):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            peak, basis = max(peak, available * 1.01), f"{basis}; a micro-batch of {batch_size} ran out of memory"
    return Projection(str(device), batch_size, samples, seconds * per_process, peak, available, basis)


def with_cpu_run(message: str, command: str) -> str:
    """A refusal's message with `command` as the CPU-scale run to use instead."""
    return message.replace(CPU_RUN, command)


def check(p: Projection, max_cpu_hours: float) -> None:
    """Raise PreflightError with what was projected and what to do, if the run cannot finish."""
    problems, remedies = [], []
    if p.device == "cpu" and p.hours > max_cpu_hours:
        problems.append(f"projected {format_hours(p.hours)} for {p.samples:,} samples at "
                        f"{1 / p.seconds_per_sample:,.2f} samples/s on the CPU, more than "
                        f"train.max_cpu_hours={max_cpu_hours:g}")
        remedies.append(f"train on a GPU, run it at the CPU scale instead ({CPU_RUN}), or raise train.max_cpu_hours")
    if p.peak_bytes > p.available_bytes:
        problems.append(f"a micro-batch of {p.batch_size} is projected to need {p.peak_bytes / GB:.1f} GB, more than "
                        f"the {p.available_bytes / GB:.1f} GB available on {p.device} ({p.measured})")
        remedies.append("lower train.batch_size (raising train.grad_accumulation_steps keeps the effective batch), "
                        "set train.activation_checkpointing: true or a smaller train.loo_training.max_holdouts, "
                        "or use a larger machine")
    if problems:
        raise PreflightError(f"training refused: {'; and '.join(problems)}. To go on: {'; and '.join(remedies)}")
