"""End to end: the real DVC commands on a copy of the repository, at tiny scale."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.helpers import commit_all, copy_repo, run, write_params

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    write_params(repo, data__max_tasks=3, augment__samples_per_task=8)
    commit_all(repo, "tiny params")
    return repo


def test_repro_runs_stages_in_order_then_nothing(repo):
    out = run(DVC + ["repro"], repo).stdout
    assert stages_run(out)[:3] == ["validate_params", "prepare", "augment"]
    assert json.loads((repo / "metrics/augment.json").read_text())["samples"] == 6 * 8
    assert json.loads((repo / "metrics/params_validation.json").read_text())["errors"] == 0
    assert "up to date" in run(DVC + ["status"], repo).stdout
    again = run(DVC + ["repro"], repo).stdout
    assert stages_run(again) == []
    commit_all(repo, "pipeline outputs")


def test_bad_param_stops_before_compute(repo):
    write_params(repo, data__max_tasks=3, augment__samples_per_task=8, model__hyperlora_init_scale=0.01)
    proc = run(DVC + ["repro"], repo, check=False)
    assert proc.returncode != 0
    assert "model.hyperlora_init_scale" in proc.stdout + proc.stderr
    assert stages_run(proc.stdout) == ["validate_params"]
    run(["git", "checkout", "--", "params.yaml"], repo)


def test_exp_run_reruns_only_what_the_key_touches(repo):
    out = run(DVC + ["exp", "run", "-n", "small", "-S", "augment.samples_per_task=4"], repo).stdout
    assert set(stages_run(out)) == {"validate_params", "augment"}
    shown = run(DVC + ["exp", "show", "--json"], repo).stdout
    assert "small" in shown
