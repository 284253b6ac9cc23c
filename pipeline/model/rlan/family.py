"""RLAN as a model family (pipeline.model.family): its objective and batches (pipeline.train.losses,
pipeline.train.batches), AdamW with HyperLoRA's learning-rate multiplier, the DSC temperature and
meta-learning schedules, and its evaluation measures (attention entropy, stop value, context gain)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.loader import batch_from_pairs
from pipeline.model.family import Family, Training
from pipeline.model.rlan.dsc import attention_entropy
from pipeline.model.rlan.model import RLAN
from pipeline.model.stablemax import log_stablemax
from pipeline.params import PUBLIC_FORMS, EvaluateParams, Params, TrainParams
from pipeline.runtime import autocast, to_device
from pipeline.train import context_gain, schedule
from pipeline.train.batches import TrainBatch, prepare
from pipeline.train.losses import (
    Objective,
    evaluation_measures,
    stablemax_cross_entropy,
)

# Logged every epoch, to MLflow and metrics/train/epochs.tsv, under exactly these names.
METRICS = (
    "loss_total", "loss_task", "loss_loo", "loss_equiv", "loss_entropy", "loss_kl", "loss_sparsity",
    "train_exact_match", "train_pixel_accuracy",
    "lora_magnitude_gru_reset", "lora_magnitude_gru_update", "lora_magnitude_gru_candidate",
    "lora_magnitude_output_head", "lora_diversity", "loo_accuracy", "loo_exact_match", "loo_skipped_ratio",
    "equiv_delta_norm",
    "attention_entropy_train", "attention_entropy_eval", "stop_value_train", "stop_value_eval",
    "temperature", "learning_rate", "nonfinite_steps", "heldout_exact_match", "heldout_pixel_accuracy", "heldout_loss",
    "context_gain_loss_train", "context_gain_exact_train", "context_gain_loss_eval", "context_gain_exact_eval",
)


def build_optimizer(model: RLAN, tp: TrainParams) -> torch.optim.AdamW:
    """AdamW; HyperLoRA learns at hyperlora_lr_multiplier x the rate; no decay on biases and norms."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        groups[(name.startswith("hyperlora."), p.dim() >= 2)].append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr_mult": tp.hyperlora_lr_multiplier if hyper else 1.0,
          "weight_decay": tp.weight_decay if decay else 0.0} for (hyper, decay), ps in sorted(groups.items())],
        lr=tp.learning_rate, betas=(tp.beta1, tp.beta2))


@torch.no_grad()
def _means(model: RLAN, examples, temperature: float, batch_size: int, device, precision) -> dict[str, float]:
    acc: dict[str, list[torch.Tensor]] = defaultdict(list)
    for i in range(0, len(examples), batch_size):
        batch = to_device(batch_from_pairs([ex[1:] for ex in examples[i : i + batch_size]]), device)
        with autocast(device, precision):
            m = evaluation_measures(model, batch, temperature)
        for k in ("loss", "exact", "attention_entropy", "stop_value", "pixel"):
            acc[k].append(m[k].float().cpu())
    return {k: float(torch.cat(v).mean()) for k, v in acc.items()}


def measure_heldout(model: RLAN, heldout: dict[str, list], temperature: float, batch_size: int, device, precision
                    ) -> dict[str, float]:
    """Eval-mode measures of the held-out examples (pipeline.train.loop.heldout_examples), each
    (task id, demonstrations, test input, test output): on the evaluation side its exact match,
    loss, pixel accuracy and the DSC's measures; on both sides the context gain
    (pipeline.train.context_gain), the same examples measured again with another task's demonstrations."""
    model.eval()
    out: dict[str, float] = {}
    for side, examples in heldout.items():
        if not examples:
            continue
        own = _means(model, examples, temperature, batch_size, device, precision)
        if side == "eval":
            out.update({"heldout_exact_match": own["exact"], "heldout_loss": own["loss"],
                        "heldout_pixel_accuracy": own["pixel"], "attention_entropy_eval": own["attention_entropy"],
                        "stop_value_eval": own["stop_value"]})
        borrowed = context_gain.borrow_demonstrations(examples)
        if borrowed is not None:
            other = _means(model, borrowed, temperature, batch_size, device, precision)
            out.update({f"{k}_{side}": v for k, v in context_gain.gains(own, other).items()})
    return out


