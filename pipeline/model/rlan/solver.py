"""RecursiveSolver: a convolutional GRU refines a hidden map for `num_solver_steps` steps.

At every step the GRU gates (reset, update, candidate; 3x3 convolutions over [x, h]) get the
task's HyperLoRA deltas and the hidden map reads the support tokens by cross-attention
(`use_solver_context`; their keys and values are projected once for all steps). The output head is
the public one: conv3x3(H, H) -> GELU -> GroupNorm(8) -> conv1x1(H, NUM_TOKENS), with zero initial
biases on the last; the HyperLoRA delta acts on its input (h + delta_W h). It reads the last step, or
every step when asked (best-step selection).

x is the same at every step, so each gate's convolution over [x, h] is computed as the convolution
of x (once per pass, bias included) plus the convolution of h (every step), and the x half of each
HyperLoRA delta likewise: the same function as convolving the concatenation, with the x half's work
done once instead of `num_solver_steps` times (5/12 of the gates' FLOPs at 6 steps).

With `recompute` (train.activation_checkpointing), each step's activations are recomputed in the
backward pass instead of being kept: memory per sample no longer grows with the steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.canvas import NUM_TOKENS
from pipeline.model.rlan.hyperlora import LoRA
from pipeline.model.rlan.layers import CrossAttention2d, run
from pipeline.params import ModelParams


class RecursiveSolver(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H = cfg.hidden_dim
        self.steps = cfg.num_solver_steps
        self.reset = nn.Conv2d(2 * H, H, 3, padding=1)
        self.update = nn.Conv2d(2 * H, H, 3, padding=1)
        self.candidate = nn.Conv2d(2 * H, H, 3, padding=1)
        self.context = CrossAttention2d(H, cfg.solver_context_heads, cfg.dropout) if cfg.use_solver_context else None
        self.head = nn.Sequential(nn.Conv2d(H, H, 3, padding=1), nn.GELU(), nn.GroupNorm(8, H),
                                  nn.Conv2d(H, NUM_TOKENS, 1))
        nn.init.zeros_(self.head[3].bias)  # neutral start: no class favoured
        self.dropout = nn.Dropout(cfg.dropout)
        self.recompute = False

    @staticmethod
    def lora_dims(cfg: ModelParams) -> dict[str, tuple[int, int]]:
        H = cfg.hidden_dim
        return {"gru_reset": (2 * H, H), "gru_update": (2 * H, H), "gru_candidate": (2 * H, H),
                "output_head": (H, H)}

    GATES = ("reset", "update", "candidate")

    def input_part(self, x: torch.Tensor, lora: LoRA | None) -> dict[str, torch.Tensor]:
        """Each gate's pre-activation from x alone (its convolution's x half and bias, and the x half
        of its LoRA delta): computed once, shared by every step."""
        H = x.shape[1]
        out = {}
        for g in self.GATES:
            conv = getattr(self, g)
            out[g] = F.conv2d(x, conv.weight[:, :H], conv.bias, padding=1)
            if lora is not None:
                out[g] = out[g] + lora.apply_part(f"gru_{g}", x, 0)
        return out

    def gate(self, g: str, x_part: torch.Tensor, h: torch.Tensor, lora: LoRA | None) -> torch.Tensor:
        """The gate's pre-activation over [x, h], from its x part and the h half."""
        H = h.shape[1]
        pre = x_part + F.conv2d(h, getattr(self, g).weight[:, H:], padding=1)
        return pre + lora.apply_part(f"gru_{g}", h, H) if lora is not None else pre

    def step(self, xs: dict[str, torch.Tensor], h, memory, lora: LoRA | None) -> torch.Tensor:
        """One GRU step and one read of the support tokens: (B, H, h, w) -> (B, H, h, w)."""
        r = torch.sigmoid(self.gate("reset", xs["reset"], h, lora))
        z = torch.sigmoid(self.gate("update", xs["update"], h, lora))
        n = torch.tanh(self.gate("candidate", xs["candidate"], r * h, lora))
        h = (1 - z) * h + z * self.dropout(n)
        if self.context is not None:
            h = h + self.context.read(h, memory)
        return h

    def readout(self, h: torch.Tensor, lora: LoRA | None) -> torch.Tensor:
        """(B, H, h, w) -> token logits (B, NUM_TOKENS, h, w)."""
        if lora is not None:
            h = h + lora.apply("output_head", h)
        return self.head(h)

    def forward(self, x, tokens, token_mask, lora: LoRA | None, all_steps: bool = False) -> list[torch.Tensor]:
        """x (B, H, h, w) -> logits (B, NUM_TOKENS, h, w) of every step, or of the last one only."""
        memory = self.context.memory(tokens, token_mask) if self.context is not None else None  # once for all steps
        xs = self.input_part(x, lora)  # once for all steps
        h = x
        logits = []
        for i in range(self.steps):
            h = run(self.step, xs, h, memory, lora, recompute=self.recompute)
            if all_steps or i == self.steps - 1:
                logits.append(self.readout(h, lora))
        return logits
