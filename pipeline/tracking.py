"""MLflow runs, reached through this one thin module (stages use it; the model never does).

The default store is `sqlite:///<repo root>/mlflow.db`, its artifacts in `<repo root>/mlruns/<experiment>`.
The repository root comes from DVC_ROOT, mapped back to the main repository when DVC runs the
experiment in a temporary copy (`dvc exp run --temp` / `--queue` work in `<repo>/.dvc/tmp/exps/...`),
so every run and its artifacts land in one store; MLFLOW_TRACKING_URI, then `tracking.tracking_uri`,
override it. Runs are named after the DVC experiment (DVC_EXP_NAME, else "workspace").

No run id is ever written into a DVC output: a training run carries tags that find it again,
`fingerprint` (what shapes training, pipeline.train.checkpoint) to resume or restore it, and
`model_md5` (the MD5 of models/model.pt, the hash in dvc.lock) for the stages that log into it.
A run also records `host`, `pid` and `pid_start`: a RUNNING run whose process is gone is marked
KILLED when the next run of the experiment starts; SIGTERM and SIGINT end a run as KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.params import Params, TrackingParams

log = logging.getLogger(__name__)


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's fluent API (mlflow.start_run, log_model, load_model) pointed at `uri` for the block.
    mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI for child processes: both are put back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
_EXP_TMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
_SQLITE = "sqlite:///"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message is one line naming the store and the fix."""


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that the run ends as KILLED; exits with 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


def end_status(err: BaseException) -> str:
    """The status of a run that ended with `err`: KILLED for a signal (SIGTERM, SIGINT), else FAILED."""
    return "KILLED" if isinstance(err, (KeyboardInterrupt, Terminated)) else "FAILED"


# --- where the store is ----------------------------------------------------------------------


def repo_root() -> Path:
    root = os.environ.get("DVC_ROOT") or os.getcwd()
    if _EXP_TMP in root + os.sep:
        root = (root + os.sep).split(_EXP_TMP)[0]
    return Path(root).resolve()


def tracking_uri(p: TrackingParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or p.tracking_uri or f"{_SQLITE}{repo_root() / 'mlflow.db'}"


def run_name() -> str:
    """The DVC experiment this process runs in, or "workspace" (`dvc repro`, a stage run by hand)."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len(_SQLITE):]) if uri.startswith(_SQLITE) else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (`mlruns/<experiment>/`), wherever the
    process runs: MLflow's own default is relative to the working directory, which for a queued
    experiment is a temporary copy that DVC deletes. Other stores choose for themselves (None)."""
    db = _sqlite_path(uri)
    return str(db.parent.resolve() / "mlruns" / re.sub(r"[^\w.-]", "_", experiment)) if db is not None else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """One writer at a time for what parallel queued runs would race on (creating the database,
    the experiment, registered model versions)."""
    from filelock import FileLock

    db = _sqlite_path(uri)
    lock_dir = db.parent if db is not None else repo_root()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / ".mlflow.lock"), timeout=600):
        yield


# --- the check before any compute --------------------------------------------------------------


def check_store(p: TrackingParams) -> bool:
    """Whether the store can be used, checked before any compute within `tracking.timeout_s`:
    True when it can; False, with a warning, when it cannot and `tracking.required` is false;
    TrackingError (one line: the store, the problem, the fix) when it cannot and is required."""
    uri = tracking_uri(p)
    db = _sqlite_path(uri)
    if db is not None:
        found = _sqlite_problem(db, p.timeout_s)
    elif uri.startswith(("http://", "https://")):
        found = _server_problem(uri, p.timeout_s)
    else:
        found = None  # other stores (file:, databricks): any problem shows when they are used
    if found is None:
        return True
    if p.required:
        raise TrackingError(f"{found}; fix the store, point MLFLOW_TRACKING_URI (or tracking.tracking_uri) at one "
                            "that works, or set tracking.required: false to run without MLflow")
    log.warning("%s: running without MLflow (tracking.required is false)", found)
    return False


