"""TRM, the second model family: shapes, the recursion's gradient, halting and deep supervision
with carried state, the puzzle embeddings' sign-SGD, the schedule, the model file, and a tiny TRM
that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.canvas import NUM_TOKENS
from pipeline.loader import batch_from_pairs
from pipeline.model import family as families
from pipeline.model.io import load_model, save_model
from pipeline.model.trm import TRM
from pipeline.model.trm.family import ACTObjective, Optimizers, TRMBatch, act_loss
from pipeline.model.trm.layers import TRUNCATED_STD, swiglu_width, trunc_normal_
from pipeline.model.trm.puzzle import PuzzleEmbedding, SignSGD
from pipeline.train.schedule import warmup_cosine
from tests.helpers import TINY, params_with

TINY_TRM = {k: v for k, v in TINY.items() if k.startswith("trm__")}


def tiny(**kw) -> TRM:
    torch.manual_seed(0)
    return TRM(params_with(**{**TINY_TRM, **kw}).trm, num_puzzles=6)


def examples(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) (n, 900) int64 of small random grids on the canvas."""
    rng = np.random.default_rng(seed)

    def g():
        return rng.integers(0, 10, tuple(rng.integers(1, 4, 2))).astype(np.uint8)

    b = batch_from_pairs([([], g(), g()) for _ in range(n)])
    return b["query_in"].long().flatten(1), b["query_out"].long().flatten(1)


