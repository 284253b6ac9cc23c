"""What evaluation needs from a model, per view: the predicted canvas, the log-probability of each
predicted token, the loss against the view's true output, the family's own per-view measures, and
optionally the model's own confidence in its answer. Each family builds its predictor
(`pipeline.model.family.Family.predictor`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Prediction:
    tokens: np.ndarray  # (B, 30, 30) predicted token per cell
    logp: np.ndarray  # (B, 30, 30) log-probability (stablemax) of that token
    loss: np.ndarray  # (B,) stablemax cross-entropy against the view's true output
    measures: dict[str, np.ndarray] = field(default_factory=dict)  # (B,) each, averaged over the views
    # (B,) the model's probability that its answer is right, ranking tied votes (TRM: its halting
    # head); None: the geometric mean probability of the answer's cells (pipeline.evaluation.runner)
    confidence: np.ndarray | None = None


# A batch of pipeline.loader's format plus `version` (B,) int64: the cache sample of each view, -1
# for a view that is not a cached version
Predictor = Callable[[dict[str, torch.Tensor]], Prediction]
