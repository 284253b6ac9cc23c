"""Named DVC experiments: the stable configuration, the fixed one, one ablation per fix, the gap analysis's
failure mode, and the scales they run at, each declared once here as overrides of params.yaml; and
the runner that runs them, or any override of the user's, at a scale, with seed repeats.

`params.yaml` is the stable configuration. The fixed configuration applies the gap analysis's fixes (docs/sources.md)
(plus the faster EMA of the public fixed config); the baseline already evaluates with inverse
augmentation and voting over the 8 dihedral views. Each ablation applies one fix alone to stable.

Every experiment's name carries its scale and, for a seed other than the committed one, its seed:
`stable_cpu`, `fixed_cpu_s43` (`_` is the one separator that both DVC experiment names and MLflow
aliases allow). The repeats of one configuration at one scale form a group (`stable_cpu`), which the
compare report and `diff` show as mean and spread over the seeds.

    python -m pipeline.experiments run [--scale cpu] [--seeds N] [--queue -j 2] [NAME|GROUP ...]   # default: stable fixed
    python -m pipeline.experiments run --scale cpu -S key=value [-S key=a,b,c] [-n NAME]   # yours against stable
    python -m pipeline.experiments run --scale cpu stable fixed trm cache-views   # TRM and the view sources
    python -m pipeline.experiments compare stable fixed [--scale cpu] | ablations   # metrics/compare/<names>/
    python -m pipeline.experiments diff stable fixed [--scale cpu]   # every metric: mean ± sd, real or within noise
    python -m pipeline.experiments overrides fixed [--scale cpu] [--seed K]   # the -S arguments, for dvc exp run
    python -m pipeline.experiments runs [NAME ...] [--run RUN_ID]   # MLflow runs and model versions (pipeline.tracking.lineage)

then `dvc metrics diff stable_cpu fixed_cpu`, `dvc params diff stable_cpu fixed_cpu`, `dvc plots diff ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.experiments import prevalidate, reuse, runlock, supervise
from pipeline.experiments.committed import (
    committed_text,
    differences,
    set_args,
    yaml_value,
)
from pipeline.experiments.compare import CompareError, Group, compare, metrics_table
from pipeline.experiments.dvc_cli import MODULE as DVC_CLI
from pipeline.params import (
    MAX_PARAMS_BYTES,
    SEED_KEYS,
    ParamsError,
    did_you_mean,
    flatten,
    parse_params,
    parse_yaml,
    schema_keys,
    shorten,
)
from pipeline.stage import (
    EXPERIMENT_ENV,
    INTERRUPTED,
    TERMINATED,
    Stopped,
    fail,
    run_foreground,
    setup_logging,
    sigterm_stops,
)

log = logging.getLogger(__name__)

FIXED: dict[str, Any] = {
    "model.use_gumbel_softmax": False,  # train like eval: no Gumbel noise
    "model.task_conditioned_clues": True,  # clue queries projected from the task context
    "train.temperature_start": 0.5,  # no temperature decay
    "train.temperature_end": 0.5,
    "train.entropy_on_raw_logits": True,  # entropy of the raw softmax, not of the noise
    "train.lambda_kl_consistency": 0.1,
    "train.eval_every": 1,  # gap visible every epoch
    "train.ema_decay": 0.99,  # the EMA follows the weights closely (docs/sources.md#ema-lag)
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
    "full": Scale({}, "params.yaml as committed: 400K samples, 200 epochs of the 18.1M-parameter model (every "
                      "context pair held out for leave-one-out), on a GPU: about 49 H100-hours at 40% of the bf16 "
                      "peak, projected from its FLOPs"),
    "cpu": Scale({
        "model.hidden_dim": 32, "model.num_solver_steps": 3, "model.max_clues": 3, "model.spatial_downsample": 4,
        "model.dsc_num_heads": 2, "model.solver_context_heads": 2,
        "data.max_tasks": 20, "data.task_order": "size", "augment.samples_per_task": 100,
        "train.epochs": 16, "train.steps_per_epoch": 25, "train.batch_size": 16, "train.grad_accumulation_steps": 1,
        "train.heldout_tasks": 20, "train.device": "cpu", "train.save_every": 1, "train.cpu_threads": 1,
        # a CPU's shortcut (rule loo-every-pair warns): one held-out pair per sample and one turned
        # context for equivariance, a cheaper meta-learning step than every pair and four
        "train.loo_training.max_holdouts": 1, "train.equivariance_training.num_augmentations": 1,
        "evaluate.device": "cpu", "evaluate.batch_size": 128, "evaluate.max_versions": 8,
        "trm.hidden_size": 32, "trm.num_heads": 2, "trm.h_cycles": 2, "trm.l_cycles": 2, "trm.puzzle_emb_len": 4,
        "trm.halt_max_steps": 3, "trm.global_batch_size": 16, "trm.lr_warmup_steps": 10,
    }, "the 20+20 tasks of the smallest grids, 100 versions each, a 32-wide model, 16 epochs (13 with "
       "meta-learning) of 25 steps of 16 samples; about 14 minutes for both in the queue on 2 cores (measured: "
       "13 and 15 min per pair of the three-seed study)"),
    "tiny": Scale({
        "model.hidden_dim": 16, "model.num_solver_steps": 2, "model.max_clues": 2, "model.spatial_downsample": 2,
        "model.dsc_num_heads": 2, "model.solver_context_heads": 2, "model.msre_encoding_dim": 8,
        "model.msre_num_freq": 2, "model.hyperlora_rank": 2,
        "data.max_tasks": 3, "augment.samples_per_task": 8,
        "train.epochs": 3, "train.steps_per_epoch": 2, "train.batch_size": 3, "train.grad_accumulation_steps": 2,
        "train.heldout_tasks": 2, "train.meta_learning_start_epoch": 1, "train.eval_every": 1, "train.save_every": 1,
        "train.device": "cpu", "train.cpu_threads": 1, "train.equivariance_training.num_augmentations": 1,
        "evaluate.max_tasks": 2, "evaluate.batch_size": 64, "evaluate.device": "cpu",
        "trm.hidden_size": 16, "trm.num_heads": 2, "trm.num_layers": 1, "trm.h_cycles": 2, "trm.l_cycles": 1,
        "trm.puzzle_emb_len": 2, "trm.halt_max_steps": 2, "trm.global_batch_size": 6, "trm.lr_warmup_steps": 2,
    }, "3+3 tasks, a 16-wide model, 3 epochs of 2 steps: the tests' scale, seconds per experiment"),
}


SEP = "_"  # between an experiment's name, its scale and its seed
NAME_RE = re.compile(rf"^(?P<base>.+){SEP}(?P<scale>{'|'.join(SCALES)})(?:{SEP}s(?P<seed>\d+))?$")
_REF_SAFE = re.compile(r"^\w[\w.=+-]*$")  # a valid git ref component, DVC experiment name and shell word


class ExperimentError(RuntimeError):
    """A dvc command failed, an experiment is unknown, or its params are not its baseline plus its overrides."""


def name_of(base: str, scale: str, seed: int | None = None) -> str:
    """The DVC experiment name: `stable_cpu`, `fixed_cpu_s43` (seed None: the committed seeds)."""
    return f"{base}{SEP}{scale}" + (f"{SEP}s{seed}" if seed is not None else "")


def resolve(names: list[str]) -> list[str]:
    """Experiment names with groups expanded, each once, in order; unknown names are an error."""
    out: list[str] = []
    for name in names:
        for n in GROUPS.get(name, [name]):
            if n not in EXPERIMENTS:
                raise ExperimentError(f"unknown experiment {n!r}{did_you_mean(n, [*EXPERIMENTS, *GROUPS])}; "
                                      f"declared: {', '.join(EXPERIMENTS)}; groups: {', '.join(GROUPS)}")
            if n not in out:
                out.append(n)
    return out


def seed_changes(seed: int | None) -> dict[str, int]:
    """The overrides of a run's seed: every seed key set to it (None: the committed seeds)."""
    return {} if seed is None else {k: seed for k in SEED_KEYS}


