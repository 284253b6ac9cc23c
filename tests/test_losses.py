"""The training objective: encode-once LOO and equivariance against their naive definitions, no leak
of a held-out answer, the equivariance penalty on a hand-made case, the entropy switch, the
held-out draw, and what is logged when."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.augment import IDENTITY_CMAP, augment_grid
from pipeline.loader import batch_from_pairs
from pipeline.model import RLAN
from pipeline.model.dsc import attention_entropy
from pipeline.model.hyperlora import LoRA
from pipeline.train.batches import holdouts, pack
from pipeline.train.losses import equivariance, solve_examples, stablemax_cross_entropy, training_losses
from tests.helpers import TINY_MODEL, params_with

# deterministic in train mode: no dropout, no Gumbel noise (so a second pass gives the same numbers)
QUIET = dict(model__dropout=0.0, model__use_gumbel_softmax=False, train__temperature_start=0.5)


def _examples(seed: int = 0, n: int = 4, shift: int = 0):
    """n examples of grids (context pairs, query in, query out) with 1 to 4 context pairs."""
    rng = np.random.default_rng(seed)

    def g():
        return rng.integers(0, 10, tuple(rng.integers(1, 6, 2))).astype(np.uint8)

    return [([(g(), g()) for _ in range(1 + (i + shift) % 4)], g(), g()) for i in range(n)]


def _train_batch(examples, dihedrals: list[list[int]], limit: int | None):
    """A TrainBatch of the examples with leave-one-out (min 2 pairs) and the given dihedral turns
    (one list per augmentation, one id per example), built from grids."""
    tb = pack(batch_from_pairs(examples))
    sample = tb.pair_sample.numpy()
    eligible = np.bincount(sample, minlength=len(examples)) >= 2
    held = holdouts(sample, eligible, limit, np.random.default_rng(0))
    parts = []
    for a, ds in enumerate(dihedrals):
        turned = [([(augment_grid(x, d, IDENTITY_CMAP), augment_grid(y, d, IDENTITY_CMAP)) for x, y in ctx], q, o)
                  for (ctx, q, o), d in zip(examples, ds)]
        t = pack(batch_from_pairs(turned))
        parts.append((t.pair_in, t.pair_out, a * len(examples) + t.pair_sample))
    e_in, e_out, group = (torch.cat(x) for x in zip(*parts))
    return dataclasses.replace(tb, loo_pair=torch.from_numpy(held), loo_eligible=torch.from_numpy(eligible),
                               loo_on=True, equiv_in=e_in, equiv_out=e_out, equiv_group=group, n_equiv=len(dihedrals))


def _model(**kw) -> tuple[RLAN, object]:
    torch.manual_seed(0)
    p = params_with(**{**TINY_MODEL, **QUIET, **kw})
    return RLAN(p.model).train(), p.train


def _naive_total(model: RLAN, examples, tb, tp, temperature: float) -> torch.Tensor:
    """The objective as defined, re-encoding every context it needs: the main pass on the padded
    batch, each leave-one-out example as its own task, each transformed context encoded anew."""
    out = model(batch_from_pairs(examples), temperature, all_steps=False)
    logits = out.logits[-1]
    target = batch_from_pairs(examples)["query_out"]
    task = stablemax_cross_entropy(logits, target)
    clues = out.clues
    entropy = attention_entropy(clues.attention)
    total = task.mean() + tp.lambda_entropy * entropy.mean() + tp.lambda_sparsity * (
        tp.ponder_weight * (1 - clues.stop_prob).sum(-1)
        + tp.min_clue_weight * torch.relu(tp.min_clues - (1 - clues.stop_prob).sum(-1))).mean()
    # leave-one-out: sample b without pair j, asked pair j
    loo = []
    sample, slot = tb.pair_sample.tolist(), tb.pair_slot.tolist()
    for p in tb.loo_pair.tolist():
        ctx, _, _ = examples[sample[p]]
        rest = [pair for k, pair in enumerate(ctx) if k != slot[p]]
        lo = model(batch_from_pairs([(rest, ctx[slot[p]][0], ctx[slot[p]][1])]), temperature, all_steps=False)
        loo.append(stablemax_cross_entropy(lo.logits[-1], batch_from_pairs([(rest, ctx[slot[p]][0], ctx[slot[p]][1])])
                                           ["query_out"]))
    total = total + tp.loo_training.loss_weight * torch.cat(loo).mean()
    # equivariance: magnitudes of each transformed context against the original's (the fixed target)
    b = batch_from_pairs(examples)
    with torch.no_grad():
        target_mags = model.hyperlora(model.support(b["demo_in"], b["demo_out"], b["demo_mask"]).pooled,
                                      dropout=False).magnitudes()
    diffs = []
    for a in range(tb.n_equiv):
        rows = tb.equiv_group >= a * len(examples)
        rows &= tb.equiv_group < (a + 1) * len(examples)
        pooled = []
        for s in range(len(examples)):
            mine = rows & (tb.equiv_group == a * len(examples) + s)
            with torch.no_grad():
                _, pp = model.context.encode_pairs(tb.equiv_in[mine], tb.equiv_out[mine])
            pooled.append(pp.mean(0))
        mags = model.hyperlora(torch.stack(pooled), dropout=False).magnitudes()
        diffs += [mags[t] - target_mags[t] for t in mags]
    return total + tp.equivariance_training.loss_weight * (torch.stack(diffs) ** 2).mean()


@pytest.mark.parametrize("limit", [None, 1])
def test_encode_once_matches_the_naive_definitions(limit):
    """Same loss and same gradients as re-encoding every context (tiny model)."""
    model, tp = _model()
    examples = _examples()
    tb = _train_batch(examples, [[1, 2, 5, 7], [3, 6, 4, 1]], limit)
    assert len(tb.loo_pair) == (3 if limit == 1 else 2 + 3 + 4)  # the sample with one pair is skipped
    params = list(model.parameters())
    total, _ = training_losses(model, tb, 0.5, tp)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    naive = _naive_total(model, examples, tb, tp, 0.5)
    naive_grads = torch.autograd.grad(naive, params, allow_unused=True)
    assert total.item() == pytest.approx(naive.item(), rel=1e-5)
    for (name, _), g, h in zip(model.named_parameters(), grads, naive_grads):
        zero = torch.zeros(())
        g, h = (g if g is not None else zero), (h if h is not None else zero)
        assert torch.allclose(g, h, rtol=1e-3, atol=1e-6), (name, (g - h).abs().max())


def test_a_loo_example_does_not_see_its_held_out_output():
    model, tp = _model()
    model.eval()
    examples = _examples(seed=3)
    tb = _train_batch(examples, [[1, 1, 1, 1]], None)
    B = tb.size
    with torch.no_grad():
        before = solve_examples(model, tb, 0.5)[0].logits[-1]
        for i, p in enumerate(tb.loo_pair.tolist()):
            changed = tb.pair_out.clone()
            changed[p] = torch.where(changed[p] >= 2, (changed[p] - 2 + 1) % 10 + 2, changed[p])  # every colour moved
            assert not torch.equal(changed[p], tb.pair_out[p])
            after = solve_examples(model, dataclasses.replace(tb, pair_out=changed), 0.5)[0].logits[-1]
            assert torch.equal(after[B + i], before[B + i])  # the example that holds pair p out: unchanged
            others = [B + k for k, q in enumerate(tb.loo_pair.tolist())
                      if q != p and tb.pair_sample[q] == tb.pair_sample[p]]
            assert others and all(not torch.equal(after[k], before[k]) for k in others)  # its siblings see it


class _FakeContext:
    def __init__(self, pooled):
        self.pooled = pooled

    def encode_pairs(self, pair_in, pair_out):
        return None, self.pooled


class _FakeHyperLoRA:
    """Magnitude of sample b's delta for target t = |pooled[b, 0]| (A and B of rank 1)."""

    def __call__(self, pooled, dropout=True):
        n = pooled.shape[0]
        a = {"t": pooled[:, :1, None]}  # (B, 1, 1)
        b = {"t": torch.ones(n, 1, 1)}
        return LoRA(a, b, 1.0)


