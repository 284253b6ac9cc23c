"""The training loop: one loop with commented phases, on one device (CUDA when present).

Epochs are numbered from 1 everywhere (logs, progress, epochs.tsv, MLflow steps); a checkpoint's
`epoch` is the number of epochs completed and its `step` the optimizer steps completed of the next
one (mid-epoch checkpoints, pipeline.train.checkpoint). The first line of a training says whether it
resumes (from where), restores a finished training, or starts from scratch and why. The host never
waits for the device inside a step but once per optimizer step (is the step finite? is a checkpoint
due?): measurements stay on the device until the end of the epoch, and the next micro-batches are
prepared on a background thread (pinned on CUDA) while the current one computes. Whatever the model
family (`model.family`), the loop drives it through pipeline.model.family's `Training`: nothing below
depends on which family trains.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from pipeline import distributed, gap, monitor
from pipeline.arc import Task
from pipeline.io import write_json, write_text
from pipeline.loader import AugmentedCache
from pipeline.model import family as families
from pipeline.model.io import ModelFileError, save_model
from pipeline.params import Params, TrainParams
from pipeline.runtime import autocast, resolve_device, seed_everything, use_cpu
from pipeline.tracking import Terminated, Tracker, health_tags
from pipeline.train import checkpoint, preflight
from pipeline.train.batches import Prefetcher
from pipeline.train.sampler import MicroBatch, Sampler

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or Inf loss."""


@dataclass(frozen=True)
class TrainPaths:
    cache: Path
    checkpoints: Path
    model: Path
    metrics: Path
    plots: Path


class Meter:
    """Per-epoch means of logged values, ignoring steps where a value was not measured or not finite.
    Values are 0-dim tensors and stay on their device until `global_means` (one read per epoch)."""

    def __init__(self) -> None:
        self.sum: dict[str, torch.Tensor] = {}
        self.n: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            ok = torch.isfinite(v)
            self.sum[k] = self.sum.get(k, 0.0) + torch.where(ok, v, 0.0)
            self.n[k] = self.n.get(k, 0.0) + ok.float()

    def global_means(self, world: distributed.World) -> dict[str, float]:
        """Means over the values of every rank (each rank may have measured different keys)."""
        keys = distributed.union_keys(world, set(self.sum))
        if not keys:
            return {}
        zero = torch.zeros((), device=world.device)
        totals = torch.stack([self.sum.get(k, zero) for k in keys] + [self.n.get(k, zero) for k in keys])
        totals = distributed.sum_tensor(world, totals.double()).tolist()
        return {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys) if totals[len(keys) + i] > 0}

    def state(self, world: distributed.World) -> dict[str, Any]:
        """The sums and counts so far over every rank (a collective), on the CPU, for a checkpoint.
        One process: exactly its own values, so a resumed epoch ends with the same means."""
        keys = distributed.union_keys(world, set(self.sum))
        zero = torch.zeros((), device=world.device)
        if not keys:
            return {"keys": [], "sum": torch.zeros(0), "n": torch.zeros(0)}
        totals = distributed.sum_tensor(world, torch.stack([self.sum.get(k, zero) for k in keys]
                                                           + [self.n.get(k, zero) for k in keys]))
        return {"keys": keys, "sum": totals[: len(keys)].cpu(), "n": totals[len(keys):].cpu()}

    def restore(self, state: dict[str, Any] | None, device: torch.device, main: bool) -> None:
        """Continue from `state` (`Meter.state`); rank 0 carries every rank's values so far."""
        if state is None or not main:
            return
        for i, k in enumerate(state["keys"]):
            self.sum[k] = state["sum"][i].to(device)
            self.n[k] = state["n"][i].to(device)


def heldout_examples(tasks: list[Task], n_tasks: int, seed: int) -> dict[str, list]:
    """The examples measured in eval mode every eval_every epochs, per side, each as (task id, all its
    demonstrations, test input, test output): "eval", the test pairs of `n_tasks` evaluation tasks (a
    seeded choice, never trained on), and "train", those of `n_tasks` training tasks (whose versions
    are trained on: the training side of the context gain, pipeline.train.context_gain)."""
    out: dict[str, list] = {}
    for k, split in enumerate(("eval", "train"), start=1):
        pool = sorted((t for t in tasks if t.split == split), key=lambda t: t.id)
        pick = np.random.default_rng([seed, k]).permutation(len(pool))[:n_tasks] if n_tasks else []
        out[split] = [(t.id, list(t.demos), q_in, q_out) for i in sorted(pick) for t in [pool[i]]
                      for q_in, q_out in t.tests]
    return out