def overrides(name: str, scale: str = "full", seed: int | None = None) -> dict[str, Any]:
    """The keys an experiment sets on the committed params.yaml: the scale's, its own, then the seed's."""
    return {**SCALES[scale].overrides, **EXPERIMENTS[name], **seed_changes(seed)}


def seeds_of(count: int, seed: int | None, base: dict[str, Any]) -> list[int | None]:
    """The seed of each repeat: `seed` alone, or `count` of them from the committed train.seed on; None
    stands for the committed seeds (no override, no suffix in the name)."""
    committed = {base[k] for k in SEED_KEYS}
    first = base["train.seed"] if seed is None else seed
    wanted = [first + i for i in range(count)] if seed is None else [seed]
    return [None if committed == {s} else s for s in wanted]


def _comparable(v: Any) -> Any:
    return str(list(v)) if isinstance(v, (list, tuple)) else v  # `dvc params diff` shows lists as str(list)


def _parse_value(text: str) -> Any:
    """A -S value as DVC reads it (YAML, where `1e-5` is a number too), read by the params files' loader."""
    value = parse_yaml(text, "-S value")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_sets(sets: list[str], base: dict[str, Any]) -> list[dict[str, Any]]:
    """`-S key=value` arguments as the overrides of each experiment they make: comma-separated values
    are a sweep, one experiment per value (per combination when several keys are swept)."""
    swept: dict[str, list[Any]] = {}
    for arg in sets:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise ExperimentError(f"-S {arg!r}: expected key=value (comma-separated values for a sweep)")
        if key not in base:
            raise ExperimentError(f"-S {arg}: {key} is not a key of params.yaml{did_you_mean(key, list(base))}")
        pieces = [text] if text.lstrip().startswith("[") else text.split(",")
        try:
            swept[key] = [_parse_value(p) for p in pieces]
        except ParamsError as err:
            raise ExperimentError(f"-S {shorten(arg)}: {err.problems[0]}") from None
    return [dict(zip(swept, combo)) for combo in itertools.product(*swept.values())] if swept else []


