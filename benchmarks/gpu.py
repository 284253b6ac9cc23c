"""The GPU check in one command (about 5-10 minutes on one H100): `make bench-gpu` or

    python -m benchmarks.gpu [--steps N] [--smoke]

On the CUDA device, each part in a process of its own:
- the measured dense bf16 matmul peak (8192^3 GEMMs), the reference for MFU;
- bf16 training steps of the production model at the stable micro-batch (train.batch_size) with
  meta-learning on, exactly as the loop runs them: samples/s, MFU (FLOPs per sample counted as in
  benchmarks.train), peak memory, and the largest micro-batch that fits (projected from the peaks
  of two sizes, then run once to confirm);
- the same steps compiled (train.compile) against eager, with the compilation time;
- the 32-view TRM evaluation of the 400 ARC-AGI-1 evaluation tasks (random weights: the wall time
  does not depend on them);
- NCCL start-up of a one-process group (init, one all-reduce, barrier).
`--smoke` runs every part on the CPU at tiny scale (gloo instead of NCCL, aot_eager instead of
inductor, no MFU) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch

from benchmarks.common import REPO, Row, print_table
from benchmarks.evaluate import time_evaluation
from benchmarks.train import CONFIGS, count_flops, load_batch_size, throughput

GB = 1024**3


def bf16_peak_tflops(device: torch.device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0, reps = time.perf_counter(), 50
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def largest_batch(name: str, device: torch.device, cap: int) -> dict:
    """Peak memory of one meta-learning step at two sizes, the largest micro-batch (at most `cap`)
    they project to fit in 90% of the device, and that size run once (shrunk until it fits)."""
    from benchmarks.train import _setup
    from pipeline.model import RLAN
    from pipeline.runtime import autocast
    from pipeline.train.batches import prepare
    from pipeline.train.losses import training_losses
    from pipeline.train.preflight import MEMORY_MARGIN, available_memory, measure

    stable = load_batch_size()
    p, cache, sampler, order = _setup(name, device, cap)
    torch.manual_seed(0)
    model = RLAN(p.model).to(device).train()
    model.checkpoint_activations(p.train.activation_checkpointing)
    first = sampler.micro_batches(order, 0, 0, 0)[0]

    def step(n: int) -> None:
        tb = prepare(cache, type(first)(first.index, first.ids[:n], first.key), p.train, True,
                     p.model.use_hyperlora).to(device)
        with autocast(device, p.train.precision):
            loss, _ = training_losses(model, tb, p.train.temperature_start, p.train)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(8)
    small = max(stable // 4, 1)
    _, p_small = measure(step, small, device)
    _, p_stable = measure(step, stable, device)
    per_sample = (p_stable - p_small) / max(stable - small, 1)
    budget = available_memory(device) * MEMORY_MARGIN
    guess = min(cap, int(stable + (budget - p_stable) / max(per_sample, 1.0)))
    fits = stable
    while guess > stable:
        try:
            measure(step, guess, device)
            fits = guess
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            guess = int(stable + (guess - stable) * 0.8)
    return {"peak_stable_gb": p_stable / GB, "per_sample_gb": per_sample / GB, "largest": fits,
            "budget_gb": budget / GB}


def process_group_startup(backend: str) -> dict:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    t0 = time.perf_counter()
    dist.init_process_group(backend, rank=0, world_size=1)
    t = torch.ones(1, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t)
    dist.barrier()
    seconds = time.perf_counter() - t0
    dist.destroy_process_group()
    return {"seconds": seconds, "backend": backend}


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny scale")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    name = "tiny" if smoke else "production"
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: benchmarks.gpu needs a GPU (--smoke checks the script on the CPU)")
    if args.one:
        kind = args.one[0]
        out = {"peak": lambda: {} if smoke else {"tflops": bf16_peak_tflops(device)},
               "flops": lambda: count_flops(name, 4),
               "eager": lambda: throughput(name, device, args.steps, 8 if smoke else load_batch_size(), True),
               "compiled": lambda: throughput(name, device, args.steps, 8 if smoke else load_batch_size(), True,
                                              compiled=True, backend="aot_eager" if smoke else "inductor"),
               "fit": lambda: largest_batch(name, device, 64 if smoke else 4096),
               "evaluate": lambda: {k: v for k, v in time_evaluation(device, 2 if smoke else 400, CONFIGS[name]).items()
                                    if k != "evaluate"},
               "nccl": lambda: process_group_startup("gloo" if smoke else "nccl")}[kind]()
        print(json.dumps(out))
        return

    extra = ["--steps", str(args.steps)] + (["--smoke"] if smoke else [])
    t_start = time.perf_counter()
    res = {k: _child(["--one", k, *extra]) for k in ("peak", "flops", "eager", "compiled", "fit", "evaluate", "nccl")}
    rows = []
    bad = {k: v["error"] for k, v in res.items() if "error" in v}
    if "tflops" in res["peak"] and not smoke:
        rows.append(Row("measured dense bf16 matmul peak", res["peak"]["tflops"], "TFLOP/s"))
    if "gflop_meta" in res["flops"]:
        rows.append(Row("training FLOPs per sample (meta-learning on)", res["flops"]["gflop_meta"], "GFLOP"))
    for mode in ("eager", "compiled"):
        r = res[mode]
        if "samples_per_s" not in r:
            continue
        rows.append(Row(f"training, {mode}, bf16, micro-batch {8 if smoke else load_batch_size()} with meta", r["samples_per_s"],
                        "samples/s"))
        rows.append(Row(f"  {mode}: warm-up{' and compilation' if mode == 'compiled' else ''}", r["warmup_s"], "s"))
        if "tflops" in res["peak"] and "gflop_meta" in res["flops"] and not smoke:
            mfu = r["samples_per_s"] * res["flops"]["gflop_meta"] * 1e9 / (res["peak"]["tflops"] * 1e12)
            rows.append(Row(f"  {mode}: MFU against the measured peak", 100 * mfu, "%"))
    if "largest" in res["fit"]:
        f = res["fit"]
        rows += [Row("peak memory, stable micro-batch with meta", f["peak_stable_gb"], "GB"),
                 Row("memory per additional sample", f["per_sample_gb"], "GB"),
                 Row(f"largest micro-batch that fits ({f['budget_gb']:.0f} GB budget)", f["largest"], "samples")]
    if "seconds" in res["evaluate"]:
        e = res["evaluate"]
        rows.append(Row(f"evaluation: {e['tasks']} tasks, {e['views']} views (32 per test input)", e["seconds"], "s",
                        "< 120" if e["tasks"] == 400 else "", e["seconds"] < 120 if e["tasks"] == 400 else None))
    if "seconds" in res["nccl"]:
        rows.append(Row(f"{res['nccl']['backend']} start-up, one process", res["nccl"]["seconds"], "s"))
    rows.append(Row("this check, wall time", time.perf_counter() - t_start, "s", "<= 600"))
    print_table(f"GPU check ({torch.cuda.get_device_name() if not smoke else 'smoke test on the CPU'})", rows)
    for k, v in bad.items():
        print(f"{k}: failed: {v}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