def test_equivariance_penalty_on_a_hand_made_case():
    """Two samples, two augmentations; turned contexts whose pairs average to known magnitudes."""
    pair_pooled = torch.tensor([[1.0], [3.0], [2.0], [5.0], [0.5]])  # pooled vector of each turned pair
    group = torch.tensor([0, 0, 1, 2, 3])  # a*B + b: (a0,b0) has pairs 1 and 3 -> 2.0; (a0,b1) 2; (a1,b0) 5; (a1,b1) .5
    model = type("M", (), {"context": _FakeContext(pair_pooled), "hyperlora": _FakeHyperLoRA()})()
    tb = type("TB", (), {"size": 2, "n_equiv": 2, "equiv_in": None, "equiv_out": None, "equiv_group": group})()
    own = torch.tensor([[2.0], [1.0]])  # the samples' own contexts: magnitudes 2 and 1
    penalty, delta = equivariance(model, tb, own)
    diffs = np.array([2.0 - 2.0, 2.0 - 1.0, 5.0 - 2.0, 0.5 - 1.0])
    assert penalty.item() == pytest.approx(np.mean(diffs**2), rel=1e-5)
    assert delta.item() == pytest.approx(np.mean(np.abs(diffs)), rel=1e-5)


def test_equivariance_is_zero_for_an_unturned_context():
    model, tp = _model()
    examples = _examples()
    tb = _train_batch(examples, [[0, 0, 0, 0]], None)
    penalty, delta = equivariance(model, tb, model.support(*(batch_from_pairs(examples)[k] for k in
                                                            ("demo_in", "demo_out", "demo_mask"))).pooled)
    assert penalty.item() < 1e-10 and delta.item() < 1e-5


