"""RecursiveSolver: a convolutional GRU refines a hidden map for `num_solver_steps` steps.

The GRU's input x_in is step-invariant: the solver's input x, and with the public candidate
(`solver_candidate: swiglu`) also an embedding of the query canvas, [x, embed(query)]. The reset and
update gates are 3x3 convolutions over [x_in, h]. The candidate has two forms:

- `swiglu` (the public ConvGRUCell at 74a42b0): a 1x1 convolution over [x_in, r h] to H channels,
  then a SwiGLU of 3x3 convolutions (H -> 2I, silu(gate) * up, I -> H; I = 4H/3 rounded up to a
  multiple of 64, no biases, weights N(0, 0.02) truncated), then tanh;
- `conv` (this project's earlier form): tanh of a 3x3 convolution over [x_in, r h].

The task's HyperLoRA deltas act on the gates (`hyperlora_delta`): on each gate's pre-activation
(the candidate's: the 1x1 projection's output), p + delta p, in the dense form; on each gate's
input [x_in, h] in the factored form. After each GRU step the hidden map reads the support tokens
by cross-attention (`use_solver_context`; their keys and values projected once for all steps).

The output head is the public one: conv3x3(H, H) -> GELU -> GroupNorm(8) -> conv1x1(H, NUM_TOKENS),
the last bias -0.5 on colour 0 (the background) and 0 elsewhere as the public head initialises its
ten colour classes; the HyperLoRA delta acts on its input (h + delta h). It reads the last step, or
every step when asked (best-step selection).

x_in is the same at every step, so each gate's convolution over [x_in, h] is computed as the
convolution of x_in (once per pass, bias included) plus the convolution of h (every step), and the
x_in half of each factored delta likewise: the same function as convolving the concatenation, with
the x_in half's work done once instead of `num_solver_steps` times.

With `recompute` (train.activation_checkpointing), each step's activations are recomputed in the
backward pass instead of being kept: memory per sample no longer grows with the steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.canvas import COLOR_OFFSET, NUM_TOKENS
from pipeline.model.rlan.hyperlora import LoRA
from pipeline.model.rlan.layers import CrossAttention2d, run
from pipeline.params import ModelParams

BACKGROUND_BIAS = -0.5  # the public head's initial bias of colour 0


def swiglu_width(channels: int) -> int:
    """The public SwiGLUConv2d's intermediate width at expansion 2: round(2 * channels * 2/3) rounded
    up to a multiple of 64."""
    return -(-round(2.0 * channels * 2 / 3) // 64) * 64


class SwiGLUConv(nn.Module):
    """conv3x3(C, 2I) -> silu(gate) * up -> conv3x3(I, C), no biases (the public SwiGLUConv2d)."""

    def __init__(self, channels: int):
        super().__init__()
        inner = swiglu_width(channels)
        self.gate_up = nn.Conv2d(channels, 2 * inner, 3, padding=1, bias=False)
        self.down = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        nn.init.trunc_normal_(self.gate_up.weight, std=0.02)
        nn.init.trunc_normal_(self.down.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=1)
        return self.down(F.silu(gate) * up)


class RecursiveSolver(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H = cfg.hidden_dim
        self.steps = cfg.num_solver_steps
        public = cfg.solver_candidate == "swiglu"
        self.dense = cfg.hyperlora_delta == "dense"
        self.n_x = self.input_width(cfg)
        self.input_embed = nn.Embedding(NUM_TOKENS, H) if public else None
        self.reset = nn.Conv2d(self.n_x + H, H, 3, padding=1)
        self.update = nn.Conv2d(self.n_x + H, H, 3, padding=1)
        self.candidate = nn.Conv2d(self.n_x + H, H, 1) if public else nn.Conv2d(self.n_x + H, H, 3, padding=1)
        self.swiglu = SwiGLUConv(H) if public else None
        self.context = CrossAttention2d(H, cfg.solver_context_heads, cfg.dropout) if cfg.use_solver_context else None
        self.head = nn.Sequential(nn.Conv2d(H, H, 3, padding=1), nn.GELU(), nn.GroupNorm(8, H),
                                  nn.Conv2d(H, NUM_TOKENS, 1))
        nn.init.zeros_(self.head[3].bias)
        with torch.no_grad():
            self.head[3].bias[COLOR_OFFSET] = BACKGROUND_BIAS
        self.dropout = nn.Dropout(cfg.dropout)
        self.recompute = False

    @staticmethod
    def input_width(cfg: ModelParams) -> int:
        """Channels of the step-invariant input x_in: x, and the query embedding with the public candidate."""
        return 2 * cfg.hidden_dim if cfg.solver_candidate == "swiglu" else cfg.hidden_dim

    @classmethod
    def lora_dims(cls, cfg: ModelParams) -> dict[str, tuple[int, int]]:
        """(n_in, n_out) of each HyperLoRA target."""
        H = cfg.hidden_dim
        n_in = H if cfg.hyperlora_delta == "dense" else cls.input_width(cfg) + H
        return {"gru_reset": (n_in, H), "gru_update": (n_in, H), "gru_candidate": (n_in, H), "output_head": (H, H)}

    GATES = ("reset", "update", "candidate")

    def input_part(self, x_in: torch.Tensor, lora: LoRA | None) -> dict[str, torch.Tensor]:
        """Each gate's pre-activation from x_in alone (its convolution's x_in part and bias, and the x_in
        part of a factored delta): computed once, shared by every step."""
        out = {}
        for g in self.GATES:
            conv = getattr(self, g)
            out[g] = F.conv2d(x_in, conv.weight[:, : self.n_x], conv.bias, padding=conv.padding)
            if lora is not None and not self.dense:
                out[g] = out[g] + lora.apply_part(f"gru_{g}", x_in, 0)
        return out

    def gate(self, g: str, x_part: torch.Tensor, h: torch.Tensor, lora: LoRA | None) -> torch.Tensor:
        """The gate's pre-activation over [x_in, h], from its x_in part and the h part, with its delta."""
        conv = getattr(self, g)
        pre = x_part + F.conv2d(h, conv.weight[:, self.n_x :], padding=conv.padding)
        if lora is None:
            return pre
        if self.dense:
            return pre + lora.apply(f"gru_{g}", pre)
        return pre + lora.apply_part(f"gru_{g}", h, self.n_x)

    def step(self, xs: dict[str, torch.Tensor], h, memory, lora: LoRA | None) -> torch.Tensor:
        """One GRU step and one read of the support tokens: (B, H, h, w) -> (B, H, h, w)."""
        r = torch.sigmoid(self.gate("reset", xs["reset"], h, lora))
        z = torch.sigmoid(self.gate("update", xs["update"], h, lora))
        pre = self.gate("candidate", xs["candidate"], r * h, lora)
        n = torch.tanh(self.swiglu(pre) if self.swiglu is not None else pre)
        h = (1 - z) * h + z * self.dropout(n)
        if self.context is not None:
            h = h + self.context.read(h, memory)
        return h

    def readout(self, h: torch.Tensor, lora: LoRA | None) -> torch.Tensor:
        """(B, H, h, w) -> token logits (B, NUM_TOKENS, h, w)."""
        if lora is not None:
            h = h + lora.apply("output_head", h)
        return self.head(h)

    def forward(self, x, query, tokens, token_mask, lora: LoRA | None, all_steps: bool = False) -> list[torch.Tensor]:
        """x (B, H, h, w) and the query canvas (B, h, w) -> logits (B, NUM_TOKENS, h, w) of every step, or
        of the last one only."""
        memory = self.context.memory(tokens, token_mask) if self.context is not None else None  # once for all steps
        x_in = x if self.input_embed is None else torch.cat([x, self.input_embed(query.long()).movedim(-1, 1).to(x.dtype)], 1)
        xs = self.input_part(x_in, lora)  # once for all steps
        h = x
        logits = []
        for i in range(self.steps):
            h = run(self.step, xs, h, memory, lora, recompute=self.recompute)
            if all_steps or i == self.steps - 1:
                logits.append(self.readout(h, lora))
        return logits
