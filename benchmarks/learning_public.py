"""In-context learning on the toy tasks of benchmarks.learning, with the PUBLIC RLAN code's model.

    python -m benchmarks.learning_public --public-code /tmp/sciarc       # both toys, seeds 0 1 2 (about 40 minutes on 1 core)
    python -m benchmarks.learning_public --public-code /tmp/sciarc --toys swapped --seeds 0 --steps 600
    python -m benchmarks.learning_public --public-code /tmp/sciarc --loss rlan   # the public RLANLoss, rlan_stable's weights

`--public-code PATH` is a directory holding the public code's `sci_arc/` package at commit 74a42b0
(e.g. `git --git-dir=<mirror of peymanrah/SCI-ARC> archive 74a42b0 sci_arc | tar -x -C PATH`);
it is put on sys.path and imported, nothing of it lives in this repository. Its `sci_arc` package
imports with torch alone.

The toys, the samples and the schedule are benchmarks.learning's (`Toy`, same seed -> same
samples): fresh batches of 32 samples (as many of each task), three demonstrations and a test input
each, on a 6x6 canvas; at most `--steps` AdamW steps (lr 2e-3, betas (0.9, 0.95), weight decay 0.01
on weights of 2 and more dimensions, gradient clip 1.0: the toy's params); every 25 steps exact match
on a fixed set of 8 fresh test inputs per task, in eval mode. The model is the public `RLAN(config=
RLANConfig(...))` configured as near the toy's as its config allows (`public_config`: hidden 32,
3 solver steps, 2 clues, 2 DSC and solver-context heads, dropout 0, cross-attention context
unpooled (spatial_downsample 1), solver context on, HyperLoRA on with scaling 0.1; the config
prints at the top, the keys that differ from RLANConfig's defaults). Its DSC has no Gumbel noise
at that commit (nothing to switch off); the DSC temperature is 0.5 in training and evaluation.

Inputs: our tokens (pipeline.canvas: PAD 0, EOS 1, colour c as c + 2) become the public
convention: colour c as c, PAD and EOS both as its padding colour 10 (GridEncoder.PAD_COLOR) in
the demonstration grids and the test input, as -100 (its ignore index) in the target. The public
model predicts 10 colours on the input's canvas, no size and no EOS border: its exact match is
"every cell of the target grid right" (in these toys the output has the input's size), where ours
also asks for the EOS border.

Loss: `--loss task` (default) is the public StablemaxCrossEntropy (sci_arc/training/rlan_loss.py,
`loss_mode: stablemax` of configs/rlan_stable.yaml) on the last solver step's logits, averaged over
the batch's target cells; `--loss rlan` the public RLANLoss with rlan_stable.yaml's train weights
(entropy 0.01, sparsity 0.5 with min_clues 1.0, predicate 0.01, the rest off). Neither adds the
public leave-one-out or equivariance terms (benchmarks.learning's toy trains without them too).

A row, as benchmarks.learning.table: toy, model, seed, the first measured step at which every task
is solved (exact match 1.0 on all of its test inputs; "-" if none), the per-task exact match at the
end, the context gain there (pipeline.train.context_gain: the test inputs again with another
task's demonstrations; loss in nats per target cell, and exact match) and the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import time
from pathlib import Path

import torch

from benchmarks.learning import BATCH, EVERY, TOYS, Toy, batch_of, per_task, toy_params
from pipeline.canvas import COLOR_OFFSET
from pipeline.runtime import use_cpu
from pipeline.train.context_gain import borrow_demonstrations, gains

PUBLIC_COMMIT = "74a42b0"
PAD_COLOR, IGNORE = 10, -100  # the public code's padding colour (inputs) and ignore index (targets)
# configs/rlan_stable.yaml's train weights for the public RLANLoss (`--loss rlan`)
STABLE_LOSS = {"loss_mode": "stablemax", "lambda_entropy": 0.01, "lambda_sparsity": 0.5, "lambda_predicate": 0.01,
               "lambda_curriculum": 0.0, "lambda_deep_supervision": 0.0, "lambda_act": 0.0, "min_clues": 1.0,
               "min_clue_weight": 5.0, "ponder_weight": 0.02, "entropy_ponder_weight": 0.02}


def import_public(path: str):
    """The public code's modules (sci_arc at PUBLIC_COMMIT under `path`)."""
    root = Path(path).resolve()
    if not (root / "sci_arc" / "models" / "rlan.py").is_file():
        raise SystemExit(f"--public-code {path}: no sci_arc/models/rlan.py there")
    sys.path.insert(0, str(root))
    from sci_arc.models import rlan
    from sci_arc.training import rlan_loss

    return rlan, rlan_loss


def public_config(rlan):
    """The toy's model (module doc) in the public RLANConfig."""
    return rlan.RLANConfig(hidden_dim=32, num_solver_steps=3, max_clues=2, dsc_num_heads=2, solver_context_heads=2,
                           dropout=0.0, use_cross_attention_context=True, spatial_downsample=1,
                           use_solver_context=True, use_hyperlora=True, hyperlora_scaling=0.1)


