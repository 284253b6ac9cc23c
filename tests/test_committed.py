"""params.yaml against HEAD's: the keys that differ, the -S arguments that set values, and what a
refused training suggests instead (the CPU scale with the run's own overrides, how to restore)."""

from __future__ import annotations

import shlex

import pytest

from pipeline.experiments import committed
from pipeline.train import preflight
from stages.train import refusal
from tests.helpers import REPO, run


def _repo(tmp_path, text: str):
    (tmp_path / "params.yaml").write_text(text)
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "baseline"]):
        run(cmd, tmp_path)
    return tmp_path / "params.yaml"


def test_changed_values_name_every_differing_key_both_ways():
    old = "a:\n  b: 1\n  c: [x]\nd: null\n"
    new = "a:\n  b: 2\n  c: [x]\ne: true\n"
    assert committed.changed_values(old, new) == {"a.b": (1, 2), "d": (None, "(absent)"), "e": ("(absent)", True)}
    assert committed.changed_values(old, old) == {}
    assert committed.describe_changes({"a.b": (1, 2)}) == "this run differs from HEAD in: a.b (1 -> 2)"
    assert committed.describe_changes({}) == "this run's params.yaml is HEAD's"
    assert "not committed" in committed.describe_changes(None)
    assert committed.differences(old, "a: [") == [
        "(the file is not valid YAML: line 1, column 5: expected the node content, but found '<stream end>')"]


def test_set_args_round_trip_through_yaml_as_single_words():
    import yaml

    values = {"a": False, "b": 0.05, "c": ["color-permutation-inverse-aug", "eval-views-inverse-aug"], "d": None,
              "e": 1e-5, "f": "cpu", "g": []}
    args = committed.set_args(values)
    assert all(" " not in a for a in args)  # `$(python -m pipeline.experiments overrides ...)` splits on spaces
    parsed = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[1::2])}
    assert parsed == values


def test_a_temporary_copy_needs_no_restore_hint(tmp_path):
    path = _repo(tmp_path, "a: 1\n")
    path.write_text("a: 2\n")
    assert "git checkout -- params.yaml" in committed.restore_hint(path)
    workdir = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12"  # DVC's copy: a git repository of its own
    workdir.mkdir(parents=True)
    copy = _repo(workdir, "a: 1\n")
    copy.write_text("a: 2\n")  # the experiment's override, discarded with the copy
    assert committed.in_temporary_copy(copy) and not committed.in_temporary_copy(path)
    assert committed.changes_from_head(copy) == {"a": (1, 2)} and committed.restore_hint(copy) == ""


def _refused() -> str:
    p = preflight.Projection("cpu", 75, 80_000_000, 1 / 0.6, 1e9, 2e10, "measured at 2 and 4 samples")
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(p, max_cpu_hours=12)
    return str(err.value)


def test_a_cpu_refusal_suggests_the_cpu_scale_with_the_runs_own_overrides(tmp_path):
    text = (REPO / "params.yaml").read_text()
    path = _repo(tmp_path, text)
    assert preflight.CPU_RUN in refusal(_refused(), str(path))  # the committed params: stable and fixed
    path.write_text(text.replace("hyperlora_init_scale: 0.1", "hyperlora_init_scale: 0.05")
                    .replace("accept_broken_rules: []", "accept_broken_rules: [a, b]"))
    message = refusal(_refused(), str(path))
    command = message.split("run it at the CPU scale instead (", 1)[1].split("), or raise")[0]
    assert shlex.split(command) == ["python", "-m", "pipeline.experiments", "run", "--scale", "cpu",
                                    "-S", "model.hyperlora_init_scale=0.05", "-S", "validation.accept_broken_rules=[a,b]"]
    assert "model.hyperlora_init_scale: committed 0.1, now 0.05" in message  # what a `dvc exp run -S` left
    assert message.endswith("restore the committed version with: git checkout -- params.yaml")
