"""The training objective against its definition, and the edits each test is meant to catch.

Checked by making each edit and seeing the named test fail:
- equivariance computed under no_grad (no gradient from the term): test_encode_once_matches_the_definitions,
  test_equivariance_gradient_flows_through_both_sides;
- either side of the equivariance comparison detached, the 0.3/0.7 weights swapped, the cosine
  dropped: test_equivariance_penalty_is_the_public_formula;
- the LOO rows run at the step's temperature under `public` (or at 1.0 under `training`):
  test_loo_temperature_is_the_public_default;
- prepare() putting every transformed context in group 0 (a wrong grouping):
  test_prepare_groups_each_transformed_context_with_its_sample;
- activation checkpointing never applied: test_activation_checkpointing_keeps_fewer_activations;
- a LOO example reading its own held-out output: test_a_loo_example_does_not_see_its_held_out_output;
- loo_accuracy as exact match, or counting the EOS border: test_loo_accuracy_is_pixel_accuracy_over_the_held_out_answers;
- the LOO pooled vectors rounded to bf16 under autocast: test_loo_pooled_vectors_stay_float32_under_bf16_autocast;
- context_gradient ignored: test_loo_context_gradient_switch.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.augment import IDENTITY_CMAP, augment_grid
from pipeline.loader import batch_from_pairs
from pipeline.model import RLAN
from pipeline.model.rlan.context import PairLayout, Support
from pipeline.model.rlan.dsc import attention_entropy
from pipeline.model.rlan.hyperlora import LoRA
from pipeline.train.batches import holdouts, pack
from pipeline.train.losses import (
    PUBLIC_LOO_TEMPERATURE,
    equivariance,
    equivariance_penalty,
    solve_examples,
    turned_contexts,
    stablemax_cross_entropy,
    training_losses,
)
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
                               loo_on=True, equiv_in=e_in, equiv_out=e_out, equiv_group=group,
                               equiv_turn=torch.tensor(dihedrals).reshape(-1), n_equiv=len(dihedrals))


def _model(**kw) -> tuple[RLAN, object]:
    torch.manual_seed(0)
    p = params_with(**{**TINY_MODEL, **QUIET, **kw})
    return RLAN(p.model).train(), p.train


def _support_by_hand(model: RLAN, pairs) -> Support:
    """One sample's encoded context written out: each pair encoded alone, the tokens side by side, the
    pooled vector the mean of the pairs' (no packing, no layout, no index bookkeeping)."""
    enc = [model.context.encode_pairs(*(batch_from_pairs([([p], p[0], p[1])])[k][:, 0] for k in ("demo_in", "demo_out")))
           for p in pairs]
    tokens = torch.cat([t for t, _ in enc], 1)
    return Support(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), torch.cat([p for _, p in enc]).mean(0, keepdim=True),
                   enc[0][0].shape[1])


def _solve_by_hand(model: RLAN, pairs, query, answer, temperature: float):
    """(cross-entropy (1,), outputs) of one query under the context of `pairs`."""
    q = batch_from_pairs([(pairs, query, answer)])
    out = model.solve(q["query_in"], model.task_context(_support_by_hand(model, pairs)), temperature)
    return stablemax_cross_entropy(out.logits[-1], q["query_out"]), out


def _public_equivariance(own: LoRA, turned: LoRA, compare: str = "magnitude_and_direction") -> torch.Tensor:
    """(rows,) the validated code's term written out on the explicit deltas: per target, flatten each
    row's scaled delta, n = its norm, the unit vector delta / (n + 1e-8); 0.3 (n' - n)^2 + 0.7 (1 - cos)
    (or (n' - n)^2 alone for the older form), summed over the targets."""
    total = 0
    for t in own.magnitudes():
        d0, d1 = own.deltas(t).flatten(1), turned.deltas(t).flatten(1)
        n0, n1 = torch.linalg.norm(d0, dim=1), torch.linalg.norm(d1, dim=1)
        term = (n0 - n1) ** 2
        if compare == "magnitude_and_direction":
            cos = ((d0 / (n0[:, None] + 1e-8)) * (d1 / (n1[:, None] + 1e-8))).sum(1)
            term = 0.3 * term + 0.7 * (1 - cos)
        total = total + term
    return total


