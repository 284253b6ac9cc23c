"""Training throughput, peak memory and FLOPs per sample of the production and a tiny RLAN.

    python -m benchmarks.train [--device cpu|cuda] [--steps N] [--batch B]

Each configuration runs in its own process (so peak memory is its own): a few optimizer steps of
the real training objective (task loss, plus LOO and equivariance from `--meta`), on batches from
`data/cache` when it exists, else random ARC-sized grids. FLOPs come from torch's FlopCounterMode
over one forward and backward. On CUDA the step runs in bf16 and model-FLOP utilisation is given
against the measured bf16 matmul peak of the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import REPO, Row, print_table

CONFIGS = {
    "production": {},
    "tiny": {"model.hidden_dim": 32, "model.num_solver_steps": 3, "model.max_clues": 3,
             "model.spatial_downsample": 4, "model.dsc_num_heads": 2, "model.solver_context_heads": 2},
}


def _batches(params, n: int, batch: int, seed: int = 0):
    from pipeline.loader import AugmentedCache, batch_from_pairs

    rng = np.random.default_rng(seed)
    if (REPO / "data/cache/manifest.json").exists():
        cache = AugmentedCache(REPO / "data/cache")
        ids = [rng.integers(0, len(cache), batch) for _ in range(n)]
        return [(cache.batch(i, rng), [cache.batch(i, rng, dihedral=rng.integers(1, 8, batch))]) for i in ids]

    def g():
        return rng.integers(0, 10, tuple(rng.integers(5, 21, 2))).astype(np.uint8)

    out = []
    for _ in range(n):
        b = batch_from_pairs([([(g(), g()) for _ in range(3)], g(), g()) for _ in range(batch)])
        out.append((b, [b]))
    return out


def bf16_peak_tflops(device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def measure(name: str, device_name: str, steps: int, batch: int, meta: bool) -> dict:
    """One configuration, in this process: samples/s, peak memory, FLOPs per sample."""
    import resource

    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import RLAN
    from pipeline.runtime import autocast, to_device
    from pipeline.train.losses import training_losses
    from pipeline.train.loop import build_optimizer
    from pipeline.params import load_params

    torch.manual_seed(0)
    device = torch.device(device_name)
    p = load_params(REPO / "params.yaml").override({**CONFIGS[name], "train.device": device_name})
    model = RLAN(p.model).to(device).train()
    opt = build_optimizer(model, p.train)
    data = [(to_device(b, device), [to_device(e, device) for e in eq]) for b, eq in _batches(p, steps + 1, batch)]

    def step(b, eq):
        with autocast(device, p.train.precision):
            loss, _ = training_losses(model, b, 1.0, p.train, meta_active=meta, equivariant_batches=eq)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        step(*data[0])
    flops = fc.get_total_flops() / batch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b, eq in data[1:]:
        step(b, eq)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    out = {"name": name, "params": sum(q.numel() for q in model.parameters()), "samples_per_s": rate,
           "flops_per_sample": flops, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        out["bf16_peak_tflops"] = bf16_peak_tflops(device)
        out["mfu"] = rate * flops / (out["bf16_peak_tflops"] * 1e12)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: 75 on CUDA, 2 on the CPU")
    ap.add_argument("--meta", action="store_true", help="include the LOO and equivariance losses")
    ap.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    batch = args.batch or (75 if args.device == "cuda" else 2)
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.steps, batch, args.meta)))
        return
    rows = []
    for name in CONFIGS:
        b = batch if name == "production" else max(batch, 16)
        cmd = [sys.executable, "-m", "benchmarks.train", "--one", name, "--device", args.device,
               "--steps", str(args.steps), "--batch", str(b)] + (["--meta"] if args.meta else [])
        r = json.loads(subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        tag = f"{name} ({r['params'] / 1e6:.2f}M params, batch {b}, {args.device})"
        rows += [Row(f"{tag}: samples/s", r["samples_per_s"], "samples/s"),
                 Row(f"{tag}: train FLOPs/sample", r["flops_per_sample"] / 1e9, "GFLOP"),
                 Row(f"{tag}: peak RSS", r["peak_rss_gb"], "GB")]
        if "mfu" in r:
            rows += [Row(f"{tag}: peak GPU memory", r["peak_gpu_gb"], "GB"),
                     Row(f"{tag}: measured bf16 peak", r["bf16_peak_tflops"], "TFLOP/s"),
                     Row(f"{tag}: MFU", 100 * r["mfu"], "%", ">= 40" if name == "production" else "",
                         r["mfu"] >= 0.4 if name == "production" else None)]
    print_table(f"Training ({'task + LOO + equivariance' if args.meta else 'task loss'})", rows)


if __name__ == "__main__":
    main()
