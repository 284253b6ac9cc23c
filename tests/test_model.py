"""The RLAN modules: shapes, switches, HyperLoRA sizes, losses, step selection, model files."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.canvas import NUM_TOKENS, PAD
from pipeline.loader import crop_canvas
from pipeline.model import RLAN
from pipeline.model.dsc import attention_entropy
from pipeline.model.io import ModelFileError, load_model, save_model
from pipeline.train.losses import loo_batch, stablemax_cross_entropy, token_accuracy
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
def test_switches_build_and_run(kw):
    m = tiny(**kw)
    out = m(example_batch(2), temperature=0.5)
    out.logits[-1].sum().backward()
    assert (out.context.lora is None) == (not m.cfg.use_hyperlora)


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


def test_loo_skips_samples_with_too_few_pairs():
    b = example_batch(3, demos=3)
    b["demo_mask"][1, 1:] = False  # one context pair: cannot hold one out
    b["demo_mask"][2, 2] = False  # two pairs
    lb, skipped = loo_batch(b, min_pairs=2)
    assert skipped.tolist() == [False, True, False]
    assert len(lb["query_in"]) == 3 + 2
    assert torch.equal(lb["query_in"][0], b["demo_in"][0, 0]) and not lb["demo_mask"][0, 0]
    assert lb["demo_mask"].sum(1).tolist() == [2, 2, 2, 1, 1]
    assert loo_batch(b, min_pairs=4)[0] is None


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
