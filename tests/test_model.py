"""The RLAN modules: shapes, switches, the public RLAN details (DSC, MSRE and the clue aggregation,
pair encoder, output head) against known answers, HyperLoRA sizes and measures, losses, step
selection, model files.

Edits the known-answer tests catch (each made once, the named test seen to fail):
- DSC scores divided by heads x sqrt(d_head) instead of sqrt(hidden_dim), the stop logit unbounded:
  test_dsc_on_a_hand_computed_case;
- the DSC recurrence dropped: test_dsc_recurrence_feeds_each_clue_the_ones_before;
- the clue-count divisor not detached: test_clue_features_are_aggregated_with_a_detached_clue_count;
- offsets normalised per axis, a linear radius: test_msre_coordinates_on_known_cells;
- the head's LoRA delta on its output, no GroupNorm: test_output_head_is_the_public_one_with_the_delta_on_its_input;
- a gate's x half computed from a stale input: test_solver_computes_each_gate_over_the_concatenated_input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.canvas import COLOR_OFFSET, NUM_TOKENS, PAD
from pipeline.loader import batch_from_pairs, crop_canvas
from pipeline.model import RLAN
from pipeline.model.io import ModelFileError, load_model, save_model
from pipeline.model.rlan.context import PairEmbedding
from pipeline.model.rlan.dsc import DSC, attention_entropy, gumbel_noise
from pipeline.model.rlan.layers import CrossAttention2d
from pipeline.model.rlan.model import query_grid
from pipeline.model.rlan.msre import fourier, frequencies, relative_coords
from pipeline.train.losses import stablemax_cross_entropy, token_accuracy
from tests.helpers import TINY_MODEL, example_batch, params_with


def tiny(**kw) -> RLAN:
    torch.manual_seed(0)
    return RLAN(params_with(**{**TINY_MODEL, **kw}).model)


def test_output_shapes_and_clue_maps():
    m = tiny().eval()
    b = example_batch(4)
    out = m(b, temperature=1.0)
    assert len(out.logits) == 2 and all(x.shape == (4, NUM_TOKENS, 30, 30) for x in out.logits)
    att = out.clues.attention
    assert att.shape == (4, 2, 30, 30)
    assert torch.allclose(att.flatten(2).sum(-1), torch.ones(4, 2), atol=1e-5)
    assert out.clues.centroids.shape == (4, 2, 2) and out.clues.stop_logits.shape == (4, 2)
    assert ((out.clues.centroids >= 0) & (out.clues.centroids <= 29)).all()


def test_model_runs_on_a_smaller_canvas():
    out = tiny().eval()(crop_canvas(example_batch(2), 6), temperature=1.0)
    assert out.logits[-1].shape == (2, NUM_TOKENS, 6, 6)


@pytest.mark.parametrize("kw", [dict(model__use_cross_attention_context=False), dict(model__use_solver_context=False),
                                dict(model__use_hyperlora=False, train__equivariance_training__enabled=False),
                                dict(model__task_conditioned_clues=True)])
def test_switches_change_the_model_and_it_still_learns(kw):
    m = tiny(**kw)
    out = m(example_batch(2), temperature=0.5)
    stablemax_cross_entropy(out.logits[-1], example_batch(2)["query_out"]).mean().backward()
    # the DSC recurrence's state weights first act on the third clue (the first state is 0); tiny has 2
    grads = {n: p.grad for n, p in m.named_parameters() if n != "dsc.recurrence.weight_hh"}
    # every parameter that exists takes part: a finite gradient, not all zero
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    cfg = m.cfg
    assert hasattr(m.inject, "attn") == cfg.use_cross_attention_context and hasattr(m.inject, "film") != hasattr(m.inject, "attn")
    assert (m.solver.context is not None) == cfg.use_solver_context
    assert (out.context.lora is None) == (not cfg.use_hyperlora) and (m.hyperlora is None) == (not cfg.use_hyperlora)
    assert hasattr(m.dsc, "query_proj") == cfg.task_conditioned_clues != hasattr(m.dsc, "query_bank")


def test_gumbel_noise_only_in_training():
    m = tiny(model__use_gumbel_softmax=True, model__dropout=0.0)
    b = example_batch(2)
    m.eval()
    a1, a2 = (m(b, 1.0).clues.attention for _ in range(2))
    assert torch.equal(a1, a2)  # eval mode is deterministic
    m.train()
    t1, t2 = (m(b, 1.0).clues for _ in range(2))
    assert not torch.allclose(t1.attention, t2.attention)  # noise in training
    # the first clue's raw map is noise-free (later clues follow the noisy chain's state and mask)
    assert torch.allclose(t1.raw_attention[:, 0], t2.raw_attention[:, 0])
    assert not torch.allclose(t1.raw_attention[:, 0], t1.attention[:, 0])
    quiet = tiny(model__use_gumbel_softmax=False, model__dropout=0.0, train__temperature_start=0.5).train()
    assert torch.equal(quiet(b, 1.0).clues.attention, quiet(b, 1.0).clues.attention)


def test_task_conditioned_clues_depend_on_the_context():
    b1, b2 = example_batch(2, seed=1), example_batch(2, seed=2)
    b2["query_in"] = b1["query_in"]  # same query, other demonstrations
    cond = tiny(model__task_conditioned_clues=True).eval()
    assert not torch.allclose(cond(b1, 1.0).clues.raw_attention, cond(b2, 1.0).clues.raw_attention)
    p1, p2 = torch.randn(3, 16), torch.randn(3, 16)
    assert not torch.allclose(cond.dsc.clue_queries(p1), cond.dsc.clue_queries(p2))
    static = tiny(model__task_conditioned_clues=False).eval()
    assert torch.equal(static.dsc.clue_queries(p1), static.dsc.clue_queries(p2))


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.03, 0.1, 0.3])
def test_first_lora_gain_follows_init_scale(scale):
    """hyperlora_init_scale is the first deltas' root-mean-square gain ||A B^T||_F / sqrt(n_out), in
    both forms; the logged magnitude is the public ||scaling A B^T||_F. The factored heads read one
    LayerNorm: each target's gain is near init_scale. The dense form's targets have MLPs of their own,
    each with its own random hidden width: init_scale is the expectation, checked over the targets."""
    b = example_batch(16)
    for form, H in (("factored", 64), ("dense", 128)):
        m = tiny(model__hidden_dim=H, model__hyperlora_rank=8, model__hyperlora_init_scale=scale,
                 model__hyperlora_scaling=2.0, model__hyperlora_delta=form)
        lora = m.encode_context(b["demo_in"], b["demo_out"], b["demo_mask"]).lora
        gains = {t: float(v.detach().pow(2).mean()) / (4.0 * lora.a[t].shape[1]) for t, v in lora.magnitudes().items()}
        if form == "factored":
            assert all(0.7 * scale < math.sqrt(g) < 1.3 * scale for g in gains.values()), gains
        else:
            assert 0.8 * scale < math.sqrt(sum(gains.values()) / len(gains)) < 1.2 * scale, gains


def test_lora_magnitude_is_linear_in_init_scale():
    b = example_batch(4)
    ctx = [tiny(model__hyperlora_init_scale=s).eval().encode_context(b["demo_in"], b["demo_out"], b["demo_mask"])
           for s in (0.1, 0.2)]
    for t in ctx[0].lora.a:
        assert torch.allclose(ctx[1].lora.magnitudes()[t], 2 * ctx[0].lora.magnitudes()[t], rtol=1e-4)


def test_lora_measures_match_explicit_deltas():
    """Magnitude, inner product and diversity against the (B, n_out, n_in) deltas formed explicitly, as
    the public module computes them (norm of each sample's delta; std over the batch of each entry)."""
    b = example_batch(5)
    lora = tiny(model__hyperlora_scaling=0.5).eval().encode_context(b["demo_in"], b["demo_out"], b["demo_mask"]).lora
    other = lora.rows(torch.tensor([4, 3, 2, 1, 0]))
    explicit_div = []
    for t, a in lora.a.items():
        dw = 0.5 * a @ lora.b[t].transpose(1, 2)  # (B, out, in)
        assert torch.allclose(lora.magnitudes()[t], dw.flatten(1).norm(dim=1), rtol=1e-4)
        assert torch.allclose(lora.inner(other)[t], (dw * dw.flip(0)).sum((1, 2)), rtol=1e-4, atol=1e-7)
        explicit_div.append(dw.std(0).mean())
    assert torch.allclose(lora.diversity(), torch.stack(explicit_div).mean(), rtol=1e-4)
    same = example_batch(1)
    rep = {k: v.repeat(4, *[1] * (v.dim() - 1)) for k, v in same.items()}
    assert float(tiny().eval().encode_context(rep["demo_in"], rep["demo_out"], rep["demo_mask"]).lora.diversity()) < 1e-6
    assert math.isnan(float(lora.rows(slice(0, 1)).diversity()))


def test_best_step_picks_the_most_confident_step():
    m = tiny(model__num_solver_steps=3).eval()
    out = m(example_batch(2), 1.0)
    sharp = torch.zeros_like(out.logits[0])
    sharp[:, 3] = 50.0  # every cell confidently colour 1
    out.logits = [out.logits[0], sharp, out.logits[2]]
    assert torch.equal(out.step_logits(best_step=True), sharp)
    assert torch.equal(out.step_logits(best_step=False), out.logits[2])


def test_stablemax_known_answer_and_pad_ignored():
    logits = torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[1, PAD]]])
    s = torch.tensor([1.0, 2.0, 0.5])
    assert torch.allclose(stablemax_cross_entropy(logits, target), -torch.log(s[1] / s.sum()).view(1))


