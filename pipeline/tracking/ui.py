"""Links into MLflow's UI that open on what a reader of this project looks at.

The experiment is created as a model-training experiment (the experiment tag `mlflow.experimentKind`,
pipeline.tracking.prepare_store). MLflow 3.17's UI nevertheless lays an experiment out by the
browser's own GenAI / Model training switch (remembered by the browser, GenAI at first) or by the
`workflowType` parameter of the address: every link here carries `workflowType=machine_learning`, so
that the experiment opens on its training runs.

    python -m pipeline.tracking.ui [--host http://127.0.0.1:5000]

prints the training runs, the registered models, and the charts of `CHARTS`: MLflow's metric page
plots several metrics of several runs in one chart against the epoch, one colour per run and one
line style per metric (the attention entropy in train mode solid, in eval mode dashed). A chart holds
the latest finished run of every experiment that logged all of its metrics (a TRM has no DSC, no
LoRA, no leave-one-out: it is in the gap chart only).
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from pipeline.params import Params, load_params
from pipeline.tracking import tracking_uri

ML = "workflowType=machine_learning"
CHARTS = (
    ("attention entropy, train mode (solid) against eval mode (dashed)",
     ("attention_entropy_train", "attention_entropy_eval")),
    ("HyperLoRA: the magnitude of each target's delta",
     ("lora_magnitude_gru_reset", "lora_magnitude_gru_update", "lora_magnitude_gru_candidate",
      "lora_magnitude_output_head")),
    ("leave-one-out: pixel accuracy and exact match", ("loo_accuracy", "loo_exact_match")),
    ("gaps of the training view, per epoch (1 or 0: none)",
     ("gap.training.exact_match_gap", "gap.training.loss_ratio")),
)


def latest_runs(client: Any, experiment_id: str) -> list[Any]:
    """The latest finished run of each run name (DVC experiment), newest first."""
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    seen: dict[str, Any] = {}
    for r in runs:
        seen.setdefault(r.info.run_name, r)
    return list(seen.values())


def metric_chart(host: str, experiment_id: str, run_ids: list[str], keys: tuple[str, ...]) -> str:
    """MLflow's metric page: every key of every run in one chart against the epoch (step), one line
    style per key."""
    query = {"runs": json.dumps(run_ids), "metric": json.dumps(keys[0]), "experiments": json.dumps([experiment_id]),
             "plot_metric_keys": json.dumps(list(keys)), "plot_layout": "{}", "x_axis": "step",
             "y_axis_scale": "linear", "line_smoothness": "1", "show_point": "true", "deselected_curves": "[]",
             "last_linear_y_axis_range": "[]"}
    return f"{host}/#/metric/{quote(keys[0])}?" + "&".join(f"{k}={quote(v)}" for k, v in query.items()) + f"&{ML}"


def links(params: Params, host: str) -> dict[str, str]:
    """Title -> address; only the models when the experiment does not exist yet."""
    import mlflow

    host = host.rstrip("/")
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    found = {"registered models (rlan, trm)": f"{host}/#/models"}
    exp = client.get_experiment_by_name(params.tracking.experiment_name)
    if exp is None:
        return found
    eid = exp.experiment_id
    runs = latest_runs(client, eid)
    found = {f"training runs of {exp.name}": f"{host}/#/experiments/{eid}/runs?{ML}", **found}
    for title, keys in CHARTS:
        have = [r for r in runs if all(k in r.data.metrics for k in keys)]
        if have:
            found[f"{title}: {', '.join(r.info.run_name for r in have)}"] = metric_chart(
                host, eid, [r.info.run_id for r in have], keys)
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:5000", help="where `mlflow ui` or `mlflow server` listens")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    for title, url in links(load_params(args.params), args.host).items():
        print(f"{title}:\n  {url}")


if __name__ == "__main__":
    main()
