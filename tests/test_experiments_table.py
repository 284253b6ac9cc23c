"""`python -m pipeline.experiments table`: every finished experiment of HEAD on one line within 100
columns, a measure the model lacks not measured, long names on their own line."""

from __future__ import annotations

import pytest

from pipeline.experiments.runner import SCALES
from pipeline.experiments.table import WIDTH, render, rows_of
from pipeline.params import flatten
from tests.helpers import raw_params


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def experiment(name: str, seed: int = 42, scale: str = "tiny", trm: bool = False, state: str = "success") -> dict:
    """One experiment as `dvc exp show --json` lists it."""
    params = {**flatten(raw_params()), **SCALES[scale].overrides, "train.seed": seed, "augment.seed": seed,
              "evaluate.seed": seed}
    summary = {"pass@2": 0.125, "train@2": 0.5, "em_gap": 0.25, "status": 1}
    if not trm:  # TRM reads no demonstrations and has no DSC
        summary.update({"entropy_ratio": 3.0759, "stop_gap": 0.0136, "ctx_gain": 1.5})
    metrics = {"metrics/summary.json": {"data": summary}}
    return {"name": name, "executor": {"state": state},
            "revs": [{"rev": "a" * 40, "name": name, "data": {"params": {"params.yaml": {"data": unflatten(params)}},
                                                               "metrics": metrics}}]}


def shown(*experiments: dict) -> list[dict]:
    return [{"rev": "workspace", "data": None, "experiments": None},
            {"rev": "b" * 40, "data": {"params": {"params.yaml": {"data": raw_params()}}},
             "experiments": list(experiments)}]


def test_one_line_per_finished_experiment_sorted_and_not_measured_marked():
    rows = rows_of(shown(experiment("stable_tiny"), experiment("trm_tiny", trm=True),
                         experiment("stable_tiny_s43", seed=43), experiment("queued", state="queued")))
    assert list(rows) == ["stable_tiny", "stable_tiny_s43", "trm_tiny"]  # the queued one has no outputs yet
    assert rows["stable_tiny"] == ["tiny", "42", "0.125", "0.500", "0.250", "3.076", "0.014", "1.500", "warning"]
    assert rows["stable_tiny_s43"][:2] == ["tiny", "43"]
    assert rows["trm_tiny"][5:8] == ["n/m", "n/m", "n/m"]  # not measured, not a number
    text = render(rows)
    [line] = [x for x in text.splitlines() if x.startswith("trm_tiny ")]
    assert line.split() == ["trm_tiny", "tiny", "42", "0.125", "0.500", "0.250", "n/m", "n/m", "n/m", "warning"]


@pytest.mark.parametrize("name", ["stable_cpu", "hyperlora_init_scale=0.05_model.hidden_dim=64_cpu_s43"])
def test_every_line_fits_and_a_long_name_stays_whole(name):
    rows = rows_of(shown(experiment(name, scale="cpu"), experiment("fixed_cpu", scale="cpu")))
    text = render(rows)
    assert max(len(x) for x in text.splitlines()) <= WIDTH
    assert name in text.splitlines() or any(x.startswith(name + " ") for x in text.splitlines())
    assert "…" not in text and text.splitlines()[0].split()[:3] == ["experiment", "scale", "seed"]
