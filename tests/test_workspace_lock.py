"""One experiment at a time in a workspace: the claim a DVC process's stages make, the runner's lock,
and two `dvc exp run` started at once in one workspace (end to end)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest

from pipeline.experiments import runlock
from tests.helpers import REPO, TINY, commit_all, copy_repo, run, tool_env, write_params

DVC = [sys.executable, "-m", "dvc"]


def owner(pid: int, command: str) -> dict[str, str]:
    return {**runlock._owner(pid), "command": command}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("DVC_STAGE", "train")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def test_a_stage_claims_the_workspace_for_its_dvc_process(workspace, monkeypatch):
    me = owner(os.getpid(), "dvc exp run -n e1 -S train.seed=1")
    monkeypatch.setattr(runlock, "dvc_process", lambda: me)
    runlock.check_stage("params.yaml")  # the first stage claims it
    claim = json.loads((workspace / ".dvc/tmp/rlan-workspace.json").read_text())
    assert claim["pid"] == str(os.getpid()) and claim["params"] == (REPO / "params.yaml").read_text()
    runlock.check_stage("params.yaml")  # a later stage of the same process, same params: fine

    (workspace / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("train:\n  seed: 42",
                                                                                      "train:\n  seed: 2"))
    with pytest.raises(runlock.WorkspaceError) as err:  # what another `dvc exp run` wrote meanwhile
        runlock.check_stage("params.yaml")
    message = str(err.value)
    assert message.startswith("params.yaml changed while experiment workspace runs (train.seed: at its start 42, "
                              "now 2)") and "git checkout -- params.yaml" in message and "\n" not in message


def test_a_stage_of_another_dvc_process_is_refused_naming_the_running_experiment(workspace, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "e1")
    monkeypatch.setattr(runlock, "dvc_process", lambda: owner(os.getpid(), "dvc exp run -n e1 -S train.seed=1"))
    runlock.check_stage("params.yaml")
    monkeypatch.setenv("DVC_EXP_NAME", "e2")
    monkeypatch.setattr(runlock, "dvc_process", lambda: owner(os.getppid(), "dvc exp run -n e2 -S train.seed=2"))
    with pytest.raises(runlock.WorkspaceError, match=r"this workspace is running experiment e1 \(`dvc exp run -n e1 "
                                                     r"-S train.seed=1`, pid \d+, since .*queue experiments"):
        runlock.check_stage("params.yaml")

    claim = workspace / ".dvc/tmp/rlan-workspace.json"  # a claim whose process is gone is taken over
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "pid_start": "1"}))
    runlock.check_stage("params.yaml")
    assert json.loads(claim.read_text())["experiment"] == "e2"


def test_outside_dvc_nothing_is_checked(workspace, monkeypatch):
    monkeypatch.delenv("DVC_STAGE")
    assert runlock.dvc_process() is None
    runlock.check_stage("params.yaml")
    assert not (workspace / ".dvc").exists()


def _holder(workspace, command):
    """A process holding the runner's lock on `workspace`, as a run of experiments does."""
    code = (f"import time; from pipeline.experiments import runlock\nwith runlock.hold({str(workspace)!r}, {command!r}):\n"
            "    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=tool_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_run_of_experiments_is_refused_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("changed: by hand\n")
    first = _holder(tmp_path, "python -m pipeline.experiments run --scale tiny stable fixed")
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.experiments", "run", "--scale", "tiny", "stable"],
                              cwd=tmp_path, env={**tool_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=120)
        with pytest.raises(runlock.WorkspaceError):
            with runlock.hold(tmp_path, "another"):
                pass
    finally:
        first.kill()
        first.wait()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert (f"this workspace is held by `python -m pipeline.experiments run --scale tiny stable fixed` (pid {first.pid}, "
            "since ") in line and "wait for it to end, or queue experiments" in line
    assert (tmp_path / "params.yaml").read_text() == "changed: by hand\n"  # refused before it touched anything
    with runlock.hold(tmp_path, "now free"):  # the lock ended with its process
        assert runlock.runner(tmp_path)["command"] == "now free"
    assert runlock.runner(tmp_path) is None


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("race"))
    write_params(repo, **TINY)
    commit_all(repo, "tiny params")
    run(DVC + ["repro"], repo, timeout=1200)
    commit_all(repo, "outputs")
    return repo


def _seeds(repo) -> tuple[dict[str, str], dict[str, str]]:
    """train.seed of every FINISHED run by name, and of the run behind every registered alias."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        finished = dict(db.execute("select r.name, p.value from runs r join params p on p.run_uuid = r.run_uuid "
                                   "where p.key = 'train.seed' and r.status = 'FINISHED'"))
        aliases = dict(db.execute("select a.alias, p.value from registered_model_aliases a join model_versions v on "
                                  "v.name = a.name and v.version = a.version join params p on p.run_uuid = v.run_id "
                                  "where p.key = 'train.seed'"))
    return finished, aliases


@pytest.mark.long
@pytest.mark.e2e
def test_two_experiments_started_at_once_never_cross(repo):
    """The second `dvc exp run` writes its params.yaml while the first one's stages run (DVC does that
    before it waits): neither trains or registers with the other's params, and each failure is one line."""
    claim = repo / ".dvc/tmp/rlan-workspace.json"
    claim.unlink(missing_ok=True)
    env = tool_env()
    first = subprocess.Popen(DVC + ["exp", "run", "-n", "e1", "-S", "train.seed=1"], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not claim.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "e1 ended before its first stage claimed the workspace"
    second = subprocess.run(DVC + ["exp", "run", "-n", "e2", "-S", "train.seed=2"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    out1, _ = first.communicate(timeout=600)
    out2 = second.stdout + second.stderr

    finished, aliases = _seeds(repo)
    assert finished.get("e1", "1") == "1" and finished.get("e2", "2") == "2", finished
    assert aliases.get("e1", "1") == "1" and aliases.get("e2", "2") == "2", aliases
    assert first.returncode != 0 or second.returncode != 0  # they could not both succeed in one workspace
    refusals = ("this workspace is running experiment e1", "params.yaml changed while experiment e1 runs",
                "started in this workspace while experiment e1", "is busy, it is being blocked by",
                "Unable to acquire lock")
    assert any(r in out1 + out2 for r in refusals), out1[-3000:] + out2[-3000:]
    assert "Traceback" not in out1 + out2
    for out in (out1, out2):  # our refusals are one line each
        ours = [line for line in out.splitlines() if " ERROR " in line]
        assert len(ours) <= 1, ours

    restore = re.search(r"restore the workspace with `([^`]+)`", runlock.RESTORE_HINT).group(1)
    subprocess.run(restore.replace("dvc ", f"{sys.executable} -m dvc "), shell=True, cwd=repo, env=env, check=True,
                   capture_output=True)  # as printed: the workspace is HEAD's again
    assert run(["git", "status", "--short"], repo).stdout == ""
    assert "up to date" in run(DVC + ["status"], repo).stdout