def test_stablemax_gradient_is_finite_at_one():
    x = torch.ones(1, 12, 2, 2, requires_grad=True)  # x = 1 once gave 0 * inf = NaN through torch.where
    stablemax_cross_entropy(x, torch.full((1, 2, 2), 3)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_token_accuracy():
    target = torch.tensor([[[2, 3], [PAD, 1]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[2, 3], [5, 1]]]), NUM_TOKENS).permute(0, 3, 1, 2).float()
    exact, pixel = token_accuracy(logits, target)
    assert exact.tolist() == [True] and pixel.tolist() == [1.0]  # the PAD cell does not count
    logits[0, :, 0, 0] = torch.nn.functional.one_hot(torch.tensor(4), NUM_TOKENS).float()
    exact, pixel = token_accuracy(logits, target)
    # pixel accuracy is over the answer's cells (the colours), as the public loo_accuracy: 1 of 2
    assert exact.tolist() == [False] and abs(pixel.item() - 1 / 2) < 1e-6
    logits[0, :, 1, 1] = torch.nn.functional.one_hot(torch.tensor(0), NUM_TOKENS).float()  # the EOS cell wrong
    exact, pixel = token_accuracy(logits, target)
    assert exact.tolist() == [False] and abs(pixel.item() - 1 / 2) < 1e-6