_KEYS = schema_keys()


def _key_word(key: str) -> str:
    """A key in a name: its last part where no other key of params.yaml ends so (`hyperlora_init_scale`),
    else the whole dotted key (`train.learning_rate`, as `trm.learning_rate` exists too)."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in _KEYS) <= 1 else key


def _value_word(value: Any) -> str:
    """A value in a name: as written (`-3`, `0.05`) when that is a valid name; else its characters
    that are, and a digest of the value, so that two values never give one word (`a/b`, `a b`)."""
    text = yaml_value(value)
    safe = re.sub(r"[^\w.-]+|\.{2,}", "-", text).rstrip(".")
    if safe == text and text:
        return text
    return f"{safe.strip('-.') or 'value'}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def label_of(changes: dict[str, Any]) -> str:
    """A name for the user's own experiment from its overrides, one to one: `hyperlora_init_scale=0.05`,
    `epochs=-3`, `train.learning_rate=0.001`, `source=a-b-<digest>` (`_key_word`, `_value_word`)."""
    return "+".join(f"{_key_word(k)}={_value_word(v)}" for k, v in changes.items())


def is_baseline(variant: dict[str, Any], scale: str, base: dict[str, Any]) -> bool:
    """Whether the user's overrides change nothing at the scale; says which of them are the committed
    value or the scale's already."""
    same = []
    for k, v in variant.items():
        if _comparable(SCALES[scale].overrides.get(k, base[k])) == _comparable(v):
            where = f"the {scale} scale's value" if k in SCALES[scale].overrides else "the committed value (HEAD)"
            log.warning("-S %s=%s is %s already: it changes nothing", k, yaml_value(v), where)
            same.append(k)
    if len(same) == len(variant):
        log.warning("%s is the baseline at the %s scale, %s: not an experiment of its own", label_of(variant),
                    scale, name_of("stable", scale))
        return True
    return False


@dataclass(frozen=True)
class Planned:
    """One experiment to run."""
    name: str  # its DVC experiment name
    label: str  # its group: the configuration at the scale, over the seeds
    changes: dict[str, Any]  # on HEAD's params.yaml: the scale's, the experiment's (or the user's), the seed's


def plan(names: list[str], scale: str, seeds: list[int | None], variants: list[dict[str, Any]],
         own_name: str | None = None) -> list[Planned]:
    """Every named experiment and every variant of the user's (stable plus its overrides), each at
    every seed."""
    configs = [(n, EXPERIMENTS[n]) for n in names]
    for v in variants:
        base = own_name if own_name and len(variants) == 1 else (f"{own_name}-{label_of(v)}" if own_name
                                                                else label_of(v))
        if base in EXPERIMENTS or not _REF_SAFE.match(base):
            raise ExperimentError(f"experiment name {base!r}: " + ("a named experiment's name" if base in EXPERIMENTS
                                  else "use letters, digits and _ . = + - (starting with a letter or digit)"))
        configs.append((base, v))
    planned = [Planned(name_of(base, scale, seed), name_of(base, scale), {**SCALES[scale].overrides, **own,
                                                                          **seed_changes(seed)})
               for base, own in configs for seed in seeds]
    clashes = sorted(n for n, count in Counter(p.name for p in planned).items() if count > 1)
    if clashes:
        raise ExperimentError(f"refused: two planned experiments would both be named {', '.join(clashes)} "
                              "(the same overrides twice?); each experiment needs a name of its own")
    return planned


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


def _dvc(args: list[str], cwd: Path, capture: bool = True, experiment: str | None = None) -> subprocess.CompletedProcess:
    """`dvc ARGS`; with `experiment`, its stages' log lines carry the experiment's name first
    (pipeline.stage.EXPERIMENT_ENV): what a run outside the queue shows as it comes."""
    cmd = [sys.executable, "-m", DVC_CLI, *args]
    env = {**child_env(cwd), **({EXPERIMENT_ENV: experiment} if experiment else {})}
    proc = run_foreground(cmd, cwd=cwd, env=env, capture_output=capture, text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"`dvc {' '.join(args)}` failed"
                              + (f":\n{proc.stdout}{proc.stderr}" if capture else " (its output is above)"))
    return proc


def baseline_params(cwd: Path, rev: str = "HEAD") -> dict[str, Any]:
    """The committed params.yaml, flat."""
    text = committed_text(cwd / "params.yaml", rev)
    if text is None:
        raise ExperimentError("params.yaml is not committed: commit the baseline before running experiments")
    return flatten(parse_yaml(text))


