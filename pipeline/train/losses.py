"""The training objective and its measurements, as pure functions of the model and a batch.

    L_total = L_task + w_loo L_loo + w_equiv L_equiv
              + lambda_entropy L_entropy + lambda_kl L_kl + lambda_sparsity L_sparsity

L_task is TRM's stablemax cross-entropy on the last solver step (or the best step with
`train.use_best_step_selection`) over the answer's cells (PAD is ignored; EOS is predicted).

Each context pair of a micro-batch is encoded once (`TrainBatch`: packed, no padding slots). The
leave-one-out examples reuse those encodings: example (b, j) takes sample b's support with pair j's
tokens masked out and its pooled vector re-pooled over the other pairs, and predicts pair j's output
from its input; they run through the solver in the same pass as the main
queries. L_loo is their mean cross-entropy. With `loo_training.context_gradient: false` their
context is detached (the encoder learns from the main queries only, as later public code does).
`loo_accuracy` is the public code's: correct cells over all cells of the held-out answers (pixel
accuracy, micro-averaged over the examples); `loo_exact_match` the share of answers entirely right.

L_equiv is the validated code's term: HyperLoRA's deltas for each sample's transformed contexts
(`num_augmentations` dihedral turns) against those of its own context, per LoRA target
0.3 (|dW'| - |dW|)^2 + 0.7 (1 - cos(dW', dW)) (`compare: magnitude_and_direction`; `magnitude` keeps
the older norm-only term), summed over the targets, averaged over the augmentations and samples,
with gradient through both deltas. The turned contexts are the turned demonstration grids encoded
anew (`context: reencoded`, the signal the validation report asks for) or, as the validated code
builds them, the already-encoded support features turned and pooled (`rotated_features`: mean
pooling does not see the turn, so that term is zero up to rounding). Both sides with HyperLoRA's
dropout off, so the penalty compares like with like. `equiv_delta_norm` is the mean Frobenius norm of
the difference of the two deltas. The leave-one-out rows run at the DSC's default temperature 1.0,
as the validated code runs them (`loo_training.temperature: public`), or at the step's (`training`).

Logged loss terms are unweighted; `loss_total` is the weighted sum. Every logged value stays a tensor
on the device (no host synchronisation); a term that is not computed is not logged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.augment import dihedral_index

from pipeline.canvas import COLOR_OFFSET, PAD
from pipeline.model import RLAN, Output
from pipeline.model.rlan.context import PairLayout, Support, pooled_without
from pipeline.model.rlan.dsc import attention_entropy
from pipeline.model.rlan.hyperlora import LoRA
from pipeline.model.stablemax import log_stablemax
from pipeline.params import EquivarianceParams, TrainParams

if TYPE_CHECKING:
    from pipeline.train.batches import TrainBatch

# The DSC's default temperature, at which the validated code runs the leave-one-out pass
# (`train.loo_training.temperature: public`)
PUBLIC_LOO_TEMPERATURE = 1.0


def stablemax_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean over each sample's non-PAD target cells; logits (B, C, h, w), target (B, h, w)."""
    logp = log_stablemax(logits.float(), dim=1)
    t = target.long()
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    valid = (t != PAD).float()
    return (nll * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1.0)


def cell_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exact (B,) bool, right (B,), cells (B,)): exact means every non-PAD target cell (the answer
    and its EOS border) is right, which decodes to exactly the target grid; `right` counts the
    answer's cells (colours) predicted right, out of `cells`."""
    pred = logits.argmax(1)
    t = target.long()
    valid = t != PAD
    exact = ((pred == t) | ~valid).all(-1).all(-1)
    colour = t >= COLOR_OFFSET
    return exact, ((pred == t) & colour).sum((1, 2)).float(), colour.sum((1, 2)).float()


def token_accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact (B,) bool, pixel accuracy (B,)): the share of the answer's cells predicted right."""
    exact, right, cells = cell_counts(logits, target)
    return exact, right / cells.clamp_min(1.0)


def sparsity_loss(stop_prob: torch.Tensor, tp: TrainParams) -> torch.Tensor:
    """(B,) clue regularisation: a cost per clue in use, and a penalty below `min_clues`."""
    used = (1 - stop_prob).sum(-1)
    return tp.ponder_weight * used + tp.min_clue_weight * torch.relu(tp.min_clues - used)


