"""MLflow, reached through this one thin module (stages use it; the model never does).

The default store is `sqlite:///<repo root>/mlflow.db`. The repository root comes from DVC_ROOT,
mapped back to the main repository when DVC runs the experiment in a temporary copy
(`dvc exp run --temp` / `--queue` work in `<repo>/.dvc/tmp/exps/...`), so every run lands in one
store; MLFLOW_TRACKING_URI, then `tracking.tracking_uri`, override it. Runs are named after the DVC
experiment (DVC_EXP_NAME) and tagged with the git commit, experiment name and baseline revision.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.params import Params, TrackingParams

log = logging.getLogger(__name__)
_EXP_TMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def repo_root() -> Path:
    root = os.environ.get("DVC_ROOT") or os.getcwd()
    if _EXP_TMP in root + os.sep:
        root = (root + os.sep).split(_EXP_TMP)[0]
    return Path(root).resolve()


def tracking_uri(p: TrackingParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or p.tracking_uri or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_store(uri: str, experiment: str) -> str:
    """Create the database and the experiment once, under a file lock, so that parallel queued runs
    do not race on either; returns the experiment id."""
    import mlflow
    from filelock import FileLock

    lock_dir = repo_root() if not uri.startswith("sqlite:///") else Path(uri[len("sqlite:///"):]).parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / ".mlflow.lock"), timeout=600):
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        return found.experiment_id if found else client.create_experiment(experiment)


class Tracker:
    """One MLflow run. `enabled=False` (ranks other than 0) makes every call a no-op."""

    def __init__(self, params: Params, enabled: bool = True):
        self.params, self.enabled = params, enabled
        self.run_id: str | None = None
        self._client = None

    def start(self, run_id: str | None = None, only_if_same_name: bool = False) -> str | None:
        """Start a run, or continue `run_id` when the store has it: always for a resumed training,
        and with `only_if_same_name` only when that run carries this run's name (a finished training
        restored inside another DVC experiment gets a run of its own)."""
        if not self.enabled:
            return None
        import mlflow

        uri = tracking_uri(self.params.tracking)
        exp_id = prepare_store(uri, self.params.tracking.experiment_name)
        self._client = mlflow.MlflowClient(uri)
        name = os.environ.get("DVC_EXP_NAME") or "workspace"
        if run_id is not None:
            try:
                found = self._client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                found = None
                log.warning("MLflow run %s not found in %s: starting a new run", run_id, uri)
            if found is not None and (not only_if_same_name or found.info.run_name == name):
                self.run_id = run_id
                self._client.update_run(run_id, status="RUNNING")
                log.info("MLflow: continuing run %s", run_id)
                return run_id
        tags = {"git_commit": _git_commit(), "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")}
        if self.params.validation.accept_broken_rules:  # error rules broken on purpose (validate_params)
            tags["validation.accepted_rules"] = ",".join(self.params.validation.accept_broken_rules)
        run = self._client.create_run(exp_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self.log_params(self.params.flat())
        log.info("MLflow: run %s (%s) in %s", self.run_id, name, uri)
        return self.run_id

    def attach(self, run_id: str | None) -> bool:
        """Log into an existing run (evaluation of a trained model); False when there is none."""
        if not self.enabled or run_id is None:
            return False
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri(self.params.tracking))
        try:
            self._client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s not found: not logging", run_id)
            return False
        self.run_id = run_id
        return True

    def log_params(self, flat: dict[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        if self._client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._client is not None:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
