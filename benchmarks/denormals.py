"""Where training makes denormal (subnormal) float32 numbers on the CPU, and what they cost.

    python -m benchmarks.denormals [--scale stable|cpu] [--batch B] [--steps N] [--cache DIR]
                                   [--checkpoint DIR/last.pt] [--task-loss] [--repeat R]

Runs `--steps` optimizer steps (forward, backward, gradient clipping, AdamW) of RLAN with
meta-learning on (`--task-loss`: off), as the training loop calls its objective, at the last
temperature (the sharpest clue maps), twice from the same weights and micro-batches: with torch's
default (subnormals kept) and with them flushed (`pipeline.runtime.use_cpu`). Every aten operation
is seen through a dispatch mode, attributed to the innermost module that runs it (torch's
ModuleTracker, forward and backward; a module returning a dataclass has its backward counted under
the module around it) or to the optimizer:
- subnormal: float32 values with 0 < |x| < 2^-126 (torch.finfo(torch.float32).tiny) among the
  values it writes, in the pass that keeps them;
- its seconds in each pass (CPU time of the thread, which the machine's other load changes far
  less than the wall time; torch computes on this one thread).
`--scale stable` is params.yaml's model (hidden 256) and configuration; `--scale cpu` applies the
overrides of the experiment workflow's cpu scale. `--checkpoint` starts from a training's
checkpoint (its weights and AdamW state) instead of fresh weights: the state after some training.
The cache is any augmentation cache (the data does not change where subnormals come from).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.module_tracker import ModuleTracker

from benchmarks.common import REPO

TINY = torch.finfo(torch.float32).tiny
UNWRITTEN = ("empty", "new_empty")  # allocations: whatever bytes the memory held, not computed values


class Census(TorchDispatchMode):
    """Per (module, phase, operation): subnormal values written, values written, seconds."""

    def __init__(self, tracker: ModuleTracker, count: bool):
        super().__init__()
        self.tracker, self.count, self.phase = tracker, count, "forward"
        self.rows: dict[tuple[str, str, str], list] = defaultdict(lambda: [0, 0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        seconds = time.thread_time() - t0
        name = func.overloadpacket.__name__
        phase = self.phase if self.phase == "optimizer" else ("backward" if self.tracker.is_bw else "forward")
        inner = max(self.tracker.parents, key=lambda p: (p.count("."), len(p)), default="Global")
        row = self.rows[(inner, phase, name)]
        row[2] += seconds
        if self.count and not name.startswith(UNWRITTEN) and not _is_view(func):
            written = args[0] if name.endswith("_") else out  # in-place: what it wrote to
            for t in tree_leaves(written):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel():
                    a = t.detach().abs()
                    row[0] += int(((a > 0) & (a < TINY)).sum())
                    row[1] += t.numel()
        return out


def _is_view(func) -> bool:
    """An operation returning a view of its input: it writes no value of its own."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def configuration(scale: str):
    from pipeline.experiments.runner import SCALES
    from pipeline.params import load_params

    p = load_params(REPO / "params.yaml")
    return p.override({**(SCALES["cpu"].overrides if scale == "cpu" else {}), "train.device": "cpu"})


