"""TRM as a model family (pipeline.model.family): its examples, deep supervision with carried state,
the ACT loss, TRM's optimiser split and schedule, and its evaluation.

Data: an example is one stored pair of one cached version, with that version's puzzle embedding
(row = cache sample + 1; row 0 is the blank). An epoch offers every pair of every version once
(`items` = the cache's pairs): with 500 versions per task over 200 epochs, each task's pairs are
offered as often as in TRM's run (1000 augmentations, 100K epochs of one version per task).

Deep supervision: each micro-batch position (its index within the optimizer step) keeps a Carry.
Every optimizer step runs one segment of every slot; a slot whose example halted takes the new
example the micro-batch offers it, the others keep theirs and their carried states (the offered
example is then not used), as TRM's training loop does. Carries start afresh at each epoch, so
that a checkpoint (written at the end of an epoch) holds no carried state and a resumed run is the
same run.

Loss of a segment, per slot: TRM's stablemax cross-entropy over the output's cells (PAD not
supervised, EOS supervised), averaged over the micro-batch, plus q_loss_weight x the binary
cross-entropy of the halting logit against "the answer is entirely right". Measured on the slots
that halt at this segment, as TRM's: train_exact_match, train_pixel_accuracy, halt_steps (segments
they ran) and q_halt_accuracy (halting logit >= 0 exactly when the answer is right).

Optimisers: AdamW (decoupled weight decay on every parameter) for the network, SignSGD for the
puzzle embeddings, each with its own rate under the same warm-up and cosine schedule; no gradient
clipping. TRM's public code uses Adam-atan2 for the network, here AdamW.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.canvas import CANVAS
from pipeline.loader import batch_from_pairs
from pipeline.model.family import SHARED_METRICS, Family, Training
from pipeline.model.stablemax import log_stablemax
from pipeline.model.trm.model import TRM, Carry
from pipeline.model.trm.puzzle import SignSGD
from pipeline.params import EvaluateParams, Params
from pipeline.runtime import autocast
from pipeline.train.losses import cell_counts, stablemax_cross_entropy, token_accuracy
from pipeline.train.schedule import warmup_cosine

METRICS = (*SHARED_METRICS, "loss_q_halt", "halt_steps", "q_halt_accuracy", "halt_steps_eval",
           "q_halt_accuracy_eval")


@dataclass
class TRMBatch:
    """One micro-batch of examples."""

    inputs: torch.Tensor  # (B, 30, 30) uint8 input canvases
    labels: torch.Tensor  # (B, 30, 30) uint8 output canvases
    puzzle: torch.Tensor  # (B,) int64 puzzle embedding rows
    epoch: int  # training epoch (from 1; 0 outside training): carries do not cross epochs
    index: int  # position of the micro-batch in its optimizer step: whose carry it continues

    @property
    def size(self) -> int:
        return len(self.inputs)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TRMBatch:
        return dataclasses.replace(self, inputs=fn(self.inputs), labels=fn(self.labels), puzzle=fn(self.puzzle))

    def to(self, device: torch.device) -> TRMBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin(self) -> TRMBatch:
        return self._map(torch.Tensor.pin_memory)

    def mark_dynamic(self) -> TRMBatch:
        return self  # every shape is fixed: (B, 30, 30)


def act_loss(carry: Carry, logits: torch.Tensor, q_halt: torch.Tensor, q_weight: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one segment and its measures (0-dim tensors; NaN when no slot halted, which the
    loop's per-epoch means skip)."""
    target = carry.labels.view(-1, CANVAS, CANVAS)
    ce = stablemax_cross_entropy(logits, target)
    exact, right, cells = cell_counts(logits, target)
    q_loss = F.binary_cross_entropy_with_logits(q_halt, exact.float(), reduction="none")
    total = ce.mean() + q_weight * q_loss.mean()
    halted = carry.halted.float()
    n = halted.sum()

    def over_halted(v: torch.Tensor) -> torch.Tensor:
        return (v.float() * halted).sum() / n

    logs = {"loss_total": total.detach(), "loss_task": ce.detach().mean(), "loss_q_halt": q_loss.detach().mean(),
            "train_exact_match": over_halted(exact), "train_pixel_accuracy": over_halted(right / cells.clamp_min(1.0)),
            "halt_steps": over_halted(carry.steps), "q_halt_accuracy": over_halted((q_halt.detach() >= 0) == exact)}
    return total, logs