def test_attention_entropy_bounds():
    uniform = torch.full((1, 2, 30, 30), 1 / 900)
    assert torch.allclose(attention_entropy(uniform), torch.tensor([math.log(900)]))
    onehot = torch.zeros(1, 2, 30, 30)
    onehot[..., 3, 4] = 1
    assert attention_entropy(onehot).item() < 1e-6


def test_model_file_round_trip(tmp_path):
    m = tiny().eval()
    save_model(tmp_path / "model.pt", m, {"temperature": 0.5, "mlflow_run_id": None})
    assert torch.load(tmp_path / "model.pt", weights_only=True)["format"] == 3
    back, meta = load_model(tmp_path / "model.pt")
    b = example_batch(2)
    assert meta["temperature"] == 0.5
    assert torch.equal(back.eval()(b, 0.5).logits[-1], m(b, 0.5).logits[-1])


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", None])
def test_corrupt_model_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "model.pt"
    if content is None:  # a truncated real file
        save_model(path, tiny(), {})
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=str(path)):
        load_model(path)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "nope.pt")


# --- the public RLAN module details --------------------------------------------------------------


def test_output_head_is_the_public_one_with_the_delta_on_its_input():
    m = tiny().eval()
    H = m.cfg.hidden_dim
    head = m.solver.head
    assert [type(x).__name__ for x in head] == ["Conv2d", "GELU", "GroupNorm", "Conv2d"]
    assert head[0].kernel_size == (3, 3) and (head[0].in_channels, head[0].out_channels) == (H, H)
    assert head[2].num_groups == 8 and head[3].kernel_size == (1, 1) and head[3].out_channels == NUM_TOKENS
    # the public head's last bias: -0.5 on colour 0 (the background), 0 on the other classes
    assert head[3].bias.tolist() == [-0.5 if t == COLOR_OFFSET else 0.0 for t in range(NUM_TOKENS)]
    assert m.solver.lora_dims(m.cfg)["output_head"] == (H, H)
    b = example_batch(2)
    lora = m.encode_context(b["demo_in"], b["demo_out"], b["demo_mask"]).lora
    h = torch.randn(2, H, 5, 5)
    dw = lora.scaling * lora.a["output_head"] @ lora.b["output_head"].transpose(1, 2)  # (B, H, H)
    explicit = head(h + torch.einsum("boi,bihw->bohw", dw, h))
    assert torch.allclose(m.solver.readout(h, lora), explicit, atol=1e-5)
    assert torch.equal(m.solver.readout(h, None), head(h))


