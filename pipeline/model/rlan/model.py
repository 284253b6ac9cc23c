"""RLAN: context encoder -> context injection -> DSC clues -> MSRE -> recursive solver.

    context pairs (packed) --ContextEncoder--> Support: tokens, pooled task vector --HyperLoRA--> deltas
    query_in --embed--> features f --inject context--> --DSC--> clue maps, centroids, stop logits
             --MSRE--> f seen from each clue, aggregated over the clues --fuse with f--> x
             --RecursiveSolver(deltas)--> logits

`forward(batch)` does it all from a padded batch; training calls `support`/`context.layout`,
`task_context` and `solve` itself, so that one encoding of each pair serves several queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.canvas import COLOR_OFFSET, PAD
from pipeline.model.rlan.context import (
    ContextEncoder,
    ContextInjector,
    PairLayout,
    Support,
)
from pipeline.model.rlan.dsc import DSC, Clues
from pipeline.model.rlan.hyperlora import HyperLoRA, LoRA
from pipeline.model.rlan.layers import ChannelNorm, GridEmbedding, run
from pipeline.model.rlan.msre import MSRE
from pipeline.model.rlan.solver import RecursiveSolver
from pipeline.model.stablemax import log_stablemax
from pipeline.params import ModelParams


@dataclass
class TaskContext:
    support: Support  # support tokens and pooled vector of each sample
    lora: LoRA | None

    @property
    def pooled(self) -> torch.Tensor:
        return self.support.pooled


@dataclass
class Output:
    logits: list[torch.Tensor]  # per solver step (every step, or the last only), each (B, NUM_TOKENS, h, w)
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


def query_grid(query_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query grid's cells (B, h*w) bool and its size (B, 2): its colour cells on the canvas."""
    cells = query_in >= COLOR_OFFSET
    return cells.flatten(1), torch.stack([cells.any(2).sum(1), cells.any(1).sum(1)], 1)


class RLAN(nn.Module):
    FAMILY = "rlan"

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
        self.recompute = False

    def config(self) -> dict[str, Any]:
        """What rebuilds this model (pipeline.model.io): the model section of params."""
        return self.cfg.model_dump()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RLAN:
        return cls(ModelParams.model_validate(config))

    def checkpoint_activations(self, on: bool) -> None:
        """train.activation_checkpointing: keep none of the activations of the pair encoder, the query
        path before the solver and each solver step; recompute them in the backward pass."""
        self.recompute = self.context.recompute = self.solver.recompute = on

    def support(self, demo_in, demo_out, demo_mask) -> Support:
        """Padded context pairs (B, D, h, w) with their mask (B, D) -> the encoded Support; only the
        real pairs are encoded."""
        where = PairLayout.from_mask(demo_mask)
        tokens, pooled = self.context.encode_pairs(demo_in[where.sample, where.slot], demo_out[where.sample, where.slot])
        return self.context.layout(tokens, pooled, where)

    def task_context(self, support: Support) -> TaskContext:
        return TaskContext(support, self.hyperlora(support.pooled) if self.hyperlora is not None else None)

    def encode_context(self, demo_in, demo_out, demo_mask) -> TaskContext:
        return self.task_context(self.support(demo_in, demo_out, demo_mask))

    def solve(self, query_in: torch.Tensor, context: TaskContext, temperature: float, all_steps: bool = False) -> Output:
        """The query canvases (B, h, w) under their task contexts -> logits, clues."""
        s = context.support
        x, clues = run(self.read_query, query_in, s.tokens, s.token_mask, s.pooled, temperature, recompute=self.recompute)
        logits = self.solver(x, query_in, s.tokens, s.token_mask, context.lora, all_steps)
        return Output(logits, clues, context)

    def read_query(self, query_in, tokens, token_mask, pooled, temperature: float) -> tuple[torch.Tensor, Clues]:
        """The query's features with the task read in, its clues, and the solver's input x (B, H, h, w)."""
        valid, grid_hw = query_grid(query_in)
        f = self.inject(self.embed(query_in), tokens, token_mask, pooled)
        clues = self.dsc(f, pooled, temperature, valid)
        agg = self.msre(f, clues.centroids, clues.attention, clues.stop_prob, grid_hw)
        return self.fuse(torch.cat([f, agg.to(f.dtype)], 1)), clues

    def forward(self, batch: dict[str, torch.Tensor], temperature: float, all_steps: bool = True) -> Output:
        context = self.encode_context(batch["demo_in"], batch["demo_out"], batch["demo_mask"])
        return self.solve(batch["query_in"], context, temperature, all_steps)