def epoch_checks(row: dict[str, Any], params: Params, first: dict[str, Any]) -> list[monitor.Check]:
    """The health checks of one epoch's row; `first` is the first epoch's (LoRA growth is relative to it)."""
    return monitor.lora_checks(row, params.monitoring, first) + gap.training_checks(row, params.monitoring)


def epoch_series(row: dict[str, Any], params: Params, first: dict[str, Any]) -> dict[str, float]:
    """The derived values an epoch logs beside its measures: each gap of the training view under the
    name gap_report gives its final value (`gap.training.<measure>`), and the LoRA magnitudes' growth
    since the first epoch (`lora_growth`, what the collapse and explosion checks grade)."""
    out = {f"gap.training.{c.name}": c.value for c in gap.training_checks(row, params.monitoring)}
    growth = monitor.lora_growth(row, first)
    if growth is not None:
        out["lora_growth"] = growth
    return out


def write_series(history: list[dict[str, Any]], plots_dir: Path, metrics: tuple[str, ...]) -> None:
    cols = ["epoch", *metrics]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(cols)
    for row in history:
        w.writerow(["" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                    for c in cols])
    write_text(plots_dir / "epochs.tsv", buf.getvalue())


def final_metrics(history: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    """The last value of every metric (eval-side ones from the last epoch that measured them)."""
    out: dict[str, Any] = {"epochs": len(history)}
    for name in metrics:
        vals = [r[name] for r in history if r.get(name) is not None]
        out[name] = vals[-1] if vals else None
    return out


def micro_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """The seed of one micro-batch: its Gumbel noise and dropout depend on nothing else, so any
    split of the micro-batches over processes, and any resume point, gives the same numbers."""
    return int(np.random.SeedSequence([seed, epoch, step, micro]).generate_state(1)[0])


def schedule_of(sampler: Sampler, world: distributed.World, tp: TrainParams, first_epoch: int, first_step: int,
                steps_per_epoch: int) -> Iterator[tuple[MicroBatch, int]]:
    """This rank's micro-batches in training order from (epoch, step), each with its epoch (epochs
    from 1, steps from 0)."""
    for epoch in range(first_epoch, tp.epochs + 1):
        order = sampler.order(epoch - 1)
        for step in range(first_step if epoch == first_epoch else 0, steps_per_epoch):
            for mb in sampler.micro_batches(order, epoch - 1, step, world.rank):
                yield mb, epoch


@dataclass
class Position:
    """Where a training stands: `epoch` epochs done and `step` optimizer steps of the next one."""
    epoch: int = 0
    step: int = 0

    def describe(self, epochs: int, steps_per_epoch: int) -> str:
        if self.step == 0:
            return f"after epoch {self.epoch} of {epochs}"
        return f"in epoch {self.epoch + 1} of {epochs}, after step {self.step} of {steps_per_epoch}"


def first_line(state: dict[str, Any] | None, at: Position, tp: TrainParams, steps_per_epoch: int,
               why_fresh: Callable[[], str]) -> str:
    """The first line of a training: whether it resumes (from where), restores a finished training,
    or starts from scratch, and why."""
    if state is None:
        return f"training from scratch: {why_fresh()}"
    if at.epoch >= tp.epochs:
        return (f"this training has finished ({tp.epochs} epochs): restoring its outputs from {state['path']}, "
                "no training")
    return f"resuming this training {at.describe(tp.epochs, steps_per_epoch)}, from {state['path']}"


@contextlib.contextmanager
def stop_note(where: Callable[[], str]) -> Iterator[None]:
    """SIGINT (Ctrl-C) or SIGTERM while training: re-raised as Terminated saying where training
    stopped and where the next run resumes."""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as err:
        raise Terminated(getattr(err, "signum", signal.SIGINT), where()) from None


def training_identity(params: Params, heldout: dict[str, list], cache: Path) -> checkpoint.Identity:
    """What this training is (pipeline.train.checkpoint): its params, code, cache and held-out slice
    (`heldout_examples`)."""
    held = b"".join(bytes(g.shape) + g.tobytes() for side in heldout.values() for _, ctx, q_in, q_out in side
                    for g in [q_in, q_out, *(x for pair in ctx for x in pair)])
    return checkpoint.identity(params, [cache], held)


def train(params: Params, tasks: list[Task], paths: TrainPaths, tracker: Tracker,
          world: distributed.World | None = None) -> dict[str, Any] | None:
    """Train; returns the final metrics on rank 0 (None on other ranks). `paths.checkpoints` is the
    checkpoint store: this training's checkpoint is in its directory there (pipeline.train.checkpoint),
    which this process holds while it trains (a second process of the same training waits).

    Distributed rule (pipeline.train.sampler): an optimizer step is `grad_accumulation_steps`
    micro-batches of `batch_size` whatever the world size; each rank runs its share and
    synchronises gradients only on its last micro-batch (`no_sync`).
    """
    world = world or distributed.single(resolve_device(params.train.device))
    use_cpu(params.train.cpu_threads, params.train.flush_denormals)
    seed_everything(params.train.seed)
    cache = AugmentedCache(paths.cache)
    heldout = heldout_examples(tasks, params.train.heldout_tasks, params.train.seed)
    ident = training_identity(params, heldout, paths.cache) if world.is_main else None
    folder = checkpoint.directory(paths.checkpoints, ident.fingerprint) if ident else None
    with checkpoint.exclusive(folder) if folder else contextlib.nullcontext():
        return _train(params, cache, heldout, paths, tracker, world, ident, folder)


def _train(params: Params, cache: AugmentedCache, heldout: dict[str, list], paths: TrainPaths, tracker: Tracker,
           world: distributed.World, ident: checkpoint.Identity | None, folder: Path | None) -> dict[str, Any] | None:
    tp = params.train
    device = world.device
    # -- the model family's side (pipeline.model.family): model, objective, optimizer, batches, measures
    run = families.get(params.model.family).training(params, cache, device)
    model, metrics = run.model, run.metrics
    sampler = Sampler(run.items, tp.seed, run.micro_batch, tp.grad_accumulation_steps, world.size)
    # the averaged weights are the parameters'; buffers (TRM's puzzle embeddings) follow the trained model
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(run.ema_decay), use_buffers=False)
    opt = run.optimizer()
    per_step = run.micro_batch * tp.grad_accumulation_steps
    steps_per_epoch = tp.steps_per_epoch or max(1, run.items // per_step)
    total_steps = steps_per_epoch * tp.epochs

    # -- resume from this training's checkpoint, read by rank 0 and shared; the first line says so
    state, fp = None, None
    if world.is_main:
        fp = ident.fingerprint
        state = checkpoint.load_resumable(folder, fp)
    state, fp = distributed.broadcast_from_main(world, (state, fp))
    at, history, consecutive_bad, meter, bad_steps = Position(), [], 0, Meter(), 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ModelFileError(f"{state['path']}: does not fit this model ({err})") from None
        at, history = Position(state["epoch"], state["step"]), state["history"]
        consecutive_bad, bad_steps = state["consecutive_nonfinite"], state["bad_steps"]
        meter.restore(state["meter"], device, world.is_main)
    restored = at.epoch >= tp.epochs
    if world.is_main:
        log.info("%s", first_line(state, at, tp, steps_per_epoch,
                                  lambda: checkpoint.why_fresh(paths.checkpoints, ident)))
        if not restored:
            log.info("training %s on %d x %s: %d parameters, %d items (cache samples or pairs), %d steps per epoch "
                     "of %d, %d epochs, %d CPU threads", params.model.family, world.size, device.type,
                     sum(p.numel() for p in model.parameters()), run.items, steps_per_epoch, per_step, tp.epochs,
                     torch.get_num_threads())
    objective = run.objective

    # -- pre-flight: project the remaining run on this machine; refuse what it cannot finish
    clock = RunClock(tp, steps_per_epoch, run.heavy)
    if not restored:
        remaining = (total_steps - at.epoch * steps_per_epoch - at.step) * per_step
        error = None
        if world.is_main:
            error, clock.heavy_ratio = preflight_check(run, sampler, tp, device, remaining, world.size)
        error = distributed.broadcast_from_main(world, error)
        if error is not None:
            raise preflight.PreflightError(error)
    loss_fn = torch.compile(objective) if tp.compile else objective
    net = (DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
           if world.size > 1 else loss_fn)  # every rank updates the buffers alike (TRM's puzzle embeddings)
    if world.is_main:  # the MLflow run is found by the fingerprint (pipeline.tracking), never stored
        tracker.start(fp, resume=state is not None, finished=restored)
        if history and not tracker.continued:  # a new run for epochs trained before: their history
            tracker.log_history(history, lambda row: epoch_checks(row, params, history[0]),
                                lambda row: epoch_series(row, params, history[0]))

    # -- checkpoints: every save_every epochs, the last, and the first step after checkpoint_minutes
    last_save = time.monotonic()

    def save(position: Position, meter_state: dict[str, Any] | None) -> None:
        nonlocal last_save
        checkpoint.save(folder, {
            "fingerprint": fp, "epoch": position.epoch, "step": position.step, "model": model.state_dict(),
            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "history": history, "meter": meter_state,
            "bad_steps": bad_steps, "consecutive_nonfinite": consecutive_bad, "params": params.model_dump()},
            {"epoch": position.epoch, "step": position.step, "epochs": tp.epochs, "steps_per_epoch": steps_per_epoch,
             "params": ident.params, "code": ident.code, "data": ident.data})
        last_save = time.monotonic()

    def stopped_where() -> str:  # the checkpoint on disk, whatever the signal interrupted
        about = checkpoint.about(folder) if folder else None
        saved = Position(about["epoch"], about["step"]) if about else None
        resume = (f"the next run of this training resumes {saved.describe(tp.epochs, steps_per_epoch)}, from "
                  f"{folder / checkpoint.LAST}" if saved else "no checkpoint of it yet: the next run starts afresh")
        return f"{now.describe(tp.epochs, steps_per_epoch)}; {resume}"

    def load(item: tuple[MicroBatch, int]) -> families.Batch:  # runs on the prefetch thread
        tb = run.prepare(*item)
        return tb.pin() if device.type == "cuda" else tb

    batches = Prefetcher(load, schedule_of(sampler, world, tp, at.epoch + 1, at.step, steps_per_epoch))
    done_before = at.epoch * steps_per_epoch + at.step
    progress_bar = tqdm(total=total_steps * per_step, initial=done_before * per_step, unit="sample",
                        unit_scale=True, smoothing=0.05, mininterval=5.0, disable=not world.is_main)
    now = Position(at.epoch, at.step)  # what is done, for a stop's message
    with batches, progress_bar, stop_note(stopped_where):
        for epoch in range(at.epoch + 1, tp.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            progress_bar.set_description(f"epoch {epoch}/{tp.epochs}")
            for step in range(at.step if epoch == at.epoch + 1 else 0, steps_per_epoch):
                # -- schedules
                progress = ((epoch - 1) * steps_per_epoch + step) / max(total_steps - 1, 1)
                tau = run.temperature(progress)
                lr = run.set_learning_rate(opt, (epoch - 1) * steps_per_epoch + step, total_steps)

                # -- forward and backward over this rank's micro-batches; gradients meet on the last one
                bad = torch.zeros((), device=device)
                step_logs = []
                for j in range(sampler.per_rank):
                    tb = next(batches).to(device)
                    if tp.compile:
                        tb.mark_dynamic()
                    torch.manual_seed(micro_seed(tp.seed, epoch - 1, step, world.rank * sampler.per_rank + j))
                    sync = j == sampler.per_rank - 1 or world.size == 1
                    with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device, tp.precision):
                        loss, logs = net(tb, tau)
                        bad = bad + (~torch.isfinite(loss.detach())).float()
                        (loss / sampler.per_rank).backward()  # also when non-finite: every rank joins the all-reduce
                    step_logs.append(logs)

                # -- clip; a non-finite loss on any rank, or a non-finite gradient, skips the step; rank 0's
                #    clock asks for a mid-epoch checkpoint in the same all-reduce
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.gradient_clip)
                due = world.is_main and step + 1 < steps_per_epoch and \
                    time.monotonic() - last_save >= 60 * tp.checkpoint_minutes
                flags = distributed.sum_tensor(world, torch.stack([bad, torch.tensor(float(due), device=device)]))
                flags = flags + torch.stack([(~torch.isfinite(norm)).float(), torch.zeros((), device=device)])
                n_bad, save_now = flags.tolist()  # the one host read of the step
                progress_bar.update(per_step)
                if n_bad > 0:
                    opt.zero_grad(set_to_none=True)
                    bad_steps += 1
                    consecutive_bad += 1
                    if world.is_main:
                        log.warning("epoch %d step %d: non-finite loss or gradient, step skipped", epoch, step + 1)
                    if consecutive_bad >= tp.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"{consecutive_bad} consecutive optimizer steps with a NaN/Inf loss or gradient (epoch "
                            f"{epoch}, step {step + 1}); "
                            f"train.max_consecutive_nonfinite={tp.max_consecutive_nonfinite}")
                else:
                    # -- step, EMA (every rank holds the same weights, so the same EMA), measurements
                    consecutive_bad = 0
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    ema.update_parameters(model)
                    for logs in step_logs:
                        meter.add(logs)
                now = Position(epoch - 1, step + 1)
                if save_now:  # mid-epoch: the epoch's measurements so far go with it (every rank's)
                    meter_state = meter.state(world)
                    if world.is_main:
                        save(Position(epoch - 1, step + 1), meter_state)

            # -- end of epoch: means over all ranks, then rank 0 measures, checks, logs and saves
            means = meter.global_means(world)
            elapsed = time.perf_counter() - t0
            if world.is_main:
                row: dict[str, Any] = {"epoch": epoch, **{k: None for k in metrics}, **means,
                                       "temperature": tau, "learning_rate": lr, "nonfinite_steps": bad_steps}
                steps_here = steps_per_epoch - (at.step if epoch == at.epoch + 1 else 0)
                clock.trained(epoch, steps_here, elapsed)
                if epoch % tp.eval_every == 0 or epoch == tp.epochs:
                    t_eval = time.perf_counter()
                    row.update(run.measure_heldout(ema.module, heldout, tau, device, tp.precision))
                    clock.evaluated(time.perf_counter() - t_eval)
                row = {k: row.get(k) for k in ["epoch", *metrics]}
                history.append(row)
                log_epoch(row, params, tracker, steps_here * per_step / elapsed, clock.eta(epoch), history[0])
                write_series(history, paths.plots, metrics)
            meter, bad_steps, now = Meter(), 0, Position(epoch, 0)
            if world.is_main and (epoch % tp.save_every == 0 or epoch == tp.epochs
                                  or time.monotonic() - last_save >= 60 * tp.checkpoint_minutes):
                save(Position(epoch, 0), None)
            distributed.barrier(world)

    if not world.is_main:
        return None
    # -- the EMA weights are the trained model (also rebuilt here from a finished run's checkpoint)
    final = final_metrics(history, metrics)
    write_series(history, paths.plots, metrics)
    save_model(paths.model, ema.module, {**run.model_meta(), "epochs": tp.epochs,
                                         "fingerprint": fp})
    write_json(paths.metrics, final)
    return final