def _known_dsc(K: int = 2) -> DSC:
    """A DSC of width 8 with hand-set weights: identity projections, a recurrence that stays at 0 (a
    GRU cell of zero weights halves a zero state), a stop head reading the entropy only."""
    cfg = params_with(model__hidden_dim=8, model__max_clues=K, model__dropout=0.0, model__use_gumbel_softmax=False).model
    dsc = DSC(cfg).eval()
    with torch.no_grad():
        for lin in (dsc.q, dsc.k, dsc.v):
            lin.weight.copy_(torch.eye(8))
            lin.bias.zero_()
        for p in dsc.recurrence.parameters():
            p.zero_()
        first, last = dsc.stop[0], dsc.stop[3]
        first.weight.zero_()
        first.weight[0, 8] = 1.0  # hidden unit 0 = the normalised entropy
        first.bias.zero_()
        last.weight.zero_()
        last.weight[0, 0] = 2.0
        last.bias.fill_(-1.0)
    return dsc


def test_dsc_on_a_hand_computed_case():
    """Known answers from the public formula: one score per clue q.k / sqrt(hidden_dim) (not per head),
    the log mask, the stop logit 4 tanh(x / 4) of [attended values, entropy / log(h w)], the mask update."""
    fa = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1])
    fb = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])  # orthogonal to fa; both have mean 0 and variance 1
    ln = 1 / math.sqrt(1 + 1e-5)  # LayerNorm of such a vector: itself times this
    dsc = _known_dsc()
    with torch.no_grad():
        dsc.query_bank.copy_(torch.stack([fa, fb]))
    feats = torch.stack([fa, fb, fa, fb]).T.reshape(1, 8, 2, 2)  # cells (0,0) fa, (0,1) fb, (1,0) fa, (1,1) fb
    valid = torch.tensor([[True, True, True, False]])  # the last cell is PAD canvas
    clues = dsc(feats, torch.zeros(1, 8), 1.0, valid)

    def gelu(x):
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    hi = 8 * ln * ln / math.sqrt(8)  # score of a cell whose features match the query
    mask = [1.0, 1.0, 1.0, 1e-6]
    for c, match in enumerate([(hi, 0.0, hi, 0.0), (0.0, hi, 0.0, hi)]):
        z = [math.exp(s + math.log(m)) for s, m in zip(match, mask)]
        att = [v / sum(z) for v in z]
        assert clues.attention[0, c].flatten().tolist() == pytest.approx(att, rel=1e-5)
        assert clues.centroids[0, c].tolist() == pytest.approx([att[2] + att[3], att[1] + att[3]], rel=1e-5)
        ent = -sum(max(p, 1e-6) * math.log(max(p, 1e-6)) for p in att) / math.log(4 + 1e-6)  # the public floor
        assert clues.stop_logits[0, c].item() == pytest.approx(4 * math.tanh((2 * gelu(ent) - 1) / 4), rel=1e-5)
        mask = [max(m * (1 - 0.9 * p), 1e-6) for m, p in zip(mask, att)]
    assert torch.equal(clues.raw_attention, clues.attention)  # no noise: the raw maps are the maps


