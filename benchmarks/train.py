"""Training cost of RLAN, measured on the objective exactly as the training loop calls it, and of TRM.

    python -m benchmarks.train [--device cpu|cuda] [--steps N] [--batch B] [--skip-memory] [--denormals]

- GFLOP per sample: torch's FlopCounterMode over forward and backward of micro-batches of the
  stable size (train.batch_size) prepared as training prepares them (`pipeline.train.batches.prepare`:
  packed context pairs, `max_holdouts` leave-one-out examples per sample, `num_augmentations`
  equivariance contexts, all from params.yaml), counted on the "meta" device (shapes only, no
  arithmetic), averaged over `--flop-batches` micro-batches; with meta-learning off (task loss) and on.
- samples/s: optimizer steps (forward, backward, AdamW) of the production and the tiny model on the
  device, batch `--batch` (2 on the CPU, the stable 75 on CUDA), meta-learning on and off.
- denormal numbers (CPU): samples/s with meta-learning on, float32 subnormals flushed (what
  training does, `train.flush_denormals`) and kept (torch's default), for the production model at
  batch `--batch` and for the experiment workflow's cpu scale (its model and meta-learning settings,
  its batch of 16), by the wall clock and per second of the process's CPU time (the ratio: the
  machine's other load changes it far less); `--denormals` measures these alone
  (docs/training.md#denormal-numbers).
- peak memory: one stable micro-batch with meta-learning, forward and backward, in a process of its
  own (float32 on the CPU, the resident set's peak; on CUDA the allocator's peak in bf16).
- projected cost of the stable configuration: 200 epochs x 400K samples at 40% of the H100's dense
  bf16 peak (989 TFLOP/s).
- RLAN's module forms: parameters (total, solver, injector, HyperLoRA), GFLOP/sample and projected
  hours of the earlier forms (model.solver_candidate conv, context_injector attention,
  hyperlora_delta factored), all three and each alone, beside the public ones of params.yaml.
  `--flops-only` stops after these counts (no timing); `--cache` names the augmented cache the
  micro-batches come from (any cache of the ARC-AGI-1 tasks: the counts depend on the batches' shapes).
- TRM (section trm, its ARC-AGI-1 configuration): GFLOP of one training segment per example and of
  one evaluated view, counted on the meta device, and its run's projected cost: every pair of the
  cache offered once per epoch, one segment per example slot and optimizer step.
The validated configuration holds every context pair out for leave-one-out (`max_holdouts: null`);
the cheaper option of one held-out pair per sample (`max_holdouts: 1`, a different experiment) is
counted beside it for comparison. Every configuration runs in a child process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, Row, print_table
from pipeline.runtime import use_cpu

CONFIGS = {
    "production": {},
    "production-one-holdout": {"train.loo_training.max_holdouts": 1},
    "tiny": {"model.hidden_dim": 32, "model.num_solver_steps": 3, "model.max_clues": 3,
             "model.spatial_downsample": 4, "model.dsc_num_heads": 2, "model.solver_context_heads": 2},
}
# the GPU check's smoke test (benchmarks.gpu --smoke): the tests' tiny scale (3 + 3 tasks, a 16-wide model)
# RLAN's earlier module forms (model.solver_candidate, context_injector, hyperlora_delta; the production
# configuration builds the public ones), all three and each alone, at the stable size
EARLIER_FORMS = {"solver_candidate": "conv", "context_injector": "attention", "hyperlora_delta": "factored"}
CONFIGS["production-earlier-forms"] = {f"model.{k}": v for k, v in EARLIER_FORMS.items()}
CONFIGS.update({f"production-{v}": {f"model.{k}": v} for k, v in EARLIER_FORMS.items()})
CONFIGS["smoke"] = {
    "model.hidden_dim": 16, "model.num_solver_steps": 2, "model.max_clues": 2, "model.spatial_downsample": 2,
    "model.dsc_num_heads": 2, "model.solver_context_heads": 2, "model.msre_encoding_dim": 8, "model.msre_num_freq": 2,
    "model.hyperlora_rank": 2, "data.max_tasks": 3, "augment.samples_per_task": 8, "train.batch_size": 3,
    "train.grad_accumulation_steps": 2, "train.heldout_tasks": 2, "train.equivariance_training.num_augmentations": 1,
    "evaluate.batch_size": 64}
CACHE = REPO / "data/cache"
H100_BF16_DENSE = 989e12
STABLE_SAMPLES = 200 * 400_000
# The previous model (before the public RLAN modules), which held one pair out per sample
BEFORE = {"samples_per_s_meta": 0.57, "gflop_task": 141.0, "gflop_meta": 276.0, "peak_gb": 5.5}


def overrides(name: str) -> dict:
    """The params.yaml overrides of configuration `name`: one of CONFIGS, or "cpu", the experiment
    workflow's cpu scale (its model and its meta-learning shortcut)."""
    if name != "cpu":
        return CONFIGS[name]
    from pipeline.experiments.runner import SCALES  # not at the top: the GPU check runs without its imports

    return {k: v for k, v in SCALES["cpu"].overrides.items()
            if k.startswith(("model.", "train.batch_size", "train.loo_training.", "train.equivariance_training."))}


