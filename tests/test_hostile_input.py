"""Hostile input: params.yaml with an alias bomb, a repeated key, a huge value or bytes that are not
UTF-8, and task files that are too large or nested too deeply. Each ends in one line naming the file
and the problem, in bounded time and memory, at every entry point that reads it."""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import pytest

from pipeline.experiments import committed
from pipeline.params import (
    MAX_PARAMS_BYTES,
    ParamsError,
    load_params,
    parse_params,
    parse_yaml,
)
from pipeline.rules import check_rules
from tests.helpers import REPO, raw_params, set_key, tool_env

# A 9-level alias bomb, as the probe put it into validation.accept_broken_rules: 9^9 = 387M strings.
BOMB = "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))
BOMB_PARAMS = (REPO / "params.yaml").read_text().replace(
    "  accept_broken_rules: []", "  accept_broken_rules:\n  - &l0 fixed-constant-temperature\n" + BOMB.rstrip("\n"))


def stage(args: list[str], memory_gb: float = 2.0, timeout: int = 120) -> subprocess.CompletedProcess:
    """A stage (`python -m stages.X ...`) in a process whose memory is capped, so that a loader that
    expands aliases fails fast here instead of filling the machine."""
    cap = int(memory_gb * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=tool_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def stage_commands(params, tmp_path) -> dict[str, list[str]]:
    """Every stage, run directly (as on the second node of a multi-node run), reading `params`; its other
    arguments name paths that need not exist: the params are read first."""
    out = tmp_path / "out"
    common = ["--params", str(params)]
    return {
        "validate_params": ["stages.validate_params", *common, "--metrics", str(out / "v.json"), "--report",
                            str(out / "v.md"), "--stamp", str(out / "ok")],
        "prepare": ["stages.prepare", *common, "--out", str(out / "raw"), "--metrics", str(out / "p.json")],
        "augment": ["stages.augment", *common, "--raw", str(out / "raw"), "--out", str(out / "cache"), "--metrics",
                    str(out / "a.json")],
        "train": ["stages.train", *common, "--cache", str(out / "cache"), "--raw", str(out / "raw"), "--checkpoints",
                  str(out / "ckpt"), "--model", str(out / "m.pt"), "--metrics", str(out / "t.json"), "--plots",
                  str(out / "plots")],
        "evaluate": ["stages.evaluate", *common, "--model", str(out / "m.pt"), "--raw", str(out / "raw"), "--cache",
                     str(out / "cache"), "--metrics",
                     str(out / "e.json"), "--tasks-table", str(out / "t.csv"), "--submission", str(out / "s.json"),
                     "--candidates", str(out / "c.json")],
        "gap_report": ["stages.gap_report", *common, "--eval-metrics", str(out / "e.json"), "--candidates",
                       str(out / "c.json"), "--train-metrics", str(out / "t.json"), "--series", str(out / "s.tsv"),
                       "--raw", str(out / "raw"), "--model", str(out / "m.pt"), "--metrics", str(out / "g.json"),
                       "--summary", str(out / "summary.json"), "--report", str(out / "report")],
    }


# --- the loader ------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_at_the_first_alias_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "params.yaml"
    path.write_text(BOMB_PARAMS)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ParamsError) as err:
        load_params(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 20e6  # was 3.1 GB and 32 s
    [problem] = err.value.problems
    line = next(i for i, text in enumerate(BOMB_PARAMS.splitlines()) if text.startswith("  - &l1")) + 1
    assert f"line {line}, column 10: an alias (*name): aliases are not allowed" in problem
    assert len(str(err.value)) < 300


def test_a_repeated_key_is_refused_naming_both_lines(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  seed: 42\n  device: auto", "  seed: 42\n  seed: 7\n  device: auto")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    [problem] = err.value.problems
    first = text.splitlines().index("  seed: 42", 40) + 1  # train.seed, not augment.seed
    assert f"line {first + 1}" in problem and f"key 'seed' appears twice in one mapping (first on line {first}" in problem


def test_long_values_are_cut_in_messages():
    huge = "x" * 500_000
    with pytest.raises(ParamsError) as err:
        parse_params(set_key(raw_params(), "data.source", huge))
    line = next(p for p in err.value.problems if p.startswith("data.source"))
    assert len(line) < 300 and "... (500,002 characters)" in line
    with pytest.raises(ParamsError) as err:
        parse_params({**raw_params(), "k" * 100_000: 1})
    assert len(str(err.value)) < 1000
    rules = check_rules(parse_params(set_key(raw_params(), "validation.accept_broken_rules", [huge])))
    assert max(len(str(v)) for v in rules) < 1000 and any("(500,000 characters)" in str(v) for v in rules)


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("source: arc-agi-1", f"source: {'x' * 10_000_000}"))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert f"more than the {MAX_PARAMS_BYTES:,} a params file may have" in str(err.value)
    assert len(str(err.value)) < 300


def test_not_utf8_is_named_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((REPO / "params.yaml").read_bytes().replace(b"arc-agi-1", b"arc-agi-\xe9"))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    offset = (REPO / "params.yaml").read_bytes().index(b"arc-agi-1") + len("arc-agi-")
    assert err.value.problems == [f"not UTF-8 text (byte 0xe9 at offset {offset}); save it as UTF-8"]


def test_the_runner_and_the_restore_hint_read_params_with_the_same_loader():
    """The runner compares the workspace's params.yaml with HEAD's (pipeline.experiments.committed) before it restores it."""
    good = (REPO / "params.yaml").read_text()
    bomb = committed.differences(good, BOMB_PARAMS)
    assert len(bomb) == 1 and "aliases are not allowed" in bomb[0]
    twice = committed.differences(good, good.replace("  seed: 42\n  device: auto", "  seed: 42\n  seed: 7\n  device: auto"))
    assert len(twice) == 1 and "appears twice" in twice[0]
    assert parse_yaml("a: 1\nb: [1, 2]\n") == {"a": 1, "b": [1, 2]}


# --- every stage, run directly -------------------------------------------------------------------------


@pytest.mark.slow
def test_every_stage_refuses_a_repeated_key_and_a_file_not_utf8_in_one_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text((REPO / "params.yaml").read_text().replace("  seed: 42\n  device: auto",
                                                               "  seed: 42\n  seed: 7\n  device: auto"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes((REPO / "params.yaml").read_bytes().replace(b"arc-agi-1", b"arc-agi-\xe9"))
    for name, cmd in stage_commands(twice, tmp_path).items():
        assert "key 'seed' appears twice" in one_error_line(stage(cmd)), name
    for name, cmd in stage_commands(latin, tmp_path).items():
        assert "not UTF-8 text (byte 0xe9" in one_error_line(stage(cmd)), name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v.json", "v.md"]  # validate_params' report


@pytest.mark.slow
def test_validate_params_refuses_an_alias_bomb_in_seconds(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(BOMB_PARAMS)
    t0 = time.perf_counter()
    proc = stage(stage_commands(path, tmp_path)["validate_params"])
    line = one_error_line(proc)
    assert "aliases are not allowed" in line and time.perf_counter() - t0 < 60
    assert len(proc.stderr) < 5000  # was 312 MB of error text


# --- prepare: a user's task files ----------------------------------------------------------------------


def _prepare(tmp_path, source, **params):
    text = (REPO / "params.yaml").read_text()
    for key, value in params.items():
        text = text.replace(f"  {key}: ", f"  {key}: {value}  # ", 1)
    (tmp_path / "params.yaml").write_text(text)
    return stage(["stages.prepare", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw"),
                  "--metrics", str(tmp_path / "prepare.json"), "--input", str(source)], memory_gb=1.0)


@pytest.mark.slow
def test_prepare_refuses_input_over_the_configured_size(tmp_path):
    task = '{"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]], "output": [[2]]}]}'
    source = tmp_path / "tasks.json"
    source.write_text('{"train": {' + ", ".join(f'"t{i:06d}": {task}' for i in range(14_000)) + "}}")  # 1.3 MB
    line = one_error_line(_prepare(tmp_path, source, max_input_mb=1))
    assert f"bad ARC input: {source}: {source.stat().st_size:,} bytes of JSON, more than the 1,048,576" in line
    assert not (tmp_path / "raw").exists()
    proc = _prepare(tmp_path, source, max_input_mb=2)  # the same file under a larger limit
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_prepare_refuses_deeply_nested_json_in_one_line(tmp_path):
    source = tmp_path / "tasks.json"
    source.write_text('{"train": ' + "[" * 200_000 + "]" * 200_000 + "}")
    line = one_error_line(_prepare(tmp_path, source))
    assert f"bad ARC input: {source}: JSON nested too deeply to parse" in line
