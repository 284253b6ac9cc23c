"""RLAN: context encoder -> context injection -> DSC clues -> MSRE -> recursive solver.

    batch (pipeline.loader) --ContextEncoder--> support tokens, pooled task vector --HyperLoRA--> deltas
    query_in --embed--> features --inject context--> --DSC--> clue maps, centroids, stop logits
             --MSRE--> relative-position features --fuse--> x --RecursiveSolver(deltas)--> logits per step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.canvas import PAD
from pipeline.model.context import ContextEncoder, ContextInjector
from pipeline.model.dsc import DSC, Clues
from pipeline.model.hyperlora import LoRA, HyperLoRA
from pipeline.model.layers import ChannelNorm, GridEmbedding
from pipeline.model.msre import MSRE
from pipeline.model.solver import RecursiveSolver
from pipeline.model.stablemax import log_stablemax
from pipeline.params import ModelParams


@dataclass
class TaskContext:
    tokens: torch.Tensor  # (B, T, H) support tokens
    token_mask: torch.Tensor  # (B, T) valid tokens
    pooled: torch.Tensor  # (B, H)
    lora: LoRA | None


@dataclass
class Output:
    logits: list[torch.Tensor]  # per solver step, (B, NUM_TOKENS, h, w)
    clues: Clues
    context: TaskContext

    def step_logits(self, best_step: bool) -> torch.Tensor:
        """The last step's logits, or per sample the step whose prediction has the lowest entropy."""
        if not best_step:
            return self.logits[-1]
        stacked = torch.stack(self.logits, 0).float()  # (T, B, C, h, w)
        logp = log_stablemax(stacked, 2)  # the model's probabilities are stablemax ones
        ent = -(logp.exp() * logp).sum(2)  # (T, B, h, w)
        grid = (stacked.argmax(2) != PAD).float()  # cells the step predicts as part of the answer
        score = (ent * grid).sum((2, 3)) / grid.sum((2, 3)).clamp_min(1.0)
        best = score.argmin(0)  # (B,)
        return stacked[best, torch.arange(stacked.shape[1], device=best.device)].to(self.logits[-1].dtype)


class RLAN(nn.Module):
    def __init__(self, cfg: ModelParams):
        super().__init__()
        H = cfg.hidden_dim
        self.cfg = cfg
        self.embed = GridEmbedding(H)
        self.context = ContextEncoder(cfg)
        self.inject = ContextInjector(cfg)
        self.dsc = DSC(cfg)
        self.msre = MSRE(cfg)
        self.fuse = nn.Sequential(nn.Conv2d(2 * H, H, 1), ChannelNorm(H), nn.GELU())
        self.hyperlora = HyperLoRA(cfg, RecursiveSolver.lora_dims(cfg)) if cfg.use_hyperlora else None
        self.solver = RecursiveSolver(cfg)

    def encode_context(self, demo_in, demo_out, demo_mask) -> TaskContext:
        tokens, token_mask, pooled = self.context(demo_in, demo_out, demo_mask)
        lora = self.hyperlora(pooled) if self.hyperlora is not None else None
        return TaskContext(tokens, token_mask, pooled, lora)

    def forward(self, batch: dict[str, torch.Tensor], temperature: float,
                context: TaskContext | None = None) -> Output:
        if context is None:
            context = self.encode_context(batch["demo_in"], batch["demo_out"], batch["demo_mask"])
        q = batch["query_in"]
        f = self.inject(self.embed(q), context.tokens, context.token_mask, context.pooled)
        clues = self.dsc(f, context.pooled, temperature)
        rel = self.msre(clues.centroids, clues.stop_prob, q.shape[-2], q.shape[-1])
        x = self.fuse(torch.cat([f, rel], 1))
        logits = self.solver(x, context.tokens, context.token_mask, context.lora)
        return Output(logits, clues, context)
