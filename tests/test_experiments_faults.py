"""The experiment workflow against bad input found by a fault probe: params nested too deeply, seed
counts that run nothing, bad overrides refused before anything runs, names that collide; and the
smaller faults (a wrong first line for a file that is not a params file, a file over the size limit
read anyway, a deleted MLflow store replaced without a word, a removed model without a way back)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.experiments import committed, prevalidate
from pipeline.experiments.runner import ExperimentError, label_of, parse_sets, plan, restore_params
from pipeline.params import MAX_DEPTH, MAX_PARAMS_BYTES, ParamsError, flatten, load_params, parse_yaml
from tests.helpers import REPO, raw_params, tool_env
from tests.test_experiments import _git_repo

PARAMS = (REPO / "params.yaml").read_text()
DEEP = PARAMS.replace("  accept_broken_rules: []", "  accept_broken_rules: " + "[" * 10_000 + "]" * 10_000)


def runner(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.experiments", *args], cwd=cwd,
                          env={**tool_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line or line.startswith("usage:")
              or ": error:" in line]
    assert errors and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr[proc.stderr.index(errors[0]):]


# --- params nested too deeply ------------------------------------------------------------------------


def test_a_list_nested_10000_deep_is_one_line_in_every_reader(tmp_path):
    with pytest.raises(ParamsError) as err:
        parse_yaml(DEEP)
    [problem] = err.value.problems
    assert f"nested more than {MAX_DEPTH} levels deep" in problem and len(problem) < 200
    path = tmp_path / "params.yaml"
    path.write_text(DEEP)
    with pytest.raises(ParamsError, match="nested more than"):
        load_params(path)
    assert "nested more than" in committed.differences(PARAMS, DEEP)[0]
    assert parse_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None  # MAX_DEPTH levels in all


@pytest.mark.slow
def test_the_runner_restores_heads_params_from_a_deeply_nested_one_and_keeps_the_users(tmp_path):
    repo = _git_repo(tmp_path, PARAMS)
    (repo / "params.yaml").write_text(DEEP)
    proc = runner(["overrides", "stable", "--scale", "tiny"], repo)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and len(proc.stderr) < 5000, proc.stderr[-3000:]
    assert (repo / "params.yaml").read_text() == PARAMS
    [backup] = (repo / ".dvc" / "tmp").glob("params.yaml.*")
    assert backup.read_text() == DEEP
    assert "nested more than" in proc.stderr


@pytest.mark.slow
def test_validate_params_names_the_files_problem_not_a_missing_commit(tmp_path):
    repo = _git_repo(tmp_path, PARAMS)
    (repo / "params.yaml").write_text(PARAMS.replace("  seed: 42\n  device: auto", "  seed: 42\n  seed: 7\n  device: auto"))
    with pytest.raises(ParamsError, match="appears twice"):
        committed.changes_from_head(repo / "params.yaml")
    (repo / "params.yaml").write_text(PARAMS + "#" * MAX_PARAMS_BYTES)
    with pytest.raises(ParamsError, match="a params file may have"):
        committed.changes_from_head(repo / "params.yaml")
    (repo / "params.yaml").write_text(PARAMS.replace("epochs: 200", "epochs: 3"))
    assert committed.changes_from_head(repo / "params.yaml") == {"train.epochs": (200, 3)}
    out = tmp_path / "out"
    (repo / "params.yaml").write_text(PARAMS.replace("  seed: 42\n  device: auto", "  seed: 42\n  seed: 7\n  device: auto"))
    proc = subprocess.run([sys.executable, "-m", "stages.validate_params", "--params", str(repo / "params.yaml"),
                           "--metrics", str(out / "v.json"), "--report", str(out / "v.md"), "--stamp", str(out / "ok")],
                          cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "appears twice" in proc.stderr
    assert "not committed" not in proc.stderr, proc.stderr


def test_restore_params_does_not_read_a_file_over_the_size_limit(tmp_path, caplog, monkeypatch):
    repo = _git_repo(tmp_path, "a: 1\n")
    (repo / "params.yaml").write_text("a: " + "x" * (MAX_PARAMS_BYTES + 10) + "\n")
    read = []
    original = type(repo).read_bytes
    monkeypatch.setattr(type(repo), "read_bytes", lambda self: read.append(self.name) or original(self))
    monkeypatch.setattr(type(repo), "read_text", lambda self, *a, **k: read.append(self.name) or "")
    restore_params(repo, announce=True)
    monkeypatch.undo()
    assert "params.yaml" not in read
    assert (repo / "params.yaml").read_text() == "a: 1\n"
    assert f"more than the {MAX_PARAMS_BYTES:,} a params file may have: not read" in caplog.text


# --- --seeds -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_seeds_accepts_only_integers_of_one_or_more(tmp_path, value):
    proc = runner(["run", "--scale", "tiny", "--seeds", value, "stable"], tmp_path)
    assert proc.returncode == 2 and "--seeds" in proc.stderr and "Traceback" not in proc.stderr
    assert ("is not 1 or more" if value != "x" else "is not an integer") in proc.stderr


# --- bad overrides refused before anything runs ------------------------------------------------------


@pytest.mark.parametrize("override, named", [
    ("model.hidden_dim=abc", "model.hidden_dim: Input should be a valid integer, got 'abc'"),
    ("train.epochs=-3", "train.epochs: Input should be greater than or equal to 1, got -3"),
    ("model.family=rlan; touch x", "-S model.family=rlan; touch x: DVC's override grammar refuses this value"),
    ("data.source=$(touch x)", "-S data.source=$(touch x): DVC's override grammar refuses this value"),
    ("model.hidden_dim=12", "model.hidden_dim: Input should be a multiple of 8, got 12"),
])
def test_a_bad_override_is_refused_before_anything_runs(override, named):
    head = load_params(REPO / "params.yaml")
    planned = plan(["stable"], "tiny", [None], parse_sets([override], flatten(raw_params())))
    t0 = time.perf_counter()
    with pytest.raises(ParamsError) as err:
        prevalidate.check({p.name: p.changes for p in planned}, head)
    assert time.perf_counter() - t0 < 2
    [problem] = err.value.problems
    assert problem.startswith(f"{planned[1].name}: ") and named in problem


def test_every_named_experiment_passes_the_check_at_the_tiny_scale():
    from pipeline.experiments.runner import EXPERIMENTS

    prevalidate.check({p.name: p.changes for p in plan(list(EXPERIMENTS), "tiny", [None, 7], [])},
                      load_params(REPO / "params.yaml"))


@pytest.mark.slow
def test_the_runner_refuses_a_bad_override_in_under_two_seconds_running_nothing(tmp_path):
    repo = _git_repo(tmp_path, PARAMS)
    for args in (["-S", "train.epochs=3,-3"], ["-S", "model.family=rlan; touch x"]):
        t0 = time.perf_counter()
        proc = runner(["run", "--scale", "tiny", *args], repo)
        took = time.perf_counter() - t0
        line = one_error_line(proc)
        assert "the plan (HEAD's params.yaml plus each experiment's overrides) is invalid" in line
        assert took < 5, took  # with the interpreter and its imports (1.8 s on 2 loaded cores); the check: < 2 s
        assert not (repo / "x").exists() and not (repo / ".dvc" / "tmp" / "exps").exists()
    assert "epochs=-3_tiny: train.epochs" in one_error_line(runner(["run", "--scale", "tiny", "-S",
                                                                    "train.epochs=3,-3"], repo))


def test_a_value_that_is_not_yaml_is_named_in_one_line():
    with pytest.raises(ExperimentError, match=r"-S model.dropout=\[\[\[.*nested more than"):
        parse_sets(["model.dropout=" + "[" * 1000 + "]" * 1000], flatten(raw_params()))


# --- names -------------------------------------------------------------------------------------------


def test_names_keep_the_sign_the_section_and_every_character():
    base = flatten(raw_params())
    assert [p.name for p in plan([], "tiny", [None], parse_sets(["train.epochs=3,-3"], base))] == [
        "epochs=3_tiny", "epochs=-3_tiny"]
    assert label_of({"train.learning_rate": 0.001}) != label_of({"trm.learning_rate": 0.001})
    assert label_of({"train.learning_rate": 0.001}) == "train.learning_rate=0.001"
    assert label_of({"model.hyperlora_init_scale": 0.05}) == "hyperlora_init_scale=0.05"  # one key ends so
    slash, space = (label_of(v) for v in parse_sets(["data.source=a/b,a b"], base))
    assert slash != space and slash.startswith("source=a-b-") and space.startswith("source=a-b-")
    values = ["a/b", "a b", "a-b", "a_b", "-3", "3", "", "..", "a.", [1, 2], "[1,2]", None, "null", 1e-5]
    assert len({label_of({"data.source": v}) for v in values}) == len(values)


def test_a_plan_with_two_experiments_of_one_name_is_refused():
    base = flatten(raw_params())
    with pytest.raises(ExperimentError, match="would both be named epochs=3_tiny"):
        plan([], "tiny", [None], parse_sets(["train.epochs=3,3"], base))
