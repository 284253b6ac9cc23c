"""End to end: the real DVC commands on a copy of the repository, at tiny scale."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY, commit_all, copy_repo, run, tool_env, write_params

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    write_params(repo, **TINY)
    commit_all(repo, "tiny params")
    return repo


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
    shown = run(DVC + ["metrics", "show"], repo).stdout
    assert "loss_total" in shown and "eval.pass@2" in shown and "overall_status" in shown
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


def test_killed_repro_resumes_from_checkpoint(repo):
    straight = json.loads((repo / "metrics/train.json").read_text())
    run(["rm", "-rf", "models/checkpoints"], repo)
    ckpt = repo / "models/checkpoints/last.pt"
    proc = subprocess.Popen(DVC + ["repro", "-f", "train"], cwd=repo, env=tool_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: dvc and the stage it runs
    proc.wait()
    out = run(DVC + ["repro"], repo)
    assert "resuming from models/checkpoints/last.pt" in out.stderr + out.stdout
    assert json.loads((repo / "metrics/train.json").read_text()) == straight


def test_experiment_runs_are_named_in_mlflow(repo):
    with sqlite3.connect(repo / "mlflow.db") as db:
        names = {r[0] for r in db.execute("select name from runs")}
        tags = dict(db.execute("select key, value from tags join runs on tags.run_uuid = runs.run_uuid "
                               "where runs.name = 'small'"))
    assert "small" in names
    assert tags["dvc_exp_name"] == "small" and len(tags["dvc_baseline_rev"]) == 40