@pytest.mark.slow
def test_shapes_and_every_parameter_learns():
    m = tiny().train()
    x, y = examples(3)
    carry, seg = m.segment(m.initial_carry(3, x.device), x, y, torch.tensor([1, 2, 3]))
    assert seg.logits.shape == (3, NUM_TOKENS, 30, 30) and seg.q_halt.shape == (3,)
    assert carry.y.shape == carry.z.shape == (3, m.cfg.puzzle_emb_len + 900, m.cfg.hidden_size)
    assert not carry.y.requires_grad and torch.equal(carry.inputs, x) and torch.equal(carry.labels, y)
    loss, _ = act_loss(carry, seg.logits, seg.q_halt, 0.5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    [(ids, rows)] = m.puzzle.pending
    assert ids.tolist() == [1, 2, 3] and rows.grad.abs().sum() > 0


@pytest.mark.slow
def test_init_as_trm():
    t = trunc_normal_(torch.empty(200_000), 0.5)
    assert abs(float(t.std()) - 0.5) < 0.01 and float(t.abs().max()) <= 2 * 0.5 / TRUNCATED_STD + 1e-6
    assert swiglu_width(512, 4) == 1536 and swiglu_width(916, 4) == 2560 and swiglu_width(16, 4) == 256
    m = TRM(params_with().trm, num_puzzles=2)  # TRM's ARC-AGI-1 size: about 7M parameters
    assert 6.5e6 < sum(p.numel() for p in m.parameters()) < 7.2e6
    assert float(m.q_head.bias.detach()) == -5.0 and float(m.q_head.weight.detach().abs().sum()) == 0.0
    assert float(m.puzzle.weight.abs().sum()) == 0.0


@pytest.mark.slow
def test_gradient_only_through_the_last_cycle():
    m = tiny(trm__h_cycles=3, trm__l_cycles=2, trm__num_layers=2).train()
    with_grad = []
    for block in m.blocks:
        block.register_forward_hook(lambda mod, inp, out: with_grad.append(torch.is_grad_enabled()))
    x, y = examples(2)
    carry, seg = m.segment(m.initial_carry(2, x.device), x, y, torch.tensor([1, 2]))
    # h_cycles x (l_cycles + 1) applications of the 2-block network; the last (2 + 1) with gradient
    assert len(with_grad) == 3 * 3 * 2 and with_grad == [False] * 12 + [True] * 6
    # the state carried into a segment goes through the cycles without gradient first: none reaches it
    y0 = carry.y.clone().requires_grad_(True)
    carry2, seg2 = m.segment(type(carry)(**{**carry.__dict__, "y": y0}), x, y, torch.tensor([1, 2]))
    seg2.logits.sum().backward()
    assert y0.grad is None and not carry2.y.requires_grad
    assert m.tokens.grad is not None  # the last cycle's gradient reaches the input embedding


def run_segments(m: TRM, n: int, batch: int = 3) -> list:
    x, y = examples(batch)
    carry, out = m.initial_carry(batch, x.device), []
    for _ in range(n):
        carry, seg = m.segment(carry, x, y, torch.arange(batch) % 5 + 1)
        out.append((carry, seg))
    return out


@pytest.mark.slow
def test_a_sample_halts_when_its_q_head_says_so_and_at_halt_max_steps():
    m = tiny(trm__halt_max_steps=4, trm__halt_exploration_prob=0.0).train()
    with torch.no_grad():
        m.q_head.bias.fill_(-5.0)  # q_halt < 0: never says halt
    steps = [(c.steps.tolist(), c.halted.tolist()) for c, _ in run_segments(m, 5)]
    assert steps[:4] == [([1] * 3, [False] * 3), ([2] * 3, [False] * 3), ([3] * 3, [False] * 3),
                         ([4] * 3, [True] * 3)]  # halted at halt_max_steps
    assert steps[4] == ([1] * 3, [False] * 3)  # then a new example from the first segment
    with torch.no_grad():
        m.q_head.bias.copy_(torch.tensor([5.0]))  # q_halt > 0: halts after its first segment
    assert all(c.halted.all() and (c.steps == 1).all() for c, _ in run_segments(m, 3))


@pytest.mark.slow
def test_exploration_makes_a_sample_run_at_least_two_segments():
    m = tiny(trm__halt_max_steps=4, trm__halt_exploration_prob=1.0).train()
    with torch.no_grad():
        m.q_head.bias.fill_(5.0)
    torch.manual_seed(0)
    first, second = run_segments(m, 2, batch=8)
    assert not first[0].halted.any()  # every sample explores: at least 2..halt_max_steps segments
    assert (second[0].steps == 2).all()


@pytest.mark.slow
def test_in_evaluation_every_sample_runs_every_segment():
    m = tiny(trm__halt_max_steps=3).eval()
    with torch.no_grad():
        m.q_head.bias.fill_(5.0)  # would halt at once in training
    assert [c.halted.tolist() for c, _ in run_segments(m, 3)] == [[False] * 3, [False] * 3, [True] * 3]
    x, _ = examples(2)
    seg, halt_at = m.solve(x, torch.tensor([1, 2]))
    assert halt_at.tolist() == [1, 1] and seg.logits.shape == (2, NUM_TOKENS, 30, 30)
    with torch.no_grad():
        m.q_head.bias.fill_(-5.0)
    assert m.solve(x, torch.tensor([1, 2]))[1].tolist() == [3, 3]  # never said halt: halt_max_steps


def test_halted_slots_take_new_examples_the_others_keep_theirs_and_carries_restart_each_epoch():
    m = tiny(trm__halt_max_steps=3, trm__halt_exploration_prob=0.0).train()
    objective = ACTObjective(m, 0.5)
    (x1, y1), (x2, y2) = examples(2, seed=1), examples(2, seed=2)

    def batch(x, y, epoch):
        return TRMBatch(x.view(-1, 30, 30).to(torch.uint8), y.view(-1, 30, 30).to(torch.uint8), torch.tensor([1, 2]),
                        epoch, index=0)

    objective(batch(x1, y1, 1), 1.0)
    _, carry = objective.carries[0]
    carry.halted[:] = torch.tensor([True, False])  # slot 0 is done with its example, slot 1 is not
    objective(batch(x2, y2, 1), 1.0)
    _, carry = objective.carries[0]
    assert torch.equal(carry.inputs[0], x2[0]) and torch.equal(carry.inputs[1], x1[1])
    assert carry.steps.tolist() == [1, 2]
    objective(batch(x2, y2, 2), 1.0)  # a new epoch: every slot starts afresh
    assert objective.carries[0][1].steps.tolist() == [1, 1]


def test_sign_sgd_moves_only_the_rows_in_the_step():
    emb = PuzzleEmbedding(6, 3).train()
    with torch.no_grad():
        emb.weight.copy_(torch.arange(18, dtype=torch.float32).view(6, 3))
    before = emb.weight.clone()
    opt = SignSGD(emb, lr=0.1, weight_decay=0.5)
    first = emb(torch.tensor([1, 3, 1]))  # row 1 twice: its gradients add up before the sign
    second = emb(torch.tensor([4]))  # a second micro-batch of the same step
    (first * torch.tensor([[1.0, -1.0, 2.0], [-1.0, 0.0, 1.0], [-3.0, 2.0, -1.0]])).sum().backward()
    (second * -1.0).sum().backward()
    opt.step()
    w = emb.weight
    decay = 1 - 0.1 * 0.5
    assert torch.allclose(w[1], before[1] * decay - 0.1 * torch.tensor([-1.0, 1.0, 1.0]))  # sign of (-2, 1, 1)
    assert torch.allclose(w[3], before[3] * decay - 0.1 * torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(w[4], before[4] * decay + 0.1)
    for row in (0, 2, 5):  # not in the step: neither moved nor decayed
        assert torch.equal(w[row], before[row])
    assert emb.pending == []
    emb(torch.tensor([2])).sum().backward()
    opt.zero_grad()  # a skipped step forgets what it read
    opt.step()
    assert torch.equal(emb.weight[2], before[2])
    with torch.no_grad():  # outside training nothing is recorded
        emb(torch.tensor([0]))
    assert emb.pending == []


def test_warmup_then_cosine_schedule():
    lr = [warmup_cosine(1.0, s, 4, 12, 0.1) for s in range(12)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lr[3:], lr[4:]))
    assert {warmup_cosine(1.0, s, 2, 10, 1.0) for s in range(1, 10)} == {1.0}  # TRM's ARC setting: constant


@pytest.mark.slow
def test_model_file_round_trip(tmp_path):
    m = tiny().eval()
    with torch.no_grad():
        m.puzzle.weight.normal_()
    save_model(tmp_path / "m.pt", m, {"temperature": 1.0})
    loaded, meta = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, TRM) and families.of(loaded).name == "trm" and loaded.num_puzzles == 6
    x, _ = examples(2)
    assert torch.equal(loaded.solve(x, torch.tensor([1, 5]))[0].logits, m.solve(x, torch.tensor([1, 5]))[0].logits)