def restore_params(cwd: Path, announce: bool = False,
                   why: str = "every experiment runs from HEAD's params.yaml plus its own overrides") -> None:
    """Put HEAD's params.yaml back in the workspace. With `announce`, a file that differs is first
    reported key by key and copied to .dvc/tmp/ (what an earlier `dvc exp run -S` or an edit left)."""
    committed, path = committed_text(cwd / "params.yaml"), cwd / "params.yaml"
    if committed is None:
        raise ExperimentError("params.yaml is not committed: commit the baseline before running experiments")
    size = path.stat().st_size if path.exists() else 0
    current = path.read_bytes().decode(errors="replace") if path.exists() and size <= MAX_PARAMS_BYTES else ""
    if size <= MAX_PARAMS_BYTES and current == committed:
        return
    if announce and path.exists():
        backup = cwd / ".dvc" / "tmp" / f"params.yaml.{time.strftime('%Y%m%d-%H%M%S')}"
        backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, backup)
        lines = (differences(committed, current) if size <= MAX_PARAMS_BYTES else
                 [f"(the file has {size:,} bytes, more than the {MAX_PARAMS_BYTES:,} a params file may have: not read)"])
        log.warning("params.yaml differs from HEAD; %s, so HEAD's is restored (yours is kept in %s):\n%s", why,
                    backup.relative_to(cwd), "\n".join(f"  {line}" for line in lines))
    path.write_text(committed)


def run(names: list[str], cwd: Path, scale: str = "full", queue: bool = False, jobs: int = 1, seeds: int = 1,
        seed: int | None = None, sets: list[str] | None = None, own_name: str | None = None) -> list[str]:
    """Run the named experiments, and the user's own (`sets`: `key=value`, comma-separated values a
    sweep), from the committed baseline (HEAD's params.yaml) plus the scale's, each one's own and the
    seed's overrides, each at `seeds` seeds (or at `seed`), replacing earlier experiments of those
    names (but the stable ones of the user's own are kept when identical: `reused`); then check that
    each one's params are exactly that. Every stage of each runs (`--force`: the data stages take
    seconds), so each has its own MLflow run. They run outside the workspace, in
    DVC's temporary copies: one after the other (`--temp`), or with `queue` (always for a sweep) in the
    DVC queue, `jobs` at a time. The workspace keeps its dvc.lock and outputs and ends on HEAD's
    params.yaml, also when a run fails. Before anything runs, every experiment's params are checked
    (pipeline.experiments.prevalidate), and what an earlier, killed run left in the queue under these
    names is stopped or removed (pipeline.experiments.supervise). Returns the groups (configuration at
    the scale) that ran."""
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                         check=True).stdout.strip()
    restore_params(cwd, announce=True)
    base = baseline_params(cwd)
    variants = parse_sets(sets or [], base)
    if (seeds > 1 or seed is not None) and any(k in SEED_KEYS for v in variants for k in v):
        raise ExperimentError(f"--seeds and --seed set {', '.join(SEED_KEYS)}: leave them out of -S")
    asked = list(names)
    if variants and "stable" not in names:  # the user's own experiments are compared with stable
        names = ["stable", *names]
    queue = queue or len(variants) > 1  # a sweep is queued
    variants = [v for v in variants if not is_baseline(v, scale, base)]
    if sets and not variants and not asked:
        log.warning("nothing to run: every -S is the baseline's value (`python -m pipeline.experiments run --scale "
                    "%s stable` runs the baseline, %s)", scale, name_of("stable", scale))
        return []
    planned = plan(resolve(names), scale, seeds_of(seeds, seed, base), variants, own_name)
    prevalidate.check({p.name: p.changes for p in planned},
                      parse_params(parse_yaml(committed_text(cwd / "params.yaml") or "{}")))
    kept = reused(planned, base, cwd) if variants else set()
    try:
        supervise.orphans(cwd, [p.name for p in planned], _dvc(["queue", "status"], cwd).stdout,
                          lambda args: _dvc(args, cwd).stdout)  # an earlier, killed run's: never queued twice
        stale = sorted({p.name for p in planned if p.name not in kept} & set(experiment_revs(cwd)))
        if stale:
            log.info("replacing the earlier experiments %s", ", ".join(stale))
            _dvc(["exp", "remove", *stale], cwd)
        for p in (p for p in planned if p.name not in kept):
            restore_params(cwd)
            scale_values = SCALES[scale].overrides
            own = {k: v for k, v in p.changes.items() if k not in scale_values or scale_values[k] != v}
            log.info("%s experiment %s: the %s scale and %s", "queueing" if queue else "running", p.name, scale,
                     " ".join(set_args(own)) or "the baseline")
            _dvc(["exp", "run", "--force", "--queue" if queue else "--temp", "-n", p.name, *set_args(p.changes)],
                 cwd, capture=queue, experiment=None if queue else p.name)
        if queue and len(kept) < len(planned):
            start_queue(cwd, jobs)
            try:
                wait_for_queue(cwd, jobs)
            except KeyboardInterrupt:
                stop_queue(cwd, [p.name for p in planned])
                raise
    finally:
        restore_params(cwd)
    check_params(planned, rev, cwd)
    labels = list(dict.fromkeys(p.label for p in planned))
    log.info("experiments %s ran from %s at the %s scale, each with exactly its overrides; compare them with "
             "`python -m pipeline.experiments compare %s`", ", ".join(p.name for p in planned), rev[:7], scale,
             " ".join(labels))
    explain_workspace(cwd)
    return labels


