"""Stage `gap_report`: train/eval gaps graded by the monitor, with plots and task pictures."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import arc, monitor, tracking
from pipeline.gap import gap_checks, gap_metrics
from pipeline.integrity import file_md5
from pipeline.io import atomic_path, read_json, write_json
from pipeline.params import flatten
from pipeline.report import plot_curves, read_series, task_picture
from pipeline.stage import fail, parser, run, setup_logging, stage_params
from pipeline.summary import summarize
from pipeline.tracking import Tracker
from pipeline.tracking.client import unless_required

log = logging.getLogger("gap_report")


def pick_pictures(candidates: dict, n: int) -> list[tuple[str, int]]:
    """A few evaluation test inputs, solved ones first, then by task id."""
    items = [(e["truth_rank"] is None, tid, e["test_index"]) for tid, es in candidates.items() for e in es]
    return [(tid, idx) for _, tid, idx in sorted(items)[:n]]


VIEWS = {
    "training": "Training (the gap analysis's measurement): train mode on training batches vs eval mode (EMA) on the "
                "held-out evaluation tasks, last epoch.",
    "evaluation": "Evaluation stage: the training tasks' test pairs vs the evaluation tasks, both in eval mode "
                  "with the same protocol (voting over augmented views).",
    "context": "In-context learning, last epoch: the held-out test inputs measured again with another task's "
               "demonstrations; the value is the task loss with those minus with their own (0: the model ignores "
               "its demonstrations).",
}


def render_markdown(groups, evaluation, train, figures, pictures) -> str:
    every = [c for cs in groups.values() for c in cs]
    lines = ["# Train/eval gap report", "", f"Overall status: **{monitor.overall(every)}**", ""]
    for group, checks in groups.items():
        lines += [f"## Gap: {group}", "", VIEWS[group], "", f"Status: **{monitor.overall(checks)}**", "",
                  "| measure | value | status | detail |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.value:.4f} | {c.status} | {c.message} |" for c in checks]
        lines.append("")
    lines += ["## Evaluation metrics", "", "| metric | train side | eval side |", "|---|---|---|"]
    for k in evaluation["eval"]:
        lines.append(f"| {k} | {evaluation['train'][k]:.4g} | {evaluation['eval'][k]:.4g} |")
    lines += ["", f"Training: {train.get('epochs')} epochs.", ""]
    lines += ["## Curves", ""] + [f"![{title}]({name})" for name, title in figures]
    lines += ["", "## Tasks", ""] + [f"![{name}]({name})" for name in pictures]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--eval-metrics", required=True, help="metrics of the evaluate stage (JSON)")
    ap.add_argument("--candidates", required=True, help="top candidates per test input (JSON)")
    ap.add_argument("--train-metrics", required=True, help="final training metrics (JSON)")
    ap.add_argument("--series", required=True, help="per-epoch training series (TSV)")
    ap.add_argument("--raw", required=True, help="raw tasks (stage prepare), for the pictures")
    ap.add_argument("--model", required=True, help="the model file, to find its training's MLflow run")
    ap.add_argument("--metrics", required=True, help="gap metrics (JSON)")
    ap.add_argument("--summary", required=True, help="the headline metrics DVC shows (JSON)")
    ap.add_argument("--report", required=True, help="report directory (Markdown and PNG)")
    args = ap.parse_args()
    setup_logging()
    params = stage_params(args.params)
    try:
        tracked = tracking.check_store(params.tracking)  # before any compute, within tracking.timeout_s
    except tracking.TrackingError as err:
        fail(str(err))
        return

    evaluation, training = read_json(args.eval_metrics), read_json(args.train_metrics)
    groups = gap_checks(training, evaluation, params.monitoring)
    for group, checks in groups.items():
        for c in checks:
            (log.warning if c.status != "ok" else log.info)("%s %s = %.4f: %s (%s)", group, c.name, c.value,
                                                             c.status, c.message)
    metrics = gap_metrics(groups)

    tasks = {t.id: t for t in arc.read_raw(Path(args.raw) / "pairs.parquet")}
    candidates = read_json(args.candidates)["eval"]
    with atomic_path(args.report) as tmp:
        tmp.mkdir(parents=True)
        figures = plot_curves({"run": read_series(args.series)}, tmp, {"run": params.train.meta_learning_start_epoch})
        pictures = []
        for tid, idx in pick_pictures(candidates, params.monitoring.num_task_pictures):
            entry = next(e for e in candidates[tid] if e["test_index"] == idx)
            name = f"task_{tid}_{idx}.png"
            task_picture(tasks[tid], idx, entry["candidates"], entry["truth_rank"], tmp / name)
            pictures.append(name)
        (tmp / "report.md").write_text(render_markdown(groups, evaluation, training, figures, pictures))
    write_json(args.metrics, metrics)
    write_json(args.summary, summarize({"eval": evaluation, "gap": metrics}))

    tracker = Tracker(params, enabled=tracked)
    with unless_required(params.tracking):  # a store lost for good: one line, or a warning
        if tracker.attach_to_model(file_md5(args.model)):  # the training run that made this model
            # the training view's values end the series the training logged every epoch: only their status
            tracker.log_metrics({f"gap.{k}": v for k, v in flatten(metrics).items()
                                 if not k.startswith("training.") or k.endswith("status")}, step=0)
            tracker.set_tags({"gap.overall_status": monitor.overall([c for cs in groups.values() for c in cs])})
            tracker.log_artifact(args.metrics, "gap_report")
            tracker.log_artifact(args.summary, "gap_report")
            for f in sorted(Path(args.report).iterdir()):
                tracker.log_artifact(f, "gap_report")


if __name__ == "__main__":
    run(main)