def _reference_terms(model: RLAN, examples, dihedrals, tp, temperature: float) -> dict[str, torch.Tensor]:
    """Every term of the objective from its definition, sample by sample, from the grids alone:
    each leave-one-out example (every pair of every sample with two or more, at the public
    temperature 1.0) and each transformed context (the sample's grids turned by augment_grid) built
    and encoded anew, compared by the public formula with gradient on both sides."""
    task, entropy, sparsity, loo, equiv = [], [], [], [], []
    for pairs, query, answer in examples:
        ce, out = _solve_by_hand(model, pairs, query, answer, temperature)
        used = (1 - out.clues.stop_prob).sum(-1)
        task.append(ce)
        entropy.append(attention_entropy(out.clues.attention))
        sparsity.append(tp.ponder_weight * used + tp.min_clue_weight * torch.relu(tp.min_clues - used))
        if len(pairs) >= tp.loo_training.min_pairs_for_loo:
            loo += [_solve_by_hand(model, pairs[:j] + pairs[j + 1 :], x, y, 1.0)[0] for j, (x, y) in enumerate(pairs)]
    for turns in dihedrals:  # one augmentation: a dihedral id per sample
        for (pairs, _, _), d in zip(examples, turns):
            own = model.hyperlora(_support_by_hand(model, pairs).pooled, dropout=False)
            turned = _support_by_hand(model, [(augment_grid(x, d, IDENTITY_CMAP), augment_grid(y, d, IDENTITY_CMAP))
                                              for x, y in pairs]).pooled
            equiv.append(_public_equivariance(own, model.hyperlora(turned, dropout=False)))
    w = tp
    terms = {"loss_task": torch.cat(task).mean(), "loss_entropy": torch.cat(entropy).mean(),
             "loss_sparsity": torch.cat(sparsity).mean(), "loss_loo": torch.cat(loo).mean(),
             "loss_equiv": torch.cat(equiv).mean()}
    terms["loss_total"] = (terms["loss_task"] + w.lambda_entropy * terms["loss_entropy"]
                           + w.lambda_sparsity * terms["loss_sparsity"] + w.loo_training.loss_weight * terms["loss_loo"]
                           + w.equivariance_training.loss_weight * terms["loss_equiv"])
    return terms


DIHEDRALS = [[1, 2, 5, 7], [3, 6, 4, 1]]


@pytest.mark.slow
def test_encode_once_matches_the_definitions():
    """Every logged term, the total and every gradient equal the objective computed from its definition
    sample by sample (tiny model; every pair held out; the equivariance weight raised so that its
    gradient is far above the tolerance)."""
    model, tp = _model(train__equivariance_training__loss_weight=100.0, model__hyperlora_init_scale=1.0)
    examples = _examples()
    tb = _train_batch(examples, DIHEDRALS, None)
    assert len(tb.loo_pair) == 2 + 3 + 4  # the sample with one pair is skipped
    params = list(model.parameters())
    total, logs = training_losses(model, tb, 0.5, tp)
    ref = _reference_terms(model, examples, DIHEDRALS, tp, 0.5)
    for name, value in ref.items():
        assert logs[name].item() == pytest.approx(value.item(), rel=1e-4), name
    assert ref["loss_equiv"].item() * 100.0 > 1e-3 * ref["loss_total"].item()  # the term is visible
    grads = torch.autograd.grad(total, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref["loss_total"], params, allow_unused=True)
    for (name, _), g, h in zip(model.named_parameters(), grads, ref_grads):
        zero = torch.zeros(())
        g, h = (g if g is not None else zero), (h if h is not None else zero)
        assert _close(g, h), (name, float((g - h).norm()), float(h.norm()))


