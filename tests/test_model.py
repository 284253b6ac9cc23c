"""The RLAN modules: shapes, switches, the public RLAN details (output head, DSC, MSRE), HyperLoRA
sizes, losses, step selection, model files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.canvas import NUM_TOKENS, PAD
from pipeline.loader import batch_from_pairs, crop_canvas
from pipeline.model import RLAN
from pipeline.model.dsc import MASK_FLOOR, attention_entropy, gumbel_noise
from pipeline.model.io import ModelFileError, load_model, save_model
from pipeline.model.layers import CrossAttention2d, EmbeddedPairConv
from pipeline.model.msre import periods, relative_features
from pipeline.model.rlan import query_grid
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
    grads = {n: p.grad for n, p in m.named_parameters()}
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
    assert torch.allclose(t1.raw_attention, t2.raw_attention)  # the raw maps are noise-free
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


@pytest.mark.parametrize("scale", [0.03, 0.1, 0.3])
def test_first_lora_magnitude_follows_init_scale(scale):
    m = tiny(model__hidden_dim=64, model__hyperlora_rank=8, model__hyperlora_init_scale=scale)
    mags = m.encode_context(*(example_batch(16)[k] for k in ("demo_in", "demo_out", "demo_mask"))).lora.magnitudes()
    for t, v in mags.items():
        assert 0.7 * scale < float(v.detach().mean()) < 1.3 * scale, (t, float(v.detach().mean()))


def test_lora_magnitude_is_linear_in_init_scale():
    b = example_batch(4)
    ctx = [tiny(model__hyperlora_init_scale=s).eval().encode_context(b["demo_in"], b["demo_out"], b["demo_mask"])
           for s in (0.1, 0.2)]
    for t in ctx[0].lora.a:
        assert torch.allclose(ctx[1].lora.magnitudes()[t], 2 * ctx[0].lora.magnitudes()[t], rtol=1e-4)


def test_lora_magnitude_and_diversity_match_explicit_deltas():
    b = example_batch(5)
    lora = tiny().eval().encode_context(b["demo_in"], b["demo_out"], b["demo_mask"]).lora
    for t, a in lora.a.items():
        dw = a @ lora.b[t].transpose(1, 2)  # (B, out, in)
        explicit = dw.flatten(1).norm(dim=1) / math.sqrt(a.shape[1])
        assert torch.allclose(lora.magnitudes()[t], explicit, rtol=1e-4)
    explicit_div = torch.stack([((a @ lora.b[t].transpose(1, 2)) - (a @ lora.b[t].transpose(1, 2)).mean(0))
                                .flatten(1).pow(2).sum(1).mean().sqrt() / math.sqrt(a.shape[1])
                                for t, a in lora.a.items()]).mean()
    assert torch.allclose(lora.diversity(), explicit_div, rtol=1e-3)
    same = example_batch(1)
    rep = {k: v.repeat(4, *[1] * (v.dim() - 1)) for k, v in same.items()}
    assert float(tiny().eval().encode_context(rep["demo_in"], rep["demo_out"], rep["demo_mask"]).lora.diversity().detach()) < 1e-5


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
    assert exact.tolist() == [False] and abs(pixel.item() - 2 / 3) < 1e-6


def test_attention_entropy_bounds():
    uniform = torch.full((1, 2, 30, 30), 1 / 900)
    assert torch.allclose(attention_entropy(uniform), torch.tensor([math.log(900)]))
    onehot = torch.zeros(1, 2, 30, 30)
    onehot[..., 3, 4] = 1
    assert attention_entropy(onehot).item() < 1e-6


def test_model_file_round_trip(tmp_path):
    m = tiny().eval()
    save_model(tmp_path / "model.pt", m, {"temperature": 0.5, "mlflow_run_id": None})
    assert torch.load(tmp_path / "model.pt", weights_only=True)["format"] == 1
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


def test_output_head_is_two_convolutions_with_the_delta_on_the_first():
    m = tiny().eval()
    H = m.cfg.hidden_dim
    assert (m.solver.head_hidden.in_channels, m.solver.head_hidden.out_channels) == (H, H)
    assert (m.solver.head_out.in_channels, m.solver.head_out.out_channels) == (H, NUM_TOKENS)
    assert m.solver.lora_dims(m.cfg)["output_head"] == (H, H) and m.hyperlora.dims["output_head"] == (H, H)
    b = example_batch(2)
    ctx = m.encode_context(b["demo_in"], b["demo_out"], b["demo_mask"])
    base = m.solve(b["query_in"], ctx, 0.5).logits[-1]
    for target in ctx.lora.a:  # a non-zero delta of each target changes the logits; a zero one does not
        lora = type(ctx.lora)({t: (v * 0 if t == target else v) for t, v in ctx.lora.a.items()}, ctx.lora.b,
                              ctx.lora.scaling)
        changed = m.solve(b["query_in"], type(ctx)(ctx.support, lora), 0.5).logits[-1]
        assert not torch.allclose(changed, base), target
    zero = type(ctx.lora)({t: v * 0 for t, v in ctx.lora.a.items()}, ctx.lora.b, ctx.lora.scaling)
    no_lora = m.solve(b["query_in"], type(ctx)(ctx.support, None), 0.5).logits[-1]
    assert torch.allclose(m.solve(b["query_in"], type(ctx)(ctx.support, zero), 0.5).logits[-1], no_lora, atol=1e-6)


def _dsc_by_hand(dsc, feats, pooled, tau, valid):
    """The DSC maps and stop logits written out from the public module's description."""
    B, H, h, w = feats.shape
    heads, dh = dsc.heads, H // dsc.heads
    q = dsc.q(dsc.clue_queries(pooled)).view(B, dsc.K, heads, dh)
    k = dsc.k(feats).view(B, heads, dh, h * w)
    scores = torch.einsum("bkhd,bhdn->bkn", q, k) / (heads * math.sqrt(dh))
    mask = valid.float().clamp_min(MASK_FLOOR)
    maps, stops = [], []
    for c in range(dsc.K):
        a = torch.softmax((scores[:, c] + mask.log()).clamp(-50, 50) / tau, -1)
        ent = -(a.clamp_min(1e-12) * a.clamp_min(1e-12).log()).sum(-1) / math.log(h * w)
        attended = torch.einsum("bn,bhn->bh", a, feats.flatten(2))
        stops.append(dsc.stop(torch.cat([attended, ent[:, None]], -1)).squeeze(-1))
        maps.append(a)
        mask = (mask * (1 - 0.9 * a.detach())).clamp_min(MASK_FLOOR)
    return torch.stack(maps, 1).view(B, dsc.K, h, w), torch.stack(stops, 1)


