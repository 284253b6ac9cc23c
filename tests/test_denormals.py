"""Denormal numbers on the CPU: training and evaluation flush them (train.flush_denormals), and the
layers that used to make them do not."""

from __future__ import annotations

import sys

import pytest
import torch

import pipeline.train.loop as loop
import stages.evaluate as evaluate_stage
from pipeline.arc import read_raw
from pipeline.model.io import ModelFileError
from pipeline.params import load_params
from pipeline.tracking import Tracker
from tests.helpers import tiny_workspace

SUBNORMAL = 1e-40  # below torch.finfo(torch.float32).tiny (1.2e-38): a float32 subnormal


def flushing() -> bool:
    """Whether torch computes float32 subnormals as 0 right now (what set_flush_denormal set)."""
    return torch.tensor([SUBNORMAL], dtype=torch.float32).mul(1.0).item() == 0.0


@pytest.fixture
def flush_state():
    """Each test starts from the opposite of what it expects and leaves torch's default (off), in its
    worker threads too."""
    yield
    from pipeline.runtime import use_cpu

    use_cpu(torch.get_num_threads(), False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("ws"), train__epochs=1)


@pytest.mark.parametrize("flush", [True, False])
def test_training_flushes_denormals_on_the_cpu_unless_turned_off(workspace, tmp_path, monkeypatch, flush_state,
                                                                  flush):
    params = load_params(workspace["params"]).override({"train.flush_denormals": flush})
    seen = []
    # the loop proper (model, pre-flight, steps) starts once the set-up is done: what torch does then
    monkeypatch.setattr(loop, "_train", lambda *args: seen.append(flushing()))
    torch.set_flush_denormal(not flush)
    loop.train(params, read_raw(workspace["raw"] / "pairs.parquet"),
               loop.TrainPaths(workspace["cache"], tmp_path / "ckpt", tmp_path / "model.pt", tmp_path / "train.json",
                               tmp_path / "plots"),
               Tracker(params, enabled=False))
    assert seen == [flush]


@pytest.mark.parametrize("flush", [True, False])
def test_evaluation_stage_flushes_denormals_on_the_cpu_unless_turned_off(workspace, tmp_path, monkeypatch,
                                                                         flush_state, flush):
    params_file = tmp_path / "params.yaml"
    text = workspace["params"].read_text()
    assert "flush_denormals: true" in text
    params_file.write_text(text.replace("flush_denormals: true", f"flush_denormals: {str(flush).lower()}"))
    seen = []

    def load_model(path, device, forms=None):  # the first computation of the stage: what torch does by then
        seen.append(flushing())
        raise ModelFileError(f"{path}: not a model (the test stops here)")

    monkeypatch.setattr(evaluate_stage, "load_model", load_model)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "evaluate", "--params", str(params_file), "--model", str(out / "model.pt"), "--raw", str(workspace["raw"]),
        "--cache", str(workspace["cache"]), "--metrics", str(out / "m.json"), "--tasks-table", str(out / "t.csv"),
        "--submission", str(out / "s.json"), "--candidates", str(out / "c.json")])
    torch.set_flush_denormal(not flush)
    with pytest.raises(SystemExit):
        evaluate_stage.main()
    assert seen == [flush]


def _subnormal(t: torch.Tensor) -> int:
    a = t.detach().abs()
    return int(((a > 0) & (a < torch.finfo(torch.float32).tiny)).sum())


def test_saturated_clue_scores_make_the_same_maps_without_subnormal_numbers(flush_state):
    """A trained clue's scores reach the clamp (+-50 after the temperature): a 100-wide window in which
    exp(-100) is a float32 subnormal. The maps are what the public formula gives; neither they nor the
    scores' gradient hold a subnormal value."""
    from pipeline.model.rlan.dsc import ATTENTION_FLOOR, SCORE_CLAMP, clue_map

    torch.set_flush_denormal(False)
    torch.manual_seed(0)
    scores = (torch.randn(16, 400) * 40).clamp(-SCORE_CLAMP, SCORE_CLAMP).requires_grad_()
    public = torch.softmax((scores / 0.5).clamp(-SCORE_CLAMP, SCORE_CLAMP), -1).clamp_min(ATTENTION_FLOOR)
    assert _subnormal(torch.softmax((scores / 0.5).clamp(-SCORE_CLAMP, SCORE_CLAMP), -1)) > 0  # the case at hand
    maps = clue_map(scores, 0.5)
    assert torch.equal(maps, public)
    upstream = torch.randn_like(maps)
    grad, = torch.autograd.grad((maps * upstream).sum(), scores)
    reference, = torch.autograd.grad((public * upstream).sum(), scores)
    assert _subnormal(grad) == 0
    assert torch.allclose(grad, reference, rtol=0, atol=1e-16)  # only gradients under 4e-18 of the others differ


def test_profile_counts_the_subnormal_values_each_module_writes_forward_and_backward(flush_state):
    """benchmarks.denormals' census on a known case: a layer that squares four values of 1e-20 writes
    4 subnormal values forward and, with an upstream gradient of 1e-20, at least 4 in its backward
    pass (2 x 1e-20 x 1e-20 each); the identity linear layer before it writes none forward."""
    from torch.utils.module_tracker import ModuleTracker

    from benchmarks.denormals import Census

    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), Square())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
    torch.set_flush_denormal(False)
    x = torch.full((1, 4), 1e-20, requires_grad=True)
    tracker = ModuleTracker()
    census = Census(tracker, count=True)
    with tracker, census:
        (net(x) * 1e-20).sum().backward()
    written: dict[tuple[str, str], int] = {}
    for (module, phase, _), (sub, _, _) in census.rows.items():
        written[(module, phase)] = written.get((module, phase), 0) + sub
    assert written[("Sequential.1", "forward")] == 4
    assert written[("Sequential.1", "backward")] >= 4
    assert written.get(("Sequential.0", "forward"), 0) == 0


def test_the_flush_reaches_worker_threads_started_before_it(flush_state, caplog):
    """torch's OpenMP workers copy the flush setting when they start: use_cpu also reaches the ones an
    earlier parallel operation started (without it, the workers' share of a product stays subnormal)."""
    from pipeline.runtime import use_cpu

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = torch.full((1 << 22,), 1e-20)  # a parallel operation: the worker thread starts, not flushing
        assert int((big * big != 0).sum()) == big.numel()
        use_cpu(2, True)
        assert int((big * big != 0).sum()) == 0
        assert not caplog.records  # its own check found every thread flushing
        use_cpu(2, False)
        assert int((big * big != 0).sum()) == big.numel()
    finally:
        torch.set_num_threads(before)


def test_worker_threads_that_keep_denormals_are_reported(flush_state, monkeypatch, caplog):
    """Where the OpenMP runtime cannot release its workers, use_cpu says so in one warning."""
    from pipeline import runtime

    monkeypatch.setattr(runtime, "OPENMP_LIBRARIES", ())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.full((1 << 22,), 1e-20).mul(1.0)  # the worker thread starts, not flushing
        runtime.use_cpu(2, True)
    finally:
        torch.set_num_threads(before)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "torch's worker threads could not be made to flush denormal numbers (no OpenMP runtime that releases "
        "them): set train.cpu_threads to 1 if CPU training runs slowly"]