def _setup(name: str, device: torch.device, batch: int, cache_dir: Path = CACHE):
    from pipeline.loader import AugmentedCache
    from pipeline.params import load_params
    from pipeline.train.sampler import Sampler

    if not (cache_dir / "manifest.json").exists():
        sys.exit(f"{cache_dir} is missing: run `dvc repro augment` first")
    p = load_params(REPO / "params.yaml").override({**overrides(name), "train.device": device.type})
    cache = AugmentedCache(cache_dir)
    sampler = Sampler(len(cache), p.train.seed, batch, 1)
    return p, cache, sampler, sampler.order(0)


def count_flops(name: str, batches: int, cache_dir: Path = CACHE) -> dict:
    """GFLOP per sample of training's forward and backward, meta-learning off and on (meta device)."""
    from pipeline.model import RLAN
    from pipeline.train.batches import prepare
    from pipeline.train.losses import training_losses
    from pipeline.train.preflight import flops

    meta_dev = torch.device("meta")
    p, cache, sampler, order = _setup(name, torch.device("cpu"), load_batch_size(name), cache_dir)
    with meta_dev:
        model = RLAN(p.model).train()
    out = {"params": sum(x.numel() for x in model.parameters()),
           **{f"params_{m}": sum(x.numel() for x in getattr(model, m).parameters()) for m in ("solver", "inject", "hyperlora")}}
    for meta in (False, True):
        total, samples = 0, 0
        for k in range(batches):
            mb = sampler.micro_batches(order, 0, k, 0)[0]
            tb = prepare(cache, mb, p.train, meta, p.model.use_hyperlora).to(meta_dev)

            def objective_step(_: int) -> None:
                loss, _ = training_losses(model, tb, p.train.temperature_start, p.train)
                loss.backward()

            counted = flops(objective_step, tb.size)
            model.zero_grad(set_to_none=True)
            total, samples = total + counted, samples + tb.size
        out["gflop_meta" if meta else "gflop_task"] = total / samples / 1e9
    return out


def count_trm_flops(segments: int) -> dict:
    """TRM's ARC-AGI-1 configuration (section trm), on the meta device: GFLOP of one training segment
    per example (forward of h_cycles x (l_cycles + 1) network applications, backward of the last
    l_cycles + 1), and of one evaluated view (halt_max_steps segments, forward only). The sequence
    is always the 900 cells and the puzzle prefix, so the count does not depend on the data."""
    from pipeline.model.trm import TRM
    from pipeline.params import load_params
    from pipeline.train.preflight import flops

    c = load_params(REPO / "params.yaml").trm
    B = 8
    with torch.device("meta"):
        model = TRM(c, num_puzzles=B + 1).train()
        inputs, puzzle = torch.zeros(B, 900, dtype=torch.long), torch.arange(1, B + 1)
        carry = model.initial_carry(B, torch.device("meta"))
    def train_segments(_: int) -> None:
        nonlocal carry
        for _ in range(segments):
            carry, seg = model.segment(carry, inputs, inputs, puzzle)
            (seg.logits.float().mean() + seg.q_halt.mean()).backward()

    train = flops(train_segments, B) / (segments * B) / 1e9
    model.eval()
    view = flops(lambda _: model.solve(inputs, puzzle), B) / B / 1e9
    return {"gflop_segment": train, "gflop_view": view, "halt_max_steps": c.halt_max_steps,
            "global_batch": c.global_batch_size, "params": sum(p.numel() for p in model.parameters())}