class ACTObjective(nn.Module):
    """One supervision segment of a micro-batch, continuing the carry of its position in the step."""

    def __init__(self, model: TRM, q_weight: float):
        super().__init__()
        self.model, self.q_weight = model, q_weight
        self.carries: dict[int, tuple[int, Carry]] = {}  # micro-batch index -> (epoch, carry)

    def forward(self, tb: TRMBatch, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        epoch, carry = self.carries.get(tb.index, (None, None))
        if carry is None or epoch != tb.epoch or carry.size != tb.size:
            carry = self.model.initial_carry(tb.size, tb.inputs.device)
        carry, seg = self.model.segment(carry, tb.inputs.long().flatten(1), tb.labels.long().flatten(1), tb.puzzle)
        self.carries[tb.index] = (tb.epoch, carry)
        return act_loss(carry, seg.logits, seg.q_halt, self.q_weight)


class Optimizers:
    """AdamW for the network and SignSGD for the puzzle embeddings, stepped together."""

    def __init__(self, network: torch.optim.AdamW, embedding: SignSGD):
        self.network, self.embedding = network, embedding

    def step(self) -> None:
        self.network.step()
        self.embedding.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.network.zero_grad(set_to_none)
        self.embedding.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "puzzle_embedding": self.embedding.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.embedding.load_state_dict(state["puzzle_embedding"])


def version_rows(cache: Any) -> dict[str, int]:
    """Puzzle embedding row of each task's version 0 (the identity), by task id."""
    s = cache.samples
    first = np.flatnonzero(s["version"].to_numpy() == 0)
    return {str(t): int(i) + 1 for t, i in zip(s["task_id"].to_numpy()[first], first)}


class TRMTraining(Training):
    def __init__(self, params: Params, cache: Any, device: torch.device):
        self.cfg = c = params.trm
        self.cache = cache
        self.model = TRM(c, len(cache) + 1).to(device)
        self.objective = ACTObjective(self.model, c.q_loss_weight)
        self.metrics = METRICS
        self.pair_sample = cache.pair_sample
        self.items, self.micro_batch = len(self.pair_sample), c.global_batch_size // params.train.grad_accumulation_steps
        self.ema_decay, self.gradient_clip = c.ema_decay, math.inf
        self.rows = version_rows(cache)

    def optimizer(self) -> Optimizers:
        c = self.cfg
        return Optimizers(torch.optim.AdamW(self.model.parameters(), lr=c.learning_rate, betas=(c.beta1, c.beta2),
                                            weight_decay=c.weight_decay),
                          SignSGD(self.model.puzzle, c.puzzle_emb_lr, c.puzzle_emb_weight_decay))

    def set_learning_rate(self, optimizer: Optimizers, step: int, total: int) -> float:
        c = self.cfg
        rates = {}
        for name, opt, base in (("network", optimizer.network, c.learning_rate),
                                ("embedding", optimizer.embedding, c.puzzle_emb_lr)):
            rates[name] = warmup_cosine(base, step, c.lr_warmup_steps, total, c.lr_min_ratio)
            for g in opt.param_groups:
                g["lr"] = rates[name]
        return rates["network"]

    def prepare(self, mb: Any, epoch: int | None) -> TRMBatch:
        inputs, labels = self.cache.pair_canvases(mb.ids)
        puzzle = torch.from_numpy(self.pair_sample[mb.ids] + 1)
        return TRMBatch(inputs, labels, puzzle, 0 if epoch is None else epoch, mb.index)

    @torch.no_grad()
    def measure_heldout(self, model: nn.Module, heldout: dict[str, list], temperature: float, device: torch.device,
                        precision: str) -> dict[str, float]:
        """Each evaluation-side test input with its task's identity version's embedding, all
        halt_max_steps segments. TRM reads no demonstrations (a task is its puzzle embedding): it has
        no context gain, and the training side is not measured."""
        examples = heldout.get("eval", [])
        if not examples:
            return {}
        model.eval()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("loss", "exact", "pixel", "halt", "q_right")}
        for i in range(0, len(examples), self.micro_batch):
            chunk = examples[i : i + self.micro_batch]
            batch = batch_from_pairs([([], q_in, q_out) for _, _, q_in, q_out in chunk])
            puzzle = torch.tensor([self.rows.get(task_id, 0) for task_id, *_ in chunk], device=device)
            target = batch["query_out"].to(device)
            with autocast(device, precision):
                seg, halt_at = model.solve(batch["query_in"].to(device).long().flatten(1), puzzle)
            exact, pixel = token_accuracy(seg.logits.float(), target)
            parts["loss"].append(stablemax_cross_entropy(seg.logits.float(), target))
            parts["exact"].append(exact.float())
            parts["pixel"].append(pixel)
            parts["halt"].append(halt_at.float())
            parts["q_right"].append(((seg.q_halt >= 0) == exact).float())
        mean = {k: float(torch.cat(v).mean()) for k, v in parts.items()}
        return {"heldout_exact_match": mean["exact"], "heldout_loss": mean["loss"], "heldout_pixel_accuracy": mean["pixel"],
                "halt_steps_eval": mean["halt"], "q_halt_accuracy_eval": mean["q_right"]}


