"""Distributed set-up in one place: torchrun launch, process group, rank-0 gating, collectives.

A stage asks for `train.nnodes` x `train.nproc_per_node` processes. With more than one and no
torchrun environment yet, `relaunch_under_torchrun` replaces the process with
`python -m torch.distributed.run ... -m <the stage> <its arguments>`, so the command in dvc.yaml
stays the same for one process or many. Backend NCCL on CUDA, gloo on the CPU; every collective
has `train.dist_timeout_s`, so a rank that fails stops the job (torchrun then ends the others)
instead of leaving them waiting.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.params import TrainParams
from pipeline.runtime import resolve_device

log = logging.getLogger(__name__)
FAULT_ENV = "PIPELINE_FAULT_RANK"  # testing aid: the rank named here raises at start-up


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single(device: torch.device | None = None) -> World:
    """The world of a plain, single-process run."""
    return World(0, 0, 1, device or torch.device("cpu"))


def requested(tp: TrainParams) -> int:
    return tp.nnodes * tp.nproc_per_node


def relaunch_under_torchrun(tp: TrainParams, module: str) -> None:
    """exec torchrun for `module` when several processes are asked for and this is not one of them."""
    if requested(tp) <= 1 or "LOCAL_RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={tp.nnodes}",
           f"--nproc-per-node={tp.nproc_per_node}", "--max-restarts=0"]
    if tp.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={tp.rdzv_endpoint}", f"--rdzv-id={tp.rdzv_id}"]
    cmd += ["-m", module, *sys.argv[1:]]
    log.info("launching %d processes: %s", requested(tp), " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def die_with_launcher() -> None:
    """torchrun starts its workers in sessions of their own, so killing the job's process group
    (or `dvc repro`) would leave them training; on Linux, make the kernel end a worker with its launcher."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the request took effect
        os._exit(1)


def init(tp: TrainParams, device_name: str) -> World:
    """The process group (when started by torchrun) and this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return single(resolve_device(device_name))
    die_with_launcher()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if os.environ.get(FAULT_ENV) == str(rank):
        raise RuntimeError(f"rank {rank}: failure injected by {FAULT_ENV} (testing)")
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timeout aborts instead of hanging
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=tp.dist_timeout_s))
    if rank == 0:
        log.info("process group: %d processes, backend %s", size, dist.get_backend())
    return World(rank, local_rank, size, device)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def sum_all(world: World, values: dict[str, float]) -> dict[str, float]:
    """Elementwise sums over the ranks of a dict with the same keys on every rank (in float64)."""
    if world.size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def sum_tensor(world: World, t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over the ranks of a tensor of the same shape on every rank (no host sync)."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def union_keys(world: World, keys: set[str]) -> list[str]:
    if world.size == 1:
        return sorted(keys)
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, sorted(keys))
    return sorted(set().union(*gathered))


def gather_to_main(world: World, obj: Any) -> list[Any] | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if world.size == 1:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(world: World, obj: Any) -> Any:
    if world.size == 1:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
