"""Supervising DVC's queue (pipeline.experiments.supervise) on DVC's own records, made here: a running
task whose process is gone is called dead after some polls without progress and marked failed; what an
earlier, killed run left is stopped or removed, never queued twice; the wait is bounded and says so;
SIGTERM is passed on to a command's child and stops it as Ctrl-C does."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from pipeline.experiments import runner, supervise
from pipeline.stage import Stopped, run_foreground, sigterm_stops
from tests.helpers import REPO, tool_env

REV = "bbb38c1b466ec9e9c322e0501199ccac50afb81f"


def status(*rows: tuple[str, str, str], active: int = 0) -> str:
    table = "".join(f"{rev[:7]}  {name}  09:55 AM   {state}\n" for rev, name, state in rows)
    return f"Task     Name         Created    Status\n{table}\nWorker status: {active} active, 0 idle\n"


def gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def record(cwd, rev: str, pid: int | None, returncode: int | None = None) -> None:
    folder = cwd / ".dvc" / "tmp" / "exps" / "run" / rev
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{rev}.out").write_text("Running stage 'train':\n")
    if pid is not None:
        (folder / f"{rev}.json").write_text(json.dumps({"pid": pid, "stdin": None, "stdout": str(folder / f"{rev}.out"),
                                                        "stderr": None, "returncode": returncode}))


@pytest.fixture
def task_process():
    """A live process whose command line is DVC's for a queued task (`dvc exp exec-run`)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "exp", "exec-run"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_queue_status_rows_and_workers():
    text = status((REV, "stable_tiny", "Running"), ("61f79b3" + "0" * 33, "fixed_tiny", "Queued"), active=1)
    assert supervise.tasks(text) == [supervise.Task("bbb38c1", "stable_tiny", "Running"),
                                     supervise.Task("61f79b3", "fixed_tiny", "Queued")]
    assert supervise.active_workers(text) == 1


def test_a_task_whose_process_is_gone_is_dead_after_polls_without_progress(tmp_path):
    record(tmp_path, REV, gone_pid())
    text = status((REV, "stable_tiny", "Running"))
    watch = supervise.Watch(tmp_path)
    assert [watch.dead(text) for _ in range(supervise.DEAD_POLLS - 1)] == [[]] * (supervise.DEAD_POLLS - 1)
    with (tmp_path / ".dvc" / "tmp" / "exps" / "run" / REV / f"{REV}.out").open("a") as f:
        f.write("epoch 2/3\n")  # progress: the count starts again
    assert [watch.dead(text) for _ in range(supervise.DEAD_POLLS)][-1] == []
    assert watch.dead(text) == [supervise.Task("bbb38c1", "stable_tiny", "Running")]


def test_a_live_task_process_is_never_dead_and_a_reused_pid_is_not_the_task(tmp_path, task_process):
    record(tmp_path, REV, task_process)
    text = status((REV, "stable_tiny", "Running"))
    watch = supervise.Watch(tmp_path)
    assert all(watch.dead(text) == [] for _ in range(2 * supervise.DEAD_POLLS))
    record(tmp_path, REV, subprocess.os.getpid())  # this pytest: a live pid, but not DVC's task
    assert [watch.dead(text) for _ in range(supervise.DEAD_POLLS)][-1] != []


def test_a_task_without_a_process_is_dead_only_while_no_worker_is_active(tmp_path):
    record(tmp_path, REV, None)  # a worker took it and has not started its process yet
    watch = supervise.Watch(tmp_path)
    assert all(watch.dead(status((REV, "stable_tiny", "Running"), active=1)) == [] for _ in range(5))
    assert [watch.dead(status((REV, "stable_tiny", "Running"))) for _ in range(supervise.DEAD_POLLS)][-1] != []


def test_bury_closes_the_record_before_dvc_sees_it_and_says_so_in_one_line(tmp_path, caplog):
    pid = gone_pid()
    record(tmp_path, REV, pid)
    calls = []

    def dvc(args):
        calls.append(args)
        info = json.loads((tmp_path / ".dvc" / "tmp" / "exps" / "run" / REV / f"{REV}.json").read_text())
        assert info["returncode"] == -1  # DVC then sends no signal to the pid: it may be another process's now
        return ""

    supervise.bury(tmp_path, supervise.Task("bbb38c1", "stable_tiny", "Running"), dvc)
    assert calls == [["queue", "kill", REV]]  # the full id: two tasks may share a name
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "is dead" in r.getMessage()]
    assert f"queued experiment stable_tiny (task bbb38c1) is dead: its process (pid {pid}) is gone" in line
    assert "the same command resumes it" in line


@pytest.mark.slow
def test_bury_marks_the_dead_tasks_mlflow_run_killed(tmp_path):
    import mlflow

    from pipeline import tracking
    from tests.helpers import write_params
    from tests.test_experiments import _git_repo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _git_repo(tmp_path, "")
    write_params(tmp_path, tracking__tracking_uri=uri)
    subprocess.run(["git", "commit", "-qam", "store"], cwd=tmp_path, check=True)
    client = mlflow.MlflowClient(uri)
    tags = {**tracking.process_tags(), "pid": str(gone_pid())}
    dead = client.create_run(tracking.prepare_store(uri, "rlan"), tags=tags, run_name="stable_tiny").info.run_id
    live = client.create_run(tracking.prepare_store(uri, "rlan"), tags=tracking.process_tags()).info.run_id
    assert supervise.close_killed_runs(tmp_path) == [dead]
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(live).info.status == "RUNNING"


