"""The named experiments and scales: declarations, the post-run params check, the workspace guard,
`make run`'s choice, and each fix of the fixed configuration reaching the code that reads it."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import launch
from pipeline.arc import read_raw
from pipeline.experiments import (ABLATIONS, EXPERIMENTS, FIXED, GROUPS, SCALES, ExperimentError, child_env,
                                  expected_changes, mismatches, overrides, resolve, restore_params, set_args)
from pipeline.model import RLAN
from pipeline.model.io import load_model
from pipeline.params import flatten
from pipeline.rules import check_rules
from pipeline.tracking import Tracker
from pipeline.train import loop, schedule
from tests.helpers import TINY, example_batch, params_with, raw_params, run, tiny_workspace


def test_ablations_are_fixed_one_fix_at_a_time():
    keys = [k for fix in ABLATIONS.values() for k in fix if not k.startswith("validation.")]
    assert len(keys) == len(set(keys))  # no key in two ablations
    together = {k: v for fix in ABLATIONS.values() for k, v in fix.items() if not k.startswith("validation.")}
    assert together == FIXED  # none forgotten, none added
    assert GROUPS["ablations"] == ["stable", *ABLATIONS]


@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_is_valid_at_every_scale_and_accepts_only_what_it_breaks(name, scale):
    found = check_rules(params_with().override(overrides(name, scale)))
    assert [v.rule.id for v in found if v.severity == "error"] == []
    assert "accepted-rules-broken" not in {v.rule.id for v in found}
    accepted = {v.rule.id for v in found if v.accepted}
    assert accepted == set(EXPERIMENTS[name].get("validation.accept_broken_rules", []))


def test_resolve_expands_groups_once_and_names_the_unknown():
    assert resolve(["fixed", "ablations", "stable"]) == ["fixed", "stable", *ABLATIONS]
    with pytest.raises(ExperimentError, match="'nope'"):
        resolve(["stable", "nope"])


def test_set_args_writes_what_dvc_parses():
    assert set_args({"a.b": False, "c": 0.5, "d": ["x-y", "z"], "e": None}) == [
        "-S", "a.b=false", "-S", "c=0.5", "-S", "d=[x-y,z]", "-S", "e=null"]  # a list is one shell word


def test_scale_overrides_are_known_keys_and_tiny_is_the_tests_scale():
    flat = params_with().flat()
    for scale in SCALES.values():
        assert set(scale.overrides) <= set(flat)
    assert SCALES["full"].overrides == {}
    assert SCALES["cpu"].overrides["train.device"] == "cpu" and SCALES["cpu"].overrides["model.hidden_dim"] == 32
    assert TINY == {k.replace(".", "__"): v for k, v in SCALES["tiny"].overrides.items()}


def test_expected_changes_drop_no_op_overrides_and_mismatches_name_keys():
    base = flatten(raw_params())
    want = expected_changes(overrides("no-gumbel", "tiny"), base)
    assert "train.temperature_end" not in expected_changes(FIXED, base)  # 0.5 already: no change to show
    assert want["validation.accept_broken_rules"] == ["fixed-constant-temperature"]
    # what `dvc params diff --json` reports, lists as Python's str()
    diff = {k: {"old": base[k], "new": str(v) if isinstance(v, list) else v} for k, v in want.items()}
    assert mismatches(want, diff) == []
    extra = {**diff, "train.learning_rate": {"old": 5e-4, "new": 1e-3}}
    del extra["model.use_gumbel_softmax"]
    extra["model.hidden_dim"] = {"old": 256, "new": 8}
    problems = mismatches(want, extra)
    assert problems == ["unexpected train.learning_rate=0.001 (baseline 0.0005)",
                        "missing model.use_gumbel_softmax=False", "model.hidden_dim=8, expected 16"]


def _git_repo(tmp_path, text: str):
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        if cmd[1] == "add":
            (tmp_path / "params.yaml").write_text(text)
        run(cmd, tmp_path)
    return tmp_path


def test_restore_params_reports_backs_up_and_restores(tmp_path, caplog):
    committed = "train:\n  learning_rate: 0.0005\n  epochs: 200\n"
    repo = _git_repo(tmp_path, committed)
    (repo / "params.yaml").write_text("train:\n  learning_rate: 0.001\n  epochs: 200\n")
    restore_params(repo, announce=True)
    assert (repo / "params.yaml").read_text() == committed
    assert "train.learning_rate: committed 0.0005, now 0.001" in caplog.text and "epochs" not in caplog.text
    [backup] = (repo / ".dvc" / "tmp").glob("params.yaml.*")
    assert "0.001" in backup.read_text()


def test_child_env_sets_a_git_identity_only_where_git_has_none(tmp_path, monkeypatch):
    repo = _git_repo(tmp_path, "a: 1\n")
    for k in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no global git config
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    env = child_env(repo)
    assert env["GIT_AUTHOR_NAME"] == env["GIT_COMMITTER_NAME"] == "rlan-pipeline"
    assert subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, env=env).returncode == 0
    subprocess.run(["git", "config", "user.name", "Ada"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.email", "ada@example.com"], cwd=repo, check=True)
    assert "GIT_AUTHOR_NAME" not in child_env(repo)


def test_make_run_plan():
    say, cmds = launch.plan(cuda=True, scale=None)
    assert cmds == [["dvc", "repro"]] and "full pipeline" in say[0]
    say, cmds = launch.plan(cuda=False, scale=None)
    assert cmds == [["pipeline.experiments", "run", "--scale", "cpu", "--queue", "-j", "2", "stable", "fixed"],
                    ["pipeline.experiments", "compare", "--scale", "cpu", "stable", "fixed"]]
    assert "no CUDA" in say[0] and "cpu scale" in say[0] and SCALES["cpu"].about in "\n".join(say)
    assert any("needs a GPU" in line for line in say)
    say, cmds = launch.plan(cuda=True, scale="tiny")
    assert cmds[0][3] == "tiny" and "SCALE=tiny" in say[0]


# --- each fix of the fixed configuration reaches the code that reads it -------------------------


def _model(name: str, **kw) -> RLAN:
    torch.manual_seed(0)
    p = params_with(**{**TINY, "model__dropout": 0.0, **kw}).override(EXPERIMENTS[name])
    return RLAN(p.model)


@pytest.mark.parametrize("name, noisy", [("fixed", False), ("no-gumbel", False), ("stable", True)])
def test_training_forward_has_gumbel_noise_only_in_stable(name, noisy):
    m, b = _model(name), example_batch(2)
    m.train()
    t1, t2 = (m(b, 0.5).clues.attention for _ in range(2))
    m.eval()
    e = m(b, 0.5).clues.attention
    assert (not torch.equal(t1, t2)) == noisy
    assert (not torch.allclose(t1, e)) == noisy  # without noise, training sees the maps of eval mode


@pytest.mark.parametrize("name, conditioned", [("fixed", True), ("task-clues", True), ("stable", False)])
def test_clue_queries_read_the_task_context(name, conditioned):
    m, b = _model(name, model__use_gumbel_softmax=False).eval(), example_batch(2)
    ctx = m.encode_context(b["demo_in"], b["demo_out"], b["demo_mask"])
    support = dataclasses.replace(ctx.support, pooled=ctx.pooled + torch.randn_like(ctx.pooled))  # another task vector
    other = dataclasses.replace(ctx, support=support)
    a, c = (m.solve(b["query_in"], x, 0.5).clues.attention for x in (ctx, other))
    assert (not torch.allclose(a, c)) == conditioned


@pytest.mark.parametrize("name, constant", [("fixed", True), ("constant-temperature", True), ("stable", False)])
def test_temperature_schedule(name, constant):
    tp = params_with().override(EXPERIMENTS[name]).train
    taus = {schedule.temperature(tp, p) for p in np.linspace(0, 1, 11)}
    assert (taus == {0.5}) == constant


def test_fast_ema_and_evaluation_every_epoch_reach_training(tmp_path):
    ws = tiny_workspace(tmp_path / "ws")
    tasks = read_raw(ws["raw"] / "pairs.parquet")

    def train(out: str, epochs: int, **kw):
        """The final EMA weights, flat, and which epochs measured the held-out slice."""
        p = params_with(**{**TINY, "train__epochs": epochs, "train__steps_per_epoch": 1, "train__batch_size": 1,
                           "train__grad_accumulation_steps": 1, "train__meta_learning_start_epoch": 2})
        p = p.override({**FIXED, **{k.replace("__", "."): v for k, v in kw.items()}})
        paths = loop.TrainPaths(ws["cache"], tmp_path / out / "ckpt", tmp_path / out / "model.pt",
                                tmp_path / out / "train.json", tmp_path / out / "plots")
        loop.train(p, tasks, paths, Tracker(p, enabled=False))
        weights = torch.cat([w.detach().flatten() for w in load_model(paths.model)[0].parameters()])
        return weights, pd.read_csv(paths.plots / "epochs.tsv", sep="\t")["heldout_exact_match"].notna().tolist()

    w1, _ = train("w1", 1, train__ema_decay=0.0)  # decay 0: the EMA is the trained weights
    w2, measured_stable = train("w2", 2, train__ema_decay=0.0, train__eval_every=5)
    e1, _ = train("e1", 1)
    e2, measured_fixed = train("e2", 2)
    decay = float(torch.dot(e2 - w2, e1 - w2) / torch.dot(e1 - w2, e1 - w2))  # e2 = d e1 + (1 - d) w2
    assert decay == pytest.approx(FIXED["train.ema_decay"], abs=1e-3)
    assert measured_fixed == [True, True] and measured_stable == [False, True]  # eval_every 1 vs stable's 5

