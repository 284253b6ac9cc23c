"""Test helpers: small synthetic ARC tasks, parameter overrides and a temporary repository copy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.arc import Task
from pipeline.experiments.runner import SCALES
from pipeline.params import Params, parse_params

REPO = Path(__file__).resolve().parents[1]


def grid(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


def random_task(rng: np.random.Generator, task_id: str, split: str, n_demo: int = 3, n_test: int = 1,
                max_side: int = 8) -> Task:
    def g() -> np.ndarray:
        h, w = rng.integers(1, max_side + 1, 2)
        return rng.integers(0, 10, (h, w)).astype(np.uint8)
    return Task(task_id, split, tuple((g(), g()) for _ in range(n_demo)), tuple((g(), g()) for _ in range(n_test)))


def tiny_task_set() -> list[Task]:
    """Four training and three evaluation tasks with random grids."""
    rng = np.random.default_rng(7)
    tasks = [random_task(rng, f"tr{i:02d}", "train", n_demo=2 + i % 3, n_test=1 + i % 2) for i in range(4)]
    tasks += [random_task(rng, f"ev{i:02d}", "eval", n_demo=2 + i, n_test=1 + i % 2) for i in range(3)]
    return tasks


def raw_params() -> dict[str, Any]:
    with (REPO / "params.yaml").open() as f:
        return yaml.safe_load(f)


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


def params_with(**overrides: Any) -> Params:
    """The repository's params.yaml with overrides given as section__key=value."""
    return parse_params(raw_params()).override({k.replace("__", "."): v for k, v in overrides.items()})


def tool_env() -> dict[str, str]:
    """Environment for running python/dvc of this interpreter in a subprocess."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    for k, v in {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                 "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}.items():
        env.setdefault(k, v)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_repo(dest: Path) -> Path:
    """The repository's files (tracked and untracked-but-not-ignored) in a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    run(["git", "init", "-q", "-b", "main"], dest)
    return dest


def commit_all(repo: Path, message: str = "snapshot") -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", message], repo)


def write_params(repo: Path, **overrides: Any) -> None:
    raw = raw_params()
    for key, value in overrides.items():
        set_key(raw, key.replace("__", "."), value)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


# The tiny scale of pipeline.experiments.runner.SCALES (the e2e tests' scale), as section__key overrides.
TINY = {k.replace(".", "__"): v for k, v in SCALES["tiny"].overrides.items()}
TINY_MODEL = {k: v for k, v in TINY.items() if k.startswith("model__")}


def example_batch(n: int = 3, seed: int = 0, demos: int = 3, max_side: int = 5):
    """A batch from random grids (context pairs, query), every grid at the canvas origin."""
    from pipeline.loader import batch_from_pairs

    rng = np.random.default_rng(seed)

    def g():
        return rng.integers(0, 10, tuple(rng.integers(1, max_side + 1, 2))).astype(np.uint8)

    return batch_from_pairs([([(g(), g()) for _ in range(demos)], g(), g()) for _ in range(n)])


TINY_TRAIN = {**{k: v for k, v in TINY.items() if k.startswith("train__")}, "augment__samples_per_task": 6}


def tiny_workspace(root: Path, **overrides: Any) -> dict[str, Path]:
    """A raw table and cache of the tiny tasks plus a params file for a tiny training run."""
    from pipeline.arc import write_raw
    from pipeline.cache import build_cache

    root.mkdir(parents=True, exist_ok=True)
    (root / "raw").mkdir(exist_ok=True)
    write_raw(tiny_task_set(), root / "raw" / "pairs.parquet")
    settings = {**TINY_MODEL, **TINY_TRAIN, "tracking__tracking_uri": f"sqlite:///{root / 'mlflow.db'}", **overrides}
    write_params(root, **settings)
    build_cache(tiny_task_set(), params_with(**settings).augment, root / "cache")
    return {"root": root, "params": root / "params.yaml", "raw": root / "raw", "cache": root / "cache"}


def train_cmd(ws: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--params", str(ws["params"]), "--cache", str(ws["cache"]),
            "--raw", str(ws["raw"]), "--checkpoints", str(out / "ckpt"), "--model", str(out / "model.pt"),
            "--metrics", str(out / "train.json"), "--plots", str(out / "plots")]


def checkpoint_of(ws: dict[str, Path], store: Path) -> Path:
    """The directory of the workspace's training (its fingerprint) in a checkpoint store."""
    from pipeline.arc import read_raw
    from pipeline.params import load_params
    from pipeline.train import checkpoint, loop

    params = load_params(ws["params"])
    held = loop.heldout_examples(read_raw(ws["raw"] / "pairs.parquet"), params.train.heldout_tasks, params.train.seed)
    return checkpoint.directory(store, loop.training_identity(params, held, ws["cache"]).fingerprint)


def interrupt_when(cmd: list[str], cwd: Path, ready: Any, signum: int = signal.SIGINT,
                   timeout: float = 600) -> tuple[int, str]:
    """Run `cmd` in a process group of its own and, once `ready()` holds, send `signum` to the whole
    group as Ctrl-C in a terminal does; (exit status, output). Fails if it ends before that."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        running = proc.poll() is None
        if running:
            os.killpg(proc.pid, signum)
        code = proc.wait(timeout=timeout)
        out.seek(0)
        text = out.read()
    assert running, f"{' '.join(cmd)} ended before it could be interrupted:\n{text}"
    return code, text


def checkpoint_in_progress(store: Path, after_epochs: int = 1, mid_epoch: bool = True) -> Any:
    """A predicate: some training in the checkpoint store has saved after `after_epochs` epochs or more
    (with `mid_epoch`, inside an epoch) and has not finished."""
    def ready() -> bool:
        for manifest in store.glob("*/manifest.json"):
            try:
                about = json.loads(manifest.read_text()).get("about", {})
            except (OSError, ValueError):  # being replaced
                continue
            started = after_epochs <= about.get("epoch", 0) < about.get("epochs", 0)
            if started and (about.get("step", 0) > 0 or not mid_epoch):
                return True
        return False
    return ready
