"""Figures and pictures for the reports: training curves from the per-epoch series, and ARC tasks
with the true output and the top voted predictions, in ARC's colours. matplotlib, Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from pipeline.arc import Task  # noqa: E402

# ARC's palette: 0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey, 6 magenta, 7 orange, 8 sky, 9 maroon
ARC_COLORS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
              "#870C25"]
ARC_CMAP = ListedColormap(ARC_COLORS)

# (file name, title, columns) of the training-curve figures
CURVES = [
    ("exact_match.png", "Exact match: train (train mode) vs held-out (eval mode)",
     ["train_exact_match", "heldout_exact_match", "train_pixel_accuracy"]),
    ("loss.png", "Loss: train vs held-out", ["loss_task", "heldout_loss", "loss_total"]),
    ("attention_entropy.png", "DSC attention entropy: train vs eval mode",
     ["attention_entropy_train", "attention_entropy_eval"]),
    ("stop_value.png", "Stop value: train vs eval mode", ["stop_value_train", "stop_value_eval"]),
    ("lora.png", "HyperLoRA magnitudes and diversity",
     ["lora_magnitude_gru_reset", "lora_magnitude_gru_update", "lora_magnitude_gru_candidate",
      "lora_magnitude_output_head", "lora_diversity"]),
    ("loo.png", "Leave-one-out accuracy and skipped ratio", ["loo_accuracy", "loo_skipped_ratio", "equiv_delta_norm"]),
]


def read_series(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def plot_curves(series: dict[str, pd.DataFrame], out_dir: Path) -> list[tuple[str, str]]:
    """One figure per entry of CURVES; with several runs (name -> series) they are overlaid.
    Returns (file name, title) of the figures written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    styles = ["-", "--", ":", "-."]
    for fname, title, cols in CURVES:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        drawn = False
        for k, (run, df) in enumerate(series.items()):
            for col in cols:
                if col in df and df[col].notna().any():
                    d = df[["epoch", col]].dropna()
                    label = col if len(series) == 1 else f"{run}: {col}"
                    ax.plot(d["epoch"], d[col], styles[k % len(styles)], marker="o", ms=3, label=label)
                    drawn = True
        if drawn:
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=110)
            written.append((fname, title))
        plt.close(fig)
    return written


def _draw(ax, grid: np.ndarray | None, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    if grid is None or grid.size == 0:
        ax.text(0.5, 0.5, "empty", ha="center", va="center", fontsize=7)
        return
    ax.imshow(grid, cmap=ARC_CMAP, vmin=0, vmax=9, interpolation="nearest")
    h, w = grid.shape
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.4)
    ax.tick_params(which="minor", length=0)


def task_picture(task: Task, test_index: int, candidates: list[dict[str, Any]], truth_rank: int | None,
                 path: Path) -> None:
    """Demonstrations (input over output), then the test input, its true output and the top voted
    predictions with their votes and confidence."""
    demos = list(task.demos)
    cols = len(demos) + 2 + max(len(candidates), 1)
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.6), squeeze=False)
    for j, (a, b) in enumerate(demos):
        _draw(axes[0, j], a, f"demo {j} input")
        _draw(axes[1, j], b, f"demo {j} output")
    q_in, q_out = task.tests[test_index]
    j = len(demos)
    _draw(axes[0, j], q_in, "test input")
    _draw(axes[1, j], q_out, "true output")
    axes[0, j + 1].axis("off")
    axes[1, j + 1].axis("off")
    for k in range(max(len(candidates), 1)):
        ax = axes[0, j + 2 + k]
        if k < len(candidates):
            c = candidates[k]
            mark = " (correct)" if truth_rank == k + 1 else ""
            _draw(ax, np.array(c["grid"]), f"#{k + 1}: {c['votes']} votes{mark}\nconf {c['confidence']:.2f}")
        else:
            _draw(ax, None, "no prediction")
        axes[1, j + 2 + k].axis("off")
    fig.suptitle(f"task {task.id}, test {test_index}: true answer "
                 + (f"ranked {truth_rank}" if truth_rank else "not among the candidates"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