def test_dsc_follows_the_public_module():
    m = tiny(model__max_clues=3).eval()
    torch.manual_seed(1)
    feats = torch.randn(2, 16, 6, 6, requires_grad=True)
    pooled = torch.randn(2, 16)
    valid = torch.zeros(2, 36, dtype=torch.bool)
    valid[0, :12], valid[1, 7:9] = True, True  # the query grids' cells
    clues = m.dsc(feats, pooled, 0.7, valid)
    maps, stops = _dsc_by_hand(m.dsc, feats, pooled, 0.7, valid)
    assert torch.allclose(clues.attention, maps, atol=1e-6) and torch.allclose(clues.stop_logits, stops, atol=1e-5)
    # the mask update is detached: gradients of a later clue's map equal the hand-written detached ones
    g1 = torch.autograd.grad(clues.attention[:, 2].pow(2).sum(), feats)[0]
    g2 = torch.autograd.grad(maps[:, 2].pow(2).sum(), feats)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    # the maps stay on the grid: the PAD canvas gets a vanishing share
    outside = (clues.attention.flatten(2) * (~valid[:, None, :]).float()).sum(-1)
    assert outside.max() < 2e-3
    # the public initialisation: stop bias -1, entropy weights around +1.5
    H = m.cfg.hidden_dim
    assert m.dsc.stop[0].in_features == H + 1 and m.dsc.stop[2].bias.item() == -1.0
    assert 1.3 < m.dsc.stop[0].weight[:, H].mean().item() < 1.7


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


def test_msre_scales_are_resolvable_and_offsets_are_normalised_by_the_grid():
    p = periods(8)
    assert p[0] == 60.0 and p[-1] == pytest.approx(2.0) and torch.all(p[1:] < p[:-1])
    assert torch.all(2 * math.pi / p <= math.pi + 1e-6)  # at most half a turn per cell: no scale aliases
    assert periods(1).tolist() == [60.0]
    centroids = torch.zeros(2, 1, 2)  # both at the top-left cell
    f = relative_features(centroids, 30, 30, torch.tensor([[5, 10], [20, 3]]), periods(4))
    # the grid's far corner is at 1 in grid units whatever the grid's size; canvas units differ
    assert f[0, 0, 4, 9, 2:4].tolist() == pytest.approx([4 / 5, 9 / 10])
    assert f[1, 0, 19, 2, 2:4].tolist() == pytest.approx([19 / 20, 2 / 3])
    assert f[0, 0, 4, 9, 0:2].tolist() == pytest.approx([4 / 30, 9 / 30])


def test_query_grid_finds_the_grid_wherever_it_is_on_the_canvas():
    g = np.ones((3, 5), np.uint8)
    b = batch_from_pairs([([(g, g)], g, g)])
    q = torch.roll(b["query_in"], shifts=(4, 7), dims=(1, 2))  # a translated grid
    valid, hw = query_grid(q)
    assert hw.tolist() == [[3, 5]] and valid.sum().item() == 15


def test_embedded_pair_conv_is_the_convolution_of_the_embeddings():
    torch.manual_seed(0)
    conv = EmbeddedPairConv(16)
    b = example_batch(3, demos=2)
    x, y = b["demo_in"].flatten(0, 1), b["demo_out"].flatten(0, 1)
    assert torch.allclose(conv(x, y), conv.reference(x, y), atol=1e-5)
    g1 = torch.autograd.grad(conv(x, y).pow(2).sum(), list(conv.parameters()))
    g2 = torch.autograd.grad(conv.reference(x, y).pow(2).sum(), list(conv.parameters()))
    assert all(torch.allclose(a, c, rtol=1e-4, atol=1e-4) for a, c in zip(g1, g2))


def test_cross_attention_ignores_masked_tokens_and_reuses_its_memory():
    torch.manual_seed(0)
    att = CrossAttention2d(16, 2, 0.0).eval()
    x, tokens = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 16)
    valid = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    out = att(x, tokens, valid)
    assert torch.allclose(att.read(x, att.memory(tokens, valid)), out)
    other = tokens.clone()
    other[~valid] = torch.randn(int((~valid).sum()), 16) * 100  # masked tokens changed
    assert torch.allclose(att(x, other, valid), out, atol=1e-6)