def kl_consistency(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(B,) KL(noisy || clean) of the clue maps, averaged over clues."""
    p = noisy.flatten(2).float().clamp_min(1e-12)
    q = clean.flatten(2).float().clamp_min(1e-12)
    return (p * (p.log() - q.log())).sum(-1).mean(-1)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def equivariance_penalty(original: LoRA, turned: LoRA, compare: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, mean ||dW' - dW||_F) of the deltas `turned` against `original`, row by row (the same
    rows: a sample's transformed context against its own). Per LoRA target, with n = |dW|, n' = |dW'|
    (Frobenius norms of the scaled deltas) and cos their cosine, the validated code's term
    0.3 (n' - n)^2 + 0.7 (1 - cos) (`magnitude_and_direction`; cos = <dW, dW'> / ((n + 1e-8)(n' + 1e-8)),
    its unit vectors' epsilon) or the older (n' - n)^2 (`magnitude`); summed over the targets, averaged
    over the rows (the samples and the augmentations). Gradient flows into both sides."""
    norm0, norm = original.magnitudes(), turned.magnitudes()
    inner = turned.inner(original)
    terms, gaps = [], []
    for t in norm0:
        term = (norm[t] - norm0[t]) ** 2
        if compare == "magnitude_and_direction":
            term = 0.3 * term + 0.7 * (1 - inner[t] / ((norm[t] + 1e-8) * (norm0[t] + 1e-8)))
        terms.append(term)
        n, n0, i = norm[t].detach(), norm0[t].detach(), inner[t].detach()
        gaps.append((n**2 + n0**2 - 2 * i).clamp_min(0).sqrt())
    return torch.stack(terms).sum(0).mean(), torch.stack(gaps).mean()


def turned_contexts(model: RLAN, tb: TrainBatch, tokens: torch.Tensor, how: str) -> torch.Tensor:
    """(A * B, H) float32 pooled contexts of the transformed tasks, row a * B + b for augmentation a of
    sample b. `reencoded`: the turned demonstration grids (`tb.equiv_in/out`) encoded anew, with
    gradient. `rotated_features`: the validated code's construction: each pair's encoded square token
    map (`tokens` (N, T, H), T = S*S) turned by the augmentation's dihedral transform, then pooled; the mean
    over the cells does not see the turn, so these are the original contexts up to rounding."""
    B, A = tb.size, tb.n_equiv
    if how == "reencoded":
        _, pair_pooled = model.context.encode_pairs(tb.equiv_in, tb.equiv_out)
        group = tb.equiv_group
    else:
        S = math.isqrt(tokens.shape[1])
        perms = torch.from_numpy(np.stack([dihedral_index(S, S, d) for d in range(8)]).astype(np.int64))
        perms = perms.to(tokens.device)
        group = torch.cat([a * B + tb.pair_sample for a in range(A)])
        turn = tb.equiv_turn[group]  # (A * N,) the transform of each copy of each pair
        index = perms[turn][:, :, None].expand(-1, -1, tokens.shape[2])
        pair_pooled = tokens.float().repeat(A, 1, 1).gather(1, index).mean(1)
    count = pair_pooled.new_zeros(A * B).index_add(0, group, torch.ones_like(group, dtype=pair_pooled.dtype))
    total = pair_pooled.new_zeros(A * B, pair_pooled.shape[1]).index_add(0, group, pair_pooled.float())
    return total / count.clamp_min(1.0)[:, None]


def equivariance(model: RLAN, tb: TrainBatch, pooled: torch.Tensor, tokens: torch.Tensor,
                 eq: EquivarianceParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The equivariance term of a micro-batch: HyperLoRA's deltas for each sample's transformed
    contexts against those of its own context (`pooled` (B, H)), both with HyperLoRA's dropout off
    (like is compared with like) and both with gradient."""
    B, A = tb.size, tb.n_equiv
    own = model.hyperlora(pooled, dropout=False).rows(torch.arange(B, device=pooled.device).repeat(A))
    turned = model.hyperlora(turned_contexts(model, tb, tokens, eq.context), dropout=False)
    return equivariance_penalty(own, turned, eq.compare)


def solve_examples(model: RLAN, tb: TrainBatch, temperature: float, all_steps: bool = False,
                   context_gradient: bool = True, loo_temperature: float | None = None
                   ) -> tuple[Output, torch.Tensor, torch.Tensor]:
    """The main queries (rows 0..B-1) and the leave-one-out examples (rows B..B+L-1) in one pass of
    the solver, every context pair encoded once; (output, targets, the pairs' tokens (N, T, H)).
    The LOO rows' DSC runs at `loo_temperature` (default: `temperature`)."""
    B = tb.size
    tokens, pooled = model.context.encode_pairs(tb.pair_in, tb.pair_out)
    support = model.context.layout(tokens, pooled, PairLayout(tb.pair_sample, tb.pair_slot, B, tb.n_slots))
    if not len(tb.loo_pair):
        return model.solve(tb.query_in, model.task_context(support), temperature, all_steps), tb.query_out, tokens
    held = tb.loo_pair  # example (b, j): sample b's support without pair j, asked pair j's input
    loo = support.select(tb.pair_sample[held]).without(tb.pair_slot[held], pooled_without(pooled, tb.pair_sample, held))
    if not context_gradient:
        loo = loo.detached()
    context = model.task_context(Support.cat([support, loo]))
    if loo_temperature is not None and loo_temperature != temperature:  # one temperature per row
        dev = tb.query_in.device
        temperature = torch.cat([torch.full((B,), float(temperature), device=dev),
                                 torch.full((len(held),), float(loo_temperature), device=dev)])
    out = model.solve(torch.cat([tb.query_in, tb.pair_in[held]]), context, temperature, all_steps)
    return out, torch.cat([tb.query_out, tb.pair_out[held]]), tokens


def training_losses(model: RLAN, tb: TrainBatch, temperature: float, tp: TrainParams
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss of one micro-batch and everything logged about it (0-dim tensors)."""
    B, L = tb.size, len(tb.loo_pair)
    best = tp.use_best_step_selection
    out, target, tokens = solve_examples(model, tb, temperature, all_steps=best,
                                         context_gradient=tp.loo_training.context_gradient,
                                         loo_temperature=PUBLIC_LOO_TEMPERATURE
                                         if tp.loo_training.temperature == "public" else None)
    context = out.context
    logits = out.step_logits(best)
    ce = stablemax_cross_entropy(logits, target)
    exact, right, cells = cell_counts(logits, target)
    pixel = right / cells.clamp_min(1.0)

    task = ce[:B]
    clues = out.clues.rows(slice(0, B))
    ent_used = attention_entropy(clues.attention)
    entropy = attention_entropy(clues.raw_attention) if tp.entropy_on_raw_logits else ent_used
    kl = kl_consistency(clues.attention, clues.raw_attention)
    sparsity = sparsity_loss(clues.stop_prob, tp)
    total = (task.mean() + tp.lambda_entropy * entropy.mean() + tp.lambda_kl_consistency * kl.mean()
             + tp.lambda_sparsity * sparsity.mean())
    logs: dict[str, torch.Tensor] = {
        "loss_task": _mean(task), "loss_entropy": _mean(entropy), "loss_kl": _mean(kl),
        "loss_sparsity": _mean(sparsity), "train_exact_match": _mean(exact[:B]),
        "train_pixel_accuracy": _mean(pixel[:B]), "attention_entropy_train": _mean(ent_used),
        "stop_value_train": _mean(clues.stop_prob),
    }
    if tb.loo_on:
        logs["loo_skipped_ratio"] = _mean(~tb.loo_eligible)
    if L:
        loo = ce[B:].mean()
        total = total + tp.loo_training.loss_weight * loo
        logs.update(loss_loo=_mean(loo), loo_accuracy=right[B:].sum() / cells[B:].sum().clamp_min(1.0),
                    loo_exact_match=_mean(exact[B:]))

    if context.lora is not None:
        lora = context.lora.rows(slice(0, B))
        logs.update({f"lora_magnitude_{t}": _mean(v) for t, v in lora.magnitudes().items()})
        logs["lora_diversity"] = lora.diversity()
        if tb.n_equiv:
            penalty, delta = equivariance(model, tb, context.pooled[:B], tokens, tp.equivariance_training)
            total = total + tp.equivariance_training.loss_weight * penalty
            logs.update(loss_equiv=_mean(penalty), equiv_delta_norm=delta)
    logs["loss_total"] = _mean(total)
    return total, logs


class Objective(torch.nn.Module):
    """The training loss as one module call, so that DistributedDataParallel sees a single forward
    (main queries, leave-one-out examples and equivariance encodings) per backward."""

    def __init__(self, model: RLAN, tp: TrainParams):
        super().__init__()
        self.model, self.tp = model, tp

    def forward(self, tb: TrainBatch, temperature: float):
        return training_losses(self.model, tb, temperature, self.tp)


@torch.no_grad()
def evaluation_measures(model: RLAN, batch: dict[str, torch.Tensor], temperature: float,
                        best_step: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample measures in eval mode (the caller sets model.eval()): loss, exact, pixel accuracy,
    attention entropy and stop value, plus the output for decoding."""
    out = model(batch, temperature, all_steps=best_step)
    logits = out.step_logits(best_step)
    exact, pixel = token_accuracy(logits, batch["query_out"])
    return {"loss": stablemax_cross_entropy(logits, batch["query_out"]), "exact": exact.float(), "pixel": pixel,
            "attention_entropy": attention_entropy(out.clues.attention), "stop_value": out.clues.stop_prob.mean(-1),
            "logits": logits}
