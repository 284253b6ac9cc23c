"""Figures and pictures for the reports: training curves from the per-epoch series, and ARC tasks
with the true output and the top voted predictions, in ARC's colours. matplotlib, Agg backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.arc import Task  # noqa: E402

# ARC's palette: 0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey, 6 magenta, 7 orange, 8 sky, 9 maroon
ARC_COLORS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
              "#870C25"]
ARC_CMAP = ListedColormap(ARC_COLORS)

# (file name, title, columns) of the training-curve figures: one panel per column
CURVES = [
    ("exact_match.png", "Exact match: train (train mode), held-out (eval mode)",
     ["train_exact_match", "heldout_exact_match"]),
    ("pixel_accuracy.png", "Pixel accuracy: train (train mode), held-out (eval mode)",
     ["train_pixel_accuracy", "heldout_pixel_accuracy"]),
    ("loss.png", "Loss: task (train), held-out (eval mode), total", ["loss_task", "heldout_loss", "loss_total"]),
    ("attention_entropy.png", "DSC attention entropy: train mode (solid) against eval mode (dashed)",
     ["attention_entropy_train", "attention_entropy_eval"]),
    ("stop_value.png", "Stop value: train mode, eval mode", ["stop_value_train", "stop_value_eval"]),
    ("lora.png", "HyperLoRA: magnitude of each target's delta, diversity across tasks",
     ["lora_magnitude_gru_reset", "lora_magnitude_gru_update", "lora_magnitude_gru_candidate",
      "lora_magnitude_output_head", "lora_diversity"]),
    ("loo.png", "Leave-one-out: pixel accuracy, exact match, skipped ratio; equivariance delta norm",
     ["loo_accuracy", "loo_exact_match", "loo_skipped_ratio", "equiv_delta_norm"]),
    ("halting.png", "TRM's halting: segments run and Q-head accuracy, train vs held-out",
     ["halt_steps", "halt_steps_eval", "q_halt_accuracy", "q_halt_accuracy_eval"]),
]
PANELS_PER_ROW = 3
# Figures whose columns share one panel, one line style per column (the pair a reader compares)
OVERLAID = {"attention_entropy.png"}
STYLES = ("-", "--", ":", "-.")


def read_series(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


# Measured only while meta-learning (leave-one-out) runs: a run without them never meta-learned (TRM)
META_LEARNING = ("loo_accuracy", "loo_exact_match", "loo_skipped_ratio")


def meta_learns(df: pd.DataFrame) -> bool:
    return any(c in df and df[c].notna().any() for c in META_LEARNING)


def curve_figure(series: dict[str, pd.DataFrame], cols: list[str], title: str,
                 meta_learning_starts: Mapping[str, int] | None = None, overlay: bool = False) -> plt.Figure | None:
    """Small multiples: one panel per column that any run measured, the series against the (1-based,
    integer) epoch, one colour per run (the same in every panel), a legend of the runs below the
    panels when there are several; None when no run measured any column. A dotted vertical line at
    start + 0.5 marks where a run's meta-learning (LOO, equivariance) begins, after
    `meta_learning_starts[run]` epochs: only for a run that meta-learned (it measured LOO), named
    in the label when not every run of the figure starts there. With `overlay`, every column in one
    panel, each in its own line style (`STYLES`, in the order of `cols`), a legend of run and column."""
    measured = [c for c in cols if any(c in df and df[c].notna().any() for df in series.values())]
    if not measured:
        return None
    panels = [measured] if overlay else [[c] for c in measured]
    n = len(panels)
    ncols = min(n, PANELS_PER_ROW)
    nrows = -(-n // ncols)
    width = 6.4 if overlay else 3.3 * ncols  # one wide panel: room for its legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 2.6 * nrows + 0.6), squeeze=False)
    last = max(float(df["epoch"].max()) for df in series.values())
    starts: dict[int, list[str]] = {}
    for run, start in (meta_learning_starts or {}).items():
        if run in series and meta_learns(series[run]) and start < last:
            starts.setdefault(start, []).append(run)
    for ax, group in zip(axes.flat, panels):
        for k, (run, df) in enumerate(series.items()):
            for j, col in enumerate(group):
                d = df[["epoch", col]].dropna() if col in df else df[["epoch"]].iloc[:0]
                if len(d):
                    ax.plot(d["epoch"], d[col], marker="o", ms=3, color=f"C{k}", linestyle=STYLES[j % len(STYLES)],
                            label=f"{run}: {col}" if overlay else run)
        for start, runs in sorted(starts.items()):
            whose = "" if len(runs) == len(series) else f" ({', '.join(runs)})"
            ax.axvline(start + 0.5, color="grey", linestyle=":", label=f"meta-learning from epoch {start + 1}{whose}")
        ax.set_title(" vs ".join(group), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if len(series) > 1 or overlay:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        per_row = 2 if overlay else 5
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), per_row), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.055 * -(-len(labels) // per_row) if overlay else
                               0.08 + 0.02 * (len(labels) // 5), 1, 1))
    else:
        fig.tight_layout()
    return fig


def plot_curves(series: dict[str, pd.DataFrame], out_dir: Path,
                meta_learning_starts: Mapping[str, int] | None = None) -> list[tuple[str, str]]:
    """One figure per entry of CURVES (see `curve_figure`); returns (file name, title) of those written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, title, cols in CURVES:
        fig = curve_figure(series, cols, title, meta_learning_starts, overlay=fname in OVERLAID)
        if fig is not None:
            fig.savefig(out_dir / fname, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append((fname, title))
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
