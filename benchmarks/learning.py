"""In-context learning on toy tasks: does RLAN learn tasks told apart only by their demonstrations?

    python -m benchmarks.learning                      # the learning table (about 10 minutes on 2 cores)
    python -m benchmarks.learning --seeds 0 1 2 --forms ffn/swiglu attention/swiglu ffn/conv attention/conv
    python -m benchmarks.learning --diagnose           # where the context goes (docs/model.md)
    python -m benchmarks.learning --diagnose --override model.spatial_downsample=2

Two toys, each a few recolouring tasks on random grids of the colours 0, 1, 3 and 5 (2x2 to 5x5, on a
6x6 canvas), every sample three demonstrations and a test input of its task:

- `four`: the recolourings {1:2, 3:4}, {1:3, 3:1}, {5:7}, {1:5, 5:1}. No one colour map solves all
  four (the first and third send 1 and 3 elsewhere than the second and fourth), and every grid
  holds colours several tasks map apart: the test output is known only from the demonstrations.
- `swapped`: {1:2, 3:4} and {1:4, 3:2} on the *same* grids (demonstration inputs and test input
  drawn once, each task's outputs made from them): a model that does not read the demonstrations
  is right on one of the two at most.

The model is the toy's (`toy_params`: 32 wide, 3 solver steps, 2 clues, support tokens unpooled,
no dropout or Gumbel noise, DSC temperature 0.5) with everything else as params.yaml has it; it
trains on fresh batches of 32 samples (as many of each task) for at most `--steps` AdamW steps and is measured every 25 on
a fixed set of 8 fresh test inputs per task. A row: the configuration (context injector / solver
candidate) and seed, the first measured step at which every task is solved exactly (exact match
1.0 on all of its test inputs; "-" if none within the steps), the per-task exact match at the end,
the context gain there (pipeline.train.context_gain: the test inputs again with another task's
demonstrations; loss in nats per cell and exact match) and the wall time.

`--diagnose` trains one configuration the same way and prints, every 100 steps: the gradient norm
reaching each part of the model (mean over those steps), the share of the injector's attention that
a query cell gives to support tokens of a demonstration cell of its own colour (against that
share under uniform attention), and the task loss with the context as given, shuffled (another
task's demonstrations) and zeroed (support tokens and task vector 0).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.common import REPO
from pipeline.canvas import COLOR_OFFSET
from pipeline.loader import batch_from_pairs, crop_canvas
from pipeline.model.rlan import family as rlan_family
from pipeline.model.rlan.model import RLAN
from pipeline.params import Params, load_params
from pipeline.runtime import use_cpu
from pipeline.train.batches import pack
from pipeline.train.context_gain import borrow_demonstrations, gains
from pipeline.train.losses import evaluation_measures, stablemax_cross_entropy, training_losses

TOYS: dict[str, list[dict[int, int]]] = {
    "four": [{1: 2, 3: 4}, {1: 3, 3: 1}, {5: 7}, {1: 5, 5: 1}],
    "swapped": [{1: 2, 3: 4}, {1: 4, 3: 2}],
}
SHARED_INPUTS = {"four": False, "swapped": True}
CANVAS, DEMOS, PER_TASK, BATCH, EVERY = 6, 3, 8, 32, 25
FORMS = ("ffn/swiglu", "attention/swiglu", "ffn/conv", "attention/conv")
PARTS = {"pair encoder": "context.", "injector": "inject.", "DSC clue queries": "dsc.", "HyperLoRA": "hyperlora.",
         "solver": "solver.", "query embedding": "embed.", "MSRE and fuse": ("msre.", "fuse.")}


def toy_params(**overrides) -> Params:
    """params.yaml with the toy's model (module doc) and `overrides` (dotted keys) on top."""
    base = {"model.hidden_dim": 32, "model.num_solver_steps": 3, "model.max_clues": 2, "model.spatial_downsample": 1,
            "model.dsc_num_heads": 2, "model.solver_context_heads": 2, "model.dropout": 0.0,
            "model.use_gumbel_softmax": False, "model.hyperlora_scaling": 0.1, "train.temperature_start": 0.5,
            "train.learning_rate": 2e-3, "train.hyperlora_lr_multiplier": 1.0}
    return load_params(REPO / "params.yaml").override({**base, **overrides})