def _close(g: torch.Tensor, h: torch.Tensor) -> bool:
    """Gradients equal up to float32 rounding: the difference within 1e-3 of the reference's norm."""
    return float((g - h).norm()) <= 1e-3 * float(h.norm()) + 1e-6


@pytest.mark.slow
def test_equivariance_gradient_flows_through_both_sides():
    """The penalty's gradient equals the reference's and trains HyperLoRA and the context encoder
    through both sides: the original context and the re-encoded turned one."""
    model, tp = _model(model__hyperlora_init_scale=1.0)
    examples = _examples()
    tb = _train_batch(examples, DIHEDRALS, None)
    tokens, pair_pooled = model.context.encode_pairs(tb.pair_in, tb.pair_out)
    own = model.context.layout(tokens, pair_pooled, PairLayout(tb.pair_sample, tb.pair_slot, tb.size, tb.n_slots)).pooled
    penalty, _ = equivariance(model, tb, own, tokens, tp.equivariance_training)
    ref = _reference_terms(model, examples, DIHEDRALS, tp, 0.5)["loss_equiv"]
    params = list(model.parameters())
    g = torch.autograd.grad(penalty, params, allow_unused=True, retain_graph=True)
    h = torch.autograd.grad(ref, params, allow_unused=True)
    assert all(_close(x if x is not None else torch.zeros(()), y if y is not None else torch.zeros(()))
               for x, y in zip(g, h))
    named = dict(zip([n for n, _ in model.named_parameters()], g))
    assert any(v is not None and v.abs().sum() > 0 for n, v in named.items() if n.startswith("hyperlora."))
    assert any(v is not None and v.abs().sum() > 0 for n, v in named.items() if n.startswith("context."))
    # each side alone carries gradient: into the original context's pooled vector and into the turned grids' encoder
    own_side = torch.autograd.grad(equivariance(model, tb, own, tokens, tp.equivariance_training)[0], own)[0]
    assert own_side.abs().sum() > 0
    detached_own = own.detach()
    turned_only = equivariance(model, tb, detached_own, tokens, tp.equivariance_training)[0]
    enc = torch.autograd.grad(turned_only, list(model.context.parameters()), allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in enc)


@pytest.mark.slow
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


def _column_lora(vectors: torch.Tensor) -> LoRA:
    """LoRA whose one target's delta for row b is the column vector vectors[b] (n_out = len, n_in = 1)."""
    return LoRA({"t": vectors[:, :, None]}, {"t": torch.ones(len(vectors), 1, 1)}, 1.0)


