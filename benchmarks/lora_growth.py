"""Why LoRA magnitudes grow before meta-learning: a short sweep at the cpu scale.

    python -m benchmarks.lora_growth [--epochs 3] [--write docs/lora-growth.md]

Trains stable at the cpu scale (the overrides of `pipeline.experiments`' cpu scale, seed 42) for the
epochs before meta-learning starts, once as validated (HyperLoRA learning-rate multiplier 10, scaling
1.0, init scale 0.1) and once with each of those settings changed alone, and prints per variant and
epoch the LoRA growth (largest ratio of a LoRA magnitude to its first-epoch value), the magnitudes
themselves, and the relative change of HyperLoRA's output layers (how far the weights that make the
deltas moved from their initial values, over those values' size). Each training is the real stage
(`python -m stages.train`) in a temporary workspace built by the real prepare and augment stages.
The first epoch's magnitudes are measured after its 25 optimizer steps, so the growth that matters
(epoch 1 to the start of meta-learning) is what the table shows.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.common import REPO

VARIANTS = {
    "validated (x10 lr, scaling 1.0, init 0.1)": {},
    "lr multiplier 1": {"train.hyperlora_lr_multiplier": 1.0},
    "scaling 0.1": {"model.hyperlora_scaling": 0.1},
    "init scale 0.01": {"model.hyperlora_init_scale": 0.01},
    "init scale 1.0": {"model.hyperlora_init_scale": 1.0},
}
TARGETS = ("gru_reset", "gru_update", "gru_candidate", "output_head")


def _params(changes: dict, epochs: int, store: Path) -> dict:
    from pipeline.experiments.runner import overrides

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**overrides("stable", "cpu"), "train.epochs": epochs, "train.eval_every": epochs,
                       **changes}.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    raw["tracking"]["tracking_uri"] = f"sqlite:///{store}"
    return raw


def _stage(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def _head_drift(run_dir: Path, init_dir: Path) -> float:
    """The largest relative change ||W - W0|| / ||W0|| of HyperLoRA's output layers (the weights that
    make the deltas) between the first saved checkpoint (W0: after construction, seed 42) and the last."""
    from pipeline.model import RLAN
    from pipeline.params import load_params

    p = load_params(run_dir / "params.yaml")
    torch.manual_seed(p.train.seed)
    w0 = {k: v for k, v in RLAN(p.model).state_dict().items() if k.startswith("hyperlora.")}
    state = torch.load(next((run_dir / "ck").rglob("last.pt")), weights_only=True)["model"]
    drift = [float((state[k] - v).norm() / v.norm()) for k, v in w0.items()
             if k.endswith("weight") and v.dim() == 2 and float(v.norm()) > 0]
    return max(drift) if drift else math.nan


def sweep(epochs: int) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        base = _params({}, epochs, ws / "mlflow.db")
        (ws / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        log = ws / "log"
        _stage(["stages.prepare", "--params", str(ws / "params.yaml"), "--out", str(ws / "raw"), "--metrics",
                str(ws / "prepare.json")], log)
        _stage(["stages.augment", "--params", str(ws / "params.yaml"), "--raw", str(ws / "raw"), "--out",
                str(ws / "cache"), "--metrics", str(ws / "augment.json")], log)
        for i, (name, changes) in enumerate(VARIANTS.items()):
            run = ws / f"v{i}"
            run.mkdir()
            (run / "params.yaml").write_text(yaml.safe_dump(_params(changes, epochs, ws / "mlflow.db"), sort_keys=False))
            print(f"training: {name}", file=sys.stderr, flush=True)
            _stage(["stages.train", "--params", str(run / "params.yaml"), "--cache", str(ws / "cache"), "--raw",
                    str(ws / "raw"), "--checkpoints", str(run / "ck"), "--model", str(run / "model.pt"),
                    "--metrics", str(run / "train.json"), "--plots", str(run / "plots")], log)
            series = pd.read_csv(run / "plots" / "epochs.tsv", sep="\t")
            first = series.iloc[0]
            drift = _head_drift(run, ws)
            for _, row in series.iterrows():
                mags = {t: row[f"lora_magnitude_{t}"] for t in TARGETS}
                rows.append({"variant": name, "epoch": int(row["epoch"]),
                             "lora_growth": max(mags[t] / first[f"lora_magnitude_{t}"] for t in TARGETS),
                             **{f"|dW| {t}": mags[t] for t in TARGETS},
                             "loss_task": row["loss_task"],
                             "head drift (last epoch)": drift if int(row["epoch"]) == epochs else math.nan})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, epochs: int) -> str:
    cols = ["variant", "epoch", "lora_growth", *[f"|dW| {t}" for t in TARGETS], "loss_task", "head drift (last epoch)"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join("" if isinstance(v, float) and math.isnan(v) else
                                     (f"{v:.3g}" if isinstance(v, float) else str(v)) for v in r) + " |\n"
                   for r in df[cols].itertuples(index=False))
    return (f"<!-- written by: python -m benchmarks.lora_growth --epochs {epochs} --write docs/lora-growth.md -->\n"
            "# LoRA growth before meta-learning: the sweep\n\n"
            f"Written by `python -m benchmarks.lora_growth --epochs {epochs} --write docs/lora-growth.md`: stable at "
            f"the cpu scale (seed 42), {epochs} epochs of 25 optimizer steps, before meta-learning starts; each "
            "variant changes one validated setting. `|dW|` is the mean Frobenius norm of each target's scaled "
            "delta at the end of the epoch; the head drift is the largest ||W - W0|| / ||W0|| of HyperLoRA's "
            "weight matrices after the last epoch. The reading is in [training.md](training.md#lora-growth).\n\n"
            + head + body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per variant (meta-learning starts after 3)")
    ap.add_argument("--write", default=None, help="also write the table as a Markdown page there")
    args = ap.parse_args()
    text = markdown(sweep(args.epochs), args.epochs)
    print(text)
    if args.write:
        from pipeline.io import write_text

        write_text(REPO / args.write, text)


if __name__ == "__main__":
    main()