def test_optimizers_step_and_restore_together(tmp_path):
    m = tiny().train()
    opt = Optimizers(torch.optim.AdamW(m.parameters(), lr=1e-3), SignSGD(m.puzzle, 0.1, 0.0))
    x, y = examples(2)
    carry, seg = m.segment(m.initial_carry(2, x.device), x, y, torch.tensor([1, 2]))
    act_loss(carry, seg.logits, seg.q_halt, 0.5)[0].backward()
    opt.step()
    assert float(m.puzzle.weight[1:3].abs().sum()) > 0 and float(m.puzzle.weight[3:].abs().sum()) == 0
    state = opt.state_dict()
    other = Optimizers(torch.optim.AdamW(m.parameters(), lr=0.5), SignSGD(m.puzzle, 0.7, 0.0))
    other.load_state_dict(state)
    assert other.network.param_groups[0]["lr"] == 1e-3 and other.embedding.param_groups[0]["lr"] == 0.1


@pytest.mark.slow
def test_tiny_trm_learns_a_handful_of_examples():
    """Deep supervision, the halting loss and both optimisers together: the training loss on four
    fixed examples falls, and so does the eval-mode loss of all segments."""
    from pipeline.train.losses import stablemax_cross_entropy

    m = tiny(trm__halt_max_steps=2, trm__halt_exploration_prob=0.0).train()
    objective = ACTObjective(m, 0.5)
    opt = Optimizers(torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95)), SignSGD(m.puzzle, 1e-2, 0.0))
    x, y = examples(4, seed=3)
    tb = TRMBatch(x.view(-1, 30, 30).to(torch.uint8), y.view(-1, 30, 30).to(torch.uint8), torch.arange(1, 5), 1, 0)

    def eval_loss() -> float:
        m.eval()
        seg, _ = m.solve(x, torch.arange(1, 5))
        m.train()
        return float(stablemax_cross_entropy(seg.logits, y.view(-1, 30, 30)).mean())

    before, losses = eval_loss(), []
    for _ in range(50):
        loss, logs = objective(tb, 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(logs["loss_task"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert eval_loss() < 0.6 * before