@pytest.mark.parametrize("compare", ["magnitude", "magnitude_and_direction"])
def test_equivariance_penalty_on_a_hand_made_case(compare):
    """Known deltas: the penalty and the delta norm by hand in numpy."""
    turned = np.array([[2.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.5, 0.5]])
    target = np.array([[2.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    penalty, delta = equivariance_penalty(_column_lora(torch.tensor(target, dtype=torch.float32)),
                                          _column_lora(torch.tensor(turned, dtype=torch.float32)), compare)
    n, n0 = np.linalg.norm(turned, axis=1), np.linalg.norm(target, axis=1)
    expected = (n - n0) ** 2
    if compare == "magnitude_and_direction":
        expected = 0.3 * expected + 0.7 * (1 - (turned * target).sum(1) / (n * n0))
    assert penalty.item() == pytest.approx(expected.mean(), rel=1e-5)
    assert delta.item() == pytest.approx(np.linalg.norm(turned - target, axis=1).mean(), rel=1e-5)


@pytest.mark.parametrize("compare", ["magnitude", "magnitude_and_direction"])
def test_equivariance_penalty_is_the_public_formula(compare):
    """HyperLoRA's deltas for random contexts: the penalty and its gradient with respect to BOTH
    contexts equal the validated code's formula computed on the explicit flattened deltas."""
    model, _ = _model(model__hyperlora_init_scale=1.0)
    torch.manual_seed(3)
    H = model.hyperlora_dim if hasattr(model, "hyperlora_dim") else TINY_MODEL["model__hidden_dim"]
    c0 = torch.randn(5, H, requires_grad=True)
    c1 = torch.randn(5, H, requires_grad=True)
    own, turned = model.hyperlora(c0, dropout=False), model.hyperlora(c1, dropout=False)
    penalty, _ = equivariance_penalty(own, turned, compare)
    ref = _public_equivariance(own, turned, compare).mean()
    assert penalty.item() == pytest.approx(ref.item(), rel=1e-5)
    g = torch.autograd.grad(penalty, [c0, c1], retain_graph=True)
    h = torch.autograd.grad(ref, [c0, c1])
    for x, y in zip(g, h):
        assert x.abs().sum() > 0 and _close(x, y)  # both sides move, as the formula says


def test_turned_contexts_group_the_turned_pairs_by_sample():
    """Row a * B + b of the re-encoded contexts is the mean of sample b's pairs turned by augmentation a."""
    pair_pooled = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.5, 0.5]])
    group = torch.tensor([0, 0, 1, 2, 3])  # a*B + b: (a0,b0) averages pairs 0 and 1
    context = type("C", (), {"encode_pairs": lambda self, i, o: (None, pair_pooled)})()
    model = type("M", (), {"context": context})()
    tb = type("TB", (), {"size": 2, "n_equiv": 2, "equiv_in": None, "equiv_out": None, "equiv_group": group})()
    got = turned_contexts(model, tb, None, "reencoded")
    assert torch.allclose(got, torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.5, 0.5]]))


def test_equivariance_is_zero_for_an_unturned_context():
    model, tp = _model()
    examples = _examples()
    tb = _train_batch(examples, [[0, 0, 0, 0]], None)
    own = model.support(*(batch_from_pairs(examples)[k] for k in ("demo_in", "demo_out", "demo_mask"))).pooled
    for compare in ("magnitude", "magnitude_and_direction"):
        eq = dataclasses.replace(tp.equivariance_training, compare=compare) if dataclasses.is_dataclass(
            tp.equivariance_training) else tp.equivariance_training.model_copy(update={"compare": compare})
        penalty, delta = equivariance(model, tb, own, None, eq)
        assert penalty.item() < 1e-6 and delta.item() < 1e-3


def test_rotated_features_context_is_the_original_and_reencoding_is_not():
    """The validated code's construction (encoded features turned, then mean-pooled) gives back the
    original contexts, so its penalty is 0 up to rounding; the re-encoded turned grids do not."""
    model, tp = _model(model__hyperlora_init_scale=1.0)
    tb = _train_batch(_examples(), DIHEDRALS, None)
    tokens, pair_pooled = model.context.encode_pairs(tb.pair_in, tb.pair_out)
    own = model.context.layout(tokens, pair_pooled, PairLayout(tb.pair_sample, tb.pair_slot, tb.size, tb.n_slots)).pooled
    rotated = turned_contexts(model, tb, tokens, "rotated_features")
    assert torch.allclose(rotated, own.repeat(2, 1), atol=1e-5)
    eq = tp.equivariance_training
    small, _ = equivariance(model, tb, own, tokens, eq.model_copy(update={"context": "rotated_features"}))
    large, _ = equivariance(model, tb, own, tokens, eq.model_copy(update={"context": "reencoded"}))
    assert small.item() < 1e-6 < 1e-3 < large.item()  # 1 - cos in float32: rounding only


