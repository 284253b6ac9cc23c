"""RLAN's module forms (model.solver_candidate, model.context_injector, model.hyperlora_delta): the
public forms' parameter counts at the stable configuration against the public code's formulas, each
rebuilt module against a hand computation on a small input, and the forms a model file records.

Edits these tests catch (each made once, the named test seen to fail):
- the SwiGLU's intermediate width not rounded up to a multiple of 64, the injector's feed-forward
  layer 2x instead of 4x, one MLP for both LoRA factors: test_public_forms_have_the_public_parameter_counts;
- silu on the up half instead of the gate half: test_swiglu_convolution_on_a_hand_computed_case;
- the injector's second LayerNorm before the feed-forward residual: test_ffn_injector_on_a_hand_computed_case;
- the dense delta applied as delta^T: test_dense_delta_is_the_public_x_times_scaling_a_b;
- a format-2 file read with the public forms, the forms check dropped: test_model_file_records_its_forms.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.canvas import NUM_TOKENS
from pipeline.model import RLAN
from pipeline.model.io import ModelFileError, load_model, save_model
from pipeline.model.rlan.context import ContextInjector
from pipeline.model.rlan.hyperlora import TARGETS, HyperLoRA
from pipeline.model.rlan.solver import RecursiveSolver, SwiGLUConv, swiglu_width
from pipeline.params import FORMS_BEFORE_OPTIONS, PUBLIC_FORMS
from tests.helpers import TINY_MODEL, example_batch, params_with


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def test_public_forms_have_the_public_parameter_counts():
    """At the stable configuration (params.yaml), each rebuilt module has the parameter count of the
    public module at 74a42b0, from the public constructors' formulas; where this project's module
    differs on purpose (docs/model.md#differences-from-the-public-rlan-code), the difference is
    written out."""
    cfg = params_with().model
    assert {k: getattr(cfg, k) for k in PUBLIC_FORMS} == PUBLIC_FORMS  # the stable params are the public forms
    H, r = cfg.hidden_dim, cfg.hyperlora_rank
    with torch.device("meta"):
        m = RLAN(cfg)
    # Public RecursiveSolver: ConvGRUCell(input_dim=2H, hidden_dim=H, use_swiglu=True): reset and update
    # gates conv3x3(3H, H); candidate_proj conv1x1(3H, H); SwiGLUConv2d(H, expansion=2, kernel 3):
    # intermediate = round(2 * H * 2/3) rounded up to a multiple of 64, gate_up conv(H, 2I), down
    # conv(I, H), no biases; GroupNorm(8, H) after the update. input_embed Embedding(10 + 1, H). Output
    # head conv3x3(H, H), GELU, GroupNorm(8, H), conv1x1(H, 10). SolverCrossAttention: MultiheadAttention
    # (4H^2 + 4H), LayerNorms of query, key/value and output, a sigmoid gate Linear(H, H).
    inner = -(-round(2 * H * 2 / 3) // 64) * 64
    public_gru = 2 * conv(3 * H, H, 3) + conv(3 * H, H, 1) + conv(H, 2 * inner, 3, False) + conv(inner, H, 3, False) + 2 * H
    public_embed = 11 * H
    public_head = conv(H, H, 3) + 2 * H + conv(H, 10, 1)
    public_context = 4 * H * H + 4 * H + 3 * 2 * H + linear(H, H)
    # This project: no GroupNorm after the update; the canvas's NUM_TOKENS tokens (PAD, EOS, 10 colours)
    # embedded and predicted instead of 10 colours and a pad; the solver's attention is the pre-norm one
    # of the injector's `attention` form (no gate, no output LayerNorm).
    ours = (public_gru - 2 * H) + (public_embed + (NUM_TOKENS - 11) * H) + (public_head + (NUM_TOKENS - 10) * (H + 1)) \
        + (public_context - linear(H, H) - 2 * H)
    assert count(m.solver) == ours
    # Public CrossAttentionInjector: MultiheadAttention, two LayerNorms, FFN Linear(H, 4H), GELU, Linear(4H, H).
    assert count(m.inject) == (4 * H * H + 4 * H) + 2 * 2 * H + linear(H, 4 * H) + linear(4 * H, H)
    # Public HyperLoRA: context_fuse Linear(H, 2H), GELU, Linear(2H, H), LayerNorm(H); per target (GRU reset,
    # update, candidate, output head) a LoRAPredictor: predict_A and predict_B, each Linear(H, H), GELU,
    # Linear(H, H r).
    predictor = 2 * (linear(H, H) + linear(H, H * r))
    assert count(m.hyperlora) == linear(H, 2 * H) + linear(2 * H, H) + 2 * H + len(TARGETS) * predictor


def test_swiglu_convolution_on_a_hand_computed_case():
    """The public SwiGLUConv2d on a 3-channel 2x2 map with weights set by hand: gate unit 0 reads
    channel 0 at the centre tap, up unit 0 reads channel 1, and output channel 2 reads inner unit 0 at
    the tap of the cell to the right: out[2, i, j] = silu(x0) x1 of cell (i, j + 1), 0 past the edge."""
    assert swiglu_width(3) == 64 and swiglu_width(256) == 384 and swiglu_width(96) == 128
    f = SwiGLUConv(3)
    assert f.gate_up.weight.shape == (128, 3, 3, 3) and f.down.weight.shape == (3, 64, 3, 3)
    assert f.gate_up.bias is None and f.down.bias is None
    with torch.no_grad():
        f.gate_up.weight.zero_()
        f.down.weight.zero_()
        f.gate_up.weight[0, 0, 1, 1] = 1.0  # gate half: units 0..63
        f.gate_up.weight[64, 1, 1, 1] = 1.0  # up half: units 64..127
        f.down.weight[2, 0, 1, 2] = 1.0
    x = torch.tensor([[[1.0, -2.0], [0.5, 3.0]], [[2.0, 1.0], [-1.0, 4.0]], [[9.0, 9.0], [9.0, 9.0]]])[None]

    def silu(v: float) -> float:
        return v / (1 + math.exp(-v))

    want = [silu(-2.0) * 1.0, 0.0, silu(3.0) * 4.0, 0.0]  # cells row by row
    out = f(x)
    assert out.shape == (1, 3, 2, 2)
    assert out[0, 2].flatten().tolist() == pytest.approx(want, rel=1e-6) and out[0, :2].abs().max() == 0


def test_ffn_injector_on_a_hand_computed_case():
    """The public injector on a 2x2 map reading two tokens, one masked out: attention gives the valid
    token all the weight, so every cell reads out(v(token)); then x = LN(x + read), x = LN(x + FFN(x))."""
    cfg = params_with(**TINY_MODEL, model__dropout=0.0).model
    inj = ContextInjector(cfg).eval()
    H = cfg.hidden_dim
    assert not isinstance(inj.attn.norm_q, torch.nn.LayerNorm)  # no pre-norm, as MultiheadAttention
    assert [type(x).__name__ for x in inj.ffn] == ["Linear", "GELU", "Dropout", "Linear"]
    assert inj.ffn[0].out_features == 4 * H
    torch.manual_seed(0)
    x, tokens = torch.randn(1, H, 2, 2), torch.randn(1, 2, H)
    valid = torch.tensor([[True, False]])
    value = tokens[0, 0] @ inj.attn.kv.weight[H:].T + inj.attn.kv.bias[H:]
    read = value @ inj.attn.out.weight.T + inj.attn.out.bias  # (H,): the same for every cell
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                y = F.layer_norm(x[0, :, i, j] + read, (H,), inj.norm1.weight, inj.norm1.bias)
                ffn = F.gelu(y @ inj.ffn[0].weight.T + inj.ffn[0].bias) @ inj.ffn[3].weight.T + inj.ffn[3].bias
                want = F.layer_norm(y + ffn, (H,), inj.norm2.weight, inj.norm2.bias)
                got = inj(x, tokens, valid, None)
                assert got.shape == (1, H, 2, 2)
                assert torch.allclose(got[0, :, i, j], want, atol=1e-5)


def test_dense_delta_is_the_public_x_times_scaling_a_b():
    """The dense form's shapes and function: every target is H x H; the public code's A (B, H, r) and
    B (B, r, H) are this LoRA's b and a^T; each cell's features x become x + x (scaling A B), the public
    bmm of the cells by the dense delta; the context goes through the public fusion MLP."""
    cfg = params_with(**TINY_MODEL, model__hyperlora_scaling=0.5, model__hyperlora_dropout=0.0).model
    H, r = cfg.hidden_dim, cfg.hyperlora_rank
    dims = RecursiveSolver.lora_dims(cfg)
    assert dims == {t: (H, H) for t in TARGETS}
    hl = HyperLoRA(cfg, dims).eval()
    torch.manual_seed(1)
    pooled = torch.randn(3, H)
    lora = hl(pooled)
    z = F.layer_norm(F.gelu(pooled @ hl.fuse_in.weight.T + hl.fuse_in.bias) @ hl.fuse_out.weight.T + hl.fuse_out.bias,
                     (H,), hl.norm.weight, hl.norm.bias)
    x = torch.randn(3, H, 2, 3)
    for t in TARGETS:
        a_pub = hl.head_b[t](z).view(3, H, r)  # the public A (in_features, rank)
        b_pub = hl.head_a[t](z).view(3, H, r).transpose(1, 2)  # the public B (rank, out_features)
        assert lora.a[t].shape == (3, H, r) and lora.b[t].shape == (3, H, r)
        dense = cfg.hyperlora_scaling * torch.bmm(a_pub, b_pub)  # (B, H, H)
        cells = x.permute(0, 2, 3, 1).reshape(3, 6, H)
        want = torch.bmm(cells, dense).reshape(3, 2, 3, H).permute(0, 3, 1, 2)
        assert torch.allclose(lora.apply(t, x), want, atol=1e-6)
        assert torch.allclose(lora.magnitudes()[t], dense.flatten(1).norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(model__solver_candidate="conv"), dict(model__context_injector="attention"),
                                dict(model__hyperlora_delta="factored")])
def test_each_earlier_form_is_another_model_that_runs(kw):
    public, other = (RLAN(params_with(**{**TINY_MODEL, **f}).model) for f in ({}, kw))
    assert count(other) != count(public)
    assert other(example_batch(2), 1.0).logits[-1].shape == (2, NUM_TOKENS, 30, 30)


def test_model_file_records_its_forms(tmp_path):
    """A model file names its forms; a caller that needs others is refused in one line naming the keys;
    a file of format 2 (before the forms were options) loads as the earlier forms."""
    torch.manual_seed(0)
    earlier = RLAN(params_with(**TINY_MODEL, **{f"model__{k}": v for k, v in FORMS_BEFORE_OPTIONS.items()}).model)
    path = tmp_path / "m.pt"
    save_model(path, earlier, {})
    obj = torch.load(path, weights_only=True)
    assert {k: obj["model_params"][k] for k in PUBLIC_FORMS} == FORMS_BEFORE_OPTIONS
    with pytest.raises(ModelFileError) as err:
        load_model(path, forms=PUBLIC_FORMS)
    msg = str(err.value)
    assert "\n" not in msg and all(f"model.{k}" in msg for k in PUBLIC_FORMS), msg
    back, _ = load_model(path, forms=FORMS_BEFORE_OPTIONS)
    assert back.cfg.hyperlora_delta == "factored"
    # the same file as format 2 wrote it: no form keys
    obj["format"] = 2
    obj["model_params"] = {k: v for k, v in obj["model_params"].items() if k not in PUBLIC_FORMS}
    torch.save(obj, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    b = example_batch(2)
    assert torch.equal(old.eval()(b, 0.5).logits[-1], earlier.eval()(b, 0.5).logits[-1])
    with pytest.raises(ModelFileError, match=r"model.solver_candidate 'conv' \(wanted 'swiglu'\)"):
        load_model(tmp_path / "old.pt", forms=PUBLIC_FORMS)