@pytest.mark.parametrize("raw", [False, True])
def test_entropy_on_raw_logits_switches_the_map_the_entropy_term_reads(raw):
    model, tp = _model(model__use_gumbel_softmax=True, train__entropy_on_raw_logits=raw)
    tb = pack(batch_from_pairs(_examples()))
    torch.manual_seed(1)
    _, logs = training_losses(model, tb, 1.0, tp)
    torch.manual_seed(1)  # the same noise again: the maps of that very pass
    out, _ = solve_examples(model, tb, 1.0)
    noisy, clean = attention_entropy(out.clues.attention).mean(), attention_entropy(out.clues.raw_attention).mean()
    assert not torch.isclose(noisy, clean)
    assert logs["loss_entropy"].item() == pytest.approx((clean if raw else noisy).item(), rel=1e-5)
    assert logs["attention_entropy_train"].item() == pytest.approx(noisy.item(), rel=1e-5)  # always the maps used


def test_holdouts_are_limited_per_sample_and_seeded():
    sample = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    eligible = np.array([True, False, True, True])
    every = holdouts(sample, eligible, None, np.random.default_rng(0))
    assert every.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # sample 1 has one pair: skipped
    two = holdouts(sample, eligible, 2, np.random.default_rng(0))
    assert np.bincount(sample[two], minlength=4).tolist() == [2, 0, 2, 2] and set(two) <= set(every)
    assert two.tolist() == holdouts(sample, eligible, 2, np.random.default_rng(0)).tolist()
    draws = {tuple(holdouts(sample, eligible, 1, np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 1  # the draw depends on the seed


def test_meta_terms_are_logged_only_when_computed():
    model, tp = _model()
    plain = pack(batch_from_pairs(_examples()))
    _, logs = training_losses(model, plain, 0.5, tp)
    assert not {"loss_loo", "loss_equiv", "loo_accuracy", "equiv_delta_norm", "loo_skipped_ratio"} & set(logs)
    _, logs = training_losses(model, _train_batch(_examples(), [[1, 2, 3, 4]], 1), 0.5, tp)
    assert {"loss_loo", "loss_equiv", "loo_accuracy", "equiv_delta_norm", "loo_skipped_ratio"} <= set(logs)
    assert logs["loo_skipped_ratio"].item() == pytest.approx(0.25)  # one of four samples has a single pair
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in logs.values())


@pytest.mark.slow
def test_compiled_objective_matches_eager_without_recompiling_every_step():
    """train.compile: the objective under torch.compile gives the eager losses and gradients, and
    micro-batches with other numbers of pairs and held-out pairs reuse the compiled code after at most
    one recompilation (the canvas and the slots are static, the pair counts symbolic). The backend is
    aot_eager: dynamo's graph capture and AOT autograd as in training, without inductor's C++ code
    generation, which takes many minutes on 2 CPU cores (benchmarks/gpu.py compares inductor and
    eager on a GPU)."""
    import torch._dynamo

    from pipeline.train.losses import Objective

    model, tp = _model()
    objective = Objective(model, tp)
    torch._dynamo.reset()
    compiled = torch.compile(objective, backend="aot_eager")
    graphs, sizes = [], set()
    for seed in range(4):  # the same micro-batch size, other pairs and held-out pairs
        examples = _examples(seed=seed, n=5, shift=seed)
        tb = dataclasses.replace(_train_batch(examples, [[1 + (seed + i) % 7 for i in range(5)]], 1), n_slots=4)
        sizes.add((len(tb.pair_in), len(tb.loo_pair)))
        eager, _ = objective(tb, 0.5)
        grads = torch.autograd.grad(eager, list(model.parameters()))
        fast, logs = compiled(tb.mark_dynamic(), 0.5)
        fast_grads = torch.autograd.grad(fast, list(model.parameters()))
        assert fast.item() == pytest.approx(eager.item(), rel=1e-5) and torch.isfinite(logs["loss_equiv"])
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, fast_grads))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert len(sizes) == 4  # every batch had other numbers of pairs or held-out pairs
    assert graphs[-1] == graphs[1] <= 2, graphs