@pytest.mark.parametrize("how", ["public", "training"])
def test_loo_temperature_is_the_public_default(how):
    """`public`: the LOO rows' DSC runs at 1.0 whatever the step's temperature; `training`: at the
    step's. The main rows always at the step's."""
    model, tp = _model()
    model.eval()
    examples = _examples(seed=3)
    tb = _train_batch(examples, [[1, 1, 1, 1]], None)
    B = tb.size
    loo_t = PUBLIC_LOO_TEMPERATURE if how == "public" else None
    with torch.no_grad():
        out, _, _ = solve_examples(model, tb, 0.5, loo_temperature=loo_t)
        pairs, query, answer = examples[0]
        main = _solve_by_hand(model, pairs, query, answer, 0.5)[1].logits[-1]
        first = int(tb.loo_pair[0])
        pairs = examples[int(tb.pair_sample[first])][0]
        j = int(tb.pair_slot[first])
        held = pairs[:j] + pairs[j + 1 :]
        expected_t = 1.0 if how == "public" else 0.5
        loo = _solve_by_hand(model, held, pairs[j][0], pairs[j][1], expected_t)[1].logits[-1]
        other = _solve_by_hand(model, held, pairs[j][0], pairs[j][1], 1.5 - expected_t)[1].logits[-1]
    assert torch.allclose(out.logits[-1][0], main[0], atol=1e-4)
    assert torch.allclose(out.logits[-1][B], loo[0], atol=1e-4)
    assert not torch.allclose(out.logits[-1][B], other[0], atol=1e-4)


@pytest.mark.parametrize("raw", [False, True])
def test_entropy_on_raw_logits_switches_the_map_the_entropy_term_reads(raw):
    model, tp = _model(model__use_gumbel_softmax=True, train__entropy_on_raw_logits=raw)
    tb = pack(batch_from_pairs(_examples()))
    torch.manual_seed(1)
    _, logs = training_losses(model, tb, 1.0, tp)
    torch.manual_seed(1)  # the same noise again: the maps of that very pass
    out, _, _ = solve_examples(model, tb, 1.0)
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
        assert all(_close(a, b) for a, b in zip(grads, fast_grads))  # float32 rounding of a reordered graph
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert len(sizes) == 4  # every batch had other numbers of pairs or held-out pairs
    assert graphs[-1] == graphs[1] <= 2, graphs


@pytest.mark.slow
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


@pytest.mark.slow
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
        out, target, _ = solve_examples(model, tb, 0.5, all_steps=True)
        assert torch.equal(out.step_logits(True), out.logits[0])  # the first step is every sample's best
        read = out.logits[0] if best else out.logits[-1]
        assert logs["loss_task"].item() == pytest.approx(stablemax_cross_entropy(read, target).mean().item(), rel=1e-6)


def _saved_bytes(model: RLAN, tb, tp) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (the activations held in memory)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        training_losses(model, tb, 1.0, tp)
    return total[0]


@pytest.mark.slow
def test_activation_checkpointing_keeps_fewer_activations():
    """train.activation_checkpointing recomputes the pair encoder, the query path and every solver
    step: far fewer bytes are kept for the backward pass."""
    model, tp = _model()
    tb = _train_batch(_examples(), DIHEDRALS, None)
    model.checkpoint_activations(False)
    kept = _saved_bytes(model, tb, tp)
    model.checkpoint_activations(True)
    assert _saved_bytes(model, tb, tp) < 0.5 * kept


def _colour_crop(canvas: torch.Tensor) -> np.ndarray:
    """The grid on a canvas: the bounding box of its colour cells."""
    c = canvas.numpy()
    rows, cols = np.nonzero(c >= 2)
    return c[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] - 2