def model_predictor(model: TRM, device: torch.device, precision: str):
    """Each view with its version's puzzle embedding (the blank one for a fresh view), every segment;
    the halting head's probability is the view's confidence."""
    from pipeline.evaluation.predictor import Prediction

    model.eval()

    @torch.no_grad()
    def predict(batch: dict[str, torch.Tensor]) -> Prediction:
        puzzle = batch["version"].to(device) + 1
        if int(puzzle.max()) >= model.num_puzzles:
            raise ValueError(f"a view of cache sample {int(puzzle.max()) - 1}, but the model has puzzle embeddings "
                             f"for {model.num_puzzles - 1} samples: it was trained on another cache")
        with autocast(device, precision):
            seg, halt_at = model.solve(batch["query_in"].to(device).long().flatten(1), puzzle)
        logits = seg.logits.float()
        logp, tokens = log_stablemax(logits, dim=1).max(dim=1)
        p_halt = torch.sigmoid(seg.q_halt).cpu().numpy()
        return Prediction(tokens.to(torch.uint8).cpu().numpy(), logp.cpu().numpy(),
                          stablemax_cross_entropy(logits, batch["query_out"].to(device)).cpu().numpy(),
                          {"halt_steps": halt_at.float().cpu().numpy(), "halt_probability": p_halt},
                          confidence=p_halt)

    return predict


class TRMPredictor(nn.Module):
    """TRM in eval mode behind one tensor: (B, 901) int64, each row the version's puzzle embedding row
    (0: blank) then the 900 input tokens -> the last segment's logits (B, 12, 30, 30) float32."""

    def __init__(self, model: TRM):
        super().__init__()
        self.model = model.eval()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        seg, _ = self.model.solve(rows[:, 1:].long(), rows[:, 0].long())
        return seg.logits.float()


class TRMFamily(Family):
    name, section = "trm", "trm"

    def built_with(self, model: nn.Module) -> dict[str, Any]:
        return model.config()["trm"]  # the rest of its config is the size of the puzzle table

    def build(self, config: dict[str, Any]) -> TRM:
        return TRM.from_config(config)

    def training(self, params: Params, cache: Any, device: torch.device) -> TRMTraining:
        return TRMTraining(params, cache, device)

    def predictor(self, model: nn.Module, meta: dict[str, Any], ep: EvaluateParams, device: torch.device,
                  precision: str):
        return model_predictor(model, device, precision)

    def mlflow_model(self, model: nn.Module, meta: dict[str, Any], cache: Any
                     ) -> tuple[nn.Module, np.ndarray, tuple[int, ...]]:
        from pipeline.loader import AugmentedCache

        inputs, _ = AugmentedCache(cache).pair_canvases(np.zeros(1, np.int64))
        example = np.concatenate([[[1]], inputs.flatten(1).numpy().astype(np.int64)], 1)  # sample 0's first pair
        return TRMPredictor(model), example, (-1, 1 + CANVAS * CANVAS)


FAMILY = TRMFamily()