def config_diff(rlan, config) -> dict:
    default = rlan.RLANConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def _grids(t: torch.Tensor, pad: int) -> torch.Tensor:
    t = t.long()
    return torch.where(t >= COLOR_OFFSET, t - COLOR_OFFSET, torch.full_like(t, pad))


def public_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """benchmarks.learning.batch_of's batch as the public forward_training's arguments (module doc)."""
    return {"input_grids": _grids(batch["demo_in"], PAD_COLOR), "output_grids": _grids(batch["demo_out"], PAD_COLOR),
            "test_input": _grids(batch["query_in"], PAD_COLOR), "test_output": _grids(batch["query_out"], IGNORE),
            "grid_mask": batch["demo_mask"].bool()}


def forward(model, pb: dict[str, torch.Tensor], tau: float) -> dict:
    return model.forward_training(pb["input_grids"], pb["output_grids"], pb["test_input"], grid_mask=pb["grid_mask"],
                                  temperature=tau, return_intermediates=True)


@torch.no_grad()
def measure(model, rlan_loss, examples: list, tau: float) -> dict[str, torch.Tensor]:
    """Eval-mode loss (public stablemax CE, nats per target cell) and exact match per example."""
    model.eval()
    pb = public_batch(batch_of(examples))
    logits, target = forward(model, pb, tau)["logits"], pb["test_output"]
    valid = target != IGNORE
    ce = rlan_loss.StablemaxCrossEntropy(reduction="none")(logits, target)
    exact = ((logits.argmax(1) == target) | ~valid).flatten(1).all(-1)
    return {"loss": ce.flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp_min(1), "exact": exact.float()}


def build_optimizer(model, tp) -> torch.optim.AdamW:
    """The toy's AdamW (benchmarks.learning via pipeline.model.rlan.family): no decay on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tp.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=tp.learning_rate, betas=(tp.beta1, tp.beta2))


def train_public(toy: str, seed: int, steps: int, public, loss: str = "task"):
    """Train the public model on the toy (module doc); (model, benchmarks.learning.Result-like dict)."""
    rlan, rlan_loss = public
    tp = toy_params().train
    tau = tp.temperature_start
    torch.manual_seed(seed)
    data = Toy(toy, seed)
    tests = data.examples()
    with contextlib.redirect_stdout(io.StringIO()):  # the public constructors print their module config
        model = rlan.RLAN(config=public_config(rlan))
        objective = (rlan_loss.StablemaxCrossEntropy() if loss == "task"
                     else rlan_loss.RLANLoss(max_clues=model.max_clues, **STABLE_LOSS))
    opt = build_optimizer(model, tp)
    learned_at, t0 = None, time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        pb = public_batch(batch_of(data.examples(BATCH // len(data.maps))))
        out = forward(model, pb, tau)
        if loss == "task":
            value = objective(out["logits"], pb["test_output"])
        else:
            value = objective(out["logits"], pb["test_output"], out["attention_maps"], out["stop_logits"],
                              out["predicates"], all_logits=out.get("all_logits"))["total_loss"]
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.gradient_clip)
        opt.step()
        if step % EVERY == 0 and min(per_task(tests, measure(model, rlan_loss, tests, tau)["exact"])) == 1.0:
            learned_at = step
            break
    seconds = time.perf_counter() - t0
    own = measure(model, rlan_loss, tests, tau)
    other = measure(model, rlan_loss, borrow_demonstrations(tests), tau)
    g = gains({k: v.mean() for k, v in own.items()}, {k: v.mean() for k, v in other.items()})
    return model, {"learned_at": learned_at, "exact": per_task(tests, own["exact"]),
                   "gain_loss": g["context_gain_loss"], "gain_exact": g["context_gain_exact"], "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--public-code", required=True, metavar="PATH",
                    help=f"a directory holding the public code's sci_arc/ at commit {PUBLIC_COMMIT}")
    ap.add_argument("--toys", nargs="+", default=list(TOYS), choices=list(TOYS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loss", choices=["task", "rlan"], default="task",
                    help="task: public stablemax CE on the last step; rlan: public RLANLoss, rlan_stable weights")
    args = ap.parse_args()
    use_cpu(args.threads)
    public = import_public(args.public_code)
    diff = config_diff(public[0], public_config(public[0]))
    print(f"public RLANConfig ({PUBLIC_COMMIT}), keys differing from its defaults: "
          + ", ".join(f"{k}={v}" for k, v in diff.items()) + f"; DSC temperature {toy_params().train.temperature_start}; "
          f"loss {args.loss}\n")
    model = f"public {PUBLIC_COMMIT} ({args.loss})"
    print("| toy | model | seed | solved at step | exact per task | context gain (loss) | context gain (exact) | wall s |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for toy in args.toys:
        for seed in args.seeds:
            _, r = train_public(toy, seed, args.steps, public, args.loss)
            exact = " ".join(f"{e:.2f}" for e in r["exact"])
            print(f"| {toy} | {model} | {seed} | {r['learned_at'] or '-'} | {exact} | {r['gain_loss']:.3f} "
                  f"| {r['gain_exact']:.3f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