def preflight_check(run: families.Training, sampler: Sampler, tp: TrainParams, device: torch.device, samples: int,
                    world_size: int) -> tuple[str | None, float]:
    """Project the run from measured steps (the family's heaviest step) and log it; (the reason to
    refuse it or None, the FLOPs of a heaviest step over those of a first-epoch step on the same
    samples: what a meta-learning epoch costs more, until one has been timed). A FLOP count, not a
    timing: two experiments started side by side time their steps while competing for the same cores,
    and a single timed step varied 2x between them; a count is the same for the same params and data.
    Runs forward and backward only: the weights do not change."""
    model = run.model
    first = sampler.micro_batches(sampler.order(0), 0, 0, 0)[0]

    def step(n: int, epoch: int | None = None) -> None:
        mb = MicroBatch(first.index, first.ids[:n], first.key)
        tb = run.prepare(mb, epoch).to(device)
        with autocast(device, tp.precision):
            loss, _ = run.objective(tb, run.temperature(0.0))
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    try:
        projection = preflight.project(step, run.micro_batch, samples, device, per_process=1.0 / world_size,
                                       max_cpu_hours=tp.max_cpu_hours)
        ratio = 1.0
        if projection.hours <= 2 * tp.max_cpu_hours or device.type != "cpu":  # not refused on time anyway
            n = min(run.micro_batch, 2)
            ratio = max(preflight.flops(step, n) / max(preflight.flops(lambda k: step(k, 1), n), 1.0), 1.0)
    finally:
        model.zero_grad(set_to_none=True)  # also after a step that ran out of memory half way
    log.info("pre-flight: %s", projection.describe())
    try:
        preflight.check(projection, tp.max_cpu_hours)
    except preflight.PreflightError as err:
        return str(err), ratio
    return None, ratio


