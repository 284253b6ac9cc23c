"""Stage `train`: the model family of `model.family` (RLAN or TRM) on the augmentation cache, tracked in
MLflow, resumable from checkpoints.

`--checkpoints` is the checkpoint store (pipeline.train.checkpoint): a relative path is taken from the
root of the repository, also when DVC runs the stage in a temporary copy (`dvc exp run --temp/--queue`),
so that every way of running an experiment finds its training's checkpoint. SIGINT (Ctrl-C) and
SIGTERM stop it with one line saying where the next run resumes, and exit status 130 / 143.

A training this machine cannot finish is refused before the stage writes anything: first from the
counted FLOPs of its step (pipeline.feasibility: seconds, before the cache is read), then from
measured steps on the real data (pipeline.train.preflight). Only this stage refuses for the cost of
training: the data stages before it run on any machine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline import arc, distributed, feasibility, tracking
from pipeline.experiments import committed, runlock
from pipeline.integrity import IntegrityError
from pipeline.model.io import ModelFileError
from pipeline.stage import fail, parser, run, setup_logging, stage_params
from pipeline.tracking import Tracker, lineage, mlflow_model
from pipeline.tracking.client import TrackingLost, unless_required
from pipeline.train.loop import NonFiniteLossError, TrainPaths, train
from pipeline.train.preflight import PreflightError

log = logging.getLogger("train")


def refusal(message: str, params_path: str) -> str:
    """A refusal of the run (either pre-flight's) with this run's own overrides (what its params.yaml
    changes from HEAD's) in the CPU-scale command it suggests, each `-S` of the `dvc exp run` that runs
    it (one that changes nothing says so), and HEAD's params.yaml put back where that command rewrote
    it (or how to restore it where the user changed other keys by hand)."""
    lines = [feasibility.with_own_overrides(message, params_path)]
    sets = committed.set_params_of(runlock.dvc_args())
    if sets:
        lines.append(committed.describe_sets(sets, committed.committed_text(params_path)))
    undone = committed.undo_set_params(params_path, sets)
    lines.append(undone or committed.restore_hint(params_path))
    return "\n".join(line for line in lines if line)


def removed_model(model: str) -> str:
    """How to get back the model file of the last successful training when it is gone and dvc.lock
    records it: DVC removes a stage's outputs before it runs the stage (`dvc repro -f -s train`), so a
    training that fails leaves none; an empty string when it is there or dvc.lock records none."""
    if Path(model).exists() or lineage.dvc_hash(model) is None:
        return ""
    return (f"; {model} is gone because DVC removes a stage's outputs before running it: `dvc checkout {model}` "
            "brings back the one dvc.lock records")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--cache", required=True, help="augmentation cache (stage augment)")
    ap.add_argument("--raw", required=True, help="raw tasks (stage prepare), for the held-out slice")
    ap.add_argument("--checkpoints", required=True, help="checkpoint store, one directory per training "
                    "(relative: from the repository root)")
    ap.add_argument("--model", required=True, help="trained model file (EMA weights)")
    ap.add_argument("--metrics", required=True, help="final metrics (JSON)")
    ap.add_argument("--plots", required=True, help="directory for the per-epoch series")
    args = ap.parse_args()
    setup_logging()
    tracking.install_signal_handlers()  # SIGINT and SIGTERM raise Terminated: one line, 130 / 143
    params = stage_params(args.params)
    if "LOCAL_RANK" not in os.environ and (refused := feasibility.refusal(params)) is not None:
        fail(refusal(refused + removed_model(args.model), args.params))  # before anything is written or read
        return
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
    changes = committed.changes_from_head(args.params)
    tracker.tags["differs_from_head"] = ("(params.yaml is not committed)" if changes is None else  # visible in MLflow
                                         ", ".join(f"{k}={committed.yaml_value(v)}" for k, (_, v) in changes.items())
                                         or "none")
    tracker.inputs = lambda: lineage.training_inputs(args.cache, args.raw)  # once the cache is verified
    paths = TrainPaths(Path(args.cache), tracking.repo_root() / args.checkpoints, Path(args.model),
                       Path(args.metrics), Path(args.plots))
    try:
        final = train(params, arc.read_raw(Path(args.raw) / "pairs.parquet"), paths, tracker, world)
    except PreflightError as err:  # the run would not finish on this machine: say why, no traceback
        fail(refusal(str(err) + removed_model(args.model), args.params))
        return
    except (ModelFileError, IntegrityError, FileNotFoundError) as err:  # damaged or missing inputs: one line
        tracker.end("FAILED")
        fail(str(err) + removed_model(args.model))
        return
    except tracking.Terminated as err:  # SIGINT or SIGTERM: where it stopped and resumes, no traceback
        tracker.end("KILLED")
        fail(f"train: {err}{removed_model(args.model)}", err.code)
        return
    except NonFiniteLossError as err:  # diverged: no model written, so none reaches evaluate or the registry
        tracker.end("FAILED")
        fail(f"train: stopped, the loss diverged: {err}; no model was written. Lower train.learning_rate (or "
             f"train.hyperlora_lr_multiplier, train.gradient_clip), then run again{removed_model(args.model)}")
        return
    except BaseException as err:
        tracker.end(tracking.end_status(err))
        raise
    finally:
        distributed.shutdown(world)
    if final is None:
        return
    try:
        runlock.check_stage(args.params)  # still this experiment's params: the model is registered under its name
        for f in (args.params, args.metrics, Path(args.plots) / "epochs.tsv"):
            tracker.log_artifact(f)
        mlflow_model.publish(tracker, args.model, args.cache)
        tracker.carry_over_evaluation()
    except TrackingLost as err:
        tracker.end("FAILED")  # kept with the rest until the store is back
        with unless_required(params.tracking):
            raise TrackingLost(f"{err}; the training itself finished and its checkpoint is saved: run again, it "
                               "restores the outputs without training and registers the model") from None
        return
    except tracking.Terminated as err:
        tracker.end("KILLED")
        fail(f"train: {err} while logging to MLflow; the next run restores the finished training", err.code)
        return
    except BaseException as err:
        tracker.end(tracking.end_status(err))
        raise
    tracker.end()
    log.info("trained %d epochs: train exact %.3f, held-out exact %s", final["epochs"],
             final["train_exact_match"] or 0.0, final["heldout_exact_match"])


if __name__ == "__main__":
    run(main)