def test_prepare_groups_each_transformed_context_with_its_sample(tmp_path):
    """Group a * B + b holds exactly sample b's context pairs turned by one non-identity dihedral."""
    from pipeline.loader import AugmentedCache
    from pipeline.train.batches import prepare
    from pipeline.train.sampler import MicroBatch
    from tests.helpers import TINY_TRAIN, tiny_workspace

    ws = tiny_workspace(tmp_path)
    p = params_with(**{**TINY_MODEL, **TINY_TRAIN, "train__equivariance_training__num_augmentations": 3})
    tb = prepare(AugmentedCache(ws["cache"]), MicroBatch(0, np.arange(8), (1, 2, 3, 0)), p.train, meta=True,
                 use_hyperlora=True)
    B, A = tb.size, tb.n_equiv
    assert A == 3 and len(tb.equiv_in) == A * len(tb.pair_in)

    def key(x: np.ndarray, y: np.ndarray) -> bytes:
        return x.tobytes() + bytes(x.shape) + b"|" + y.tobytes() + bytes(y.shape)

    for b in range(B):
        own = [(_colour_crop(tb.pair_in[i]), _colour_crop(tb.pair_out[i])) for i in np.flatnonzero(tb.pair_sample == b)]
        for a in range(A):
            mine = np.flatnonzero(tb.equiv_group == a * B + b)
            turned = sorted(key(_colour_crop(tb.equiv_in[i]), _colour_crop(tb.equiv_out[i])) for i in mine)
            assert len(turned) == len(own) > 0, (a, b)
            assert any(sorted(key(augment_grid(x, d, IDENTITY_CMAP), augment_grid(y, d, IDENTITY_CMAP)) for x, y in own)
                       == turned for d in range(1, 8)), (a, b)


def test_loo_accuracy_is_pixel_accuracy_over_the_held_out_answers(monkeypatch):
    """As the public code: correct answer cells over all answer cells of the LOO examples (EOS and PAD
    not counted); the exact-match rate is logged apart as loo_exact_match."""
    import pipeline.train.losses as losses

    model, tp = _model()
    tb = _train_batch(_examples(), DIHEDRALS, None)
    B = tb.size
    real = losses.solve_examples

    def designed(*args, **kw):  # LOO example 0 answered right except its EOS border, the others all wrong
        out, target, tokens = real(*args, **kw)
        pred = torch.where(target >= 2, (target - 2 + 1) % 10 + 2, target)
        pred[B] = torch.where(target[B] == 1, 0, target[B])
        out.logits = [torch.nn.functional.one_hot(pred.long(), 12).permute(0, 3, 1, 2).float()]
        return out, target, tokens

    monkeypatch.setattr(losses, "solve_examples", designed)
    _, logs = training_losses(model, tb, 0.5, tp)
    _, target, _ = real(model, tb, 0.5)
    cells = (target[B:] >= 2).sum((1, 2)).float()
    assert logs["loo_accuracy"].item() == pytest.approx((cells[0] / cells.sum()).item(), rel=1e-6)
    assert logs["loo_exact_match"].item() == 0.0  # example 0's EOS border is wrong: not an exact answer


def test_loo_pooled_vectors_stay_float32_under_bf16_autocast():
    from pipeline.model.rlan.context import pooled_without

    torch.manual_seed(0)
    pooled = torch.randn(7, 16) * 3
    sample = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    held = torch.tensor([0, 2, 3, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pooled_without(pooled, sample, held)
    expected = torch.stack([pooled[[1, 2]].double().mean(0), pooled[[0, 1]].double().mean(0),
                            pooled[[4]].double().mean(0), pooled[[5]].double().mean(0)])
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("context_gradient", [True, False])
def test_loo_context_gradient_switch(context_gradient):
    """With context_gradient, the LOO examples' loss trains the context encoder; without, it does not
    (their context detached), while the main queries' loss always does."""
    model, _ = _model()
    tb = _train_batch(_examples(), DIHEDRALS, None)
    out, target, _ = solve_examples(model, tb, 0.5, context_gradient=context_gradient)
    ce = stablemax_cross_entropy(out.logits[-1], target)
    encoder = list(model.context.parameters())
    loo = torch.autograd.grad(ce[tb.size:].mean(), encoder, allow_unused=True, retain_graph=True)
    main = torch.autograd.grad(ce[: tb.size].mean(), encoder, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in main)
    assert any(g is not None and g.abs().sum() > 0 for g in loo) == context_gradient
