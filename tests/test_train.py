"""Training: it learns, it logs what the issue names, it resumes exactly, it stops on NaN."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import pipeline.train.loop as loop
from pipeline.arc import read_raw
from pipeline.model import RLAN
from pipeline.model.io import ModelFileError, load_model
from pipeline.model.rlan import family as rlan_family
from pipeline.params import load_params
from pipeline.tracking import Tracker, tracking_uri
from pipeline.train import losses, preflight, schedule
from tests.helpers import (
    REPO,
    checkpoint_of,
    params_with,
    tiny_workspace,
    tool_env,
    train_cmd,
)

@pytest.mark.slow
def test_tiny_model_learns_four_tasks_told_apart_by_their_demonstrations():
    """benchmarks.learning's `four` toy (recolourings no one colour map solves) with params.yaml's
    context injector (`ffn`) and solver candidate, support tokens unpooled: every task solved exactly
    on its fresh test inputs within 600 steps (seed 0: 100 steps, about 15 s on one thread; seeds
    0-2 at 1, 2 and 4 threads are in docs/model.md's learning table), and the demonstrations then
    matter: another task's make the answers wrong (context gain). Fails with the tokens pooled to one
    per pair, or a context that does not reach the query."""
    from benchmarks.learning import toy_params, train_toy

    params = toy_params()
    assert params.model.context_injector == "ffn" and params.model.spatial_downsample == 1
    _, r = train_toy("four", 0, 600, params)
    assert r.learned_at is not None and r.exact == [1.0] * 4, f"exact match per task after 600 steps: {r.exact}"
    assert r.gain_exact >= 0.5 and r.gain_loss > 0.5, (r.gain_exact, r.gain_loss)


@pytest.mark.slow
def test_tiny_model_tells_apart_two_tasks_of_the_same_grids_with_swapped_maps():
    """benchmarks.learning's `swapped` toy: {1:2, 3:4} and {1:4, 3:2} on the same grids, so that only
    the pairing of input and output cells in the demonstrations tells them apart. With params.yaml's
    pair encoder (`cells`) both solved within 600 steps (seed 0: 225 steps on one thread); the public
    encoder (`pair_encoder: public`) stays on the context-blind answer at this seed."""
    from benchmarks.learning import toy_params, train_toy

    params = toy_params()
    assert params.model.pair_encoder == "cells"
    _, r = train_toy("swapped", 0, 600, params)
    assert r.learned_at is not None and r.exact == [1.0] * 2, f"exact match per task after 600 steps: {r.exact}"
    assert r.gain_exact >= 0.5 and r.gain_loss > 0.5, (r.gain_exact, r.gain_loss)


def test_optimizer_groups_and_schedules():
    p = params_with()
    model = RLAN(params_with(model__hidden_dim=16, model__dsc_num_heads=2, model__solver_context_heads=2).model)
    opt = rlan_family.build_optimizer(model, p.train)
    hyper = {id(q) for q in model.hyperlora.parameters()}
    for g in opt.param_groups:
        is_hyper = all(id(q) in hyper for q in g["params"])
        assert g["lr_mult"] == (10.0 if is_hyper else 1.0)
        assert g["weight_decay"] == (0.01 if g["params"][0].dim() >= 2 else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    tp = p.train
    assert schedule.temperature(tp, 0.0) == 1.0 and schedule.temperature(tp, 1.0) == 0.5
    assert schedule.temperature(tp, 0.5) == pytest.approx(0.75)
    assert schedule.learning_rate(tp, 0.7) == tp.learning_rate
    cos = params_with(train__lr_schedule="cosine").train
    assert schedule.learning_rate(cos, 0.0) == pytest.approx(5e-4) and schedule.learning_rate(cos, 1.0) == pytest.approx(5e-5)
    assert not schedule.meta_learning_active(tp, 3) and schedule.meta_learning_active(tp, 4)  # epochs from 1


def _paths(out):
    return loop.TrainPaths(out["cache"], out["root"] / "ckpt", out["root"] / "model.pt", out["root"] / "train.json",
                           out["root"] / "plots")


@pytest.mark.slow
def test_train_writes_model_metrics_series_and_mlflow(tmp_path):
    ws = tiny_workspace(tmp_path, monitoring__loo_accuracy_min=1.0)  # so that a LOO warning fires
    params = load_params(ws["params"])
    tracker = Tracker(params)
    final = loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), tracker)
    tracker.end()
    assert set(final) == {"epochs", *rlan_family.METRICS} and final["epochs"] == 3
    assert json.loads((tmp_path / "train.json").read_text()) == final
    rows = (tmp_path / "plots" / "epochs.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["epoch", *rlan_family.METRICS] and len(rows) == 4
    for name in ("loo_accuracy", "equiv_delta_norm", "heldout_exact_match", "lora_diversity"):
        assert final[name] is not None, name
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["temperature"] == 0.5 and "mlflow_run_id" not in meta  # run ids stay out of DVC outputs

    import mlflow

    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert set(rlan_family.METRICS) - {"loo_accuracy"} <= set(run.data.metrics)  # every named metric is logged
    assert len(client.get_metric_history(tracker.run_id, "loss_total")) == 3
    assert run.data.params["model.hyperlora_init_scale"] == "0.1"
    assert run.data.params["train.loo_training.loss_weight"] == "0.5"
    assert run.data.tags["mlflow.runName"] == "workspace" and "git_commit" in run.data.tags
    assert run.data.tags["fingerprint"] == meta["fingerprint"]  # how the run is found again
    assert run.data.tags["health.loo_accuracy"].startswith("epoch 3: warning")


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    ws = tiny_workspace(tmp_path, train__max_consecutive_nonfinite=3)
    params = load_params(ws["params"])
    real = losses.training_losses
    calls = {"n": 0}

    def every_other_nan(*a, **k):
        loss, logs = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] % 4 == 1 else loss), logs

    monkeypatch.setattr(losses, "training_losses", every_other_nan)
    final = loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), Tracker(params, enabled=False))
    assert final["nonfinite_steps"] == 1  # the first step of every epoch (2 micro-batches per step)

    monkeypatch.setattr(losses, "training_losses",
                        lambda *a, **k: (torch.tensor(float("inf"), requires_grad=True), {}))
    shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive optimizer steps with a NaN/Inf loss"):
        loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), Tracker(params, enabled=False))


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ws = tiny_workspace(tmp_path)
    folder = checkpoint_of(ws, tmp_path / "ckpt")
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"\x00garbage")
    params = load_params(ws["params"])
    with pytest.raises(ModelFileError, match="last.pt: corrupt"):
        loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), Tracker(params, enabled=False))


def _run(ws, out, kill_after_checkpoint=False):
    proc = subprocess.Popen(train_cmd(ws, out), cwd=REPO, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after_checkpoint:
        ckpt = checkpoint_of(ws, out / "ckpt") / "last.pt"
        deadline = time.time() + 300
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads((out / "train.json").read_text()), err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_metrics(tmp_path):
    ws = tiny_workspace(tmp_path / "ws", train__epochs=4)
    straight, _ = _run(ws, tmp_path / "a")
    _run(ws, tmp_path / "b", kill_after_checkpoint=True)
    assert not (tmp_path / "b" / "train.json").exists()
    resumed, log = _run(ws, tmp_path / "b")
    assert "resuming this training after epoch " in log
    assert resumed == straight
    a, _ = load_model(tmp_path / "a" / "model.pt")
    b, _ = load_model(tmp_path / "b" / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_checkpoint_of_other_params_is_not_resumed(tmp_path, caplog):
    ws = tiny_workspace(tmp_path, train__epochs=2)
    tasks = read_raw(ws["raw"] / "pairs.parquet")
    first = load_params(ws["params"])
    loop.train(first, tasks, _paths(ws), Tracker(first, enabled=False))
    other = first.model_copy(update={"train": first.train.model_copy(update={"learning_rate": 1e-3})})
    with caplog.at_level("INFO"):
        loop.train(other, tasks, _paths(ws), Tracker(other, enabled=False))
    assert "training from scratch: none of the 1 checkpoint(s) in" in caplog.text
    assert "differs in params train.learning_rate 0.0005 -> 0.001" in caplog.text
    first_weights = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").unlink()
    (tmp_path / "plots" / "epochs.tsv").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):  # the same run again: its finished checkpoint gives the outputs back
        final = loop.train(other, tasks, _paths(ws), Tracker(other, enabled=False))
    assert "this training has finished (2 epochs): restoring its outputs" in caplog.text
    assert "epoch 1/" not in caplog.text
    assert final["epochs"] == 2 and (tmp_path / "plots" / "epochs.tsv").exists()
    again, _ = load_model(tmp_path / "model.pt")
    (tmp_path / "first.pt").write_bytes(first_weights)
    before, _ = load_model(tmp_path / "first.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), before.state_dict().values()))


@pytest.mark.slow
def test_nonfinite_gradient_with_finite_loss_skips_the_step(tmp_path, monkeypatch):
    ws = tiny_workspace(tmp_path, train__epochs=1, train__max_consecutive_nonfinite=50)
    params = load_params(ws["params"])
    real = losses.training_losses

    def inf_gradient(model, *a, **k):
        loss, logs = real(model, *a, **k)
        zero = sum((q - q.detach()).abs().sum() for q in model.parameters())
        return loss + zero.sqrt(), logs  # the same value; d sqrt(u)/du at u = 0 is infinite

    monkeypatch.setattr(losses, "training_losses", inf_gradient)
    final = loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), Tracker(params, enabled=False))
    assert final["nonfinite_steps"] == 2 and final["loss_total"] is None  # every step skipped, nothing measured
    model, _ = load_model(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.slow
def test_epochs_are_numbered_from_one_everywhere(tmp_path, caplog):
    ws = tiny_workspace(tmp_path)  # 3 epochs, meta-learning after the first
    params = load_params(ws["params"])
    tracker = Tracker(params)
    with caplog.at_level("INFO"):
        loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), tracker)
    tracker.end()
    series = (tmp_path / "plots" / "epochs.tsv").read_text().splitlines()
    rows = [dict(zip(series[0].split("\t"), line.split("\t"))) for line in series[1:]]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["loss_loo"] == "" and rows[0]["loss_equiv"] == ""  # not computed before meta-learning starts
    assert all(r["loss_loo"] and r["loss_equiv"] and r["heldout_pixel_accuracy"] for r in rows[1:])
    assert [f"epoch {e}/3:" in caplog.text for e in (1, 2, 3)] == [True] * 3 and "epoch 0" not in caplog.text
    assert "to the end of the run" in caplog.text and "pre-flight: projected" in caplog.text
    import mlflow

    history = mlflow.MlflowClient(tracking_uri(params.tracking)).get_metric_history(tracker.run_id, "loss_total")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.step for m in mlflow.MlflowClient(tracking_uri(params.tracking)).get_metric_history(
        tracker.run_id, "loss_loo")] == [2, 3]


@pytest.mark.slow
def test_preflight_refuses_a_run_that_does_not_fit_in_memory(tmp_path, monkeypatch):
    ws = tiny_workspace(tmp_path)
    params = load_params(ws["params"])
    monkeypatch.setattr(preflight, "available_memory", lambda device: 64 * 1024**2)  # a 64 MB machine
    with pytest.raises(preflight.PreflightError, match=r"micro-batch of 3 is projected to need [\d.]+ GB, more than"):
        loop.train(params, read_raw(ws["raw"] / "pairs.parquet"), _paths(ws), Tracker(params, enabled=False))
    assert not list((tmp_path / "ckpt").rglob("last.pt")) and not (tmp_path / "model.pt").exists()


@pytest.mark.slow
def test_train_stage_refuses_a_cpu_run_longer_than_the_limit(tmp_path):
    ws = tiny_workspace(tmp_path / "ws", train__max_cpu_hours=1e-7)
    proc = subprocess.run(train_cmd(ws, tmp_path / "out"), cwd=REPO, env=tool_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    # the first pre-flight (counted FLOPs) refuses it before the cache is read; nothing is written
    assert "training refused before it starts" in proc.stderr and "train.max_cpu_hours=1e-07" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert "--scale cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
def test_projection_from_measured_steps():
    sizes = []

    def step(n):  # memory grows by 10 MB per sample
        sizes.append(n)
        block = np.ones(n * 10 * 1024**2 // 8)
        block.sum()

    p = preflight.project(step, 16, 1000, torch.device("cpu"))
    assert sizes == [2, 2, 4, 16]  # warm-up, two small sizes, then the full micro-batch (projected to fit)
    assert p.samples == 1000 and p.hours > 0 and "measured at 2, 4 and 16 samples" in p.measured
    assert p.peak_bytes >= 150 * 1024**2
    preflight.check(p, max_cpu_hours=1e9)
    with pytest.raises(preflight.PreflightError, match="train.max_cpu_hours=1e-09"):
        preflight.check(p, max_cpu_hours=1e-9)


@pytest.mark.parametrize("error, at", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2),
                                       (torch.OutOfMemoryError("CUDA out of memory"), 4),
                                       (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                     "can't allocate memory: you tried to allocate 9 bytes."), 4)])
def test_preflight_out_of_memory_at_a_probe_size_is_one_line(error, at):
    """An allocation failure while measuring 2 or 4 samples is a refusal in one line with what to do,
    not a traceback; any other error still surfaces."""
    def step(n):
        if n >= at:
            raise error

    with pytest.raises(preflight.PreflightError) as info:
        preflight.project(step, 16, 1000, torch.device("cpu"))
    msg = str(info.value)
    assert f"a micro-batch of only {at} samples ran out of memory" in msg and "\n" not in msg
    assert "train.activation_checkpointing: true" in msg

    def broken(n):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        preflight.project(broken, 16, 1000, torch.device("cpu"))


def _paths_in(ws, out):
    return loop.TrainPaths(ws["cache"], out / "ckpt", out / "model.pt", out / "train.json", out / "plots")


OUTPUTS = ("model.pt", "train.json", "plots/epochs.tsv")


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_resume_gives_the_same_bytes_in_the_same_run(tmp_path, monkeypatch, caplog):
    import mlflow

    from pipeline.tracking import Terminated
    from pipeline.train import checkpoint

    for k in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(k, raising=False)
    ws = tiny_workspace(tmp_path / "ws", train__steps_per_epoch=4, train__checkpoint_minutes=1e-6)  # every step
    params = load_params(ws["params"])
    tasks = read_raw(ws["raw"] / "pairs.parquet")
    with caplog.at_level("INFO", logger="pipeline.train.loop"):
        straight = loop.train(params, tasks, _paths_in(ws, tmp_path / "a"), Tracker(params, enabled=False))
    assert caplog.records[0].getMessage() == f"training from scratch: no checkpoint in {tmp_path / 'a' / 'ckpt'} yet"

    real_save, saved = checkpoint.save, []

    def save_then_ctrl_c(directory, state, about):  # Ctrl-C just after the checkpoint in epoch 2 after step 2
        path = real_save(directory, state, about)
        saved.append((state["epoch"], state["step"]))
        if saved[-1] == (1, 2):
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_ctrl_c)
    monkeypatch.setenv("DVC_EXP_NAME", "interrupted")  # e.g. the name DVC gave a `dvc exp run`
    first = Tracker(params)
    with pytest.raises(Terminated) as stop:
        loop.train(params, tasks, _paths_in(ws, tmp_path / "b"), first)
    first.end("KILLED")
    folder = checkpoint_of(ws, tmp_path / "b" / "ckpt")
    assert saved == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]  # mid-epoch and at the end of epoch 1
    assert stop.value.code == 130 and str(stop.value) == (
        f"stopped by SIGINT (Ctrl-C) in epoch 2 of 3, after step 2 of 4; the next run of this training resumes in "
        f"epoch 2 of 3, after step 2 of 4, from {folder / 'last.pt'}")

    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.setenv("DVC_EXP_NAME", "resumed")
    caplog.clear()
    second = Tracker(params)
    with caplog.at_level("INFO", logger="pipeline.train.loop"):
        resumed = loop.train(params, tasks, _paths_in(ws, tmp_path / "b"), second)
    second.end()
    assert caplog.records[0].getMessage() == (f"resuming this training in epoch 2 of 3, after step 2 of 4, from "
                                             f"{folder / 'last.pt'}")
    assert resumed == straight
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    # one training, one MLflow run: the killed one, continued and renamed after the experiment that finished it
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    runs = client.search_runs([client.get_experiment_by_name("rlan").experiment_id])
    assert [(r.info.run_id, r.info.run_name, r.info.status) for r in runs] == [(first.run_id, "resumed", "FINISHED")]
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "loss_total")) == [1, 2, 3]


@pytest.mark.slow
def test_cpu_threads_are_a_param_so_the_machine_does_not_change_the_bytes(tmp_path):
    from pipeline.train import checkpoint

    ws = tiny_workspace(tmp_path / "ws", train__epochs=2, train__cpu_threads=1)
    params = load_params(ws["params"])
    tasks = read_raw(ws["raw"] / "pairs.parquet")
    before = torch.get_num_threads()
    try:
        for threads, out in ((2, "a"), (1, "b")):  # what the machine (or OMP_NUM_THREADS) would give
            torch.set_num_threads(threads)
            loop.train(params, tasks, _paths_in(ws, tmp_path / out), Tracker(params, enabled=False))
    finally:
        torch.set_num_threads(before)
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    two = params.override({"train.cpu_threads": 2})
    assert checkpoint.fingerprint(two, [ws["cache"]]) != checkpoint.fingerprint(params, [ws["cache"]])


@pytest.mark.slow
def test_preflight_cost_of_meta_learning_does_not_depend_on_the_load(tmp_path, monkeypatch):
    """The ratio the run clock starts from (a meta-learning step over a plain one) is a FLOP count:
    two experiments side by side get the same one however their timed steps compete for the cores."""
    from pipeline.loader import AugmentedCache
    from pipeline.model import family as families
    from pipeline.train.sampler import Sampler

    ws = tiny_workspace(tmp_path)
    params = load_params(ws["params"])
    tp, cpu = params.train, torch.device("cpu")
    run = families.get("rlan").training(params, AugmentedCache(ws["cache"]), cpu)
    sampler = Sampler(run.items, tp.seed, run.micro_batch, tp.grad_accumulation_steps, 1)
    _, quiet = loop.preflight_check(run, sampler, tp, cpu, 100, 1)
    measure, rng = preflight.measure, np.random.default_rng(0)
    monkeypatch.setattr(preflight, "measure", lambda *a: (measure(*a)[0] * rng.uniform(1, 5), measure(*a)[1]))
    _, loaded = loop.preflight_check(run, sampler, tp, cpu, 100, 1)
    assert loaded == quiet > 1.5  # leave-one-out and equivariance passes: well over one plain step's work


def test_run_clock_counts_meta_learning_epochs_at_their_own_cost():
    """The time to the end: plain epochs at their measured rate, meta-learning epochs at the pre-flight's
    ratio until one is timed, then at their own; the evaluations still to come at their mean time."""
    from pipeline.train.loop import RunClock

    tp = params_with(train__epochs=10, train__meta_learning_start_epoch=3, train__eval_every=5).train
    clock = RunClock(tp, steps_per_epoch=25, heavy=lambda epoch: schedule.meta_learning_active(tp, epoch))
    clock.heavy_ratio = 2.0
    clock.trained(1, 25, 50.0)
    clock.trained(2, 25, 50.0)  # 2 s a plain step
    assert clock.eta(2) == pytest.approx(25 * 2.0 + 7 * 25 * 4.0)  # epoch 3 plain, 4..10 at 2 x 2 s
    clock.evaluated(10.0)
    assert clock.eta(2) == pytest.approx(750.0 + 2 * 10.0)  # evaluations after epochs 5 and 10
    clock.trained(3, 25, 50.0)
    clock.trained(4, 25, 125.0)  # a meta-learning step took 5 s, not the projected 4
    assert clock.eta(4) == pytest.approx(6 * 25 * 5.0 + 2 * 10.0)
