"""Named DVC experiments: the stable configuration, the fixed one, one ablation per fix, the seed's
failure mode, and the scales they run at, each declared once here as overrides of params.yaml.

`params.yaml` is the stable configuration. The fixed configuration applies seed 004 section 8's fixes
(plus the faster EMA of the public fixed config); the baseline already evaluates with inverse
augmentation and voting over the 8 dihedral views. Each ablation applies one fix alone to stable.

    python -m pipeline.experiments run [--scale cpu] [--queue -j 2] [NAME|GROUP ...]   # default: stable fixed
    python -m pipeline.experiments compare stable fixed [NAME ...] | ablations [--out metrics/compare]
    python -m pipeline.experiments run --scale cpu stable fixed trm cache-views   # TRM and the view sources
    python -m pipeline.experiments overrides fixed [--scale cpu]    # the -S arguments, to use by hand
    python -m pipeline.experiments runs [NAME ...] [--run RUN_ID]   # MLflow runs and model versions (pipeline.lineage)

then `dvc metrics diff stable fixed`, `dvc params diff stable fixed`, `dvc plots diff stable fixed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.committed import committed_text, differences
from pipeline.compare import compare
from pipeline.params import flatten
from pipeline.stage import fail, setup_logging

log = logging.getLogger(__name__)

FIXED: dict[str, Any] = {
    "model.use_gumbel_softmax": False,  # train like eval: no Gumbel noise
    "model.task_conditioned_clues": True,  # clue queries projected from the task context
    "train.temperature_start": 0.5,  # no temperature decay
    "train.temperature_end": 0.5,
    "train.entropy_on_raw_logits": True,  # entropy of the raw softmax, not of the noise
    "train.lambda_kl_consistency": 0.1,
    "train.eval_every": 1,  # gap visible every epoch
    "train.ema_decay": 0.99,  # the EMA follows the weights closely (seed 004 section 6)
}
# One experiment per fix, applied alone to stable; together (less `validation.*`) they are FIXED.
ABLATIONS: dict[str, dict[str, Any]] = {
    # train like eval: no Gumbel noise; alone it keeps stable's decaying temperature, which the
    # rule fixed-constant-temperature forbids, so it breaks that rule on purpose
    "no-gumbel": {"model.use_gumbel_softmax": False,
                  "validation.accept_broken_rules": ["fixed-constant-temperature"]},
    "constant-temperature": {"train.temperature_start": 0.5, "train.temperature_end": 0.5},
    "raw-entropy": {"train.entropy_on_raw_logits": True},
    "kl-consistency": {"train.lambda_kl_consistency": 0.1},  # noisy attention kept close to the clean one
    "task-clues": {"model.task_conditioned_clues": True},
    "fast-ema": {"train.ema_decay": 0.99},
    "eval-every-epoch": {"train.eval_every": 1},
}
# The seed's failure mode (0.2% evaluation exact match): predictions compared in augmented space.
FAILURE_MODES: dict[str, dict[str, Any]] = {
    "no-inverse-aug": {"evaluate.use_inverse_aug": False,
                       "validation.accept_broken_rules": ["color-permutation-inverse-aug", "eval-views-inverse-aug"]},
}
# The second model family, TRM (section `trm` of params.yaml), evaluated as TRM evaluates: by voting
# over the cached versions (its puzzle embeddings exist for those only); and RLAN on those same views.
FAMILIES: dict[str, dict[str, Any]] = {
    "trm": {"model.family": "trm", "evaluate.views": "cache"},
    "cache-views": {"evaluate.views": "cache"},  # stable RLAN voting over the cached versions, not fresh views
}
EXPERIMENTS: dict[str, dict[str, Any]] = {"stable": {}, "fixed": FIXED, **ABLATIONS, **FAILURE_MODES, **FAMILIES}
GROUPS: dict[str, list[str]] = {"ablations": ["stable", *ABLATIONS]}
DEFAULT = ["stable", "fixed"]


@dataclass(frozen=True)
class Scale:
    overrides: dict[str, Any]
    about: str  # what it runs and how long it takes


SCALES: dict[str, Scale] = {
    "full": Scale({}, "params.yaml as committed: 400K samples, 200 epochs of the 12.2M-parameter model, on a "
                      "GPU: about 16 H100-hours at 40% of the bf16 peak, projected from its FLOPs"),
    "cpu": Scale({
        "model.hidden_dim": 32, "model.num_solver_steps": 3, "model.max_clues": 3, "model.spatial_downsample": 4,
        "model.dsc_num_heads": 2, "model.solver_context_heads": 2,
        "data.max_tasks": 20, "augment.samples_per_task": 100,
        "train.epochs": 10, "train.steps_per_epoch": 25, "train.batch_size": 16, "train.grad_accumulation_steps": 1,
        "train.heldout_tasks": 20, "train.device": "cpu", "train.save_every": 10,
        "evaluate.device": "cpu", "evaluate.batch_size": 128, "evaluate.max_versions": 8,
        "trm.hidden_size": 32, "trm.num_heads": 2, "trm.h_cycles": 2, "trm.l_cycles": 2, "trm.puzzle_emb_len": 4,
        "trm.halt_max_steps": 3, "trm.global_batch_size": 16, "trm.lr_warmup_steps": 10,
    }, "20+20 tasks, 100 versions each, a 32-wide model, 10 epochs (7 with meta-learning) of 25 steps of 16 samples; "
       "about 6 minutes for both in the queue on 2 cores"),
    "tiny": Scale({
        "model.hidden_dim": 16, "model.num_solver_steps": 2, "model.max_clues": 2, "model.spatial_downsample": 2,
        "model.dsc_num_heads": 2, "model.solver_context_heads": 2, "model.msre_encoding_dim": 8,
        "model.msre_num_freq": 2, "model.hyperlora_rank": 2,
        "data.max_tasks": 3, "augment.samples_per_task": 8,
        "train.epochs": 3, "train.steps_per_epoch": 2, "train.batch_size": 3, "train.grad_accumulation_steps": 2,
        "train.heldout_tasks": 2, "train.meta_learning_start_epoch": 1, "train.eval_every": 1, "train.save_every": 1,
        "train.device": "cpu", "train.equivariance_training.num_augmentations": 1,
        "evaluate.max_tasks": 2, "evaluate.batch_size": 64, "evaluate.device": "cpu",
        "trm.hidden_size": 16, "trm.num_heads": 2, "trm.num_layers": 1, "trm.h_cycles": 2, "trm.l_cycles": 1,
        "trm.puzzle_emb_len": 2, "trm.halt_max_steps": 2, "trm.global_batch_size": 6, "trm.lr_warmup_steps": 2,
    }, "3+3 tasks, a 16-wide model, 3 epochs of 2 steps: the tests' scale, seconds per experiment"),
}


class ExperimentError(RuntimeError):
    """A dvc command failed, or an experiment's params are not its baseline plus its overrides."""