def reused(planned: list[Planned], base: dict[str, Any], cwd: Path) -> set[str]:
    """The stable experiments (what the user's own are compared with) already finished from HEAD with
    the same code and exactly their params (scale, seed and overrides): kept, not trained again."""
    revs = experiment_revs(cwd)
    kept = set()
    for p in planned:
        m = NAME_RE.match(p.name)
        if m is None or m["base"] != "stable" or p.name not in revs:
            continue
        why = reuse.why_not_reused(revs[p.name], {**base, **p.changes}, cwd)
        if why is None:
            log.info("%s: reusing the finished experiment of HEAD (same code, scale, seed and params), not "
                     "training it again (`dvc exp remove %s` before the run trains it anew)", p.name, p.name)
            kept.add(p.name)
        else:
            log.info("%s: training it again, the earlier one is not this run's: %s", p.name, why)
    return kept


def explain_workspace(cwd: Path) -> None:
    """Say what `dvc status` shows now: the experiments ran in temporary copies, so any difference
    between the workspace and its dvc.lock is the workspace's own."""
    status = json.loads(_dvc(["status", "--json"], cwd).stdout or "{}")
    if not status:
        log.info("the workspace is as before: params.yaml is HEAD's and `dvc status` is clean")
        return
    log.info("the workspace is as before (the experiments ran in temporary copies; params.yaml is HEAD's): "
             "`dvc status` lists %d stage(s), %s, whose dvc.lock entries the workspace's files do not match, as "
             "before this run; `dvc exp apply NAME` puts one experiment's params, dvc.lock and outputs in the "
             "workspace", len(status), ", ".join(status))


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


def stop_queue(cwd: Path, names: list[str]) -> None:
    """Ctrl-C while the queue runs (its workers are daemons, out of the terminal's reach): interrupt
    the running experiments as Ctrl-C would (each training stops and its next run resumes from its
    checkpoint) and drop the ones not started."""
    _dvc(["queue", "remove", "--queued"], cwd)
    for name in names:
        try:
            _dvc(["queue", "kill", name], cwd)
        except ExperimentError:  # finished, failed or never started: nothing to stop
            continue
        log.warning("interrupted the queued experiment %s", name)


# stage starts, the training's first line (fresh, resuming or restored), its pre-flight and epochs, every
# warning (the health checks as they fire: training's per epoch, the gap report's) and every error
_PROGRESS = re.compile(r"(Running stage '[^']+'|INFO pipeline\.train\.loop: (?:epoch \d+/\d+: .*|pre-flight: .*|"
                       r"resuming this training .*|training from scratch.*|this training has finished.*)|"
                       r"(?:WARNING|ERROR) [\w.]+: .*|ERROR .*)")
_LOGGER = re.compile(r"^(?:INFO|(WARNING)) [\w.]+: ")  # the logger's name is left out (errors keep it)


def progress(cwd: Path, status: str, read: dict[Path, int]) -> list[str]:
    """New progress lines of the queued experiments (stage starts, the pre-flight projection, each
    epoch, errors), from the logs DVC keeps of each task; `read` holds how far each log was read."""
    out = []
    for row in status.splitlines()[1:]:
        parts = row.split()
        if len(parts) < 3 or parts[-1] in ("Queued", "Status"):
            continue
        for log_file in (cwd / ".dvc" / "tmp" / "exps" / "run").glob(f"{parts[0]}*/*.out"):
            with log_file.open("rb") as f:
                f.seek(read.get(log_file, 0))
                text = f.read().decode(errors="replace")
            end = text.rfind("\n") + 1  # whole lines only
            read[log_file] = read.get(log_file, 0) + len(text[:end].encode())
            for segment in re.split(r"[\r\n]", text[:end]):
                if (m := _PROGRESS.search(segment)) is not None:
                    out.append(f"{parts[1]}: {_LOGGER.sub(lambda g: f'{g[1]} ' if g[1] else '', m.group(1))}")
    return out