class Toy:
    """Samples of a toy's tasks (module doc), as (task id, demonstrations, test input, test output)."""

    def __init__(self, name: str, seed: int):
        self.maps, self.shared = TOYS[name], SHARED_INPUTS[name]
        self.luts = []
        for m in self.maps:
            lut = np.arange(10, dtype=np.uint8)
            lut[list(m)] = list(m.values())
            self.luts.append(lut)
        self.rng = np.random.default_rng(seed)

    def _grid(self) -> np.ndarray:
        return self.rng.choice([0, 1, 3, 5], size=tuple(self.rng.integers(2, 6, 2))).astype(np.uint8)

    def examples(self, per_task: int = PER_TASK) -> list:
        out = []
        for _ in range(per_task):
            grids = None
            for k, lut in enumerate(self.luts):
                if grids is None or not self.shared:
                    grids = [self._grid() for _ in range(DEMOS + 1)]
                out.append((f"task{k}", [(g, lut[g]) for g in grids[:DEMOS]], grids[DEMOS], lut[grids[DEMOS]]))
        return out


def batch_of(examples: list) -> dict[str, torch.Tensor]:
    return crop_canvas(batch_from_pairs([ex[1:] for ex in examples]), CANVAS)


@torch.no_grad()
def measure(model: RLAN, examples: list, temperature: float) -> dict[str, torch.Tensor]:
    """Eval-mode loss and exact match per example."""
    model.eval()
    m = evaluation_measures(model, batch_of(examples), temperature)
    return {"loss": m["loss"], "exact": m["exact"]}


def per_task(examples: list, values: torch.Tensor) -> list[float]:
    by: dict[str, list[float]] = defaultdict(list)
    for ex, v in zip(examples, values.tolist()):
        by[ex[0]].append(v)
    return [float(np.mean(by[k])) for k in sorted(by)]


@dataclass
class Result:
    learned_at: int | None  # the first measured step with every task solved, None if none
    exact: list[float]  # per task, at the end
    gain_loss: float
    gain_exact: float
    seconds: float


