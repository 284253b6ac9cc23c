"""Faults and bad input at the stages: each stops with one clear line (no traceback) before any
compute, or, where the user allows it, runs on with a warning."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.model import RLAN
from pipeline.params import ParamsError
from pipeline.rules import check_rules
from tests.helpers import (
    REPO,
    TINY_MODEL,
    checkpoint_of,
    params_with,
    tiny_workspace,
    tool_env,
    train_cmd,
)
from tests.test_tracking import make_read_only, make_writable

UNREACHABLE = "http://127.0.0.1:9"


def stage(cmd, env=None):
    return subprocess.run(cmd, cwd=REPO, env={**tool_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def one_error_line(proc) -> str:
    """The stage failed with exactly one ERROR line and no traceback; returns that line."""
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def other_stages(ws, out):
    """evaluate and gap_report on (missing) outputs: a store check must stop them before they read anything."""
    common = ["--params", str(ws["params"]), "--raw", str(ws["raw"]), "--model", str(out / "model.pt")]
    return [
        [sys.executable, "-m", "stages.evaluate", *common, "--cache", str(ws["cache"]), "--metrics", str(out / "eval.json"),
         "--tasks-table", str(out / "t.csv"), "--submission", str(out / "s.json"), "--candidates", str(out / "c.json")],
        [sys.executable, "-m", "stages.gap_report", *common, "--eval-metrics", str(out / "eval.json"),
         "--candidates", str(out / "c.json"), "--train-metrics", str(out / "train.json"),
         "--series", str(out / "epochs.tsv"), "--metrics", str(out / "gap.json"), "--summary", str(out / "summary.json"),
         "--report", str(out / "report")],
    ]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("faults"), train__epochs=1, tracking__timeout_s=3)


@pytest.mark.slow
def test_unreachable_tracking_server_stops_every_logging_stage_in_seconds(ws, tmp_path):
    for cmd in [train_cmd(ws, tmp_path), *other_stages(ws, tmp_path)]:
        t0 = time.perf_counter()
        proc = stage(cmd, {"MLFLOW_TRACKING_URI": UNREACHABLE})
        line = one_error_line(proc)
        assert f"MLflow tracking server {UNREACHABLE} is unreachable or failing (Connection refused" in line, cmd[2]
        assert time.perf_counter() - t0 < 60  # imports included; MLflow's own retries took 252 s
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_read_only_store_stops_training_naming_the_file(ws, tmp_path):
    """(evaluate and gap_report run the same check, tested above with an unreachable server)"""
    from pipeline.tracking import prepare_store

    db = tmp_path / "store" / "mlflow.db"
    prepare_store(f"sqlite:///{db}", "rlan")
    if not make_read_only(db):
        pytest.skip("cannot make a file read-only here")
    try:
        line = one_error_line(stage(train_cmd(ws, tmp_path / "out"), {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}))
        assert f"MLflow store {db} cannot be written" in line and "readonly" in line
    finally:
        make_writable(db)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_without_mlflow_when_it_is_not_required(tmp_path):
    ws = tiny_workspace(tmp_path / "ws", train__epochs=1, tracking__timeout_s=3, tracking__required=False)
    proc = stage(train_cmd(ws, tmp_path / "out"), {"MLFLOW_TRACKING_URI": UNREACHABLE})
    assert proc.returncode == 0, proc.stderr
    assert "running without MLflow (tracking.required is false)" in proc.stderr
    assert len((tmp_path / "out" / "plots" / "epochs.tsv").read_text().splitlines()) == 2
    assert (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_stops_training_in_one_line(ws, tmp_path):
    folder = checkpoint_of(ws, tmp_path / "ckpt")
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"\x00not a checkpoint")
    line = one_error_line(stage(train_cmd(ws, tmp_path)))
    assert f"{folder / 'last.pt'}: corrupt" in line and f"delete {folder}" in line
    assert "weights_only" not in line


@pytest.mark.slow
def test_damaged_cache_stops_training_in_one_line(ws, tmp_path):
    import shutil

    cache = shutil.copytree(ws["cache"], tmp_path / "cache")
    cells = cache / "cells.npy"
    data = bytearray(cells.read_bytes())
    data[-1] ^= 0x10  # same size: only the digest can tell
    cells.write_bytes(data)
    cmd = train_cmd({**ws, "cache": cache}, tmp_path / "out")
    line = one_error_line(stage(cmd))
    assert f"{cells}: its content differs" in line and "dvc repro -f -s augment" in line


@pytest.mark.slow
def test_a_failed_training_says_how_to_get_back_the_model_dvc_removed(ws, tmp_path):
    """`dvc repro -f -s train` removes models/model.pt before the stage runs; a training that then fails
    says how to restore the one dvc.lock records."""
    import shutil

    cache = shutil.copytree(ws["cache"], tmp_path / "cache")
    (cache / "cells.npy").write_bytes((cache / "cells.npy").read_bytes()[:-8])  # truncated: the training fails
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: x\n    outs:\n"
                                       "    - path: out/model.pt\n      md5: 0123456789abcdef0123456789abcdef\n")
    cmd = train_cmd({**ws, "cache": cache}, tmp_path / "out")
    proc = subprocess.run(cmd, cwd=tmp_path, env={**tool_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    line = one_error_line(proc)
    assert line.endswith(f"; {tmp_path / 'out' / 'model.pt'} is gone because DVC removes a stage's outputs before "
                         f"running it: `dvc checkout {tmp_path / 'out' / 'model.pt'}` brings back the one dvc.lock "
                         "records"), line


@pytest.mark.slow
def test_non_utf8_input_file_is_bad_input(tmp_path):
    (tmp_path / "tasks.json").write_bytes(b'{"train": {"t1": "\xe9t\xe9"}}')  # Latin-1, not UTF-8
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    proc = stage([sys.executable, "-m", "stages.prepare", "--params", str(params), "--out", str(tmp_path / "raw"),
                  "--metrics", str(tmp_path / "prepare.json"), "--input", str(tmp_path / "tasks.json")])
    line = one_error_line(proc)
    assert f"bad ARC input: {tmp_path / 'tasks.json'}: not UTF-8 text (byte 0xe9" in line


# --- constraints of the model belong in validate_params --------------------------------------


def test_head_count_that_does_not_divide_hidden_dim_is_a_rule_error():
    p = params_with(**{**TINY_MODEL, "model__hidden_dim": 32, "model__solver_context_heads": 3})
    errors = [v for v in check_rules(p) if v.severity == "error"]
    assert len(errors) == 1 and "model.solver_context_heads=3 does not divide model.hidden_dim=32" in errors[0].message


def test_hidden_dim_not_a_multiple_of_8_is_a_schema_error():
    with pytest.raises(ParamsError, match=r"model.hidden_dim: Input should be a multiple of 8, got 20 .*a multiple of 8"):
        params_with(**{**TINY_MODEL, "model__hidden_dim": 20})


@pytest.mark.slow
def test_rules_accept_exactly_the_head_counts_the_model_builds_with():
    """For every small hidden size, head count and context switch: the model builds iff the rules pass
    (the DSC scores with one head whatever dsc_num_heads, as the public module)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        hidden, dsc, ctx = 8 * int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 7))
        cross, solver = bool(rng.integers(2)), bool(rng.integers(2))
        p = params_with(**{**TINY_MODEL, "model__hidden_dim": hidden, "model__dsc_num_heads": dsc,
                           "model__solver_context_heads": ctx, "model__use_cross_attention_context": cross,
                           "model__use_solver_context": solver})
        rules_pass = not [v for v in check_rules(p) if v.severity == "error"]
        try:
            RLAN(p.model)
            builds = True
        except ValueError:
            builds = False
        assert builds == rules_pass, (hidden, dsc, ctx, cross, solver)