def test_orphans_of_the_plan_are_stopped_removed_or_buried_never_queued_twice(tmp_path, task_process, caplog):
    caplog.set_level(logging.INFO)
    live, queued, dead, other = (f"{c * 7}{'0' * 33}" for c in "abcd")
    record(tmp_path, live, task_process)
    record(tmp_path, dead, gone_pid())
    record(tmp_path, queued, None)
    before = status((live, "stable_tiny", "Running"), (queued, "fixed_tiny", "Queued"), (dead, "trm_tiny", "Running"),
                    (other, "mine_tiny", "Running"), active=1)
    after = status((live, "stable_tiny", "Failed"), (other, "mine_tiny", "Running"), active=1)
    calls = []

    def dvc(args):
        calls.append(args)
        return after if args == ["queue", "status"] else ""

    monkey = supervise.close_killed_runs
    supervise.close_killed_runs = lambda cwd: []
    try:
        supervise.orphans(tmp_path, ["stable_tiny", "fixed_tiny", "trm_tiny"], before, dvc, poll=0)
    finally:
        supervise.close_killed_runs = monkey
    assert ["queue", "kill", dead] in calls and ["queue", "remove", queued] in calls
    assert ["queue", "kill", live] in calls and not any(other in a for c in calls for a in c)  # not the plan's
    assert "the queue is still running stable_tiny, started by an earlier run that was killed" in caplog.text
    assert "fixed_tiny, queued by an earlier run that was stopped: removed" in caplog.text
    assert "the earlier run's experiments stopped after" in caplog.text


def test_an_orphan_that_does_not_stop_is_killed_and_the_wait_is_bounded(tmp_path, task_process, caplog):
    record(tmp_path, REV, task_process)
    running = status((REV, "stable_tiny", "Running"), active=1)
    calls = []

    def dvc(args):
        calls.append(args)
        return running if args == ["queue", "status"] else ""

    t0 = time.perf_counter()
    with pytest.raises(supervise.QueueError, match="stable_tiny, left running by an earlier run, did not stop"):
        supervise.orphans(tmp_path, ["stable_tiny"], running, dvc, poll=0.01, wait_s=0.1, kill_wait_s=0.1)
    assert time.perf_counter() - t0 < 10
    assert ["queue", "kill", "--force", REV] in calls and "did not stop within 0 s: killing them" in caplog.text


def test_the_wait_for_the_queue_ends_on_a_dead_task_and_is_never_silent(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    record(tmp_path, REV, gone_pid())
    state = {"status": status((REV, "stable_tiny", "Running"))}

    def fake(args, cwd, capture=True):
        if args[:2] == ["queue", "kill"]:
            state["status"] = status((REV, "stable_tiny", "Failed"))
        return subprocess.CompletedProcess(args, 0, state["status"], "")

    monkeypatch.setattr(runner, "_dvc", fake)
    monkeypatch.setattr(supervise, "close_killed_runs", lambda cwd: [])
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.0)
    runner.wait_for_queue(tmp_path, poll=0.01, timeout=10)  # waited until the timeout before
    assert "queued experiment stable_tiny (task bbb38c1) is dead" in caplog.text
    assert "still waiting for the queue after" in caplog.text and "running stable_tiny; queued none" in caplog.text


def test_sigterm_is_passed_on_to_the_child_and_waited_for(tmp_path):
    """A command that runs another (the runner, `make run`) passes SIGTERM on, waits for the child to
    stop on its own, then stops (Stopped, handled where Ctrl-C is)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import signal, sys, time\n"
        "from pipeline.stage import Stopped, run_foreground, sigterm_stops\n"
        "child = 'import signal, sys, time\\n"
        "def stop(s, f):\\n    time.sleep(0.5); print(\"child stopped cleanly\", flush=True); sys.exit(143)\\n"
        "signal.signal(signal.SIGTERM, stop)\\nprint(\"child ready\", flush=True)\\ntime.sleep(30)\\n'\n"
        "try:\n"
        "    with sigterm_stops():\n"
        "        run_foreground([sys.executable, '-c', child])\n"
        "except Stopped:\n"
        "    print('parent stopped after its child', flush=True)\n"
        "    sys.exit(143)\n")
    proc = subprocess.Popen([sys.executable, str(script)], env={**tool_env(), "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "child ready\n"
    proc.send_signal(signal.SIGTERM)  # to the parent alone, as make passes it on
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143 and out == "child stopped cleanly\nparent stopped after its child\n"


def test_sigterm_outside_a_child_raises_stopped_only_inside_the_block():
    with pytest.raises(Stopped), sigterm_stops():
        subprocess.os.kill(subprocess.os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or not callable(signal.getsignal(signal.SIGTERM)) or \
        signal.getsignal(signal.SIGTERM).__name__ != "_raise_stopped"
    assert run_foreground([sys.executable, "-c", "print(1)"], capture_output=True, text=True).stdout == "1\n"