class RunClock:
    """The time to the end of a training from what its epochs took: seconds per step measured apart
    for the family's heavy epochs (RLAN's with meta-learning) and the others (a heavy step costs
    `heavy_ratio` times another, counted by the pre-flight, until one has been timed), plus the
    held-out evaluations still to come at the mean time of those done."""

    def __init__(self, tp: TrainParams, steps_per_epoch: int, heavy: Callable[[int], bool]):
        self.tp, self.steps_per_epoch, self.heavy, self.heavy_ratio = tp, steps_per_epoch, heavy, 1.0
        self.spent = {False: [0.0, 0], True: [0.0, 0]}  # heavy -> [seconds, steps]
        self.evals: list[float] = []

    def trained(self, epoch: int, steps: int, seconds: float) -> None:
        kind = self.spent[self.heavy(epoch)]
        kind[0], kind[1] = kind[0] + seconds, kind[1] + steps

    def evaluated(self, seconds: float) -> None:
        self.evals.append(seconds)

    def per_step(self, heavy: bool) -> float:
        (s_plain, n_plain), (s_heavy, n_heavy) = self.spent[False], self.spent[True]
        if heavy:
            return s_heavy / n_heavy if n_heavy else s_plain / max(n_plain, 1) * self.heavy_ratio
        return s_plain / n_plain if n_plain else s_heavy / max(n_heavy, 1) / self.heavy_ratio

    def eta(self, epoch: int) -> float:
        """Seconds from the end of `epoch` to the end of the training."""
        later = range(epoch + 1, self.tp.epochs + 1)
        train = sum(self.per_step(self.heavy(e)) for e in later) * self.steps_per_epoch
        evals = sum(1 for e in later if e % self.tp.eval_every == 0 or e == self.tp.epochs)
        return train + evals * (sum(self.evals) / len(self.evals) if self.evals else 0.0)


def log_epoch(row: dict[str, Any], params: Params, tracker: Tracker, samples_per_second: float,
              eta_seconds: float, first: dict[str, Any]) -> None:
    epoch = row["epoch"]
    checks = epoch_checks(row, params, first)
    for c in checks:
        if c.status != "ok":
            log.warning("epoch %d: %s %s: %s", epoch, c.name, c.status, c.message)
    tracker.log_metrics({**{k: v for k, v in row.items() if k != "epoch"},
                         **epoch_series(row, params, first),
                         "samples_per_second": samples_per_second}, step=epoch)
    tracker.set_tags(health_tags(epoch, checks))
    held = row["heldout_exact_match"]
    log.info("epoch %d/%d: loss %.4f, train exact %.3f, held-out exact %s, %.1f samples/s, %s to the end of the run",
             epoch, params.train.epochs, row["loss_total"] or math.nan, row["train_exact_match"] or 0.0,
             "-" if held is None else f"{held:.3f}", samples_per_second, preflight.format_hours(eta_seconds / 3600))
