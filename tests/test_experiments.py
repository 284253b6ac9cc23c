"""The named experiments and scales: declarations, the post-run params check, the workspace guard,
`make run`'s choice, and each fix of the fixed configuration reaching the code that reads it."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.arc import read_raw
from pipeline.experiments import launch
from pipeline.experiments.runner import (
    ABLATIONS,
    EXPERIMENTS,
    FIXED,
    GROUPS,
    NAME_RE,
    SCALES,
    ExperimentError,
    child_env,
    expected_changes,
    finished,
    group_of,
    infer_scale,
    is_baseline,
    label_of,
    main,
    mismatches,
    name_of,
    one_scale,
    overrides,
    parse_sets,
    plan,
    progress,
    resolve,
    restore_params,
    seeds_of,
    set_args,
    stalled,
)
from pipeline.model import RLAN
from pipeline.model.io import load_model
from pipeline.params import SEED_KEYS, flatten
from pipeline.rules import check_rules
from pipeline.tracking import Tracker
from pipeline.train import loop, schedule
from tests.helpers import (
    REPO,
    TINY,
    example_batch,
    params_with,
    raw_params,
    run,
    tiny_workspace,
)


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


@pytest.mark.slow
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



# --- names, seeds, the user's overrides ---------------------------------------------------------


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_names_carry_scale_and_seed_and_are_valid_dvc_names_and_mlflow_aliases(scale, tmp_path):
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
    )

    from pipeline.tracking.mlflow_model import alias_for

    run(["git", "init", "-q"], tmp_path)
    for base in [*EXPERIMENTS, label_of({"model.hyperlora_init_scale": 0.05, "train.lr": 1e-5})]:
        for seed in (None, 43):
            name = name_of(base, scale, seed)
            parsed = NAME_RE.match(name)
            assert (parsed["base"], parsed["scale"], parsed["seed"]) == (base, scale, None if seed is None else "43")
            assert run(["git", "check-ref-format", f"refs/exps/ab/{'c' * 38}/{name}"], tmp_path, check=False) \
                .returncode == 0, name
            assert "/" not in name and alias_for(name) == re.sub(r"[^\w-]", "-", name)
            if re.fullmatch(r"[\w-]+", base):  # the named experiments: the alias is the name itself
                assert alias_for(name) == name
            _validate_model_alias_name(alias_for(name))
            _validate_model_alias_name_reserved(alias_for(name))


def test_every_seed_of_the_schema_is_a_seed_key():
    assert sorted(k for k in params_with().flat() if k.split(".")[-1] == "seed") == sorted(SEED_KEYS)


def test_seed_repeats_start_at_the_committed_seed():
    base = flatten(raw_params())
    assert base["train.seed"] == 42
    assert seeds_of(3, None, base) == [None, 43, 44]  # None: the committed seeds, no override
    assert seeds_of(1, 7, base) == [7] and seeds_of(1, 42, base) == [None]
    assert overrides("fixed", "cpu", 43) == {**SCALES["cpu"].overrides, **FIXED, **{k: 43 for k in SEED_KEYS}}
    mixed = {**base, "augment.seed": 1}  # the committed seeds differ: every repeat sets all three to one value
    assert seeds_of(2, None, mixed) == [42, 43]
    assert seeds_of(1, 42, mixed) == [42]


def test_set_params_sweep_and_keys_checked_with_did_you_mean():
    base = flatten(raw_params())
    assert parse_sets(["model.hyperlora_init_scale=0.05,0.2", "train.learning_rate=1e-5",
                       "validation.accept_broken_rules=[a,b]"], base) == [
        {"model.hyperlora_init_scale": 0.05, "train.learning_rate": 1e-5, "validation.accept_broken_rules": ["a", "b"]},
        {"model.hyperlora_init_scale": 0.2, "train.learning_rate": 1e-5, "validation.accept_broken_rules": ["a", "b"]}]
    with pytest.raises(ExperimentError, match=r"model.hyperlora_int_scale is not a key of params.yaml "
                                              r"\(did you mean model.hyperlora_init_scale\?\)"):
        parse_sets(["model.hyperlora_int_scale=0.05"], base)
    with pytest.raises(ExperimentError, match="expected key=value"):
        parse_sets(["model.hidden_dim"], base)


def test_plan_names_each_repeat_and_the_users_own_experiments(caplog):
    base = flatten(raw_params())
    variants = parse_sets(["model.hyperlora_init_scale=0.05,0.1,0.2"], base)
    kept = [v for v in variants if not is_baseline(v, "cpu", base)]
    assert kept == [variants[0], variants[2]]
    assert "-S model.hyperlora_init_scale=0.1 is the committed value (HEAD) already" in caplog.text
    assert is_baseline({"train.epochs": 16}, "cpu", base) and "the cpu scale's value already" in caplog.text
    planned = plan(["stable"], "cpu", [None, 43], kept)
    assert [(p.name, p.label) for p in planned] == [
        ("stable_cpu", "stable_cpu"), ("stable_cpu_s43", "stable_cpu"),
        ("hyperlora_init_scale=0.05_cpu", "hyperlora_init_scale=0.05_cpu"),
        ("hyperlora_init_scale=0.05_cpu_s43", "hyperlora_init_scale=0.05_cpu"),
        ("hyperlora_init_scale=0.2_cpu", "hyperlora_init_scale=0.2_cpu"),
        ("hyperlora_init_scale=0.2_cpu_s43", "hyperlora_init_scale=0.2_cpu")]
    assert planned[3].changes == {**SCALES["cpu"].overrides, "model.hyperlora_init_scale": 0.05,
                                  **{k: 43 for k in SEED_KEYS}}
    assert [p.name for p in plan([], "tiny", [None], kept[:1], "mine")] == ["mine_tiny"]
    assert [p.name for p in plan([], "tiny", [None], kept, "mine")] == [
        "mine-hyperlora_init_scale=0.05_tiny", "mine-hyperlora_init_scale=0.2_tiny"]
    for bad in ("fixed", "-x", "a b", "a/b"):
        with pytest.raises(ExperimentError, match="experiment name"):
            plan([], "tiny", [None], kept[:1], bad)


def test_scale_inferred_from_params_for_an_experiment_not_named_by_the_runner():
    base = flatten(raw_params())
    for scale in SCALES:
        assert infer_scale({**base, **SCALES[scale].overrides}, base) == scale
    assert infer_scale({**base, **SCALES["cpu"].overrides, "model.hidden_dim": 8}, base) is None
    assert infer_scale({**base, "model.use_gumbel_softmax": False}, base) == "full"


def test_queue_progress_reads_each_running_experiments_epochs(tmp_path):
    run_dir = tmp_path / ".dvc" / "tmp" / "exps" / "run" / ("c0a6496" + "f" * 33)
    run_dir.mkdir(parents=True)
    out = run_dir / f"{run_dir.name}.out"
    out.write_text("Running stage 'train':\n> python -m stages.train\n"
                   "epoch 1/3:   0%|  | 0/6 [00:00<?]\repoch 1/3: 100%|##| 6/6"
                   "02:31:40 INFO pipeline.train.loop: epoch 1/3: loss 3.0957, train exact 0.000\n"
                   "epoch 2/3: 100%|##| 6/6\r02:31:46 INFO pipeline.train.loop: epoch 2/3: lo")  # still being written
    status = ("Task     Name         Created    Status\nc0a6496  stable_tiny  02:16 AM   Running\n"
              "32c8d94  fixed_tiny   02:17 AM   Queued\n")
    read: dict = {}
    assert progress(tmp_path, status, read) == ["stable_tiny: Running stage 'train'",
                                                 "stable_tiny: epoch 1/3: loss 3.0957, train exact 0.000"]
    assert progress(tmp_path, status, read) == []  # nothing new
    with out.open("a") as f:
        f.write("ss 3.2\n02:31:47 ERROR stage: boom\n")
    assert progress(tmp_path, status, read) == ["stable_tiny: epoch 2/3: loss 3.2", "stable_tiny: ERROR stage: boom"]
    with out.open("a") as f:  # health checks as they fire, and the first line of a resumed training
        f.write("02:31:48 WARNING pipeline.train.loop: epoch 2: lora_explosion critical: lora_growth = 15.5\n"
                "02:31:49 INFO pipeline.train.loop: resuming this training at epoch 3 of 3, from ckpt/last.pt\n"
                "02:31:50 WARNING gap_report: training attention_entropy_ratio = 3.1: warning (x)\n"
                "02:31:50 INFO pipeline.tracking: MLflow: run abc\n")
    assert progress(tmp_path, status, read) == [
        "stable_tiny: WARNING epoch 2: lora_explosion critical: lora_growth = 15.5",
        "stable_tiny: resuming this training at epoch 3 of 3, from ckpt/last.pt",
        "stable_tiny: WARNING training attention_entropy_ratio = 3.1: warning (x)"]


def test_overrides_command_restores_heads_params_and_prints_the_assignment(tmp_path, monkeypatch, capsys):
    committed = (REPO / "params.yaml").read_text()
    repo = _git_repo(tmp_path, committed)
    inherited = committed.replace("use_gumbel_softmax: true", "use_gumbel_softmax: false")
    (repo / "params.yaml").write_text(inherited)  # what a workspace `dvc exp run` of fixed leaves
    monkeypatch.chdir(repo)
    main(["overrides", "stable", "--scale", "tiny", "--seed", "2"])  # (its logging set-up replaces caplog's)
    printed = capsys.readouterr()
    assert printed.out.split() == set_args({**SCALES["tiny"].overrides, **{k: 2 for k in SEED_KEYS}})
    assert (repo / "params.yaml").read_text() == committed
    assert "model.use_gumbel_softmax: committed True, now False" in printed.err
    [backup] = (repo / ".dvc" / "tmp").glob("params.yaml.*")
    assert backup.read_text() == inherited


def test_experiment_refs_hide_dvcs_own_refs(tmp_path, monkeypatch):
    from pipeline.tracking.lineage import experiment_refs

    _git_repo(tmp_path, "a: 1\n")
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    for ref in ("refs/exps/exec/EXEC_HEAD", "refs/exps/exec/EXEC_BASELINE", "refs/exps/celery/stash",
                f"refs/exps/{head[:2]}/{head[2:]}/stable_cpu"):
        run(["git", "update-ref", ref, head], tmp_path)
    monkeypatch.chdir(tmp_path)
    assert experiment_refs() == {"stable_cpu": f"refs/exps/{head[:2]}/{head[2:]}/stable_cpu"}


def test_only_finished_experiments_count():
    def exp(name, rev, state):
        return {"name": name, "executor": state and {"state": state}, "revs": [{"rev": rev, "name": name}]}

    shown = [{"rev": "workspace", "experiments": None},
             {"rev": "6522fb5", "experiments": [exp("stable_cpu", "ee9e397", "success"), exp("fixed_cpu", "7f94ceb", "running"),
                                                exp("mine_cpu", "51fe481", "queued"), exp("x_cpu", "aaaaaaa", "failed"),
                                                exp("by-hand", "ef23388", None)]}]
    assert finished(shown) == {"stable_cpu": "ee9e397", "by-hand": "ef23388"}


def test_a_queue_without_workers_is_seen_as_stalled():
    head = "Task     Name         Created    Status\n"
    rows = {"queued": "f35f9f5  mine_tiny    03:53 AM   Queued\n", "done": "6e4bf68  stable_tiny  03:52 AM   Success\n",
            "running": "5548b3d  fixed_tiny   03:52 AM   Running\n"}
    assert stalled(head + rows["queued"] + rows["done"] + "\nWorker status: 0 active, 0 idle\n")
    assert not stalled(head + rows["queued"] + rows["done"] + "\nWorker status: 1 active, 0 idle\n")
    assert not stalled(head + rows["done"] + "\nWorker status: 0 active, 0 idle\n")  # nothing left to run
    assert not stalled(head + rows["queued"] + rows["running"] + "\nWorker status: 0 active, 0 idle\n")


def test_a_name_stands_for_its_seed_repeats_at_one_scale_never_two(tmp_path, caplog):
    revs = {"stable_tiny_s43": "b", "fixed_tiny": "c", "stable_cpu": "d", "stable_tiny": "a", "stable_tiny_s100": "e"}
    g = group_of("stable", "tiny", revs, tmp_path)
    assert (g.label, g.scale, list(g.revs)) == ("stable_tiny", "tiny",
                                                ["stable_tiny", "stable_tiny_s43", "stable_tiny_s100"])
    assert g.scale_overrides == SCALES["tiny"].overrides
    assert list(group_of("stable_tiny", None, revs, tmp_path).revs) == list(g.revs)
    assert group_of("stable_tiny_s43", None, revs, tmp_path).revs == {"stable_tiny_s43": "b"}
    assert list(group_of("fixed", None, revs, tmp_path).revs) == ["fixed_tiny"]  # the one scale it ran at
    with pytest.raises(ExperimentError, match="stable ran at the scales cpu, tiny: choose one with --scale"):
        group_of("stable", None, revs, tmp_path)
    with pytest.raises(ExperimentError, match="no experiment named fixed_cpu"):
        group_of("fixed", "cpu", revs, tmp_path)
    with pytest.raises(ExperimentError, match=r"different scales \(stable_tiny: tiny, stable_cpu: cpu\)"):
        one_scale({n: group_of(n, None, revs, tmp_path) for n in ("stable_tiny", "stable_cpu")})
    one_scale({"stable_tiny": g, "mine": dataclasses.replace(g, label="mine", scale=None)})
    assert "the scale of mine is unknown" in caplog.text


def test_a_run_outside_the_queue_names_its_experiment_first_on_every_log_line(monkeypatch, capsys):
    """The runner sets the experiment's name for `dvc exp run --temp`: each stage's warning (a health
    check as it fires) reads with the name first."""
    import logging

    from pipeline.stage import EXPERIMENT_ENV, setup_logging

    monkeypatch.setenv(EXPERIMENT_ENV, "fixed_cpu")
    setup_logging()
    logging.getLogger("pipeline.train.loop").warning("epoch 6: lora_explosion critical: grew 30x")
    monkeypatch.delenv(EXPERIMENT_ENV)
    setup_logging()
    logging.getLogger("x").warning("plain")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("fixed_cpu: ") and lines[0].endswith("epoch 6: lora_explosion critical: grew 30x")
    assert not lines[1].startswith("fixed_cpu")
