"""Before any training: the first pre-flight (pipeline.feasibility) that the train stage makes, the
user's `-S` overrides it reports and the params.yaml it puts back; the finished experiment the runner
reuses (pipeline.experiments.reuse); the DVC warning the runner's DVC drops (dvc_cli)."""

from __future__ import annotations

import logging

import pytest

from pipeline import feasibility
from pipeline.experiments import committed, dvc_cli, reuse
from pipeline.params import flatten
from pipeline.experiments.runner import SCALES
from tests.helpers import REPO, params_with, run

TINY = {k.replace(".", "__"): v for k, v in SCALES["tiny"].overrides.items()}
CPU = {k.replace(".", "__"): v for k, v in SCALES["cpu"].overrides.items()}


def test_planned_samples_count_the_steps_or_one_pass_over_the_data():
    assert feasibility.planned_samples(params_with(**TINY)) == 3 * 2 * 3 * 2  # epochs x steps x batch x accumulation
    assert feasibility.planned_samples(params_with(**CPU)) == 16 * 25 * 16
    full = params_with()  # one pass over 400 + 400 tasks of 500 versions, in steps of 75 x 4
    assert feasibility.planned_samples(full) == 200 * (800 * 500 // 300) * 300
    assert feasibility.planned_samples(params_with(data__max_tasks=10)) == 200 * (20 * 500 // 300) * 300


def test_the_tiny_and_cpu_scales_count_nothing_and_pass(monkeypatch):
    def counted(*_):
        raise AssertionError("counted FLOPs of a run that would finish at any speed")

    monkeypatch.setattr(feasibility, "step_flops", counted)
    assert feasibility.refusal(params_with(**TINY)) is None
    assert feasibility.refusal(params_with(**CPU)) is None


@pytest.mark.slow
def test_the_full_scale_on_a_cpu_is_refused_from_its_counted_flops():
    p = params_with(train__device="cpu")
    flops, micro_batch, per_sample, _ = feasibility.step_flops(p)
    assert micro_batch == p.train.batch_size and per_sample == 1.0 and flops > 1e11  # RLAN: hundreds of GFLOP
    trm = params_with(train__device="cpu", model__family="trm")
    trm_flops, trm_batch, pairs, _ = feasibility.step_flops(trm)  # TRM trains pairs: 4 per synthetic sample
    assert trm_batch == trm.trm.global_batch_size // trm.train.grad_accumulation_steps and pairs == 4.0
    assert trm_flops > 1e10 and "training refused before it starts" in feasibility.refusal(trm)
    message = feasibility.refusal(p)
    assert message.startswith("training refused before it starts: at least ")
    assert "more than train.max_cpu_hours=12" in message and "--scale cpu stable fixed" in message
    assert feasibility.refusal(params_with(train__device="cpu", train__max_cpu_hours=1e9)) is None


def _repo(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        run(cmd, tmp_path)
    return tmp_path


def test_set_params_of_a_dvc_command_and_which_change_nothing():
    args = ["exp", "run", "-n", "x", "-S", "model.hyperlora_init_scale=0.1", "--set-param=train.epochs=3",
            "-Smodel.hidden_dim=64", "--set-param", "params.yaml:augment.seed=7"]
    sets = committed.set_params_of(args)
    assert sets == {"model.hyperlora_init_scale": "0.1", "train.epochs": "3", "model.hidden_dim": "64",
                    "augment.seed": "7"}
    line = committed.describe_sets(sets, (REPO / "params.yaml").read_text())
    assert line.startswith("your overrides: -S model.hyperlora_init_scale=0.1 (HEAD's value already: it changes "
                           "nothing), -S train.epochs=3, -S model.hidden_dim=64, -S augment.seed=7")


def test_params_rewritten_by_dvc_are_put_back_unless_the_user_changed_other_keys(tmp_path):
    text = (REPO / "params.yaml").read_text()
    repo = _repo(tmp_path, {"params.yaml": text})
    path = repo / "params.yaml"
    rewritten = text.replace("hyperlora_init_scale: 0.1 ", "hyperlora_init_scale: 0.05")
    assert rewritten != text
    path.write_text(rewritten)
    said = committed.undo_set_params(path, {"model.hyperlora_init_scale": "0.05"})
    assert path.read_text() == text and "HEAD's again" in said
    [kept] = (repo / ".dvc" / "tmp").glob("params.yaml.refused-*")
    assert kept.read_text() == rewritten
    # a key the user edited by hand, not set by -S: left as it is, for the restore hint to name
    path.write_text(rewritten.replace("hidden_dim: 256", "hidden_dim: 64"))
    assert committed.undo_set_params(path, {"model.hyperlora_init_scale": "0.05"}) is None
    assert "hidden_dim: 64" in path.read_text()
    assert committed.undo_set_params(path, {}) is None  # no -S: DVC did not rewrite it


def test_an_experiment_is_reused_only_with_the_same_params_and_code(tmp_path):
    repo = _repo(tmp_path, {"params.yaml": "a: 1\nb: [x, y]\n", "dvc.yaml": "stages:\n  s:\n    cmd: c\n"
                            "    outs: [data/out]\n    metrics: [{metrics/m.json: {cache: false}}]\n",
                            "code.py": "x = 1\n"})

    def experiment(params: str, **files: str) -> str:
        run(["git", "checkout", "-q", "-b", f"e{len(files)}{len(params)}"], repo)
        (repo / "params.yaml").write_text(params)
        for name, text in {"dvc.lock": "lock\n", "metrics/m.json": "{}\n", **files}.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-qm", "exp"], repo)
        rev = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
        run(["git", "checkout", "-q", "-"], repo)
        run(["git", "clean", "-qfd"], repo)
        return rev

    base = flatten({"a": 1, "b": ["x", "y"]})
    same = experiment("a: 2\nb: [x, y]\n")
    assert reuse.why_not_reused(same, {**base, "a": 2}, repo) is None
    assert "params differ in a" in reuse.why_not_reused(same, {**base, "a": 3}, repo)
    assert "code differs (code.py" in reuse.why_not_reused(experiment("a: 2\nb: [x, y]\n", **{"code.py": "x = 2\n"}),
                                                              {**base, "a": 2}, repo)
    (repo / "code.py").write_text("x = 3\n")  # uncommitted in the workspace: a new run would differ
    assert "code differs (code.py" in reuse.why_not_reused(same, {**base, "a": 2}, repo)
    run(["git", "checkout", "--", "code.py"], repo)
    (repo / "new.py").write_text("")  # untracked: DVC copies it into a new experiment
    assert "new.py" in reuse.why_not_reused(same, {**base, "a": 2}, repo)


def test_the_runners_dvc_drops_only_the_no_hash_info_warning(caplog):
    dvc_cli.quiet_checkout()
    for name in dvc_cli.CHECKOUT_LOGGERS:
        logger = logging.getLogger(name)
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning("No file hash info found for '%s'. It won't be created.", "/x/metrics/eval.json")
            logger.warning("something else for '%s'", "/x/metrics/eval.json")
    assert [r.getMessage() for r in caplog.records] == ["something else for '/x/metrics/eval.json'"] * 2
