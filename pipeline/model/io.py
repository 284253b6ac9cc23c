"""Saving and loading a trained model of any family: its family's name, the configuration that
rebuilds it (`model.config()`), the EMA weights and metadata, in a file that loads with
`torch.load(weights_only=True)`.

An RLAN configuration names the forms its modules were built with (PUBLIC_FORMS' keys: the solver's
candidate, the context injector, HyperLoRA's delta); a file of format 2, from before they were
options, was built with FORMS_BEFORE_OPTIONS, and loads as such. A caller that needs given forms
(`forms=`) is refused a model built with others, in one line naming the keys."""

from __future__ import annotations

import pickle
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import write_bytes
from pipeline.model import family as families
from pipeline.params import FORMS_BEFORE_OPTIONS, PUBLIC_FORMS

FORMAT = 3  # 2: the family and its configuration; 3: an RLAN configuration names its module forms


class ModelFileError(RuntimeError):
    """A model or checkpoint file that is missing, corrupt or of another format."""


def _reason(err: BaseException) -> str:
    """The first line of torch's message, without its advice to load with weights_only=False
    (these files never need it: everything in them is a tensor, a number, a string or a container)."""
    first = (str(err).strip().splitlines() or [""])[0]
    return type(err).__name__ if not first or "weights_only" in first else f"{type(err).__name__}: {first[:200]}"


def safe_load(path: str | Path, map_location: str | torch.device = "cpu", hint: str = "") -> dict[str, Any]:
    """torch.load(weights_only=True) with one clear error line for a missing, truncated or foreign
    file; `hint` (what to do about it) ends the line."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file{tail}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise ModelFileError(f"{path}: corrupt or not a file of this pipeline ({_reason(err)}){tail}") from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise ModelFileError(f"{path}: not a file written by this pipeline{tail}")
    return obj


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    obj = {"format": FORMAT, "family": model.FAMILY, "model_params": model.config(), "state_dict": model.state_dict(),
           "meta": meta}
    buffer = BytesIO()  # serialized first: its size is checked against the room left (pipeline.io.write_bytes)
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def recorded_forms(obj: dict[str, Any]) -> dict[str, str]:
    """The module forms a loaded model file's RLAN was built with ({} for another family)."""
    if obj["family"] != "rlan":
        return {}
    config, before = obj["model_params"], FORMS_BEFORE_OPTIONS if obj["format"] == 2 else {}
    return {k: config.get(k, before.get(k)) for k in PUBLIC_FORMS}


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               forms: dict[str, str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model and its metadata; with `forms` (model.<key>: form), a model built with other forms
    is refused."""
    obj = safe_load(path, map_location)
    if obj["format"] not in (2, FORMAT):
        raise ModelFileError(f"{path}: model format {obj['format']}, this code reads {FORMAT}")
    built = recorded_forms(obj)
    other = [f"model.{k} {v!r} (wanted {forms[k]!r})" for k, v in built.items() if forms and forms.get(k, v) != v]
    if other:
        raise ModelFileError(f"{path}: built with other module forms: {', '.join(other)}")
    if obj["format"] == 2 and built:
        obj["model_params"] = {**obj["model_params"], **built}
    if obj["family"] == "rlan" and "pair_encoder" not in obj["model_params"]:  # built before the option: public
        obj["model_params"] = {**obj["model_params"], "pair_encoder": "public"}
    try:
        model = families.get(obj["family"]).build(obj["model_params"])
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:  # ValueError: pydantic's too
        raise ModelFileError(f"{path}: weights do not fit the recorded model ({err})") from None
    return model.to(map_location), obj["meta"]