def test_dsc_recurrence_feeds_each_clue_the_ones_before():
    dsc = _known_dsc(K=3)
    torch.manual_seed(0)
    feats, valid = torch.randn(2, 8, 3, 3), torch.ones(2, 9, dtype=torch.bool)
    still = dsc(feats, torch.zeros(2, 8), 0.7, valid)
    with torch.no_grad():
        dsc.recurrence.weight_ih.normal_()
    moved = dsc(feats, torch.zeros(2, 8), 0.7, valid)
    assert torch.equal(moved.attention[:, 0], still.attention[:, 0])  # the first clue has no clue before it
    assert not torch.allclose(moved.attention[:, 1:], still.attention[:, 1:])


def test_dsc_bounds_floors_and_public_initialisation():
    m = tiny(model__hidden_dim=256, model__max_clues=3).train()
    H = 256
    first, last = m.dsc.stop[0], m.dsc.stop[3]
    assert first.out_features == H // 2 and isinstance(m.dsc.stop[2], torch.nn.Dropout)
    w = first.weight[:, H]
    assert 1.35 < w.mean().item() < 1.65 and 0.4 < w.std().item() < 0.6  # entropy weights ~ N(1.5, 0.5)
    assert last.bias.item() == -1.0 and 0.07 < last.weight.std().item() < 0.13
    feats = torch.randn(2, H, 4, 4) * 1e3
    with torch.no_grad():
        m.dsc.stop[3].bias.fill_(1e4)  # a huge stop logit is bounded by 4
        clues = m.dsc(feats, torch.randn(2, H), 0.05, torch.ones(2, 16, dtype=torch.bool))
    assert clues.stop_logits.max().item() <= 4.0 and clues.attention.min() >= torch.tensor(1e-8)
    assert torch.isfinite(clues.attention).all()