def test_activation_checkpointing_changes_memory_not_numbers():
    """Recomputed activations give the same loss and gradients, dropout and Gumbel noise included."""
    model, tp = _model(model__dropout=0.1, model__use_gumbel_softmax=True, train__temperature_start=1.0)
    tb = _train_batch(_examples(), [[1, 2, 3, 4]], 1)
    results = []
    for on in (False, True):
        model.checkpoint_activations(on)
        torch.manual_seed(5)
        total, _ = training_losses(model, tb, 1.0, tp)
        results.append((total, torch.autograd.grad(total, list(model.parameters()))))
    (a, ga), (b, gb) = results
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb))


def test_best_step_selection_in_training_trains_the_selected_step():
    """train.use_best_step_selection (an error rule unless accepted) makes the task loss read the step
    of lowest entropy per sample instead of the last one."""
    model, _ = _model(model__num_solver_steps=3)
    solver_forward = model.solver.forward

    def sharp_first_step(*args, **kw):  # step 1 made far more confident than the others: the best step
        logits = solver_forward(*args, **kw)
        return [logits[0] * 50, *logits[1:]] if len(logits) == 3 else logits

    model.solver.forward = sharp_first_step
    tb = pack(batch_from_pairs(_examples()))
    for best in (False, True):
        p = params_with(**{**TINY_MODEL, **QUIET, "model__num_solver_steps": 3,
                           "train__use_best_step_selection": best}).train
        _, logs = training_losses(model, tb, 0.5, p)
        out, target = solve_examples(model, tb, 0.5, all_steps=True)
        assert torch.equal(out.step_logits(True), out.logits[0])  # the first step is every sample's best
        read = out.logits[0] if best else out.logits[-1]
        assert logs["loss_task"].item() == pytest.approx(stablemax_cross_entropy(read, target).mean().item(), rel=1e-6)
