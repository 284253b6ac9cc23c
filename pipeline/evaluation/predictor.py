"""What evaluation needs from a model, per view: the predicted canvas, the log-probability of
each predicted token, the loss against the view's true output, and the DSC measures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model import RLAN
from pipeline.runtime import autocast, to_device
from pipeline.model.stablemax import log_stablemax
from pipeline.train.losses import stablemax_cross_entropy


@dataclass
class Prediction:
    tokens: np.ndarray  # (B, 30, 30) predicted token per cell
    logp: np.ndarray  # (B, 30, 30) log-probability (stablemax) of that token
    loss: np.ndarray  # (B,) stablemax cross-entropy against the view's true output
    attention_entropy: np.ndarray  # (B,) mean entropy of the clue maps, eval mode
    stop_value: np.ndarray  # (B,) mean stop probability of the clues


Predictor = Callable[[dict[str, torch.Tensor]], Prediction]


def model_predictor(model: RLAN, temperature: float, best_step: bool, device: torch.device,
                    precision: str) -> Predictor:
    """The model in eval mode, with the training precision (`train.precision`: bf16 autocast on CUDA)."""
    from pipeline.model.rlan.dsc import attention_entropy

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
                          attention_entropy(out.clues.attention).cpu().numpy(),
                          out.clues.stop_prob.float().mean(-1).cpu().numpy())

    return predict