def test_gumbel_noise_is_float32_under_bf16_autocast():
    g = gumbel_noise(torch.Size([200_000]), torch.device("cpu"))
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert len(torch.unique(g)) > 190_000  # not quantised to bf16's few thousand values
    assert g.max() > 9.0 and abs(g.mean().item() - 0.5772) < 0.02  # the tail and the mean (Euler's constant)
    m = tiny(model__use_gumbel_softmax=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(example_batch(2), 1.0)
    assert out.clues.attention.dtype == torch.float32 and torch.isfinite(out.clues.attention).all()
    assert torch.allclose(out.clues.attention.flatten(2).sum(-1), torch.ones(2, 2), atol=1e-5)


def test_msre_coordinates_on_known_cells():
    """The public six coordinates: offset / canvas, offset / max(h, w), normalised log radius, angle."""
    f = relative_coords(torch.zeros(2, 1, 2), 30, 30, torch.tensor([[5, 10], [20, 3]]))
    log_r = math.log(1 + math.sqrt(4**2 + 9**2 + 1e-6)) / (math.log(1 + math.sqrt(125)) + 1e-6)
    angle = (math.atan2(9, 4) + math.pi) / (2 * math.pi)
    assert f[0, 0, 4, 9].tolist() == pytest.approx([4 / 30, 9 / 30, 4 / 10, 9 / 10, log_r, angle], rel=1e-5)
    assert f[1, 0, 19, 2, 2:4].tolist() == pytest.approx([19 / 20, 2 / 20], rel=1e-5)  # max side 20 for both axes
    assert f[0, 0, 0, 0, 4].item() == pytest.approx(0.0, abs=1e-3)  # at the centroid
    freqs = frequencies(3)
    assert freqs.tolist() == pytest.approx([math.pi, 2 * math.pi, 4 * math.pi])
    enc = fourier(torch.tensor([[0.25, 0.5]]), freqs)  # every coordinate gets sine and cosine
    assert enc.shape == (1, 2 + 2 * 2 * 3)
    assert enc[0, 2:8].tolist() == pytest.approx([math.sin(0.25 * math.pi), math.sin(0.5 * math.pi),
                                                 math.sin(math.pi), math.sin(0.5 * math.pi),
                                                 math.sin(math.pi), math.sin(2 * math.pi)], abs=1e-6)


def test_clue_features_are_aggregated_with_a_detached_clue_count(monkeypatch):
    """Per cell, sum_k fused_k * attention_k * (1 - stop_k) / sum_k (1 - stop_k), the divisor detached:
    the gradient reaches the stop probabilities through the weights only."""
    m = tiny(model__max_clues=3).eval()
    msre = m.msre
    msre.aggregate = torch.nn.Identity()
    torch.manual_seed(0)
    H = m.cfg.hidden_dim
    feats, cents = torch.randn(2, H, 5, 5), torch.rand(2, 3, 2) * 4
    att = torch.softmax(torch.randn(2, 3, 25), -1).view(2, 3, 5, 5)
    stop = torch.rand(2, 3, requires_grad=True)
    hw = torch.tensor([[5, 5], [3, 4]])
    out = msre(feats, cents, att, stop, hw)
    coords = relative_coords(cents, 5, 5, hw)
    fused = torch.stack([msre.clue_features(feats.permute(0, 2, 3, 1), coords[:, k]) for k in range(3)], 1)
    weights = att * (1 - stop)[:, :, None, None]
    count = (1 - stop).sum(1).detach()
    explicit = (fused * weights[..., None]).sum(1) / count[:, None, None, None]
    assert torch.allclose(out, explicit.permute(0, 3, 1, 2), atol=1e-5)
    r = torch.randn_like(out)  # a random read-out (channel sums of layer-normalised features are ~0)
    g = torch.autograd.grad((out * r).sum(), stop)[0]
    by_hand = -(fused * att[..., None] * r.permute(0, 2, 3, 1)[:, None]).sum((2, 3, 4)) / count[:, None]
    assert torch.allclose(g, by_hand, rtol=1e-4)


def test_query_grid_finds_the_grid_wherever_it_is_on_the_canvas():
    g = np.ones((3, 5), np.uint8)
    b = batch_from_pairs([([(g, g)], g, g)])
    q = torch.roll(b["query_in"], shifts=(4, 7), dims=(1, 2))  # a translated grid
    valid, hw = query_grid(q)
    assert hw.tolist() == [[3, 5]] and valid.sum().item() == 15


def test_pair_embedding_table_is_the_embedding_of_every_cell():
    """The gathered table equals the public embedding computed cell by cell (colour and position
    halves, linear, LayerNorm), values and gradients."""
    torch.manual_seed(0)
    emb = PairEmbedding(16)
    x = example_batch(3, demos=2)["demo_in"].flatten(0, 1)
    assert torch.allclose(emb(x), emb.reference(x), atol=1e-5)
    g1 = torch.autograd.grad(emb(x).pow(3).sum(), list(emb.parameters()))
    g2 = torch.autograd.grad(emb.reference(x).pow(3).sum(), list(emb.parameters()))
    assert all(torch.allclose(a, c, rtol=1e-4, atol=1e-5) for a, c in zip(g1, g2))


def test_pair_encoder_has_input_output_and_difference_branches():
    m = tiny().eval()
    enc = m.context
    towers = [enc.input_tower, enc.output_tower]
    assert all(sum(isinstance(x, torch.nn.GroupNorm) for x in t) == 2 for t in towers)
    assert enc.difference[0].in_channels == 3 * m.cfg.hidden_dim and enc.difference[0].kernel_size == (1, 1)
    assert enc.input_tower[0].weight.data_ptr() != enc.output_tower[0].weight.data_ptr()
    b = example_batch(2, demos=1)
    x, y = b["demo_in"][:, 0], b["demo_out"][:, 0]
    tokens, pooled = enc.encode_pairs(x, y)
    S = m.cfg.spatial_downsample
    assert tokens.shape == (2, S * S, m.cfg.hidden_dim)
    assert torch.allclose(pooled, tokens.mean(1), atol=1e-6)  # HyperLoRA's AdaptiveAvgPool2d(1) of the tokens
    swapped, _ = enc.encode_pairs(y, x)
    assert not torch.allclose(swapped, tokens, atol=1e-4)  # a pair is directed: input and output differ
    with torch.no_grad():  # the difference branch reads [input, output, output - input] of the towers
        a, o = enc.input_tower(enc.embed.reference(x)), enc.output_tower(enc.embed.reference(y))
        f = enc.difference(torch.cat([a, o, o - a], 1))
        f = f + enc.cell(torch.cat([enc.embed.reference(x), enc.embed.reference(y)], 1))  # each cell's own pair
    assert torch.allclose(tokens, (enc.downsample(f) + enc.token_position).flatten(2).transpose(1, 2), atol=1e-5)


def test_cross_attention_ignores_masked_tokens_and_reuses_its_memory():
    torch.manual_seed(0)
    att = CrossAttention2d(16, 2, 0.0).eval()
    x, tokens = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 16)
    valid = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    out = att(x, tokens, valid)
    for i in range(2):  # masking a token is removing it: the same as attending over the valid tokens only
        kept = tokens[i : i + 1, valid[i]]
        assert torch.allclose(att(x[i : i + 1], kept, torch.ones(1, kept.shape[1], dtype=torch.bool)), out[i : i + 1],
                              atol=1e-6)
    other = tokens.clone()
    other[~valid] = torch.randn(int((~valid).sum()), 16) * 100  # masked tokens changed
    assert torch.allclose(att(x, other, valid), out, atol=1e-6)