def stalled(status: str) -> bool:
    """Whether `dvc queue status` shows queued experiments and no worker to run them: DVC's workers can
    stop early when several read the queue at once (a JSON decoding error in their log)."""
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", status)
    rows = [line.split()[-1] for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
    return workers is not None and workers.groups() == ("0", "0") and "Queued" in rows and "Running" not in rows


HEARTBEAT_S = 60.0  # the longest the queue's wait stays silent


def wait_for_queue(cwd: Path, jobs: int = 1, poll: float = 5.0, timeout: float = 7 * 24 * 3600) -> None:
    """Until no queued experiment is queued or running; logs the queue's table whenever it changes and
    each experiment's stages and epochs as they come, and a line at least every HEARTBEAT_S; starts
    the workers again when they stopped with experiments still queued; marks a running task whose
    worker is dead failed (pipeline.experiments.supervise) instead of waiting for it."""
    deadline, shown, t0, read, idle = time.time() + timeout, "", time.time(), {}, 0
    watch, said = supervise.Watch(cwd), time.time()
    log.info("the queue runs; its experiments' stages and epochs follow (`dvc queue logs -f NAME` shows one's "
             "whole log)")
    while time.time() < deadline:
        status = _dvc(["queue", "status"], cwd).stdout
        for line in progress(cwd, status, read):
            log.info("%s", line)
            said = time.time()
        table = "\n".join(line for line in status.splitlines() if line.strip() and not line.startswith("Worker"))
        if table != shown:
            log.info("queue after %.0f s:\n%s", time.time() - t0, table)
            shown, said = table, time.time()
        if not any(word in status for word in ("Queued", "Running")):
            return
        for task in watch.dead(status):
            supervise.bury(cwd, task, lambda args: _dvc(args, cwd).stdout)
        if time.time() - said >= HEARTBEAT_S:
            log.info("%s", heartbeat(status, time.time() - t0, time.time() - said))
            said = time.time()
        idle = idle + 1 if stalled(status) else 0
        if idle == 3:  # three polls in a row: not a worker between two tasks
            log.warning("the queue's workers stopped with experiments still queued (see "
                        ".dvc/tmp/exps/celery/*.out); starting them again")
            start_queue(cwd, jobs)
            idle = 0
        time.sleep(poll)
    raise TimeoutError("the experiment queue did not finish")


def heartbeat(status: str, waited: float, silent: float) -> str:
    """The line that says the queue's wait goes on: what runs and is queued, how long nothing came."""
    rows = supervise.tasks(status)
    running = [t.name for t in rows if t.status == "Running"]
    queued = [t.name for t in rows if t.status == "Queued"]
    return (f"still waiting for the queue after {waited:.0f} s (nothing new for {silent:.0f} s): running "
            f"{', '.join(running) or 'none'}; queued {', '.join(queued) or 'none'}; "
            f"{supervise.active_workers(status)} active worker(s)")


def check_params(planned: list[Planned], rev: str, cwd: Path) -> None:
    """Fail, naming the experiment and the keys, unless `dvc params diff rev <exp>` shows exactly the
    overrides of each experiment that change a value of the baseline."""
    revs = experiment_revs(cwd, rev)  # the commit they were queued from, even if HEAD moved since
    missing = [p.name for p in planned if p.name not in revs]
    if missing:
        status = _dvc(["queue", "status"], cwd).stdout
        raise ExperimentError(f"experiment(s) {', '.join(missing)} did not finish (see `dvc queue logs NAME`):\n"
                              f"{status}")
    base = baseline_params(cwd, rev)
    problems = []
    for p in planned:
        diff = json.loads(_dvc(["params", "diff", rev, revs[p.name], "--json"], cwd).stdout or "{}")
        problems += [f"  {p.name}: {m}" for m in mismatches(expected_changes(p.changes, base),
                                                            diff.get("params.yaml", {}))]
    if problems:
        raise ExperimentError("experiment params are not the baseline plus their overrides:\n" + "\n".join(problems))


def finished(shown: list[dict[str, Any]]) -> dict[str, str]:
    """Name -> commit of every finished experiment in `dvc exp show --json`'s output: not one that is
    queued, running or failed in the queue (its rev is the queue's entry, without outputs)."""
    return {exp["name"]: exp["revs"][0]["rev"] for entry in shown for exp in entry.get("experiments") or []
            if exp.get("name") and exp.get("revs") and (exp.get("executor") or {}).get("state", "success") == "success"}


def experiment_revs(cwd: Path, baseline: str | None = None) -> dict[str, str]:
    """Name -> commit of every finished experiment of `baseline` (default HEAD)."""
    return finished(json.loads(_dvc(["exp", "show", "--json", *(["--rev", baseline] if baseline else [])],
                                    cwd).stdout))


def earlier_baselines(cwd: Path) -> list[str]:
    """The commits before HEAD on its first-parent line that hold experiments (DVC keeps a finished
    experiment as refs/exps/<baseline, split 2/38>/<name>), newest first."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=cwd, capture_output=True,
                          text=True).stdout.split()
    held = {m[1] + m[2] for r in refs if (m := re.fullmatch(r"refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/[^/]+", r))}
    line = subprocess.run(["git", "rev-list", "--first-parent", "HEAD"], cwd=cwd, capture_output=True,
                          text=True).stdout.split()
    return [c for c in line[1:] if c in held]


# --- comparing: experiments by group, one scale ----------------------------------------------------


def infer_scale(params: dict[str, Any], base: dict[str, Any]) -> str | None:
    """The scale whose every override an experiment's params (flat) hold; `full` when none of the scales'
    keys differs from its baseline `base`; None when neither (an experiment not made by the runner)."""
    for scale, s in SCALES.items():
        if s.overrides and all(_comparable(params.get(k)) == _comparable(v) for k, v in s.overrides.items()):
            return scale
    keys = {k for s in SCALES.values() for k in s.overrides}
    return "full" if all(_comparable(params.get(k)) == _comparable(base.get(k)) for k in keys) else None


def _params_at(rev: str, cwd: Path) -> dict[str, Any]:
    return flatten(parse_yaml(committed_text(cwd / "params.yaml", rev) or "{}") or {})


def group_of(name: str, scale: str | None, revs: dict[str, str], cwd: Path) -> Group:
    """The experiments `name` stands for: a group (`stable_cpu`, or `stable` at `scale` or at the one
    scale it ran at) with its seed repeats, one repeat (`stable_cpu_s43`), or any DVC experiment."""
    m = NAME_RE.match(name)
    if m is None and name in revs and not scale:  # an experiment not named by the runner
        params = _params_at(revs[name], cwd)
        found = infer_scale(params, _params_at(f"{revs[name]}^", cwd))
        return Group(name, found, {name: revs[name]}, SCALES[found].overrides if found else {})
    if m is not None and m["seed"] is not None:
        label, at, members = name, m["scale"], {name: revs[name]} if name in revs else {}
    else:
        if m is not None:
            label, at = name, m["scale"]
        elif scale:
            label, at = name_of(name, scale), scale
        else:
            scales = sorted({x["scale"] for e in revs if (x := NAME_RE.match(e)) and x["base"] == name})
            if len(scales) != 1:
                raise ExperimentError(f"{name} ran at the scales {', '.join(scales)}: choose one with --scale"
                                      if scales else f"no experiment {name} at any scale here; run it with "
                                      f"`python -m pipeline.experiments run --scale cpu {name}`")
            label, at = name_of(name, scales[0]), scales[0]
        repeats = [e for e in revs if e == label or re.fullmatch(rf"{re.escape(label)}{SEP}s\d+", e)]
        members = {e: revs[e] for e in sorted(repeats, key=lambda e: (e != label, len(e), e))}  # by seed
    if not members:
        raise ExperimentError(f"no experiment named {label}; run it with `python -m pipeline.experiments run "
                              f"--scale {at} {NAME_RE.match(label)['base'] if NAME_RE.match(label) else label}`")
    return Group(label, at, members, SCALES[at].overrides)


def groups_of(names: list[str], scale: str | None, cwd: Path) -> dict[str, Group]:
    """The groups to compare (named groups such as `ablations` expanded); refused when they ran at
    different scales, flagged (a warning here and in the report) when a scale is unknown."""
    revs = experiment_revs(cwd)
    groups: dict[str, Group] = {}
    for name in names:
        for n in GROUPS.get(name, [name]):
            try:
                g = group_of(n, scale, revs, cwd)
            except ExperimentError as err:
                g = from_earlier_baseline(n, scale, cwd, err)
            groups[g.label] = g
    one_scale(groups)
    return groups


def from_earlier_baseline(name: str, scale: str | None, cwd: Path, at_head: ExperimentError) -> Group:
    """`name`'s group from the newest earlier commit that has it, when HEAD has none (a commit made
    after the experiments ran, or while they ran in the queue); said in the log, since the code may
    have changed since. HEAD's error `at_head` when no earlier commit has it either."""
    for baseline in earlier_baselines(cwd):
        try:
            g = group_of(name, scale, experiment_revs(cwd, baseline), cwd)
        except ExperimentError:
            continue
        log.info("%s: HEAD has none of its experiments; those of the earlier commit %s (what changed since: "
                 "`git diff %s HEAD`)", g.label, baseline[:7], baseline[:7])
        return g
    raise at_head


