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
KILLED when the next run of the experiment starts; SIGTERM and SIGINT end a run as KILLED. A resumed
training continues the run that made its checkpoint, whichever DVC experiment (or `dvc repro`) runs
it, so one training is one run.

Every call to the store goes through `pipeline.tracking.client` (`connect`): bounded by
`tracking.timeout_s` per request and `tracking.retry_s` in all; logging calls made while the store is
lost are kept in `<repo root>/.dvc/tmp/mlflow-buffer/` and sent when it is back.
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
from pipeline.tracking.client import BoundedClient, connect, reason

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


SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Terminated(SystemExit):
    """SIGTERM or SIGINT, raised in the main thread (`install_signal_handlers`) so that the run ends as
    KILLED and the process exits with 128 + signal (143, 130) after one line; `where` says what it
    stopped and what the next run does."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(128 + signum)
        self.signum, self.where = signum, where

    def __str__(self) -> str:
        name = SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")
        return f"stopped by {name}" + (f" {self.where}" if self.where else "")


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT raise Terminated in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNAL_NAMES:
            signal.signal(signum, _raise_terminated)


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


def buffer_root() -> Path:
    """Where logging calls wait while a store is lost (pipeline.tracking.client), one folder per store."""
    return repo_root() / ".dvc" / "tmp" / "mlflow-buffer"


def client_for(p: TrackingParams) -> BoundedClient:
    """The store's client with bounded calls (it first sends what earlier processes kept for it)."""
    return connect(tracking_uri(p), p, buffer_root())


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
        found = _sqlite_problem(db, p.timeout_s) or _artifacts_problem(
            _recorded_artifacts(db, p.experiment_name) or artifact_location(uri, p.experiment_name))
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
    `chattr +i`), a file that is not a database, a directory that cannot be created, and a database
    that another process keeps locked for longer than timeout_s."""
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
            con.execute("BEGIN IMMEDIATE")  # waits up to timeout_s for another process's write to end
            con.execute("CREATE TABLE main._rlan_write_probe (x)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return (f"MLflow store {db} is locked by another process for more than {timeout_s} s (tracking.timeout_s: "
                    "an open transaction of an sqlite3 shell, or a process that hangs)")
        return f"MLflow store {db} cannot be written ({err})"
    except sqlite3.DatabaseError as err:
        return f"MLflow store {db} is not a usable database ({err})"
    return None


def _recorded_artifacts(db: Path, experiment: str) -> str | None:
    """The artifact location the database records for the experiment, None before it exists."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # not created yet (no tables), or unreadable: the write probe reports that
        return None
    return row[0] if row else None


def _artifacts_problem(location: str) -> str | None:
    """A file written and removed in the artifact folder (a local one; other stores check themselves)."""
    if location.startswith("file:"):
        location = location.removeprefix("file://").removeprefix("file:")
    elif re.match(r"^[a-z][a-z0-9+.-]*:", location):
        return None
    folder = Path(location)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".mlflow-probe-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        return f"MLflow artifact folder {folder} cannot be written ({err.strerror}: {err.filename})"
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
        return f"MLflow tracking server {uri} is unreachable or failing ({reason(err)}; checked for {timeout_s} s)"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _default_beside_store(uri: str) -> None:
    """MLflow makes its `Default` experiment when it creates a database, with artifacts under the
    working directory of that process: for a queued experiment, DVC's temporary copy, deleted with it.
    A sqlite store's `Default` keeps its artifacts beside the database, as every experiment here."""
    db = _sqlite_path(uri)
    if db is None or not db.exists():
        return
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0 AND artifact_location <> ?",
                    (artifact_location(uri, "Default"),) * 2)


# MLflow 3 records what an experiment is for in this experiment tag; its UI opens a model-training
# experiment on its runs (a GenAI one, or one it cannot tell, on a GenAI overview of traces).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def orphaned_artifacts(uri: str, experiment: str) -> list[Path]:
    """The run folders an experiment's artifact folder holds while the store has no such experiment:
    the store was deleted or replaced (its runs and the models' lineage are gone), said in a warning."""
    folder = artifact_location(uri, experiment)
    runs = sorted(p for p in Path(folder).iterdir() if p.is_dir()) if folder and Path(folder).is_dir() else []
    if runs:
        log.warning("MLflow store %s has no experiment %s, but its artifact folder %s holds the artifacts of %d "
                    "earlier run(s): the store was deleted or replaced, and those runs, their metrics and the models' "
                    "lineage are not in it; restore it from a backup (and stop this run) to keep them, else a new "
                    "experiment starts here", _sqlite_path(uri), experiment, folder, len(runs))
    return runs


def prepare_store(uri: str, experiment: str, client: Any = None) -> str:
    """Create the database and the experiment (artifacts at `artifact_location`, kind model training)
    once, under the store lock; an experiment of an older store, or one whose kind the UI guessed,
    gets its kind; returns the id."""
    import mlflow

    with store_lock(uri):
        client = client or mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        _default_beside_store(uri)
        if found is None:
            orphaned_artifacts(uri, experiment)
            return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if found.tags.get(EXPERIMENT_KIND_TAG, "_inferred").endswith("_inferred"):  # not one a person chose
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
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


