"""The trained model as an MLflow model: logged with the PyTorch flavour and registered.

MLflow gets the module its family gives it (pipeline.model.family: `Family.mlflow_model`; TRM's
takes one (B, 901) int64 tensor, see pipeline/model/trm/family.py). For RLAN, `RLANPredictor`: the EMA weights of `models/model.pt` in eval mode at their saved
temperature, behind one tensor. Its input `views` (B, 2D + 1, H, W), uint8 token canvases
(pipeline.canvas: 0 padding, 1 end of grid, colour c as c + 2), stacks the D context inputs, the D
context outputs and the query input; an empty context slot is all zeros. Its output is the last
solver step's logits (B, 12, H, W), float32: their argmax, decoded by `pipeline.canvas.decode_canvas`,
is the predicted grid. `pack_views` builds `views` from a batch of `pipeline.loader`:

    model = mlflow.pytorch.load_model("models:/rlan@fixed")     # TRM's: models:/trm@trm; or runs:/<id>/model
    logits = model(pack_views(batch))                           # = RLAN(batch, temperature).logits[-1]

The model carries the `pipeline` package (`code_paths`) and pinned requirements. Every finished
training becomes a version of its registered model (`registered_model`: `tracking.registered_model`,
by default the name of its model family, `rlan` or `trm`, so that one name never holds models of two
architectures), tagged with the
DVC experiment, the model's MD5 and the training fingerprint, and aliased by the DVC experiment's
name (`alias_for`: `stable`, `fixed`, `no-gumbel`; `workspace` for `dvc repro`), so that an alias
always points at its experiment's latest model.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.canvas import CANVAS, NUM_TOKENS
from pipeline.integrity import file_md5
from pipeline.model import RLAN
from pipeline.params import FAMILIES, Params

log = logging.getLogger(__name__)
ARTIFACT = "model"
PACKAGE = Path(__file__).resolve().parent
REQUIREMENTS = ("torch", "numpy", "pydantic", "pyyaml")  # what `pipeline.model` imports


class RLANPredictor(nn.Module):
    """RLAN in eval mode at a fixed temperature, with a tensor interface (see the module's doc)."""

    def __init__(self, model: RLAN, temperature: float):
        super().__init__()
        self.model = model.eval()
        self.temperature = float(temperature)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        d = (views.shape[1] - 1) // 2
        demo_in, demo_out = views[:, :d], views[:, d : 2 * d]
        batch = {"demo_in": demo_in, "demo_out": demo_out, "demo_mask": demo_in.flatten(2).ne(0).any(-1),
                 "query_in": views[:, 2 * d]}
        return self.model(batch, self.temperature).logits[-1].float()


def pack_views(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """RLANPredictor's input from a batch of pipeline.loader."""
    return torch.cat([batch["demo_in"], batch["demo_out"], batch["query_in"][:, None]], 1)


def alias_for(experiment: str) -> str:
    """A registry alias for a DVC experiment name: MLflow allows letters, digits, '_' and '-'
    (so `no-gumbel` stays as it is) and reserves `latest` and `v<digits>`."""
    alias = re.sub(r"[^\w-]", "-", experiment) or "workspace"
    return f"exp-{alias}" if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) else alias


def registered_model(params: Params) -> str:
    """The registered model a training's versions go to: `tracking.registered_model`, or (null) the
    model family's name."""
    return params.tracking.registered_model or params.model.family


def registered_models(params: Params) -> list[str]:
    """Where an experiment's version may be, not knowing its family: every family's name, or the one
    `tracking.registered_model` names."""
    return [params.tracking.registered_model] if params.tracking.registered_model else list(FAMILIES)


def example_views(cache: str | Path, n: int = 1) -> np.ndarray:
    """A small input example: the first `n` samples of the augmentation cache (MLflow runs the logged
    model on it once, to check it loads and predicts: 2 s on a CPU for the production model)."""
    from pipeline.loader import AugmentedCache

    reader = AugmentedCache(cache)
    return pack_views(reader.batch(np.arange(min(n, len(reader))), np.random.default_rng(0))).numpy()


def signature(example: np.ndarray, shape: tuple[int, ...]) -> Any:
    """One input tensor of `example`'s dtype and `shape`; the logits (B, 12, 30, 30) float32 out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(example.dtype, shape)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_TOKENS, CANVAS, CANVAS))]))


def requirements() -> list[str]:
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


@contextlib.contextmanager
def _quiet(logger: str):
    level = logging.getLogger(logger).level
    logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger(logger).setLevel(level)


def publish(tracker: Any, model_path: str | Path, cache: str | Path) -> Any:
    """Log `model_path` into the tracker's training run as an MLflow PyTorch model, register it
    and point the DVC experiment's alias at it; returns the ModelVersion (None without a run).
    A model already registered byte for byte (by this run, or by another run of the same training)
    gets no new version: the alias moves to the existing one."""
    from pipeline.model import family as families
    from pipeline.model.io import load_model
    from pipeline.tracking import run_name, store_lock, using_tracking_uri

    if tracker.client is None:
        return None
    import mlflow

    md5 = file_md5(model_path)
    tracker.set_tags({"model_md5": md5})
    client, name, alias = tracker.client, registered_model(tracker.params), alias_for(run_name())
    same = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("model_md5") == md5]
    done = sorted(same, key=lambda v: (v.run_id != tracker.run_id, int(v.version)))  # this run's own first
    if done:  # this very model is registered already (a restored training, or the same one again)
        found = done[0]
    else:
        t0 = time.perf_counter()
        model, meta = load_model(model_path)
        logged, example, shape = families.of(model).mlflow_model(model, meta, cache)
        with using_tracking_uri(tracker.uri), tempfile.TemporaryDirectory() as tmp, \
                mlflow.start_run(run_id=tracker.run_id), _quiet("mlflow.pytorch"):
            # pickle, not MLflow's default torch.export (14 s for the tiny model): docs/mlflow.md
            # section says why (MLflow warns that pickled models run code when loaded: trust the store)
            code = shutil.copytree(PACKAGE, Path(tmp) / PACKAGE.name,
                                   ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            info = client.call("log_model", mlflow.pytorch.log_model, logged, name=ARTIFACT,
                               signature=signature(example, shape), input_example=example,
                               code_paths=[str(code)], pip_requirements=requirements(),
                               serialization_format="pickle")  # bounded like every call (tracking.retry_s)
        run = client.get_run(tracker.run_id)
        tags = {"dvc_exp_name": run_name(), "model_md5": md5, "fingerprint": run.data.tags.get("fingerprint", ""),
                "git_commit": run.data.tags.get("git_commit", "")}
        with store_lock(tracker.uri), using_tracking_uri(tracker.uri):
            found = client.call("register_model", mlflow.register_model, info.model_uri, name, tags=tags)
        log.info("MLflow: logged the model and registered %s version %s in %.1f s", name, found.version,
                 time.perf_counter() - t0)
    client.set_registered_model_alias(name, alias, found.version)
    log.info("MLflow: models:/%s@%s is version %s", name, alias, found.version)
    return found
