"""End to end: the real DVC commands on a copy of the repository, at tiny scale."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc.api import DVCFileSystem

from pipeline.experiments.runner import experiment_revs
from tests.helpers import (
    TINY,
    checkpoint_in_progress,
    commit_all,
    copy_repo,
    interrupt_when,
    run,
    write_params,
)

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    write_params(repo, **{**TINY, "train__checkpoint_minutes": 1e-4})  # a checkpoint after every step
    commit_all(repo, "tiny params")
    return repo


def lock_outs(repo, rev: str, stage: str) -> dict[str, str]:
    lock = yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], repo).stdout)
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def exp_rev(repo, name: str) -> str:
    return experiment_revs(repo)[name]


def mlflow_runs(repo) -> list[tuple[str, str, str]]:
    """(name, status, fingerprint) of every MLflow run."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        return list(db.execute("select runs.name, runs.status, tags.value from runs left join tags on "
                               "tags.run_uuid = runs.run_uuid and tags.key = 'fingerprint'"))


def stop_line(output: str) -> str:
    [line] = [line for line in output.splitlines() if "stopped by SIGINT (Ctrl-C)" in line]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    return line


def test_repro_runs_stages_in_order_then_nothing(repo):
    out = run(DVC + ["repro"], repo).stdout
    assert stages_run(out) == ["validate_params", "prepare", "augment", "train", "evaluate", "gap_report"]
    assert json.loads((repo / "metrics/augment.json").read_text())["samples"] == 6 * 8
    assert json.loads((repo / "metrics/params_validation.json").read_text())["errors"] == 0
    assert json.loads((repo / "metrics/train.json").read_text())["epochs"] == 3
    assert (repo / "models/model.pt").exists() and (repo / "mlflow.db").exists()
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert set(ev) == {"eval", "train"} and ev["eval"]["tasks"] == 2 and ev["eval"]["views"] >= 64
    sub = json.loads((repo / "metrics/submission.json").read_text())
    assert len(sub) == 2 and all("attempt_1" in e and "attempt_2" in e for v in sub.values() for e in v)
    shown = run(DVC + ["metrics", "show"], repo).stdout  # the headline alone: one line a terminal shows
    assert shown.split("\n")[1].split()[0] == "metrics/summary.json" and max(map(len, shown.splitlines())) <= 120
    assert {"pass@2", "train@2", "entropy_ratio", "stop_gap", "status"} <= set(shown.split())
    report = (repo / "metrics/gap_report/report.md").read_text()
    assert "exact_match_gap" in report and (repo / "metrics/gap_report/attention_entropy.png").exists()
    assert list((repo / "metrics/gap_report").glob("task_*.png"))
    run(DVC + ["plots", "show", "-o", "plots_html"], repo)
    page = (repo / "plots_html" / "index.html").read_text()
    assert "vegaEmbed" in page and "cdn.jsdelivr" not in page and "<script src=" not in page  # works offline
    assert "up to date" in run(DVC + ["status"], repo).stdout
    again = run(DVC + ["repro"], repo).stdout
    assert stages_run(again) == []
    commit_all(repo, "pipeline outputs")


def test_bad_param_stops_before_compute(repo):
    write_params(repo, **{**TINY, "model__hyperlora_init_scale": 0.01})
    proc = run(DVC + ["repro"], repo, check=False)
    assert proc.returncode != 0
    assert "model.hyperlora_init_scale" in proc.stdout + proc.stderr
    assert stages_run(proc.stdout) == ["validate_params"]
    run(["git", "checkout", "--", "params.yaml"], repo)


def test_exp_run_reruns_only_what_the_key_touches(repo):
    out = run(DVC + ["exp", "run", "-n", "small", "-S", "train.learning_rate=0.001"], repo).stdout
    assert stages_run(out) == ["validate_params", "train", "evaluate", "gap_report"]
    shown = run(DVC + ["exp", "show", "--json"], repo).stdout
    assert "small" in shown


@pytest.mark.long
def test_interrupted_exp_run_resumes_to_the_bytes_of_an_uninterrupted_one(repo):
    override = ["-S", "train.learning_rate=0.002"]
    code, out = interrupt_when(DVC + ["exp", "run", "-n", "resumed", *override], repo,
                               checkpoint_in_progress(repo / "checkpoints"))  # Ctrl-C in epoch 2 or 3
    assert code != 0 and stages_run(out)[-1] == "train"
    line = stop_line(out)
    assert re.search(r"train: stopped by SIGINT \(Ctrl-C\) in epoch [23] of 3, after step 1 of 2; the next run of "
                     r"this training resumes in epoch [23] of 3, after step 1 of 2, from .*/checkpoints/\w+/last.pt",
                     line), line

    again = run(DVC + ["exp", "run", "-n", "resumed", *override], repo)  # the same command: it resumes
    assert re.search(r"resuming this training in epoch [23] of 3, after step 1 of 2", again.stderr + again.stdout)
    [(_, _, fingerprint)] = [r for r in mlflow_runs(repo) if r[0] == "resumed"]  # one run, continued
    assert [r for r in mlflow_runs(repo) if r[2] == fingerprint] == [("resumed", "FINISHED", fingerprint)]

    shutil.rmtree(repo / "checkpoints")  # the same experiment from scratch, never interrupted, in a copy
    straight = run(DVC + ["exp", "run", "--temp", "--force", "-n", "straight", *override], repo)
    assert "training from scratch: no checkpoint in" in straight.stderr + straight.stdout
    assert lock_outs(repo, exp_rev(repo, "resumed"), "train") == lock_outs(repo, exp_rev(repo, "straight"), "train")