def run_pass(p, cache, ids_per_step: list, meta: bool, checkpoint: Path | None, flush: bool,
             count: bool) -> tuple[Census, dict[str, tuple[int, int]]]:
    """`len(ids_per_step)` optimizer steps from the same start, at the last temperature
    (train.temperature_end, the sharpest maps); the census of their operations, and AdamW's
    moments after them: (subnormal values, values) of each."""
    from pipeline.model import RLAN
    from pipeline.model.io import safe_load
    from pipeline.model.rlan.family import build_optimizer
    from pipeline.runtime import use_cpu
    from pipeline.train.batches import prepare
    from pipeline.train.losses import Objective

    use_cpu(1, flush)
    torch.manual_seed(0)
    model = RLAN(p.model).train()
    opt = build_optimizer(model, p.train)
    if checkpoint is not None:
        state = safe_load(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    objective = Objective(model, p.train)
    data = [prepare(cache, mb, p.train, meta, p.model.use_hyperlora) for mb in ids_per_step]
    tracker = ModuleTracker()
    census = Census(tracker, count)
    with tracker, census:
        for i, tb in enumerate(data):
            torch.manual_seed(1 + i)  # the same Gumbel noise and dropout in both passes
            census.phase = "forward"
            loss, _ = objective(tb, p.train.temperature_end)
            loss.backward()
            census.phase = "optimizer"
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.train.gradient_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return census, {k: _subnormal_state(opt, k) for k in ("exp_avg", "exp_avg_sq")}


def _subnormal_state(opt: torch.optim.Optimizer, key: str) -> tuple[int, int]:
    ts = [s[key] for s in opt.state.values() if key in s]
    return sum(int(((t.abs() > 0) & (t.abs() < TINY)).sum()) for t in ts), sum(t.numel() for t in ts)


def group(module: str, depth: int) -> str:
    return ".".join(module.split(".")[: depth + 1])


def table(kept: Census, flushed: Census, depth: int, top: int) -> list[str]:
    by_module: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0, 0.0])
    for (module, phase, _), (sub, n, s) in kept.rows.items():
        row = by_module[(group(module, depth), phase)]
        row[0], row[1], row[2] = row[0] + sub, row[1] + n, row[2] + s
    for (module, phase, _), (_, _, s) in flushed.rows.items():
        by_module[(group(module, depth), phase)][3] += s
    lines = ["| module | pass | subnormal values written | of all | s kept | s flushed | kept / flushed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    order = sorted(by_module.items(), key=lambda kv: -kv[1][2])
    for (module, phase), (sub, n, s_kept, s_flush) in order[:top]:
        lines.append(f"| {module} | {phase} | {sub:,} | {sub / max(n, 1):.3%} | {s_kept:.2f} | {s_flush:.2f} | "
                     f"{s_kept / max(s_flush, 1e-9):.1f}x |")
    tot = [sum(r[i] for r in by_module.values()) for i in range(4)]
    lines.append(f"| all | all | {tot[0]:,} | {tot[0] / max(tot[1], 1):.3%} | {tot[2]:.2f} | {tot[3]:.2f} | "
                 f"{tot[2] / max(tot[3], 1e-9):.1f}x |")
    return lines


def top_ops(kept: Census, flushed: Census, top: int) -> list[str]:
    lines = ["| module (innermost) | pass | operation | subnormal values written | of its values | s kept | "
             "s flushed |", "|---|---|---|---:|---:|---:|---:|"]
    rows = sorted(kept.rows.items(), key=lambda kv: -kv[1][0])
    for key, (sub, n, s) in rows[:top]:
        if sub == 0:
            break
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {sub:,} | {sub / max(n, 1):.3%} | {s:.3f} | "
                     f"{flushed.rows.get(key, [0, 0, 0.0])[2]:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("stable", "cpu"), default="stable")
    ap.add_argument("--batch", type=int, default=None, help="default: 2 at the stable width, 16 at the cpu scale")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=REPO / "data/cache")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a training's last.pt: start from its state")
    ap.add_argument("--task-loss", action="store_true", help="meta-learning off (the task loss alone)")
    ap.add_argument("--repeat", type=int, default=1, help="each pass this many times, alternated: the fastest")
    ap.add_argument("--depth", type=int, default=2, help="module names grouped to this depth below RLAN")
    ap.add_argument("--top", type=int, default=25, help="rows of each table")
    args = ap.parse_args()

    from pipeline.loader import AugmentedCache
    from pipeline.train.sampler import Sampler

    p = configuration(args.scale)
    batch = args.batch or (2 if args.scale == "stable" else 16)
    cache = AugmentedCache(args.cache)
    sampler = Sampler(len(cache), p.train.seed, batch, 1)
    order = sampler.order(0)
    mbs = [sampler.micro_batches(order, 0, s, 0)[0] for s in range(args.steps)]
    meta = not args.task_loss
    kept, moments = run_pass(p, cache, mbs, meta, args.checkpoint, flush=False, count=True)
    flushed, _ = run_pass(p, cache, mbs, meta, args.checkpoint, flush=True, count=False)
    for _ in range(args.repeat - 1):  # alternated, the fastest of each: less of the machine's other load
        for census, flush in ((kept, False), (flushed, True)):
            again, _ = run_pass(p, cache, mbs, meta, args.checkpoint, flush=flush, count=False)
            for key, row in census.rows.items():
                row[2] = min(row[2], again.rows[key][2]) if key in again.rows else row[2]
    start = f"checkpoint {args.checkpoint}" if args.checkpoint else "fresh weights"
    print(f"\nSubnormal float32 values and seconds per module: {args.scale} (hidden {p.model.hidden_dim}), "
          f"{'meta-learning on' if meta else 'task loss'}, batch {batch}, {args.steps} optimizer steps from {start}, "
          f"1 thread")
    print("\n".join(table(kept, flushed, args.depth, args.top)))
    print("\nOperations writing the most subnormal values (subnormals kept)")
    print("\n".join(top_ops(kept, flushed, args.top)))
    for k, (sub, n) in moments.items():
        print(f"\nAdamW {k} after the steps (subnormals kept): {sub:,} of {n:,} values subnormal")


if __name__ == "__main__":
    main()