def test_pair_encoding_in_chunks_is_the_same_encoding(monkeypatch):
    import pipeline.model.rlan.context as context

    m = tiny()
    b = example_batch(4, demos=3)
    x, y = b["demo_in"].flatten(0, 1), b["demo_out"].flatten(0, 1)  # 12 pairs
    whole = m.context.encode_pairs(x, y)
    monkeypatch.setattr(context, "PAIR_CHUNK", 5)  # chunks of 5, 5 and 2
    for recompute in (False, True):
        m.checkpoint_activations(recompute)
        parts = m.context.encode_pairs(x, y)
        assert all(torch.allclose(a, c, atol=1e-6) for a, c in zip(parts, whole))
        g = torch.autograd.grad(parts[0].sum() + parts[1].sum(), list(m.context.parameters()))
        g0 = torch.autograd.grad(whole[0].sum() + whole[1].sum(), list(m.context.parameters()), retain_graph=True)
        assert all(torch.allclose(a, c, rtol=1e-4, atol=1e-5) for a, c in zip(g, g0))


def test_cross_attention_in_chunks_on_the_cpu_is_the_same_attention(monkeypatch):
    import pipeline.model.rlan.layers as layers

    torch.manual_seed(0)
    att = CrossAttention2d(16, 2, 0.0).train()
    x, tokens = torch.randn(5, 16, 3, 3, requires_grad=True), torch.randn(5, 4, 16)
    valid = torch.rand(5, 4) > 0.3
    valid[:, 0] = True
    whole = att(x, tokens, valid)
    att.dropout = 0.1  # chunking applies to training with dropout; the same weights with p = 0 below
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", 2 * 2 * 9 * 4 * 4)  # two samples per call
    assert att._rows(torch.zeros(5, 2, 9, 8), torch.zeros(5, 2, 4, 8)) == 2
    monkeypatch.setattr(CrossAttention2d, "_attend", lambda self, q, k, v, b: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=b))  # no dropout: comparable numbers
    chunked = att(x, tokens, valid)
    assert torch.allclose(chunked, whole, atol=1e-6)
    g1 = torch.autograd.grad(chunked.sum(), x)[0]
    g2 = torch.autograd.grad(whole.sum(), x)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


