"""Every stage that does not train runs on a CPU machine from a fresh clone, at the full scale; only
the train stage refuses a training the CPU cannot finish, before it writes anything.

What it catches: a refusal for the cost of training made by a stage that does not train
(validate_params, prepare, augment: `dvc repro prepare` and `dvc repro augment` failing on a CPU),
or a train stage that starts training, writes its model or a checkpoint, or leaves `-S` overrides in
params.yaml before refusing; a cache build killed half way (SIGKILL: no handler runs) that leaves a
partial cache behind, or makes the next `dvc repro` keep or build anything but the uninterrupted
cache."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
import torch

from tests.helpers import commit_all, copy_repo, interrupt_when, run

DVC = [sys.executable, "-m", "dvc"]
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full scale trains: nothing to refuse")]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("cpu"))
    commit_all(repo, "fresh clone")
    return repo


def test_prepare_and_augment_run_at_full_scale_on_a_cpu(clone):
    prepared = run(DVC + ["repro", "prepare"], clone, timeout=600)
    assert "training refused" not in prepared.stdout + prepared.stderr
    counts = json.loads((clone / "metrics" / "prepare.json").read_text())
    assert counts["train"]["tasks"] == 400 and counts["eval"]["tasks"] == 400  # every ARC-AGI-1 task
    assert (clone / "data" / "raw" / "pairs.parquet").is_file()
    run(DVC + ["repro", "augment"], clone, timeout=600)
    manifest = json.loads((clone / "data" / "cache" / "manifest.json").read_text())
    assert manifest["samples"] == 800 * 500  # the 400K-sample cache of params.yaml
    assert json.loads((clone / "metrics" / "augment.json").read_text())["samples"] == 400_000
    status = run(DVC + ["status", "prepare", "augment"], clone).stdout
    assert "changed" not in status  # recorded in dvc.lock: a second repro runs nothing


def test_the_train_stage_refuses_before_it_writes_anything(clone):
    """`dvc exp run -S ...` at the full scale: the data stages run (or are up to date), the train
    stage refuses in one line naming the override, puts HEAD's params.yaml back, and leaves no model,
    checkpoint or MLflow run."""
    if not (clone / "data" / "cache" / "manifest.json").exists():
        run(DVC + ["repro", "augment"], clone, timeout=600)
    head = (clone / "params.yaml").read_text()
    failed = run(DVC + ["exp", "run", "-S", "model.hyperlora_init_scale=0.05"], clone, check=False, timeout=600)
    out = failed.stdout + failed.stderr
    refusals = [line for line in out.splitlines() if "training refused before it starts: at least " in line]
    assert failed.returncode != 0 and len(refusals) == 1, out
    assert "more than train.max_cpu_hours=12" in refusals[0] and "Traceback" not in out
    assert "python -m pipeline.experiments run --scale cpu -S model.hyperlora_init_scale=0.05)" in refusals[0]
    assert "your overrides: -S model.hyperlora_init_scale=0.05" in out and "params.yaml is HEAD's again" in out
    assert "Running stage 'train'" in out and "pipeline.train.loop" not in out  # refused before the loop starts
    assert (clone / "params.yaml").read_text() == head
    assert not (clone / "models" / "model.pt").exists() and not (clone / "checkpoints").exists()
    assert not (clone / "mlflow.db").exists() and not (clone / "metrics" / "train.json").exists()


def _lock_md5(repo, stage: str, out: str) -> str:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def test_augment_killed_half_way_then_repro_builds_the_same_cache(clone):
    """SIGKILL to `dvc repro -f augment` (DVC and the stage at once) while the 400K cache is being
    written; the next `dvc repro augment` removes the dead writer's temporary folder and builds the
    cache whose hash dvc.lock held before, byte for byte; nothing stale is left."""
    if not (clone / "data" / "cache" / "manifest.json").exists():
        run(DVC + ["repro", "augment"], clone, timeout=600)
    before = _lock_md5(clone, "augment", "data/cache")

    def writing() -> bool:  # the stage has written part of its temporary cache folder
        return any(f.is_file() for tmp in (clone / "data").glob("cache.tmp-*") for f in tmp.rglob("*"))

    started = time.monotonic()
    code, out = interrupt_when(DVC + ["repro", "-f", "augment"], clone, writing, signum=signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    assert list((clone / "data").glob("cache.tmp-*")), "killed before the temporary cache was written"
    assert not (clone / "data" / "cache" / "manifest.json").exists()  # DVC removed the old one: no stale cache
    status = run(DVC + ["status", "augment"], clone).stdout
    assert "changed" in status or "deleted" in status  # DVC sees the stage is not done

    again = run(DVC + ["repro", "augment"], clone, timeout=600)
    said = again.stdout + again.stderr
    assert "Running stage 'augment'" in said and "left by a stage that was killed" in said
    assert _lock_md5(clone, "augment", "data/cache") == before
    assert json.loads((clone / "data" / "cache" / "manifest.json").read_text())["samples"] == 400_000
    assert not list((clone / "data").glob("cache.tmp-*"))  # the killed writer's folder is gone
    assert "changed" not in run(DVC + ["status", "augment"], clone).stdout
    assert time.monotonic() - started < 600


def test_the_gpu_checks_carry_is_made_on_a_cpu(clone):
    """`make gpu-carry` (benchmarks.gpu_carry) from the fresh clone: the wheels the device lacks, for
    its Python and this one, and the prepared tasks, with the command to run there."""
    made = run([sys.executable, "-m", "benchmarks.gpu_carry"], clone, timeout=600)
    carry = clone / ".gpu-carry"
    wheels = [w.name for w in (carry / "wheels").glob("*.whl")]
    assert any(w.startswith("pydantic_core-") and "cp312" in w for w in wheels), wheels
    assert (carry / "wheels" / "requirements.txt").read_text().startswith("pydantic==")
    from pipeline.arc import read_raw

    assert len(read_raw(carry / "raw" / "pairs.parquet")) == 800
    assert "python3 -m benchmarks.gpu --raw .gpu-carry/raw" in made.stdout and "travel (limit 64 MiB)" in made.stdout
    assert "training refused" not in made.stdout + made.stderr


def test_the_flop_count_runs_on_a_cpu(clone):
    """`python -m benchmarks.train --flops-only` from the fresh clone (its 400K cache): the counts on
    the meta device and the projected H100-hours, never a refusal for the cost of training."""
    if not (clone / "data" / "cache" / "manifest.json").exists():
        run(DVC + ["repro", "augment"], clone, timeout=600)
    counted = run([sys.executable, "-m", "benchmarks.train", "--flops-only", "--flop-batches", "1"], clone,
                  timeout=900)
    assert "Training cost (counted on the meta device)" in counted.stdout
    [line] = [ln for ln in counted.stdout.splitlines() if "stable run (80M samples) at 40% of H100 bf16 peak" in ln]
    assert float(line.split("|")[2].replace(",", "")) > 1  # H100-hours, counted
    assert "training refused" not in counted.stdout + counted.stderr
