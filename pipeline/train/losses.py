"""The training objective and its measurements, as pure functions of the model and a batch.

    L_total = L_task + w_loo L_loo + w_equiv L_equiv
              + lambda_entropy L_entropy + lambda_kl L_kl + lambda_sparsity L_sparsity

L_task is TRM's stablemax cross-entropy on the last solver step over the answer's cells (PAD is
ignored; EOS is predicted). L_loo holds out each context pair of a sample in turn and predicts it
from the others; L_equiv compares the HyperLoRA delta magnitudes of the original and dihedrally
transformed contexts. Logged loss terms are unweighted; `loss_total` is the weighted sum.
"""

from __future__ import annotations

import math

import torch

from pipeline.canvas import PAD
from pipeline.model import RLAN, Output
from pipeline.model.dsc import attention_entropy
from pipeline.model.stablemax import log_stablemax
from pipeline.params import TrainParams


def stablemax_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean over each sample's non-PAD target cells; logits (B, C, h, w), target (B, h, w)."""
    logp = log_stablemax(logits.float(), dim=1)
    t = target.long()
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    valid = (t != PAD).float()
    return (nll * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1.0)


def token_accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact (B,) bool, pixel accuracy (B,)) over the non-PAD target cells: exact means every cell
    of the answer and its EOS border is right, which decodes to exactly the target grid."""
    pred = logits.argmax(1)
    t = target.long()
    valid = t != PAD
    right = (pred == t) & valid
    exact = (right | ~valid).all(-1).all(-1)
    return exact, right.sum((1, 2)).float() / valid.sum((1, 2)).clamp_min(1).float()


def loo_batch(batch: dict[str, torch.Tensor], min_pairs: int) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor]:
    """Leave-one-out examples: for every sample with at least `min_pairs` context pairs, one example
    per context pair, which becomes the query while the others stay context.
    Returns (the batch or None, skipped (B,) bool)."""
    mask = batch["demo_mask"]
    eligible = mask.sum(1) >= min_pairs
    b, j = torch.nonzero(mask & eligible[:, None], as_tuple=True)
    if len(b) == 0:
        return None, ~eligible
    ctx_mask = mask[b].clone()
    ctx_mask[torch.arange(len(b), device=b.device), j] = False
    return {"demo_in": batch["demo_in"][b], "demo_out": batch["demo_out"][b], "demo_mask": ctx_mask,
            "query_in": batch["demo_in"][b, j], "query_out": batch["demo_out"][b, j]}, ~eligible


def sparsity_loss(stop_prob: torch.Tensor, tp: TrainParams) -> torch.Tensor:
    """(B,) clue regularisation: a cost per clue in use, and a penalty below `min_clues`."""
    used = (1 - stop_prob).sum(-1)
    return tp.ponder_weight * used + tp.min_clue_weight * torch.relu(tp.min_clues - used)


def kl_consistency(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(B,) KL(noisy || clean) of the clue maps, averaged over clues."""
    p = noisy.flatten(2).float().clamp_min(1e-12)
    q = clean.flatten(2).float().clamp_min(1e-12)
    return (p * (p.log() - q.log())).sum(-1).mean(-1)


def _mean(x: torch.Tensor) -> float:
    return float(x.detach().float().mean()) if x.numel() else math.nan


def training_losses(model: RLAN, batch: dict[str, torch.Tensor], temperature: float, tp: TrainParams,
                    meta_active: bool, equivariant_batches: list[dict[str, torch.Tensor]] = ()
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of one micro-batch and everything logged about it."""
    out: Output = model(batch, temperature)
    logits = out.step_logits(best_step=False)  # training always uses the last step
    task = stablemax_cross_entropy(logits, batch["query_out"])
    exact, pixel = token_accuracy(logits, batch["query_out"])
    clues = out.clues
    ent_used = attention_entropy(clues.attention)
    entropy = attention_entropy(clues.raw_attention) if tp.entropy_on_raw_logits else ent_used
    kl = kl_consistency(clues.attention, clues.raw_attention)
    sparsity = sparsity_loss(clues.stop_prob, tp)
    zero = logits.new_zeros(())
    logs: dict[str, float] = {
        "train_exact_match": _mean(exact), "train_pixel_accuracy": _mean(pixel),
        "attention_entropy_train": _mean(ent_used), "stop_value_train": _mean(clues.stop_prob),
    }

    loo_loss = zero
    if meta_active and tp.loo_training.enabled:
        lb, skipped = loo_batch(batch, tp.loo_training.min_pairs_for_loo)
        logs["loo_skipped_ratio"] = _mean(skipped.float())
        if lb is not None:
            lo = model(lb, temperature).step_logits(best_step=False)
            loo_loss = stablemax_cross_entropy(lo, lb["query_out"]).mean()
            logs["loo_accuracy"] = _mean(token_accuracy(lo, lb["query_out"])[0].float())

    equiv_loss = zero
    lora = out.context.lora
    if lora is not None:
        mags = lora.magnitudes()
        logs.update({f"lora_magnitude_{t}": _mean(v) for t, v in mags.items()})
        logs["lora_diversity"] = float(lora.diversity().detach()) if len(task) > 1 else math.nan
        if meta_active and tp.equivariance_training.enabled and equivariant_batches:
            diffs = []
            for eb in equivariant_batches:
                aug = model.encode_context(eb["demo_in"], eb["demo_out"], eb["demo_mask"]).lora.magnitudes()
                diffs += [mags[t] - aug[t] for t in mags]
            d = torch.stack(diffs)
            equiv_loss = (d**2).mean()
            logs["equiv_delta_norm"] = _mean(d.abs())

    w = tp
    total = (task.mean() + w.loo_training.loss_weight * loo_loss + w.equivariance_training.loss_weight * equiv_loss
             + w.lambda_entropy * entropy.mean() + w.lambda_kl_consistency * kl.mean()
             + w.lambda_sparsity * sparsity.mean())
    logs.update({"loss_total": float(total.detach()), "loss_task": _mean(task), "loss_loo": float(loo_loss.detach()),
                 "loss_equiv": float(equiv_loss.detach()), "loss_entropy": _mean(entropy), "loss_kl": _mean(kl),
                 "loss_sparsity": _mean(sparsity)})
    return total, logs


class Objective(torch.nn.Module):
    """The training loss as one module call, so that DistributedDataParallel sees a single forward
    (the main, leave-one-out and equivariance passes) per backward."""

    def __init__(self, model: RLAN, tp: TrainParams):
        super().__init__()
        self.model, self.tp = model, tp

    def forward(self, batch, temperature: float, meta_active: bool, equivariant_batches=()):
        return training_losses(self.model, batch, temperature, self.tp, meta_active, equivariant_batches)


@torch.no_grad()
def evaluation_measures(model: RLAN, batch: dict[str, torch.Tensor], temperature: float,
                        best_step: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample measures in eval mode (the caller sets model.eval()): loss, exact, pixel accuracy,
    attention entropy and stop value, plus the output for decoding."""
    out = model(batch, temperature)
    logits = out.step_logits(best_step)
    exact, pixel = token_accuracy(logits, batch["query_out"])
    return {"loss": stablemax_cross_entropy(logits, batch["query_out"]), "exact": exact.float(), "pixel": pixel,
            "attention_entropy": attention_entropy(out.clues.attention), "stop_value": out.clues.stop_prob.mean(-1),
            "logits": logits}
