"""Schedules as pure functions of training progress (0 at the first step, 1 at the last)."""

from __future__ import annotations

import math

from pipeline.params import TrainParams


def temperature(tp: TrainParams, progress: float) -> float:
    """DSC temperature, linear from temperature_start to temperature_end."""
    p = min(max(progress, 0.0), 1.0)
    return tp.temperature_start + (tp.temperature_end - tp.temperature_start) * p


def learning_rate(tp: TrainParams, progress: float) -> float:
    """Base learning rate: constant, or cosine decay to 10% of it."""
    if tp.lr_schedule == "constant":
        return tp.learning_rate
    p = min(max(progress, 0.0), 1.0)
    return tp.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def meta_learning_active(tp: TrainParams, epoch: int) -> bool:
    """LOO and equivariance losses run after the first `meta_learning_start_epoch` epochs (epochs are
    numbered from 1: with 3, from epoch 4 on)."""
    return epoch > tp.meta_learning_start_epoch


def warmup_cosine(base: float, step: int, warmup: int, total: int, min_ratio: float) -> float:
    """TRM's schedule: optimizer step `step` (0-based) of `total`: linear warm-up to `base` over the first
    `warmup` steps (the first at base / warmup), then cosine decay to min_ratio x base (1.0: constant)."""
    s = step + 1
    if s < warmup:
        return base * s / warmup
    p = min(max((s - warmup) / max(1, total - warmup), 0.0), 1.0)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