class RLANTraining(Training):
    def __init__(self, params: Params, cache: Any, device: torch.device):
        tp = self.tp = params.train
        self.cache, self.use_hyperlora = cache, params.model.use_hyperlora
        self.model = RLAN(params.model).to(device)
        self.model.checkpoint_activations(tp.activation_checkpointing)
        self.objective = Objective(self.model, tp)
        self.metrics = METRICS
        self.items, self.micro_batch = len(cache), tp.batch_size
        self.ema_decay, self.gradient_clip = tp.ema_decay, tp.gradient_clip
        self.slots = cache.max_context() if tp.compile else None  # compiled: a static number of context slots

    def optimizer(self) -> torch.optim.AdamW:
        return build_optimizer(self.model, self.tp)

    def set_learning_rate(self, optimizer: torch.optim.AdamW, step: int, total: int) -> float:
        lr = schedule.learning_rate(self.tp, step / max(total - 1, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        return lr

    def temperature(self, progress: float) -> float:
        return schedule.temperature(self.tp, progress)  # the DSC's, decayed from temperature_start

    def heavy(self, epoch: int) -> bool:
        return schedule.meta_learning_active(self.tp, epoch)  # leave-one-out and equivariance passes

    def model_meta(self) -> dict[str, Any]:
        return {"temperature": schedule.temperature(self.tp, 1.0)}  # the predictor's, the run's last

    def prepare(self, mb: Any, epoch: int | None) -> TrainBatch:
        meta = epoch is None or self.heavy(epoch)  # the pre-flight: meta on, the heaviest
        return prepare(self.cache, mb, self.tp, meta, self.use_hyperlora, self.slots)

    def measure_heldout(self, model: nn.Module, heldout: dict[str, list], temperature: float, device: torch.device,
                        precision: str) -> dict[str, float]:
        return measure_heldout(model, heldout, temperature, self.tp.batch_size, device, precision)


def model_predictor(model: RLAN, temperature: float, best_step: bool, device: torch.device, precision: str):
    """The model in eval mode, with the training precision (`train.precision`: bf16 autocast on CUDA)."""
    from pipeline.evaluation.predictor import Prediction

    model.eval()

    @torch.no_grad()
    def predict(batch: dict[str, torch.Tensor]) -> Prediction:
        b = to_device(batch, device)
        with autocast(device, precision):
            out = model(b, temperature, all_steps=best_step)
            logits = out.step_logits(best_step).float()
        logp, tokens = log_stablemax(logits, dim=1).max(dim=1)
        return Prediction(tokens.to(torch.uint8).cpu().numpy(), logp.cpu().numpy(),
                          stablemax_cross_entropy(logits, b["query_out"]).cpu().numpy(),
                          {"attention_entropy": attention_entropy(out.clues.attention).cpu().numpy(),
                           "stop_value": out.clues.stop_prob.float().mean(-1).cpu().numpy()})

    return predict


class RLANFamily(Family):
    name, section = "rlan", "model"

    def forms(self, params: Params) -> dict[str, str]:
        return {k: getattr(params.model, k) for k in PUBLIC_FORMS}

    def build(self, config: dict[str, Any]) -> RLAN:
        return RLAN.from_config(config)

    def training(self, params: Params, cache: Any, device: torch.device) -> RLANTraining:
        return RLANTraining(params, cache, device)

    def predictor(self, model: nn.Module, meta: dict[str, Any], ep: EvaluateParams, device: torch.device,
                  precision: str):
        return model_predictor(model, meta["temperature"], ep.use_best_step_selection, device, precision)

    def mlflow_model(self, model: nn.Module, meta: dict[str, Any], cache: Any
                     ) -> tuple[nn.Module, np.ndarray, tuple[int, ...]]:
        from pipeline.canvas import CANVAS
        from pipeline.tracking.mlflow_model import RLANPredictor, example_views

        return RLANPredictor(model, meta["temperature"]), example_views(cache), (-1, -1, CANVAS, CANVAS)


FAMILY = RLANFamily()