def test_interrupted_repro_resumes_and_exp_save_keeps_the_metrics(repo):
    straight = json.loads((repo / "metrics/train.json").read_text())
    shutil.rmtree(repo / "checkpoints")
    code, out = interrupt_when(DVC + ["repro", "-f", "train"], repo, checkpoint_in_progress(repo / "checkpoints"))
    assert code != 0 and "the next run of this training resumes in epoch" in stop_line(out)
    out = run(DVC + ["repro", "-f", "train"], repo)  # the same command (`-f`: DVC's run cache would restore it)
    assert "resuming this training in epoch" in out.stderr + out.stdout
    assert json.loads((repo / "metrics/train.json").read_text()) == straight
    workspace = [r for r in mlflow_runs(repo) if r[0] == "workspace"]
    assert sorted(status for _, status, _ in workspace) == ["FINISHED", "FINISHED"]  # the first repro's, this one

    run(DVC + ["exp", "save", "-n", "saved"], repo)  # the metrics are DVC outputs: the saved experiment has them
    fs = DVCFileSystem(str(repo), rev=exp_rev(repo, "saved"))
    for path in ("metrics/train.json", "metrics/eval.json", "metrics/gap.json", "metrics/train/epochs.tsv"):
        assert fs.read_text(path) == (repo / path).read_text(), path


def test_experiment_runs_are_named_in_mlflow(repo):
    with sqlite3.connect(repo / "mlflow.db") as db:
        names = {r[0] for r in db.execute("select name from runs")}
        tags = dict(db.execute("select key, value from tags join runs on tags.run_uuid = runs.run_uuid "
                               "where runs.name = 'small'"))
    assert "small" in names
    assert tags["dvc_exp_name"] == "small" and len(tags["dvc_baseline_rev"]) == 40


def stage_running(module: str, cwd: Path, for_s: float):
    """A predicate: a process of `python -m <module>` in `cwd` has run for `for_s` seconds."""
    seen: dict[int, float] = {}

    def ready() -> bool:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                here = os.readlink(proc / "cwd") == str(cwd)
            except OSError:
                continue
            if here and b"-m" in cmd and module.encode() in cmd:
                first = seen.setdefault(int(proc.name), time.monotonic())
                if time.monotonic() - first >= for_s:
                    return True
        return False
    return ready


def test_evaluate_killed_then_repro_gives_the_uninterrupted_result(repo):
    """SIGKILL to `dvc repro` (DVC and the evaluate stage at once) while it evaluates: no output is
    left half-written, DVC sees the stage as not done, and the same command run again gives the
    bytes of the uninterrupted evaluation (a plain `dvc repro` would restore them from DVC's cache: the
    killed run never reached dvc.lock)."""
    run(DVC + ["repro"], repo)
    outs = ["metrics/eval.json", "metrics/submission.json", "metrics/eval_tasks.csv", "metrics/eval_candidates.json"]
    whole = {p: (repo / p).read_bytes() for p in outs}
    code, out = interrupt_when(DVC + ["repro", "-f", "evaluate"], repo,
                               stage_running("stages.evaluate", repo, 2.0), signum=signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    for p in outs:  # DVC removed the outputs before the stage ran; a killed stage wrote none of them
        assert not (repo / p).exists() or (repo / p).read_bytes() == whole[p], p
    assert "evaluate" in run(DVC + ["status"], repo).stdout
    again = run(DVC + ["repro", "-f", "evaluate"], repo)  # the command that was killed, once more
    assert "Running stage 'evaluate'" in again.stdout
    assert {p: (repo / p).read_bytes() for p in outs} == whole
    assert not [p for p in (repo / "metrics").iterdir() if ".tmp-" in p.name]
    assert "changed" not in run(DVC + ["status"], repo).stdout


def test_a_diverging_training_stops_in_one_line_and_no_model_reaches_evaluate_or_the_registry(repo):
    """An absurd learning rate (within the schema's bounds): the loss turns NaN/Inf, training stops
    after train.max_consecutive_nonfinite skipped steps with one line saying what to lower; no model
    file, no evaluation, no registered model version of that experiment."""
    def versions() -> list[tuple]:
        if not (repo / "mlflow.db").exists():
            return []
        with sqlite3.connect(repo / "mlflow.db") as db:
            return list(db.execute("select name, version, run_id from model_versions"))

    registered = versions()
    absurd = ["-S", "train.learning_rate=1.0", "-S", "train.hyperlora_lr_multiplier=1000",
              "-S", "train.gradient_clip=1000000", "-S", "train.max_consecutive_nonfinite=2"]
    failed = run(DVC + ["exp", "run", "-n", "diverged", *absurd], repo, check=False)
    said = failed.stdout + failed.stderr
    try:
        assert failed.returncode != 0
        [line] = [ln for ln in said.splitlines() if "the loss diverged" in ln]
        assert "consecutive optimizer steps with a NaN/Inf loss" in line and "Lower train.learning_rate" in line
        assert "Traceback" not in said and "Running stage 'evaluate'" not in said
        assert not (repo / "models" / "model.pt").exists()
        assert versions() == registered
        assert [r[1] for r in mlflow_runs(repo) if r[0] == "diverged"] == ["FAILED"]
    finally:
        run(["git", "checkout", "--", "."], repo)
        run(DVC + ["checkout", "-f"], repo, check=False)