def train_toy(toy: str, seed: int, steps: int, params: Params, on_step=None, stop_when_learned: bool = True) -> tuple[RLAN, Result]:
    """Train the toy model (module doc); `on_step(step, model)` after each optimizer step."""
    torch.manual_seed(seed)
    data = Toy(toy, seed)
    tests = data.examples()
    tau = params.train.temperature_start
    model = RLAN(params.model)
    opt = rlan_family.build_optimizer(model, params.train)
    learned_at, t0 = None, time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        loss, _ = training_losses(model, pack(batch_of(data.examples(BATCH // len(data.maps)))), tau, params.train)
        opt.zero_grad()
        loss.backward()
        if on_step is not None:
            on_step(step, model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.gradient_clip)
        opt.step()
        if step % EVERY == 0 and learned_at is None and min(per_task(tests, measure(model, tests, tau)["exact"])) == 1.0:
            learned_at = step
            if stop_when_learned:
                break
    seconds = time.perf_counter() - t0
    own = measure(model, tests, tau)
    other = measure(model, borrow_demonstrations(tests), tau)
    g = gains({k: v.mean() for k, v in own.items()}, {k: v.mean() for k, v in other.items()})
    return model, Result(learned_at, per_task(tests, own["exact"]), g["context_gain_loss"], g["context_gain_exact"],
                         seconds)


def form_overrides(form: str) -> dict[str, str]:
    injector, candidate = form.split("/")
    return {"model.context_injector": injector, "model.solver_candidate": candidate}


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def table(args: argparse.Namespace, extra: dict) -> None:
    print(f"| toy | injector/candidate | seed | solved at step | exact per task | context gain (loss) "
          f"| context gain (exact) | wall s |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for toy in args.toys:
        for form in args.forms:
            for seed in args.seeds:
                _, r = train_toy(toy, seed, args.steps, toy_params(**form_overrides(form), **extra))
                exact = " ".join(f"{e:.2f}" for e in r.exact)
                print(f"| {toy} | {form} | {seed} | {r.learned_at or '-'} | {exact} | {r.gain_loss:.3f} "
                      f"| {r.gain_exact:.3f} | {r.seconds:.0f} |", flush=True)


@torch.no_grad()
def attention_on_own_colour(model: RLAN, examples: list, temperature: float) -> tuple[float, float]:
    """The injector's attention (mean over heads and query cells of the grid) on support tokens
    whose demonstration-input cell has the query cell's colour, and that share under uniform
    attention over the valid tokens. Needs one token per cell (spatial_downsample 1)."""
    model.eval()
    b = batch_of(examples)
    support = model.support(b["demo_in"], b["demo_out"], b["demo_mask"])
    attn = model.inject.attn
    k, _, bias = attn.memory(support.tokens, support.token_mask)
    x = model.embed(b["query_in"])
    B, C, H, W = x.shape
    q = attn.q(attn.norm_q(x.flatten(2).transpose(1, 2))).view(B, H * W, attn.heads, -1).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, -1).mean(1)  # (B, h*w, T)
    cells = b["demo_in"].flatten(2)  # (B, D, h*w): support token t of slot d is cell t % (h*w) of demo d
    if support.tokens.shape[1] != cells.shape[1] * cells.shape[2]:
        raise ValueError("attention on own colour needs unpooled support tokens (model.spatial_downsample 1)")
    token_colour = cells.flatten(1)  # (B, T)
    query = b["query_in"].flatten(1)  # (B, h*w)
    match = (query[:, :, None] == token_colour[:, None, :]) & support.token_mask[:, None, :]
    grid = query >= COLOR_OFFSET
    share = (w * match).sum(-1)[grid].mean()
    chance = (match.sum(-1) / support.token_mask.sum(-1, keepdim=True))[grid].mean()
    return float(share), float(chance)


@torch.no_grad()
def context_losses(model: RLAN, examples: list, temperature: float) -> dict[str, float]:
    """Task loss with the context as given, shuffled (borrowed demonstrations) and zeroed."""
    model.eval()
    given = float(measure(model, examples, temperature)["loss"].mean())
    shuffled = float(measure(model, borrow_demonstrations(examples), temperature)["loss"].mean())
    b = batch_of(examples)
    ctx = model.encode_context(b["demo_in"], b["demo_out"], b["demo_mask"])
    s = ctx.support
    s.tokens, s.pooled = torch.zeros_like(s.tokens), torch.zeros_like(s.pooled)
    zero = model.task_context(s)
    out = model.solve(b["query_in"], zero, temperature, all_steps=False)
    zeroed = float(stablemax_cross_entropy(out.logits[-1], b["query_out"]).mean())
    return {"given": given, "shuffled": shuffled, "zeroed": zeroed}


def diagnose(args: argparse.Namespace, extra: dict) -> None:
    form = args.forms[0]
    params = toy_params(**form_overrides(form), **extra)
    probe = Toy(args.toys[0], 10_000 + args.seeds[0]).examples()
    tau = params.train.temperature_start
    norms: dict[str, list[float]] = defaultdict(list)
    unpooled = params.model.spatial_downsample == 1 and params.model.use_cross_attention_context
    print(f"toy {args.toys[0]}, {form}, seed {args.seeds[0]}, overrides {extra or 'none'}")
    head = ["step", *(f"grad {p}" for p in PARTS), "attention on own colour (chance)", "loss given", "shuffled", "zeroed"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))

    def on_step(step: int, model: RLAN) -> None:
        for part, prefix in PARTS.items():
            g = [p.grad.norm() ** 2 for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
            norms[part].append(float(torch.stack(g).sum().sqrt()) if g else 0.0)
        if step % 100 == 0:
            att = "%.3f (%.3f)" % attention_on_own_colour(model, probe, tau) if unpooled else "-"
            ls = context_losses(model, probe, tau)
            grads = " | ".join(f"{np.mean(norms[p]):.4f}" for p in PARTS)
            print(f"| {step} | {grads} | {att} | {ls['given']:.3f} | {ls['shuffled']:.3f} | {ls['zeroed']:.3f} |",
                  flush=True)
            norms.clear()

    train_toy(args.toys[0], args.seeds[0], args.steps, params, on_step, stop_when_learned=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toys", nargs="+", default=list(TOYS), choices=list(TOYS))
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS),
                    help="context injector / solver candidate")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="params on top of the toy's")
    ap.add_argument("--diagnose", action="store_true")
    args = ap.parse_args()
    use_cpu(args.threads)
    extra = {k: _value(v) for k, v in (o.split("=", 1) for o in args.override)}
    (diagnose if args.diagnose else table)(args, extra)


if __name__ == "__main__":
    main()
