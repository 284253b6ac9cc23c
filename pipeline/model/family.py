"""The one interface between a model family and the rest of the pipeline, and the registry of
families (`model.family` in params.yaml).

The training loop (pipeline.train.loop) drives any family through a `Training`: its model, its
objective (one micro-batch -> loss and logged measures), its optimizer and learning-rate schedule,
how a micro-batch is prepared from the cache, and its eval-mode measurement of the held-out slice.
The evaluate stage asks the `Family` for a predictor (pipeline.evaluation.predictor), the model file
(pipeline.model.io) rebuilds a model from the configuration it recorded, and MLflow logs the model
behind the tensor interface the family gives it. Nothing else in the pipeline knows which family runs.

    rlan  pipeline/model/rlan/family.py
    trm   pipeline/model/trm/family.py
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.params import FAMILIES, EvaluateParams, Params

# Measured by every family, logged every epoch under these names (MLflow, metrics/train/epochs.tsv).
SHARED_METRICS = ("loss_total", "loss_task", "train_exact_match", "train_pixel_accuracy", "learning_rate",
                  "nonfinite_steps", "heldout_exact_match", "heldout_pixel_accuracy", "heldout_loss")

_MODULES = {name: f"pipeline.model.{name}.family" for name in FAMILIES}


class Batch(Protocol):
    """A prepared micro-batch: host tensors that move to the device (pinned first on CUDA)."""

    def to(self, device: torch.device) -> Batch: ...
    def pin(self) -> Batch: ...
    def mark_dynamic(self) -> Batch: ...


class Training(ABC):
    """A family's side of one training run, built on the device by `Family.training`."""

    model: nn.Module  # the network the optimizer trains; its weight average is the trained model
    objective: nn.Module  # forward(batch, temperature) -> (loss, {measure: 0-dim tensor})
    metrics: tuple[str, ...]  # logged every epoch, in this order: SHARED_METRICS and the family's own
    items: int  # what one epoch goes through once: cache samples (RLAN) or their pairs (TRM)
    micro_batch: int  # items per micro-batch
    ema_decay: float  # of the weight average (parameters; buffers follow the trained model)
    gradient_clip: float  # maximum gradient norm (inf: no clipping)

    @abstractmethod
    def optimizer(self) -> Any:
        """The optimizer (step, zero_grad, state_dict, load_state_dict) of `model`."""

    @abstractmethod
    def set_learning_rate(self, optimizer: Any, step: int, total: int) -> float:
        """Set the learning rates of optimizer step `step` (0-based) of `total`; returns the base rate."""

    def temperature(self, progress: float) -> float:
        """The temperature the objective gets at `progress` (0 at the first step, 1 at the last) of the
        run; a family whose objective takes none ignores it."""
        return 1.0

    def heavy(self, epoch: int) -> bool:
        """Whether epoch `epoch` (from 1) runs the family's heaviest step (what the pre-flight measures):
        its time per step is then tracked apart from the other epochs'."""
        return False

    def model_meta(self) -> dict[str, Any]:
        """What the trained model file records beside the weights for the family's predictor."""
        return {}

    @abstractmethod
    def prepare(self, mb: Any, epoch: int | None) -> Batch:
        """Micro-batch `mb` (pipeline.train.sampler.MicroBatch) of `epoch` (from 1) on the host; `None`
        for a measurement outside training (the pre-flight check): the heaviest batch, no carried state."""

    @abstractmethod
    def measure_heldout(self, model: nn.Module, heldout: dict[str, list[tuple[str, list, np.ndarray, np.ndarray]]],
                        temperature: float, device: torch.device, precision: str) -> dict[str, float]:
        """Eval-mode measures of `model` on the held-out examples (pipeline.train.loop.heldout_examples:
        per side, "eval" and "train", (task id, demonstrations, test input, test output)):
        heldout_exact_match, heldout_loss, heldout_pixel_accuracy of the evaluation side, and the
        family's own held-out ones."""


class Family(ABC):
    name: str
    section: str  # the params.yaml section its models are built from (`model`, `trm`)

    def built_with(self, model: nn.Module) -> dict[str, Any]:
        """The values of `section` that `model` was built from (what evaluate checks params.yaml against)."""
        return model.config()

    def forms(self, params: Params) -> dict[str, str] | None:
        """The module forms (key: form) a model file must have been built with to match `params`;
        None for a family without form options."""
        return None

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """The model of a configuration recorded in a model file (`model.config()`)."""

    @abstractmethod
    def training(self, params: Params, cache: Any, device: torch.device) -> Training:
        """A new model for `params` on `device`, and everything its training needs (the cache is
        pipeline.loader.AugmentedCache)."""

    @abstractmethod
    def predictor(self, model: nn.Module, meta: dict[str, Any], ep: EvaluateParams, device: torch.device,
                  precision: str) -> Any:
        """The evaluation's Predictor (pipeline.evaluation.predictor) of a trained model and its file's meta."""

    @abstractmethod
    def mlflow_model(self, model: nn.Module, meta: dict[str, Any], cache: Any
                     ) -> tuple[nn.Module, np.ndarray, tuple[int, ...]]:
        """What MLflow logs: a module (one input tensor -> logits (B, 12, 30, 30)), an input example from
        the cache directory `cache`, and the input's shape (-1 where it varies)."""


def get(name: str) -> Family:
    if name not in _MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).FAMILY


def of(model: nn.Module) -> Family:
    """The family of a built model (each model class names its family in FAMILY)."""
    return get(model.FAMILY)