def load_batch_size(name: str = "production") -> int:
    """The micro-batch of configuration `name` (the stable one, train.batch_size, for the production model)."""
    from pipeline.params import load_params

    return load_params(REPO / "params.yaml").override(overrides(name)).train.batch_size


def throughput(name: str, device: torch.device, steps: int, batch: int, meta: bool, compiled: bool = False,
               backend: str = "inductor", cache_dir: Path = CACHE, warmup: int = 2) -> dict:
    """samples/s of optimizer steps, as the loop runs them (eager unless `compiled`, with `backend`),
    the micro-batches prepared beforehand; also the seconds to prepare one micro-batch on one thread
    (the loop's prefetch thread) and, on CUDA, the peak memory of the steps (AdamW's state included)."""
    from pipeline.model import RLAN
    from pipeline.model.rlan.family import build_optimizer
    from pipeline.runtime import autocast
    from pipeline.train.batches import prepare
    from pipeline.train.losses import Objective

    torch.manual_seed(0)
    p, cache, sampler, order = _setup(name, device, batch, cache_dir)
    model = RLAN(p.model).to(device).train()
    model.checkpoint_activations(p.train.activation_checkpointing)
    opt = build_optimizer(model, p.train)
    objective = Objective(model, p.train)
    fn = torch.compile(objective, backend=backend) if compiled else objective
    slots = cache.max_context() if compiled else None
    t_prep = time.perf_counter()
    data = [prepare(cache, sampler.micro_batches(order, 0, s, 0)[0], p.train, meta, p.model.use_hyperlora, slots)
            for s in range(steps + warmup)]
    prepare_s = (time.perf_counter() - t_prep) / len(data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(tb):
        tb = tb.to(device)
        if compiled:
            tb.mark_dynamic()
        with autocast(device, p.train.precision):
            loss, _ = fn(tb, p.train.temperature_start)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_first = time.perf_counter()
    for tb in data[:warmup]:  # warm-up (and compilation)
        step(tb)
    _sync(device)
    warm = time.perf_counter() - t_first
    t0, cpu0 = time.perf_counter(), time.process_time()
    for tb in data[warmup:]:
        step(tb)
    _sync(device)
    rate = steps * batch / (time.perf_counter() - t0)
    per_cpu_s = steps * batch / (time.process_time() - cpu0)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return {"params": sum(q.numel() for q in model.parameters()), "samples_per_s": rate, "samples_per_cpu_s": per_cpu_s,
            "warmup_s": warm, "prepare_s": prepare_s, "peak_gb": peak, "activation_checkpointing": model.recompute}


def peak_memory(name: str, device: torch.device, checkpointing: bool | None, pick: str = "first",
                cache_dir: Path = CACHE) -> dict:
    """Peak memory of one stable micro-batch with meta-learning (forward and backward): the first one
    of training, or the samples with the most or the fewest context pairs among 4,000."""
    from pipeline.model import RLAN
    from pipeline.runtime import autocast
    from pipeline.train.batches import prepare
    from pipeline.train.losses import training_losses
    from pipeline.train.preflight import measure

    torch.manual_seed(0)
    p, cache, sampler, order = _setup(name, device, load_batch_size(), cache_dir)
    model = RLAN(p.model).to(device).train()
    model.checkpoint_activations(p.train.activation_checkpointing if checkpointing is None else checkpointing)
    mb = sampler.micro_batches(order, 0, 0, 0)[0]
    if pick != "first":
        pool = order[:4000]
        n_ctx = np.where(cache.n_test[pool] > 0, cache.n_demo[pool], cache.n_demo[pool] - 1)
        ranked = pool[np.argsort(n_ctx, kind="stable")]
        mb = dataclasses.replace(mb, ids=ranked[-mb.ids.size:] if pick == "most" else ranked[: mb.ids.size])
    tb = prepare(cache, mb, p.train, True, p.model.use_hyperlora)

    def step(n: int) -> None:
        with autocast(device, p.train.precision):
            loss, _ = training_losses(model, tb.to(device), p.train.temperature_start, p.train)
        loss.backward()

    seconds, peak = measure(step, tb.size, device)
    return {"peak_gb": peak / 1024**3, "seconds": seconds, "checkpointing": model.recompute,
            "pairs": len(tb.pair_in), "holdouts": len(tb.loo_pair), "slots": tb.n_slots, "pick": pick}


def encoding(name: str, device: torch.device, reps: int, cache_dir: Path = CACHE) -> dict:
    """Seconds to encode the context of one stable micro-batch (forward and backward): every padding
    slot (B x D canvases), only the real pairs packed then laid out per sample (what training does),
    or bucketed (samples grouped by their number of pairs, one call per group, as a sampler that
    buckets micro-batches by demonstration count would see them)."""
    from pipeline.model import RLAN
    from pipeline.model.rlan.context import PairLayout

    torch.manual_seed(0)
    p, cache, sampler, order = _setup(name, device, load_batch_size(), cache_dir)
    enc = RLAN(p.model).to(device).train().context
    batches = [cache.batch(sampler.micro_batches(order, 0, s, 0)[0].ids, np.random.default_rng(s)) for s in range(reps)]

    def padded(b):
        B, D = b["demo_mask"].shape
        t, pooled = enc.encode_pairs(b["demo_in"].flatten(0, 1).to(device), b["demo_out"].flatten(0, 1).to(device))
        return t.sum() + pooled.sum()

    def packed(b):
        where = PairLayout.from_mask(b["demo_mask"].to(device))
        t, pooled = enc.encode_pairs(b["demo_in"].to(device)[where.sample, where.slot],
                                     b["demo_out"].to(device)[where.sample, where.slot])
        s = enc.layout(t, pooled, where)
        return s.tokens.sum() + s.pooled.sum()

    def bucketed(b):
        n = b["demo_mask"].sum(1)
        total = 0.0
        for k in n.unique().tolist():
            rows = n == k
            t, pooled = enc.encode_pairs(b["demo_in"][rows, :k].flatten(0, 1).to(device),
                                         b["demo_out"][rows, :k].flatten(0, 1).to(device))
            total = total + t.sum() + pooled.sum()
        return total

    out = {"slots": sum(int(b["demo_mask"].numel()) for b in batches) / reps,
           "pairs": sum(int(b["demo_mask"].sum()) for b in batches) / reps}
    for label, fn in (("padded", padded), ("packed", packed), ("bucketed", bucketed)):
        fn(batches[0]).backward()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            fn(b).backward()
        _sync(device)
        out[label] = (time.perf_counter() - t0) / reps
    return out


def projected_hours(gflop_per_sample: float) -> float:
    """H100-hours of the stable run (STABLE_SAMPLES) at 40% of the dense bf16 peak."""
    return STABLE_SAMPLES * gflop_per_sample * 1e9 / (0.4 * H100_BF16_DENSE) / 3600


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _child(args: list[str], cache: Path = CACHE) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train", "--cache", str(cache), "--one", *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def denormal_rows(args: argparse.Namespace, batch: int) -> list[Row]:
    """samples/s with meta-learning on, denormals flushed and kept: the production model at `batch`
    and the cpu scale at its batch (one warm-up step each; `--steps` measured). Also per second of
    the process's CPU time, which the machine's other load changes far less than the wall time: the
    ratio is taken from it."""
    rows = []
    for name, b in (("production", batch), ("cpu", load_batch_size("cpu"))):
        speed = {}
        for flush in (True, False):
            r = _child(["speed", name, "meta", "--device", args.device, "--steps", str(args.steps), "--batch", str(b),
                        "--warmup", "1", *([] if flush else ["--keep-denormals"])], args.cache)
            speed[flush] = r["samples_per_cpu_s"]
            what = "flushed" if flush else "kept (torch's default)"
            rows += [Row(f"{name} ({r['params'] / 1e6:.2f}M params, batch {b}, meta), denormals {what}: samples/s",
                         r["samples_per_s"], "samples/s"),
                     Row(f"{name}, denormals {what}: samples per CPU-second", r["samples_per_cpu_s"], "samples/s")]
        rows.append(Row(f"{name}: flushed / kept, per CPU-second", speed[True] / speed[False], "x"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: 75 on CUDA, 2 on the CPU")
    ap.add_argument("--flop-batches", type=int, default=8, help="micro-batches averaged for the FLOP count")
    ap.add_argument("--cache", type=Path, default=CACHE, help="augmentation cache (default: data/cache)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the stable micro-batch memory measurement")
    ap.add_argument("--flops-only", action="store_true",
                    help="only the counts on the meta device (FLOPs, parameters, projected hours; no timing)")
    ap.add_argument("--denormals", action="store_true",
                    help="measure only samples/s with denormals flushed and kept (the CPU)")
    ap.add_argument("--keep-denormals", action="store_true", help=argparse.SUPPRESS)  # a child: torch's default
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)  # a child: warm-up steps
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a child: what to measure
    args = ap.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (75 if device.type == "cuda" else 2)
    if args.one:
        use_cpu(torch.get_num_threads(), not args.keep_denormals)
        kind, name, *rest = args.one
        if kind == "flops":
            out = count_flops(name, args.flop_batches, args.cache)
        elif kind == "trm-flops":
            out = count_trm_flops(2)
        elif kind == "encode":
            out = encoding(name, device, args.steps, args.cache)
        elif kind == "speed":
            out = throughput(name, device, args.steps, batch, meta=rest[0] == "meta", cache_dir=args.cache,
                             warmup=args.warmup)
        else:
            out = peak_memory(name, device, None if rest[0] == "params" else rest[0] == "on", *rest[1:],
                              cache_dir=args.cache)
        print(json.dumps(out))
        return

    if args.denormals:
        print_table(f"Denormal numbers ({args.device}, {torch.get_num_threads()} threads): training speed",
                    denormal_rows(args, batch))
        return
    rows = []
    counted = {name: _child(["flops", name, "--flop-batches", str(args.flop_batches)], args.cache)
               for name in ("production", "production-one-holdout", "production-earlier-forms",
                            *(f"production-{v}" for v in EARLIER_FORMS.values()))}
    flops, one = counted["production"], counted["production-one-holdout"]
    ratio = flops["gflop_meta"] / flops["gflop_task"]
    hours = projected_hours(flops["gflop_meta"])
    rows += [Row(f"production ({flops['params'] / 1e6:.2f}M params): GFLOP/sample, task loss", flops["gflop_task"],
                 "GFLOP", f"previous model {BEFORE['gflop_task']:.0f}"),
             Row("production: GFLOP/sample, with LOO (every pair) + equivariance", flops["gflop_meta"], "GFLOP"),
             Row("production: GFLOP/sample, with LOO (one pair per sample) + equivariance", one["gflop_meta"], "GFLOP",
                 f"previous model {BEFORE['gflop_meta']:.0f}"),
             Row("production: meta-learning / task-loss FLOPs (every pair)", ratio, "x"),
             Row("stable run (80M samples) at 40% of H100 bf16 peak", hours, "H100-h", "<= 24", hours <= 24)]
    for name, c in counted.items():
        if name.startswith("production-") and name != "production-one-holdout":
            what = ("earlier forms (all three)" if name == "production-earlier-forms" else
                    "form " + next(f"{k}: {v}" for k, v in EARLIER_FORMS.items() if name == f"production-{v}"))
            sizes = ", ".join(f"{m} {c[f'params_{m}'] / 1e6:.2f}M" for m in ("solver", "inject", "hyperlora"))
            rows += [Row(f"{what} ({c['params'] / 1e6:.2f}M params: {sizes}): GFLOP/sample, task loss / with "
                         f"LOO + equivariance", c["gflop_meta"], "GFLOP", f"task {c['gflop_task']:.0f}"),
                     Row(f"{what}: stable run at 40% of H100 bf16 peak", projected_hours(c["gflop_meta"]), "H100-h")]
    if args.flops_only:
        print_table("Training cost (counted on the meta device)", rows)
        return
    trm = _child(["trm-flops", "arc-agi-1"], args.cache)
    pairs = json.loads((args.cache / "manifest.json").read_text())["pairs"]
    epochs = STABLE_SAMPLES // json.loads((args.cache / "manifest.json").read_text())["samples"]
    segments = epochs * pairs  # one segment of one example per slot and optimizer step, every pair each epoch
    trm_hours = segments * trm["gflop_segment"] * 1e9 / (0.4 * H100_BF16_DENSE) / 3600
    rows += [Row(f"TRM ({trm['params'] / 1e6:.2f}M params): GFLOP per example and segment, training", trm["gflop_segment"],
                 "GFLOP"),
             Row(f"TRM: GFLOP per evaluated view ({trm['halt_max_steps']} segments, forward)", trm["gflop_view"], "GFLOP"),
             Row(f"TRM run ({epochs} epochs x {pairs:,} pairs = {segments / 1e6:.0f}M example-segments, "
                 f"{segments // trm['global_batch']:,} steps of {trm['global_batch']}) at 40% of H100 bf16 peak",
                 trm_hours, "H100-h", "paper: about 3 days on 4 H100 (288 H100-h)")]
    for name in ("production", "tiny"):
        b = batch if name == "production" else max(batch, 16)
        for meta in ("task", "meta"):
            r = _child(["speed", name, meta, "--device", args.device, "--steps", str(args.steps), "--batch", str(b)],
                       args.cache)
            label = f"{name} ({r['params'] / 1e6:.2f}M params, batch {b}, {args.device}, {meta}): samples/s"
            target = ""
            ok = None
            if name == "production" and meta == "meta" and device.type == "cpu":
                target = f"previous model {BEFORE['samples_per_s_meta']:.2f}"
            rows.append(Row(label, r["samples_per_s"], "samples/s", target, ok))
    enc = _child(["encode", "production", "--device", args.device, "--steps", str(args.steps)], args.cache)
    for label in ("padded", "packed", "bucketed"):
        what = {"padded": f"every slot ({enc['slots']:.0f} canvases)", "packed": f"real pairs packed ({enc['pairs']:.0f})",
                "bucketed": "real pairs, one call per pair count"}[label]
        rows.append(Row(f"production: context encoding of a stable micro-batch, {what}", enc[label], "s"))
    if not args.skip_memory:
        # on the CPU: float32, activation checkpointing on (without it the stable micro-batch needs about
        # 23 GB); the first micro-batch of training, and the samples with the most and fewest pairs
        setting = "on" if device.type == "cpu" else "params"
        for pick in ("first", "most", "fewest"):
            m = _child(["memory", "production", setting, pick, "--device", args.device], args.cache)
            what = "activation checkpointing " + ("on" if m["checkpointing"] else "off")
            limit = 12 if device.type == "cpu" else None
            rows.append(Row(f"production: peak memory, micro-batch {load_batch_size()} with meta, {pick} ({what}, "
                            f"{m['pairs']} pairs in {m['slots']} slots, {m['holdouts']} held out)", m["peak_gb"], "GB",
                            f"<= {limit}" if limit else "", m["peak_gb"] <= limit if limit else None))
    if device.type == "cpu":
        rows += denormal_rows(args, batch)
    print_table(f"Training cost ({args.device}; FLOPs counted as the training loop calls the objective)", rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