@pytest.mark.parametrize("candidate", ["swiglu", "conv"])
@pytest.mark.parametrize("delta", ["dense", "factored"])
def test_solver_computes_each_gate_over_the_concatenated_input(candidate, delta):
    """The x_in part of each gate (convolution and factored LoRA delta) computed once per pass is the
    same GRU as convolving [x_in, h] at every step (values and gradients), x_in = [x, embed(query)]
    with the public candidate; the dense deltas act on the gates' pre-activations."""
    m = tiny(model__num_solver_steps=3, model__dropout=0.0, model__solver_candidate=candidate,
             model__hyperlora_delta=delta).eval()
    b = example_batch(2)
    ctx = m.encode_context(b["demo_in"], b["demo_out"], b["demo_mask"])
    torch.manual_seed(0)
    x = torch.randn(2, m.cfg.hidden_dim, 6, 6, requires_grad=True)
    query = b["query_in"][:, :6, :6]
    s, lora = m.solver, ctx.lora
    tokens, mask = ctx.support.tokens, ctx.support.token_mask
    memory = s.context.memory(tokens, mask)
    x_in = torch.cat([x, s.input_embed(query.long()).permute(0, 3, 1, 2)], 1) if candidate == "swiglu" else x

    def gate(name, conv, inp):
        pre = conv(inp)
        return pre + lora.apply(name, pre if delta == "dense" else inp)

    h, by_hand = x, []
    for _ in range(3):
        xh = torch.cat([x_in, h], 1)
        r = torch.sigmoid(gate("gru_reset", s.reset, xh))
        z = torch.sigmoid(gate("gru_update", s.update, xh))
        pre = gate("gru_candidate", s.candidate, torch.cat([x_in, r * h], 1))
        if candidate == "swiglu":
            g, u = F.conv2d(pre, s.swiglu.gate_up.weight, padding=1).chunk(2, 1)
            pre = F.conv2d(F.silu(g) * u, s.swiglu.down.weight, padding=1)
        h = (1 - z) * h + z * torch.tanh(pre)
        h = h + s.context.read(h, memory)
        by_hand.append(s.readout(h, lora))
    got = s(x, query, tokens, mask, lora, all_steps=True)
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(got, by_hand))
    g1 = torch.autograd.grad(got[-1].pow(2).sum(), [x, s.reset.weight])
    g2 = torch.autograd.grad(by_hand[-1].pow(2).sum(), [x, s.reset.weight])
    assert all(torch.allclose(a, c, rtol=1e-4, atol=1e-5) for a, c in zip(g1, g2))