def one_scale(groups: dict[str, Group]) -> None:
    """Refuse groups of different scales; warn about a group whose scale is unknown."""
    scales = {g.scale for g in groups.values()}
    if len(scales - {None}) > 1:
        raise ExperimentError("refused: these experiments ran at different scales ("
                              + ", ".join(f"{g.label}: {g.scale}" for g in groups.values() if g.scale)
                              + "), so their differences would be the scales'; compare experiments of one scale")
    if None in scales:
        log.warning("the scale of %s is unknown (not named by the runner, its params match no scale): the "
                    "comparison may include a difference of scale", ", ".join(g.label for g in groups.values()
                                                                          if g.scale is None))


def report_dir(labels: list[str]) -> str:
    """The directory of a comparison under metrics/compare/: the groups it compares."""
    name = "-vs-".join(labels)
    if len(name) <= 120:
        return name
    return f"{labels[0]}-vs-{len(labels) - 1}-others-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def at_least_one(text: str) -> int:
    """An argparse type: an integer of 1 or more (`--seeds 0` would run nothing and succeed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run named experiments (or groups), or your own overrides, with dvc exp run")
    r.add_argument("names", nargs="*", help=f"experiments or groups ({', '.join(GROUPS)}); default: "
                                            f"{' '.join(DEFAULT)}, or stable with -S")
    r.add_argument("--scale", choices=sorted(SCALES), default="full", help="overrides applied to every experiment")
    r.add_argument("--seeds", type=at_least_one, default=1, help="repeats of each, at seeds train.seed, +1, ...")
    r.add_argument("--seed", type=int, default=None, help="one seed for every random choice (all of "
                                                          f"{', '.join(SEED_KEYS)})")
    r.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="your own experiment: stable plus these overrides; comma-separated values are a sweep")
    r.add_argument("-n", "--name", default=None, help="the name of your own experiment (default: from its -S)")
    r.add_argument("--queue", action="store_true", help="queue them and run with dvc queue start")
    r.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers")
    for cmd, about in (("compare", "gap reports of experiments side by side: metrics/compare/<names>/"),
                       ("diff", "every metric of two experiments: mean ± sd over their seeds, real or within noise")):
        c = sub.add_parser(cmd, help=about)
        c.add_argument("names", nargs="+", help="experiments (stable, stable_cpu, stable_cpu_s43) or a group")
        c.add_argument("--scale", choices=sorted(SCALES), default=None, help="the scale (default: the one they ran at)")
        if cmd == "compare":
            c.add_argument("--out", default=None, help="report directory (default: metrics/compare/<names>)")
    st = sub.add_parser("study", help="a study page written from experiments' runs: per-epoch LoRA growth and "
                                      "equivariance share, the health checks they tripped, the final gaps")
    st.add_argument("names", nargs="+", help="experiments or groups, e.g. stable fixed")
    st.add_argument("--scale", choices=sorted(SCALES), default=None, help="the scale (default: the one they ran at)")
    st.add_argument("--write", default=None, help="write the page there (whole or not at all), e.g. docs/cpu-study.md")
    sub.add_parser("runs", help="each experiment's MLflow runs and registered model version (python -m pipeline.tracking.lineage)",
                   add_help=False)
    o = sub.add_parser("overrides", help="the -S arguments of an experiment, for dvc exp run (restores HEAD's "
                                         "params.yaml first, when the workspace's differs)")
    o.add_argument("name", choices=sorted(EXPERIMENTS))
    o.add_argument("--scale", choices=sorted(SCALES), default="full")
    o.add_argument("--seed", type=int, default=None, help=f"one seed for {', '.join(SEED_KEYS)}")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["runs"]:  # the lineage command, with its own arguments (names, --run RUN_ID)
        from pipeline.tracking import lineage

        lineage.main(argv[1:])
        return
    args = ap.parse_args(argv)
    cwd = Path(os.getcwd())
    try:
        if args.cmd == "run":  # one run of experiments at a time in a workspace (pipeline.experiments.runlock)
            # SIGTERM stops what it started as Ctrl-C does (pipeline.stage.Stopped)
            with runlock.hold(cwd, " ".join(["python -m pipeline.experiments", *argv])), sigterm_stops():
                names = args.names or ([] if args.sets else DEFAULT)
                labels = run(names, cwd, args.scale, args.queue, args.jobs, args.seeds, args.seed, args.sets,
                             args.name)
            if args.sets and labels:  # yours against stable
                reference = name_of("stable", args.scale)
                labels = [reference, *(g for g in labels if g != reference)]
                groups = groups_of(labels, None, cwd)
                print(compare(groups, cwd, cwd / "metrics" / "compare" / report_dir(labels)))
        elif args.cmd == "compare":
            groups = groups_of(args.names, args.scale, cwd)
            out = Path(args.out) if args.out else cwd / "metrics" / "compare" / report_dir(list(groups))
            print(compare(groups, cwd, out))
            log.info("report: %s", out / "compare.md")
        elif args.cmd == "study":
            from pipeline.experiments.study import study

            print(study(groups_of(args.names, args.scale, cwd), cwd, Path(args.write) if args.write else None))
        elif args.cmd == "diff":
            groups = groups_of(args.names, args.scale, cwd)
            if len(groups) != 2:
                raise ExperimentError(f"diff compares two experiments; got {len(groups)}: {', '.join(groups)}")
            print(metrics_table(*groups.values(), cwd))
        else:
            restore_params(cwd, announce=True, why="`dvc exp run` with these arguments gives HEAD's params.yaml "
                                                   "plus them only from HEAD's params.yaml")
            print(" ".join(set_args(overrides(args.name, args.scale, args.seed))))
    except (ExperimentError, CompareError, ParamsError, runlock.WorkspaceError, supervise.QueueError) as err:
        fail(str(err))
    except Stopped:
        fail("stopped by SIGTERM: the same command resumes each interrupted training from its checkpoint",
             TERMINATED)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C): the same command resumes each interrupted training from its checkpoint",
             INTERRUPTED)


if __name__ == "__main__":
    main()