def _sqlite_problem(db: Path, timeout_s: int) -> str | None:
    """A write that is rolled back: catches a read-only file or directory (even for root, e.g.
    `chattr +i`), a file that is not a database, a directory that cannot be created."""
    if not db.exists():
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            probe = db.parent / f".mlflow-probe-{uuid.uuid4().hex[:8]}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            return f"MLflow store {db} cannot be created ({err.strerror}: {err.filename})"
        return None
    try:
        con = sqlite3.connect(db, timeout=timeout_s, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE main._rlan_write_probe (x)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return None  # busy with another run's writes for timeout_s: it can be written
        return f"MLflow store {db} cannot be written ({err})"
    except sqlite3.DatabaseError as err:
        return f"MLflow store {db} is not a usable database ({err})"
    return None


def _server_problem(uri: str, timeout_s: int) -> str | None:
    """One request, no retries, within timeout_s (MLflow's own client retries for minutes)."""
    import mlflow

    bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {k: os.environ.get(k) for k in bounded}
    os.environ.update(bounded)
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - whatever the probe hits is the answer
        return f"MLflow tracking server {uri} is unreachable or failing ({_reason(err)}; checked for {timeout_s} s)"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return None


def _reason(err: Exception) -> str:
    """The cause of a failed request in a few words (MLflow's message nests urllib3's)."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(timed out|HTTP \d{3}[^.]*)", text)
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    return found.group(1).strip() if found else first[:160]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_store(uri: str, experiment: str) -> str:
    """Create the database and the experiment (artifacts at `artifact_location`) once, under the
    store lock; returns the experiment id."""
    import mlflow

    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))
    if _EXP_TMP in found.artifact_location:
        log.warning("MLflow experiment %s keeps its artifacts in %s, a temporary DVC copy: rename or delete the "
                    "experiment to start one whose artifacts stay", experiment, found.artifact_location)
    return found.experiment_id


# --- processes behind runs ---------------------------------------------------------------------


def _process_start(pid: int) -> str:
    """The start time of a process (clock ticks since boot), to tell a reused pid; "" off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "pid_start": _process_start(pid)}


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that a run's tags record still runs; None when this host cannot tell."""
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return None
    pid = int(tags["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not tags.get("pid_start") or _process_start(pid) in ("", tags["pid_start"])


def close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose process on this host is gone."""
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        if process_alive(run.data.tags) is False:
            client.set_tag(run.info.run_id, "killed", f"process {run.data.tags['pid']} on {run.data.tags['host']} "
                                                      "ended without closing the run")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            log.warning("MLflow: run %s (%s) was left RUNNING by a process that is gone: marked KILLED",
                        run.info.run_id, run.info.run_name)
    return closed


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def health_tags(epoch: int, checks: list[Any]) -> dict[str, str]:
    """`health.<check>` tags for the checks of one epoch that are not ok."""
    return {f"health.{c.name}": f"epoch {epoch}: {c.status}: {c.message}" for c in checks if c.status != "ok"}


# --- the run -------------------------------------------------------------------------------------


class Tracker:
    """One MLflow run. `enabled=False` (ranks other than 0, or no usable store with
    `tracking.required: false`) makes every call a no-op."""

    def __init__(self, params: Params, enabled: bool = True):
        self.params, self.enabled = params, enabled
        self.run_id: str | None = None
        self.continued = False  # start() continued an earlier run rather than creating one
        self.inputs: Callable[[], list[Any]] | None = None  # gives the DatasetInputs logged by a new run
        self.tags: dict[str, str] = {}  # set by the stage on a new run, besides the tags of every run
        self._client = None

    @property
    def uri(self) -> str:
        return tracking_uri(self.params.tracking)

    @property
    def client(self) -> Any:
        return self._client

    def start(self, fingerprint: str | None = None, resume: bool = False, finished: bool = False) -> str | None:
        """Start the run of the training with this fingerprint. With `resume` (a checkpoint of this
        training was found) continue this DVC experiment's earlier run of it: an unfinished one to
        go on training, a finished one (`finished`) whose outputs are restored; otherwise start a new
        run (the caller logs the restored history into it). Runs of the MLflow experiment left
        RUNNING by a dead process are marked KILLED first."""
        if not self.enabled:
            return None
        import mlflow

        exp_id = prepare_store(self.uri, self.params.tracking.experiment_name)
        self._client = mlflow.MlflowClient(self.uri)
        close_dead_runs(self._client, exp_id)
        name = run_name()
        earlier = self._client.search_runs([exp_id], f"tags.fingerprint = '{fingerprint}'",
                                           order_by=["attributes.start_time DESC"],
                                           max_results=100) if resume and fingerprint else []
        same = [r for r in earlier if r.info.run_name == name and (r.info.status == "FINISHED") == finished]
        self._install_signal_handlers()
        if same:
            self.run_id, self.continued = same[0].info.run_id, True
            self._client.update_run(self.run_id, status="RUNNING")
            self.set_tags(process_tags())
            log.info("MLflow: continuing run %s (%s)", self.run_id, name)
            return self.run_id
        tags = {"git_commit": git_commit(), "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""), **process_tags()}
        if fingerprint:
            tags["fingerprint"] = fingerprint
        if earlier:
            tags["restored_from_run"] = earlier[0].info.run_id
        if self.params.validation.accept_broken_rules:  # error rules broken on purpose (validate_params)
            tags["validation.accepted_rules"] = ",".join(self.params.validation.accept_broken_rules)
        tags.update(self.tags)
        self.run_id = self._client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.log_params(self.params.flat())
        if self.inputs is not None:
            self.log_inputs(self.inputs())
        log.info("MLflow: run %s (%s) in %s", self.run_id, name, self.uri)
        return self.run_id

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)  # SIGINT already raises KeyboardInterrupt

    def attach(self, run_id: str | None) -> bool:
        """Log into an existing run; False when there is none."""
        if not self.enabled or run_id is None:
            return False
        import mlflow

        self._client = mlflow.MlflowClient(self.uri)
        try:
            self._client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s not found: not logging", run_id)
            return False
        self.run_id = run_id
        return True

    def attach_to_model(self, model_md5: str) -> bool:
        """Log into the training run that made the model with this MD5 (its `model_md5` tag), the
        latest of this DVC experiment's runs if it has one; False, with a warning, when none did."""
        found = self.find_training_run(model_md5) if self.enabled else None
        if found is None:
            if self.enabled:
                log.warning("MLflow: no training run in %s made this model (tag model_md5=%s): not logging",
                            self.uri, model_md5)
            return False
        return self.attach(found)

    def find_training_run(self, model_md5: str) -> str | None:
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.params.tracking.experiment_name)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], f"tags.model_md5 = '{model_md5}'",
                                  order_by=["attributes.start_time DESC"], max_results=100)
        runs.sort(key=lambda r: r.info.run_name != run_name())  # stable: latest of this experiment first
        return runs[0].info.run_id if runs else None

    def log_params(self, flat: dict[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        self._log_steps([(step, metrics)])

    def _log_steps(self, steps: list[tuple[int, dict[str, float | None]]]) -> None:
        if self._client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for step, metrics in steps for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_history(self, history: list[dict[str, Any]], checks: Callable[[dict[str, Any]], list[Any]]) -> None:
        """Per-epoch rows of a training done before this run (restored or resumed into a new run),
        with the gap values and health tags its epochs logged (each check's last problem, as live)."""
        steps, tags = [], {}
        for row in history:
            found = checks(row)
            steps.append((row["epoch"], {**{k: v for k, v in row.items() if k != "epoch"},
                                         **{f"gap_{c.name}": c.value for c in found if c.name not in row}}))
            tags.update(health_tags(row["epoch"], found))
        self._log_steps(steps)
        self.set_tags(tags)

    def log_inputs(self, inputs: list[Any]) -> None:
        if self._client is not None and inputs:
            self._client.log_inputs(self.run_id, datasets=inputs)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._client is not None and tags:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
