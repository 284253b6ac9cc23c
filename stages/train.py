"""Stage `train`: the model family of `model.family` (RLAN or TRM) on the augmentation cache, tracked in
MLflow, resumable from checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import arc, distributed, lineage, mlflow_model, tracking
from pipeline.integrity import IntegrityError
from pipeline.model.io import ModelFileError
from pipeline.params import load_params
from pipeline.stage import fail, parser, setup_logging
from pipeline.tracking import Tracker
from pipeline.train.loop import TrainPaths, train
from pipeline.train.preflight import PreflightError

log = logging.getLogger("train")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--cache", required=True, help="augmentation cache (stage augment)")
    ap.add_argument("--raw", required=True, help="raw tasks (stage prepare), for the held-out slice")
    ap.add_argument("--checkpoints", required=True, help="checkpoint directory (persistent)")
    ap.add_argument("--model", required=True, help="trained model file (EMA weights)")
    ap.add_argument("--metrics", required=True, help="final metrics (JSON)")
    ap.add_argument("--plots", required=True, help="directory for the per-epoch series")
    args = ap.parse_args()
    setup_logging()
    params = load_params(args.params)
    try:
        tracked = tracking.check_store(params.tracking)  # before any compute, within tracking.timeout_s
    except tracking.TrackingError as err:
        fail(str(err))
        return
    distributed.relaunch_under_torchrun(params.train, "stages.train")
    world = distributed.init(params.train, params.train.device)
    if not world.is_main:
        setup_logging(logging.WARNING)

    tracker = Tracker(params, enabled=world.is_main and tracked)  # only rank 0 writes outputs and logs to MLflow
    tracker.inputs = lambda: lineage.training_inputs(args.cache, args.raw)  # once the cache is verified
    paths = TrainPaths(Path(args.cache), Path(args.checkpoints), Path(args.model), Path(args.metrics),
                       Path(args.plots))
    try:
        final = train(params, arc.read_raw(Path(args.raw) / "pairs.parquet"), paths, tracker, world)
    except PreflightError as err:  # the run would not finish on this machine: say why, no traceback
        fail(str(err))
        return
    except (ModelFileError, IntegrityError, FileNotFoundError) as err:  # damaged or missing inputs: one line
        tracker.end("FAILED")
        fail(str(err))
        return
    except BaseException as err:
        tracker.end(tracking.end_status(err))
        raise
    finally:
        distributed.shutdown(world)
    if final is None:
        return
    try:
        tracker.log_metrics({f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))},
                            step=final["epochs"])
        for f in (args.params, args.metrics, Path(args.plots) / "epochs.tsv"):
            tracker.log_artifact(f)
        mlflow_model.publish(tracker, args.model, args.cache)
    except BaseException as err:
        tracker.end(tracking.end_status(err))
        raise
    tracker.end()
    log.info("trained %d epochs: train exact %.3f, held-out exact %s", final["epochs"],
             final["train_exact_match"] or 0.0, final["heldout_exact_match"])


if __name__ == "__main__":
    main()
