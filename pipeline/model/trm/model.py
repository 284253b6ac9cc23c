"""TRM, the Tiny Recursive Model: one small network, applied over and over.

    canvas (900 tokens) --embed--> x, with the version's puzzle embedding in front (puzzle_emb_len positions)
    per segment, from the carried answer state y and latent z:
        h_cycles times:  z <- net(z + y + x), l_cycles times;  then  y <- net(y + z)
        (gradient only through the last of the h_cycles; the others run without it)
    logits = lm_head(y) over the 900 cells;  q_halt = q_head(y at the first position)

Deep supervision: a sample is supervised after every segment; y and z carry over (detached) to its
next segment, for up to `halt_max_steps` segments. In training a sample halts when q_halt > 0 (with
`halt_exploration_prob`, a random minimum of 2..halt_max_steps segments first), and always at
halt_max_steps; its slot in the batch then takes a new example. In evaluation every sample runs
all halt_max_steps segments. The public code's second Q output (continue) is unused in its ARC
configuration (no continue loss), so the head has the halting output only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.canvas import CANVAS, NUM_TOKENS
from pipeline.model.trm.layers import Block, Linear, rotary_tables, trunc_normal_
from pipeline.model.trm.puzzle import PuzzleEmbedding
from pipeline.params import TRMParams

SEQ = CANVAS * CANVAS


@dataclass
class Carry:
    """The state of each batch slot between segments, and the example it is working on."""

    y: torch.Tensor  # (B, P + 900, H) answer state (the public code's z_H)
    z: torch.Tensor  # (B, P + 900, H) latent reasoning state (z_L)
    steps: torch.Tensor  # (B,) int64 segments run on the slot's example
    halted: torch.Tensor  # (B,) bool: the slot takes a new example at its next segment
    inputs: torch.Tensor  # (B, 900) int64 tokens
    labels: torch.Tensor  # (B, 900) int64 target tokens (PAD is not supervised)
    puzzle: torch.Tensor  # (B,) int64 puzzle embedding row (0: blank)

    @property
    def size(self) -> int:
        return len(self.steps)


@dataclass
class Segment:
    logits: torch.Tensor  # (B, NUM_TOKENS, 30, 30)
    q_halt: torch.Tensor  # (B,) float32 halting logit


class TRM(nn.Module):
    FAMILY = "trm"

    def __init__(self, cfg: TRMParams, num_puzzles: int):
        super().__init__()
        self.cfg, self.num_puzzles = cfg, num_puzzles
        H, P = cfg.hidden_size, cfg.puzzle_emb_len
        self.scale = math.sqrt(H)
        self.tokens = nn.Parameter(trunc_normal_(torch.empty(NUM_TOKENS, H), 1 / self.scale))
        self.puzzle = PuzzleEmbedding(num_puzzles, H)
        self.blocks = nn.ModuleList(Block(H, cfg.num_heads, cfg.expansion, cfg.mixer, P + SEQ, cfg.rms_norm_eps)
                                    for _ in range(cfg.num_layers))
        self.lm_head = Linear(H, NUM_TOKENS)
        self.q_head = Linear(H, 1, bias=True)
        with torch.no_grad():  # halting starts almost never: Q close to 0 probability
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("y_init", trunc_normal_(torch.empty(H), 1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(H), 1.0))
        if cfg.mixer == "attention":
            cos, sin = rotary_tables(H // cfg.num_heads, P + SEQ, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def config(self) -> dict[str, Any]:
        """What rebuilds this model (pipeline.model.io): the trm section and the size of the table."""
        return {"trm": self.cfg.model_dump(), "num_puzzles": self.num_puzzles}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TRM:
        return cls(TRMParams.model_validate(config["trm"]), int(config["num_puzzles"]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.puzzle.clear()  # rows read by a pass whose gradient is dropped

    # -- one application of the network and the recursion --------------------------------------
    def embed(self, inputs: torch.Tensor, puzzle: torch.Tensor) -> torch.Tensor:
        """(B, 900) tokens and (B,) rows -> (B, P + 900, H): the version's embedding at position 0, zeros
        at the other P - 1 prefix positions, then the tokens; all scaled by sqrt(H)."""
        B, P = len(inputs), self.cfg.puzzle_emb_len
        tok = self.tokens[inputs]
        prefix = torch.cat([self.puzzle(puzzle)[:, None].to(tok.dtype), tok.new_zeros(B, P - 1, tok.shape[-1])], 1)
        return self.scale * torch.cat([prefix, tok], 1)

    def net(self, state: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        rope = (self.rope_cos, self.rope_sin) if self.cfg.mixer == "attention" else None
        h = state + injection
        for block in self.blocks:
            h = block(h, rope)
        return h

    def recur(self, y: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_cycles answer updates, each after l_cycles latent updates; only the last carries gradient."""
        c = self.cfg
        with torch.no_grad():
            for _ in range(c.h_cycles - 1):
                for _ in range(c.l_cycles):
                    z = self.net(z, y + x)
                y = self.net(y, z)
        for _ in range(c.l_cycles):
            z = self.net(z, y + x)
        return self.net(y, z), z

    # -- deep supervision ------------------------------------------------------------------------
    def initial_carry(self, batch: int, device: torch.device) -> Carry:
        """Every slot halted: the first segment takes a new example in each."""
        L, H = self.cfg.puzzle_emb_len + SEQ, self.cfg.hidden_size
        zeros = torch.zeros(batch, L, H, device=device)
        none = torch.zeros(batch, dtype=torch.long, device=device)
        cells = torch.zeros(batch, SEQ, dtype=torch.long, device=device)
        return Carry(zeros, zeros, none, torch.ones(batch, dtype=torch.bool, device=device), cells, cells, none)

    def segment(self, carry: Carry, inputs: torch.Tensor, labels: torch.Tensor, puzzle: torch.Tensor
                ) -> tuple[Carry, Segment]:
        """One supervision segment of every slot. Halted slots start the new example given here (the
        others ignore theirs) from the initial states; then the recursion, the heads, and who halts."""
        new = carry.halted
        keep = new[:, None, None]
        y = torch.where(keep, self.y_init.to(carry.y.dtype), carry.y)
        z = torch.where(keep, self.z_init.to(carry.z.dtype), carry.z)
        data = {k: torch.where(new.view(-1, *([1] * (v.dim() - 1))), v, getattr(carry, k))
                for k, v in (("inputs", inputs), ("labels", labels), ("puzzle", puzzle))}
        steps = torch.where(new, 0, carry.steps) + 1
        y, z = self.recur(y, z, self.embed(data["inputs"], data["puzzle"]))
        P = self.cfg.puzzle_emb_len
        logits = self.lm_head(y[:, P:]).transpose(1, 2).unflatten(2, (CANVAS, CANVAS))
        q_halt = self.q_head(y[:, 0]).float().squeeze(-1)
        with torch.no_grad():
            halted = steps >= self.cfg.halt_max_steps
            if self.training and self.cfg.halt_max_steps > 1:
                halted = halted | (q_halt > 0)
                explore = torch.rand_like(q_halt) < self.cfg.halt_exploration_prob
                least = explore * torch.randint_like(steps, 2, self.cfg.halt_max_steps + 1)
                halted = halted & (steps >= least)
        return Carry(y.detach(), z.detach(), steps, halted, **data), Segment(logits, q_halt)

    @torch.no_grad()
    def solve(self, inputs: torch.Tensor, puzzle: torch.Tensor) -> tuple[Segment, torch.Tensor]:
        """Evaluation: every segment (halt_max_steps) of a fresh carry. The last segment's output, and
        per sample the first segment whose q_halt > 0 (halt_max_steps if none): where it would halt."""
        n = self.cfg.halt_max_steps
        carry = self.initial_carry(len(inputs), inputs.device)
        halt_at = torch.full((len(inputs),), n, device=inputs.device)
        said = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
        for s in range(1, n + 1):
            carry, out = self.segment(carry, inputs, inputs, puzzle)  # labels unused here
            first = (out.q_halt > 0) & ~said
            halt_at, said = torch.where(first, s, halt_at), said | first
        return out, halt_at