def pid_exists(pid: int) -> bool:
    """Whether a process of this id exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that a run's tags record still runs; None when this host cannot tell."""
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return None
    pid = int(tags["pid"])
    if not pid_exists(pid):
        return False
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


# What `evaluate` and `gap_report` log into a training's run (metrics and tags by prefix, report folders).
CARRIED_METRICS = ("eval.", "train.", "gap.")
CARRIED_ARTIFACTS = ("evaluation", "gap_report")


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
        self.restored_from: str | None = None  # the finished run a new run of a restored training comes from
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
        training was found): an unfinished training continues the latest unfinished run of it, whatever
        its name (a killed `dvc exp run` has another name than the run that resumes it), renamed after
        this DVC experiment; a finished one (`finished`) whose outputs are restored continues this
        experiment's finished run of it. Otherwise a new run starts (the caller logs the restored
        history into it; `restored_from` is the finished run it was restored from, whose evaluation
        `carry_over_evaluation` copies). Runs left RUNNING by a dead process are marked KILLED first."""
        if not self.enabled:
            return None
        with store_lock(self.uri):  # a new client of an sqlite store creates and migrates the database
            self._client = client_for(self.params.tracking)
        exp_id = prepare_store(self.uri, self.params.tracking.experiment_name, self._client)
        close_dead_runs(self._client, exp_id)
        name = run_name()
        earlier = self._client.search_runs([exp_id], f"tags.fingerprint = '{fingerprint}'",
                                           order_by=["attributes.start_time DESC"],
                                           max_results=100) if resume and fingerprint else []
        done = [r for r in earlier if r.info.status == "FINISHED"]
        same = [r for r in done if r.info.run_name == name] if finished else \
            [r for r in earlier if r.info.status != "FINISHED"]
        install_signal_handlers()
        tags = {"git_commit": git_commit(), "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""), **process_tags()}
        if same:
            self.run_id, self.continued = same[0].info.run_id, True
            self._client.update_run(self.run_id, status="RUNNING", name=name)
            self.set_tags(tags)
            before = same[0].info.run_name
            log.info("MLflow: continuing run %s (%s%s)", self.run_id, name,
                     f", until now {before}" if before != name else "")
            return self.run_id
        if fingerprint:
            tags["fingerprint"] = fingerprint
        if finished and done:
            self.restored_from = tags["restored_from_run"] = done[0].info.run_id
        if self.params.validation.accept_broken_rules:  # error rules broken on purpose (validate_params)
            tags["validation.accepted_rules"] = ",".join(self.params.validation.accept_broken_rules)
        tags.update(self.tags)
        self.run_id = self._client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.log_params(self.params.flat())
        if self.inputs is not None:
            self.log_inputs(self.inputs())
        log.info("MLflow: run %s (%s) in %s", self.run_id, name, self.uri)
        return self.run_id

    def carry_over_evaluation(self) -> None:
        """Into the new run of a restored training: the evaluation and gap metrics, the gap status tag
        and the evaluation and gap reports of the run it was restored from, if that run's model is
        this one (`model_md5`). DVC does not rerun `evaluate` and `gap_report` for a model whose bytes
        did not change, so they would not log into this run; when they do run, they log over these."""
        if self._client is None or self.restored_from is None:
            return
        import tempfile

        from mlflow.artifacts import download_artifacts

        source = self._client.get_run(self.restored_from)
        md5 = source.data.tags.get("model_md5")
        if md5 is None or md5 != self._client.get_run(self.run_id).data.tags.get("model_md5"):
            return
        keys = [k for k in source.data.metrics if k.startswith(CARRIED_METRICS)]
        self._log_steps([(m.step, {k: m.value}) for k in keys for m in self._client.get_metric_history(
            source.info.run_id, k)[-1:]])
        self.set_tags({k: v for k, v in source.data.tags.items() if k.startswith(CARRIED_METRICS)})
        listed = {a.path for a in self._client.list_artifacts(source.info.run_id)}
        with tempfile.TemporaryDirectory() as tmp:
            for folder in CARRIED_ARTIFACTS:
                if folder in listed:
                    local = download_artifacts(run_id=source.info.run_id, artifact_path=folder, dst_path=tmp,
                                               tracking_uri=self.uri)
                    self._client.log_artifacts(self.run_id, local, folder)
        log.info("MLflow: evaluation and gap report of run %s carried over (%d metrics)", source.info.run_id,
                 len(keys))

    def attach(self, run_id: str | None) -> bool:
        """Log into an existing run; False when there is none."""
        if not self.enabled or run_id is None:
            return False
        import mlflow

        self._client = client_for(self.params.tracking)
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
        client = client_for(self.params.tracking)
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

    def log_history(self, history: list[dict[str, Any]], checks: Callable[[dict[str, Any]], list[Any]],
                    series: Callable[[dict[str, Any]], dict[str, float]]) -> None:
        """Per-epoch rows of a training done before this run (restored or resumed into a new run),
        with the derived values (`series`) and health tags (`checks`: each check's last problem) its
        epochs logged live."""
        steps, tags = [], {}
        for row in history:
            found = checks(row)
            steps.append((row["epoch"], {**{k: v for k, v in row.items() if k != "epoch"}, **series(row)}))
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
