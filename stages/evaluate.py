"""Stage `evaluate`: TRM-style evaluation of the trained model (of either family) on the evaluation
tasks and, measured the same way, on the training tasks' test pairs; pass@K, per-input table,
submission.json. The views are fresh augmentations or the cached versions (`evaluate.views`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import arc, distributed, tracking
from pipeline.cache import CacheReader
from pipeline.evaluation import submission
from pipeline.evaluation.runner import SideResult, evaluate_side
from pipeline.evaluation.views import cached_versions
from pipeline.integrity import IntegrityError, file_md5
from pipeline.io import write_json, write_text
from pipeline.model import family as families
from pipeline.model.io import ModelFileError, load_model
from pipeline.params import differences
from pipeline.runtime import use_cpu
from pipeline.stage import fail, parser, run, setup_logging, stage_params
from pipeline.tracking import Tracker, lineage
from pipeline.tracking.client import unless_required

log = logging.getLogger("evaluate")
SIDES = {"eval": "eval", "train": "train"}  # side -> split whose test pairs it measures
TOP_CANDIDATES = 3


def candidates_json(result: SideResult) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in result.ranked:
        out.setdefault(r.task_id, []).append({
            "test_index": r.test_index, "truth_rank": r.truth_rank,
            "candidates": [{"grid": c.grid.astype(int).tolist(), "votes": c.votes, "confidence": round(c.confidence, 6)}
                           for c in r.candidates[:TOP_CANDIDATES]]})
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", required=True, help="trained model file (stage train)")
    ap.add_argument("--raw", required=True, help="raw tasks (stage prepare)")
    ap.add_argument("--cache", required=True, help="augmentation cache (stage augment): its versions are the cache views")
    ap.add_argument("--metrics", required=True, help="metrics of both sides (JSON)")
    ap.add_argument("--tasks-table", required=True, help="one row per test input (CSV)")
    ap.add_argument("--submission", required=True, help="ARC Prize submission of the evaluation tasks (JSON)")
    ap.add_argument("--candidates", required=True, help="top candidates per test input, both sides (JSON)")
    args = ap.parse_args()
    setup_logging()
    params = stage_params(args.params)
    ep = params.evaluate
    try:
        tracked = tracking.check_store(params.tracking)  # before any compute, within tracking.timeout_s
    except tracking.TrackingError as err:
        fail(str(err))
        return
    distributed.relaunch_under_torchrun(params.train, "stages.evaluate")
    world = distributed.init(params.train, ep.device)
    use_cpu(params.train.cpu_threads, params.train.flush_denormals)  # the same bytes whatever the machine's cores
    if not world.is_main:
        setup_logging(logging.WARNING)

    try:
        model, meta = load_model(args.model, world.device, families.get(params.model.family).forms(params))
    except ModelFileError as err:
        fail(str(err))
        return
    family = families.of(model)
    section = family.section  # the params section the model was built from
    other = differences({section: family.built_with(model)},
                        {section: getattr(params, section).model_dump()}, ("the model has", "params.yaml"))
    if model.FAMILY != params.model.family:
        other.insert(0, f"model.family: the model has {model.FAMILY!r}, params.yaml {params.model.family!r}")
    if other:  # the metrics would be recorded beside params the model was not trained with
        what = "model family" if model.FAMILY != params.model.family else f"{section} section"
        fail(f"{args.model} was trained with another {what} than {args.params} ({'; '.join(other[:3])}"
             f"{f'; and {len(other) - 3} more' if len(other) > 3 else ''}): train it with these params first "
             f"(`dvc repro`), or evaluate it with the params.yaml it was trained with")
        return
    predict = family.predictor(model, meta, ep, world.device, params.train.precision)
    tasks = arc.read_raw(Path(args.raw) / "pairs.parquet")
    versions = None
    if ep.views == "cache":
        try:
            versions = cached_versions(CacheReader(args.cache).samples, ep.max_versions)
        except (IntegrityError, FileNotFoundError) as err:
            fail(str(err))
            return

    results = {}
    try:
        for side, split in SIDES.items():
            chosen = arc.select([t for t in tasks if t.split == split], ep.max_tasks)
            if not chosen:
                fail(f"no {split} tasks in {args.raw}: the {side} side of the evaluation has nothing to measure")
            if versions is not None and (missing := sorted({t.id for t in chosen} - set(versions))):
                fail(f"{args.cache} holds no version of {split} task(s) {', '.join(missing[:5])}: no cache views of "
                     "them (rebuild the cache with `dvc repro augment`)")
            results[side] = evaluate_side(chosen, predict, ep, desc=f"evaluate {side}", world=world,
                                          versions=versions)
    finally:
        distributed.shutdown(world)
    if not world.is_main:
        return  # only rank 0 writes outputs and logs to MLflow
    for side, r in results.items():
        log.info("%s side: %s", side, {k: round(v, 4) for k, v in r.metrics.items()})

    sub = submission.build(results["eval"].ranked)
    submission.validate(sub, arc.select([t for t in tasks if t.split == "eval"], ep.max_tasks))
    write_json(args.metrics, {side: r.metrics for side, r in results.items()})
    table = pd.DataFrame([{"side": side, **row} for side, r in results.items() for row in r.rows])
    table["truth_rank"] = table["truth_rank"].astype("Int64")  # empty when the answer is not a candidate
    write_text(args.tasks_table, table.to_csv(index=False))
    write_json(args.submission, sub)
    write_json(args.candidates, {side: candidates_json(r) for side, r in results.items()})

    tracker = Tracker(params, enabled=tracked)
    with unless_required(params.tracking):  # a store lost for good: one line, or a warning
        if tracker.attach_to_model(file_md5(args.model)):  # the training run that made this model
            tracker.log_inputs(lineage.dataset_inputs([lineage.raw_dataset(args.raw)], "evaluation"))
            tracker.log_metrics({f"{side}.{k.replace('@', '_at_')}": v for side, r in results.items()
                                 for k, v in r.metrics.items()}, step=meta.get("epochs", 0))
            for f in (args.metrics, args.tasks_table, args.submission):
                tracker.log_artifact(f, "evaluation")


if __name__ == "__main__":
    run(main)
