"""RecursiveSolver: a convolutional GRU refines a hidden map for `num_solver_steps` steps.

At every step the GRU gates (reset, update, candidate; 3x3 convolutions over [x, h]) get the
task's HyperLoRA deltas, the hidden map reads the support tokens by cross-attention
(`use_solver_context`), and the output head (with its delta) gives per-cell token logits.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.canvas import NUM_TOKENS
from pipeline.model.hyperlora import LoRA
from pipeline.model.layers import CrossAttention2d
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
        self.head = nn.Conv2d(H, NUM_TOKENS, 1)
        self.dropout = nn.Dropout(cfg.dropout)

    @staticmethod
    def lora_dims(cfg: ModelParams) -> dict[str, tuple[int, int]]:
        H = cfg.hidden_dim
        return {"gru_reset": (2 * H, H), "gru_update": (2 * H, H), "gru_candidate": (2 * H, H),
                "output_head": (H, NUM_TOKENS)}

    def forward(self, x, tokens, token_mask, lora: LoRA | None) -> list[torch.Tensor]:
        """x (B, H, h, w) -> logits of every step, each (B, NUM_TOKENS, h, w)."""
        def delta(target: str, inp: torch.Tensor) -> torch.Tensor | float:
            return lora.apply(target, inp) if lora is not None else 0.0

        h = x
        logits = []
        for _ in range(self.steps):
            xh = torch.cat([x, h], 1)
            r = torch.sigmoid(self.reset(xh) + delta("gru_reset", xh))
            z = torch.sigmoid(self.update(xh) + delta("gru_update", xh))
            xrh = torch.cat([x, r * h], 1)
            n = torch.tanh(self.candidate(xrh) + delta("gru_candidate", xrh))
            h = (1 - z) * h + z * self.dropout(n)
            if self.context is not None:
                h = h + self.context(h, tokens, token_mask)
            logits.append(self.head(h) + delta("output_head", h))
        return logits