def resolve(names: list[str]) -> list[str]:
    """Experiment names with groups expanded, each once, in order; unknown names are an error."""
    out: list[str] = []
    for name in names:
        for n in GROUPS.get(name, [name]):
            if n not in EXPERIMENTS:
                raise ExperimentError(f"unknown experiment {n!r}; declared: {', '.join(EXPERIMENTS)}; "
                                      f"groups: {', '.join(GROUPS)}")
            if n not in out:
                out.append(n)
    return out


def overrides(name: str, scale: str = "full") -> dict[str, Any]:
    """The keys an experiment sets on the committed params.yaml: the scale's, then its own."""
    return {**SCALES[scale].overrides, **EXPERIMENTS[name]}


def set_args(changes: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments, values written as YAML scalars or flow lists (what dvc parses)."""
    out = []
    for k, v in changes.items():
        v = list(v) if isinstance(v, tuple) else v
        out += ["-S", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


def _comparable(v: Any) -> Any:
    return str(list(v)) if isinstance(v, (list, tuple)) else v  # `dvc params diff` shows lists as str(list)


def expected_changes(changes: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change a value of `baseline` (flat keys): what `dvc params diff` must show."""
    return {k: v for k, v in changes.items() if _comparable(baseline.get(k)) != _comparable(v)}


def mismatches(expected: dict[str, Any], diff: dict[str, Any]) -> list[str]:
    """Problems of a `dvc params diff --json` entry (key -> {old, new}) against the expected changes."""
    got = {k: d.get("new") for k, d in diff.items()}
    out = [f"unexpected {k}={got[k]!r} (baseline {diff[k].get('old')!r})" for k in got if k not in expected]
    out += [f"missing {k}={v!r}" for k, v in expected.items() if k not in got]
    out += [f"{k}={got[k]!r}, expected {v!r}" for k, v in expected.items()
            if k in got and _comparable(got[k]) != _comparable(v)]
    return out


def child_env(cwd: Path, jobs: int = 1) -> dict[str, str]:
    """Environment for dvc and the stages: this interpreter's tools first on PATH, `jobs` parallel runs
    sharing the cores (torch's threads; unless OMP_NUM_THREADS is set), and a fallback git identity when
    git has none (DVC commits every experiment; a fresh machine may have no identity)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    for field, key in (("NAME", "user.name"), ("EMAIL", "user.email")):
        configured = subprocess.run(["git", "config", key], cwd=cwd, capture_output=True, text=True).stdout.strip()
        if not configured:
            value = "rlan-pipeline" if field == "NAME" else "rlan-pipeline@localhost"
            env.setdefault(f"GIT_AUTHOR_{field}", value)
            env.setdefault(f"GIT_COMMITTER_{field}", value)
    return env


def _dvc(args: list[str], cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(cwd), capture_output=capture, text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"`dvc {' '.join(args)}` failed"
                              + (f":\n{proc.stdout}{proc.stderr}" if capture else " (its output is above)"))
    return proc


def restore_params(cwd: Path, announce: bool = False) -> None:
    """Put HEAD's params.yaml back in the workspace. With `announce`, a file that differs is first
    reported key by key and copied to .dvc/tmp/ (what an earlier `dvc exp run -S` or an edit left)."""
    committed, path = committed_text(cwd / "params.yaml"), cwd / "params.yaml"
    if committed is None:
        raise ExperimentError("params.yaml is not committed: commit the baseline before running experiments")
    current = path.read_text() if path.exists() else ""
    if current == committed:
        return
    if announce and path.exists():
        backup = cwd / ".dvc" / "tmp" / f"params.yaml.{time.strftime('%Y%m%d-%H%M%S')}"
        backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, backup)
        log.warning("params.yaml differs from HEAD; every experiment runs from HEAD's params.yaml plus its own "
                    "overrides, so it is restored (your file is kept in %s):\n%s", backup.relative_to(cwd),
                    "\n".join(f"  {line}" for line in differences(committed, current)))
    path.write_text(committed)


def run(names: list[str], cwd: Path, scale: str = "full", queue: bool = False, jobs: int = 1) -> None:
    """Run the named experiments from the committed baseline (HEAD's params.yaml) plus the scale's and
    each one's own overrides, replacing earlier experiments of those names, then check that each one's
    params are exactly that. Every stage of each runs (`--force`: the data stages take seconds), so each
    has its own MLflow run; a training identical to one already finished is restored from its checkpoint.
    In the workspace they run one after the other, `stable` last; with `queue`, in temporary copies,
    `jobs` at a time. The workspace ends on HEAD's params.yaml, also when a run fails."""
    names = resolve(names)
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    restore_params(cwd, announce=True)
    try:
        stale = sorted(set(names) & set(experiment_revs(cwd)))
        if stale:
            _dvc(["exp", "remove", *stale], cwd)
        for name in sorted(names, key=lambda n: n == "stable"):
            restore_params(cwd)
            log.info("%s experiment %s at the %s scale: %s", "queueing" if queue else "running", name, scale,
                     " ".join(set_args(EXPERIMENTS[name])) or "the baseline")
            _dvc(["exp", "run", "--force", *(["--queue"] if queue else []), "-n", name,
                  *set_args(overrides(name, scale))], cwd, capture=queue)
        if queue:
            start_queue(cwd, jobs)
            wait_for_queue(cwd)
    finally:
        restore_params(cwd)
    check_params(names, scale, baseline, cwd)
    log.info("experiments %s ran from %s at scale %s, each with exactly its overrides; compare them with "
             "`python -m pipeline.experiments compare %s`", ", ".join(names), baseline[:7], scale, " ".join(names))


def start_queue(cwd: Path, jobs: int) -> None:
    """`dvc queue start`: its workers inherit the environment (and the cores' share) and are daemons
    that keep inherited pipes open, so its output goes to a file, not to a pipe this process reads."""
    out = cwd / ".dvc" / "tmp" / "queue-start.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=cwd,
                              env=child_env(cwd, jobs), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ExperimentError(f"`dvc queue start -j {jobs}` failed:\n{out.read_text()}")


def wait_for_queue(cwd: Path, poll: float = 5.0, timeout: float = 7 * 24 * 3600) -> None:
    """Until no queued experiment is queued or running; logs the queue's table whenever it changes."""
    deadline, shown, t0 = time.time() + timeout, "", time.time()
    while time.time() < deadline:
        status = _dvc(["queue", "status"], cwd).stdout
        table = "\n".join(line for line in status.splitlines() if line.strip() and not line.startswith("Worker"))
        if table != shown:
            log.info("queue after %.0f s:\n%s", time.time() - t0, table)
            shown = table
        if not any(word in status for word in ("Queued", "Running")):
            return
        time.sleep(poll)
    raise TimeoutError("the experiment queue did not finish")


def check_params(names: list[str], scale: str, baseline: str, cwd: Path) -> None:
    """Fail, naming the experiment and the keys, unless `dvc params diff baseline <exp>` shows exactly
    the overrides of the scale and the experiment that change a value of the baseline."""
    revs = experiment_revs(cwd)
    missing = [n for n in names if n not in revs]
    if missing:
        status = _dvc(["queue", "status"], cwd).stdout
        raise ExperimentError(f"experiment(s) {', '.join(missing)} did not finish (see `dvc queue logs NAME`):\n"
                              f"{status}")
    base = flatten(yaml.safe_load(committed_text(cwd / "params.yaml", baseline) or "{}"))
    problems = []
    for name in names:
        diff = json.loads(_dvc(["params", "diff", baseline, revs[name], "--json"], cwd).stdout or "{}")
        found = mismatches(expected_changes(overrides(name, scale), base), diff.get("params.yaml", {}))
        problems += [f"  {name}: {p}" for p in found]
    if problems:
        raise ExperimentError("experiment params are not the baseline plus their overrides:\n" + "\n".join(problems))


def experiment_revs(cwd: Path) -> dict[str, str]:
    """Name -> commit of every experiment of the current baseline."""
    shown = json.loads(_dvc(["exp", "show", "--json"], cwd).stdout)
    return {exp["name"]: exp["revs"][0]["rev"] for entry in shown for exp in entry.get("experiments") or []
            if exp.get("name") and exp.get("revs")}


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run named experiments (or groups) with dvc exp run")
    r.add_argument("names", nargs="*", default=DEFAULT, help=f"experiments or groups ({', '.join(GROUPS)})")
    r.add_argument("--scale", choices=sorted(SCALES), default="full", help="overrides applied to every experiment")
    r.add_argument("--queue", action="store_true", help="queue them and run with dvc queue start")
    r.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers")
    c = sub.add_parser("compare", help="gap reports of experiments side by side")
    c.add_argument("names", nargs="+", help="two or more experiments, or a group")
    c.add_argument("--out", default="metrics/compare")
    sub.add_parser("runs", help="each experiment's MLflow runs and registered model version (python -m pipeline.lineage)",
                   add_help=False)
    o = sub.add_parser("overrides", help="print the -S arguments of an experiment")
    o.add_argument("name", choices=sorted(EXPERIMENTS))
    o.add_argument("--scale", choices=sorted(SCALES), default="full")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["runs"]:  # the lineage command, with its own arguments (names, --run RUN_ID)
        from pipeline import lineage

        lineage.main(argv[1:])
        return
    args = ap.parse_args(argv)
    cwd = Path(os.getcwd())
    try:
        if args.cmd == "run":
            run(args.names, cwd, args.scale, args.queue, args.jobs)
        elif args.cmd == "compare":
            names = resolve(args.names)
            revs = experiment_revs(cwd)
            absent = [n for n in names if n not in revs]
            if absent:
                raise ExperimentError(f"no experiment named {', '.join(absent)}; run `python -m pipeline.experiments "
                                      f"run {' '.join(absent)}`")
            print(compare({n: revs[n] for n in names}, cwd, Path(args.out)))
        else:
            print(" ".join(set_args(overrides(args.name, args.scale))))
    except ExperimentError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
