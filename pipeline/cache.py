"""The augmentation cache: `samples_per_task` augmented versions of every task, built in whole
arrays and stored as a few memory-mappable files.

A version applies one dihedral transform and one colour map (0 fixed) to every pair of the task,
and places each pair at its own offset inside the 30x30 canvas (input and output share it).
Version 0 is the identity. Versions of a task are distinct where the task allows it: two
candidates with equal augmented grids (sizes included) are duplicates and are redrawn, up to
`max_tries_factor x samples_per_task` candidates; a task with fewer distinct versions repeats them
in order and is reported as a shortfall. Equality is decided exactly, without hashing: by the key
(dihedral id, colour map on the task's colours), which determines the grids, and byte for byte for
the tasks with a symmetry, where different keys can give the same grids (`choose_versions`).

Training tasks contribute all their pairs; evaluation tasks their demonstrations only. The build
checks that no test output of an evaluation task is in the cache and that every stored version
maps back to its task's grids through its recorded augmentation.

Layout of the cache directory:

- `cells.npy`: uint8, the augmented cells of all samples, two cells per byte (first cell in the
  high nibble). Sample s occupies bytes `[cell_start // 2, (cell_start + n_cells + 1) // 2)`; a
  task with an odd cell count is padded with one zero cell per sample so samples start on a byte.
- `samples.parquet`: one row per sample (the index): task_id, split, version, dihedral,
  color_map (10 digits, digit c = new colour of c), name (`task|||t{d}|||{color_map}`), repeat
  (true when the task had too few distinct versions), cell_start, n_cells, pair_start, n_demo, n_test.
- `pairs.parquet`: one row per pair of each sample, demonstrations first: sample, is_test,
  input_h, input_w, output_h, output_w (after the dihedral transform), row_offset, col_offset,
  cell_start (input cells, then output cells, in `cells.npy`'s cell numbering).
- `manifest.json`: the parameters, counts, sizes and shortfalls, and the size and digest of each
  other file (`files`, see pipeline.integrity): every reader checks them before use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.arc import Task, task_key
from pipeline.augment import (
    NUM_DIHEDRAL,
    dihedral_index,
    dihedral_shape,
    inverse_grid,
    parse_name,
    random_cmaps,
)
from pipeline.canvas import CANVAS, ranges
from pipeline.integrity import IntegrityError, describe_all, read_manifest, verify
from pipeline.io import atomic_path, ensure_room, reserve, write_json
from pipeline.params import AugmentParams

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the manifest records each file's size and digest
CELLS_FILE, SAMPLES_FILE, PAIRS_FILE, MANIFEST_FILE = "cells.npy", "samples.parquet", "pairs.parquet", "manifest.json"


class LeakError(RuntimeError):
    """An evaluation task's test output would enter the training cache."""


class CacheIntegrityError(RuntimeError):
    """A stored version does not map back to its task through its recorded augmentation."""


def repair_hint(path: Path) -> str:
    return f"restore it with `dvc checkout --force {path}` or rebuild it with `dvc repro -f -s augment`"


@dataclass
class TaskPlan:
    """What one task contributes: its pairs, their cells laid end to end, and the 8 dihedral forms."""

    task: Task
    grids: list[tuple[np.ndarray, np.ndarray]]  # included pairs, demonstrations first
    is_test: np.ndarray  # (P,) bool
    cells: np.ndarray  # (C,) original cells, input then output of each pair
    gather: np.ndarray  # (8, C) gather[d] permutes `cells` into dihedral form d
    shapes: np.ndarray  # (8, P, 4) in_h, in_w, out_h, out_w under each transform
    shape_class: np.ndarray  # (8,) transforms with equal shapes share a class

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    @property
    def n_cells_padded(self) -> int:
        return self.n_cells + (self.n_cells & 1)


def plan_task(task: Task) -> TaskPlan:
    grids = list(task.demos) + (list(task.tests) if task.split == "train" else [])
    is_test = np.array([False] * len(task.demos) + [True] * (len(grids) - len(task.demos)))
    flat = [g.ravel() for pair in grids for g in pair]
    cells = np.concatenate(flat)
    starts = np.cumsum([0] + [len(f) for f in flat[:-1]])
    gather = np.empty((NUM_DIHEDRAL, len(cells)), np.int64)
    shapes = np.empty((NUM_DIHEDRAL, len(grids), 4), np.uint8)
    for d in range(NUM_DIHEDRAL):
        for g, (grid, start) in enumerate(zip([g for pair in grids for g in pair], starts)):
            h, w = grid.shape
            gather[d, start : start + h * w] = start + dihedral_index(h, w, d)
            shapes[d, g // 2, 2 * (g % 2) : 2 * (g % 2) + 2] = dihedral_shape(h, w, d)
    _, shape_class = np.unique(shapes.reshape(NUM_DIHEDRAL, -1), axis=0, return_inverse=True)
    return TaskPlan(task, grids, is_test, cells, gather, shapes, shape_class.ravel().astype(np.uint8))


def check_no_leak(plan: TaskPlan) -> None:
    """An evaluation task's included grids must not contain one of its test outputs, unless that
    output is also one of its demonstration grids (then it is public, not a leak)."""
    task = plan.task
    if task.split != "eval":
        return
    def key(g: np.ndarray) -> bytes:
        return bytes(g.shape) + g.tobytes()
    demo_grids = {key(g) for pair in task.demos for g in pair}
    included = {key(g) for pair in plan.grids for g in pair}
    for i, (_, out) in enumerate(task.tests):
        if key(out) in included and key(out) not in demo_grids:
            raise LeakError(f"task {task.id}: test pair {i} output would be in the training cache")


def _materialize(plan: TaskPlan, dih: np.ndarray, cmaps: np.ndarray) -> np.ndarray:
    """(n, C) augmented cells of n versions, grouped by dihedral id (one gather per group)."""
    forms = plan.cells[plan.gather]  # (8, C) the task's cells in each dihedral form
    rows = np.empty((len(dih), plan.n_cells), np.uint8)
    for d in np.unique(dih):
        idx = np.flatnonzero(dih == d)
        rows[idx] = cmaps[idx][:, forms[d]]
    return rows


def _first_distinct(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row of `keys`, in row order."""
    void = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    _, first = np.unique(void, return_index=True)
    return np.sort(first)


def _task_rng(seed: int, task_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, task_key(task_id)])


class CacheReader:
    """A cache directory with its cells memory-mapped; numpy only (tensor batches: pipeline.loader).
    Opening it checks every file against the sizes and digests of its manifest (IntegrityError)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        missing = [f for f in (CELLS_FILE, SAMPLES_FILE, PAIRS_FILE, MANIFEST_FILE) if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: not an augmentation cache (missing {', '.join(missing)}); "
                                    f"{repair_hint(path)}")
        self.path = path
        self.manifest = read_manifest(path / MANIFEST_FILE, repair_hint(path))
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise IntegrityError(f"{path}: cache format {self.manifest.get('format_version')}, this code reads "
                                 f"{FORMAT_VERSION}; rebuild it with `dvc repro -f -s augment`")
        verify(path, self.manifest.get("files"), repair_hint(path))
        self.cells = np.load(path / CELLS_FILE, mmap_mode="r")
        self.samples = pd.read_parquet(path / SAMPLES_FILE)
        pairs = pd.read_parquet(path / PAIRS_FILE)
        self.pair_start = self.samples["pair_start"].to_numpy(np.int64)
        self.n_demo = self.samples["n_demo"].to_numpy(np.int64)
        self.n_test = self.samples["n_test"].to_numpy(np.int64)
        self.hw = pairs[["input_h", "input_w", "output_h", "output_w"]].to_numpy(np.int64)
        self.offset = pairs[["row_offset", "col_offset"]].to_numpy(np.int64)
        self.cell_start = pairs["cell_start"].to_numpy(np.int64)
        self.is_test = pairs["is_test"].to_numpy(bool)

    def __len__(self) -> int:
        return len(self.samples)

    def ids_of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.samples["split"].to_numpy() == split)

    def read_cells(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Cells of the given runs, laid end to end (unpacked from two per byte)."""
        idx = np.repeat(np.asarray(starts, np.int64), lengths) + ranges(lengths)
        b = self.cells[idx >> 1]
        return (b >> ((~idx & 1) << 2).astype(np.uint8)) & 15

    def pairs(self, sample: int) -> list[dict[str, Any]]:
        """The augmented pairs of one sample, unplaced: [{is_test, input, output, offset}, ...]."""
        first = self.pair_start[sample]
        out = []
        for p in range(first, first + self.n_demo[sample] + self.n_test[sample]):
            ih, iw, oh, ow = self.hw[p]
            cells = self.read_cells(self.cell_start[p : p + 1], np.array([ih * iw + oh * ow]))
            out.append({
                "is_test": bool(self.is_test[p]),
                "input": cells[: ih * iw].reshape(ih, iw),
                "output": cells[ih * iw :].reshape(oh, ow),
                "offset": (int(self.offset[p, 0]), int(self.offset[p, 1])),
            })
        return out


def _has_symmetry(plan: TaskPlan) -> bool:
    """Whether some transform d != identity maps the task onto a recolouring of itself (sizes
    included). Only then can two versions with different dihedral ids have equal grids."""
    for d in range(1, NUM_DIHEDRAL):
        if plan.shape_class[d] != plan.shape_class[0]:
            continue
        pairs = np.unique(plan.cells.astype(np.int64) * 16 + plan.cells[plan.gather[d]])
        src, dst = pairs // 16, pairs % 16
        if len(np.unique(src)) == len(pairs) == len(np.unique(dst)) and np.all((src == 0) == (dst == 0)):
            return True
    return False


def choose_versions(plan: TaskPlan, p: AugmentParams) -> dict[str, np.ndarray]:
    """Dihedral ids, colour maps, offsets and cells of the task's versions; version 0 is the identity.

    Candidates are drawn in rounds; a candidate is kept if its grids differ from every version kept
    so far. Two versions with the same dihedral id have equal grids exactly when their colour maps
    agree on the task's colours, so candidates are first compared by that key, without building
    them. For a task with a symmetry (see `_has_symmetry`) the built grids are also compared byte
    for byte, grid sizes included.
    """
    want = p.samples_per_task
    rng = _task_rng(p.seed, plan.task.id)
    used = np.unique(plan.cells)
    symmetric = _has_symmetry(plan)
    dih = np.zeros(0, np.int64)
    cmaps = np.zeros((0, 10), np.uint8)
    rows = np.zeros((0, plan.n_cells), np.uint8)
    seen = np.zeros((0, 1 + len(used)), np.uint8)  # keys of every candidate built or kept
    budget, drawn = want * p.max_tries_factor, 0
    while len(dih) < want and drawn < budget:
        n = min(want if drawn == 0 else 2 * (want - len(dih)) + 16, budget - drawn)
        d_new = rng.integers(0, NUM_DIHEDRAL, n) if p.dihedral else np.zeros(n, np.int64)
        c_new = random_cmaps(rng, n, p.color_permutation_prob)
        if drawn == 0:
            d_new[0], c_new[0] = 0, np.arange(10)
        drawn += n
        keys = np.concatenate([seen, np.concatenate([d_new[:, None].astype(np.uint8), c_new[:, used]], 1)])
        fresh = _first_distinct(keys)
        fresh = fresh[fresh >= len(seen)]
        d_new, c_new = d_new[fresh - len(seen)], c_new[fresh - len(seen)]
        seen = keys[np.concatenate([np.arange(len(seen)), fresh])]
        if symmetric:
            all_rows = np.concatenate([rows, _materialize(plan, d_new, c_new)])
            all_d = np.concatenate([dih, d_new])
            keep = _first_distinct(np.concatenate([plan.shape_class[all_d][:, None], all_rows], axis=1))[:want]
            dih, cmaps, rows = all_d[keep], np.concatenate([cmaps, c_new])[keep], all_rows[keep]
        else:
            dih, cmaps = np.concatenate([dih, d_new])[:want], np.concatenate([cmaps, c_new])[:want]
    if not symmetric:
        rows = _materialize(plan, dih, cmaps)
    distinct = len(dih)
    if distinct < want:  # too few distinct versions: repeat them in order
        reps = np.resize(np.arange(distinct), want)
        dih, cmaps, rows = dih[reps], cmaps[reps], rows[reps]
    offsets = np.zeros((want, len(plan.grids), 2), np.uint8)
    if p.translation:
        shp = plan.shapes[dih].astype(np.int64)  # (want, P, 4)
        room = CANVAS - np.stack([np.maximum(shp[..., 0], shp[..., 2]), np.maximum(shp[..., 1], shp[..., 3])], -1)
        offsets[:] = np.floor(rng.random(room.shape) * (room + 1)).astype(np.uint8)
        offsets[0] = 0  # version 0 is the untouched task
    return {"dihedral": dih, "cmaps": cmaps, "offsets": offsets, "rows": rows,
            "repeat": np.arange(want) >= distinct, "distinct": distinct}


def pack(rows: np.ndarray) -> np.ndarray:
    """(n, C) cells 0..15 -> (n, ceil(C / 2)) bytes, the first cell of each byte in the high nibble."""
    if rows.shape[1] & 1:
        rows = np.concatenate([rows, np.zeros((len(rows), 1), np.uint8)], axis=1)
    return (rows[:, 0::2] << 4) | rows[:, 1::2]


def build_cache(tasks: list[Task], p: AugmentParams, out_dir: str | Path) -> dict[str, Any]:
    """Build the cache directory atomically; returns the manifest."""
    plans = [plan_task(t) for t in tasks]
    for plan in plans:
        check_no_leak(plan)
    want = p.samples_per_task
    sample_bytes = np.array([pl.n_cells_padded // 2 for pl in plans], np.int64) * want
    byte_base = np.concatenate([[0], np.cumsum(sample_bytes)])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ensure_room(tmp / CELLS_FILE, int(byte_base[-1]))
        cells = np.lib.format.open_memmap(tmp / CELLS_FILE, mode="w+", dtype=np.uint8, shape=(int(byte_base[-1]),))
        reserve(tmp / CELLS_FILE)  # a full disk then fails here, in one line, not with SIGBUS in the mapped writes
        per_task = []
        for t, plan in enumerate(tqdm(plans, desc="augment", unit="task", mininterval=1.0)):
            v = choose_versions(plan, p)
            cells[byte_base[t] : byte_base[t + 1]] = pack(v.pop("rows")).ravel()
            per_task.append(v)
        cells.flush()
        del cells
        samples, pairs = _index_tables(plans, per_task, byte_base, want)
        samples.to_parquet(tmp / SAMPLES_FILE, index=False, compression="zstd")
        pairs.to_parquet(tmp / PAIRS_FILE, index=False, compression="zstd")
        manifest = _manifest(plans, per_task, p, samples, pairs, int(byte_base[-1]))
        manifest["files"] = describe_all(tmp, (CELLS_FILE, SAMPLES_FILE, PAIRS_FILE))
        write_json(tmp / MANIFEST_FILE, manifest)
        verify_cache(CacheReader(tmp), plans)
    return manifest


def verify_cache(reader: CacheReader, plans: list[TaskPlan]) -> None:
    """Read the first and last version of every task back from the written files and map them back
    through their recorded augmentation: they must give the task's own grids (for an evaluation
    task its demonstrations, so never a test output)."""
    want = len(reader) // max(len(plans), 1)
    names = reader.samples["name"].to_numpy()
    for t, plan in enumerate(plans):
        for s in sorted({t * want, (t + 1) * want - 1}):
            task_id, d, cmap = parse_name(str(names[s]))
            if task_id != plan.task.id:
                raise CacheIntegrityError(f"sample {s}: task {task_id}, expected {plan.task.id}")
            for k, (pair, (gin, gout)) in enumerate(zip(reader.pairs(s), plan.grids, strict=True)):
                if not (np.array_equal(inverse_grid(pair["input"], d, cmap), gin)
                        and np.array_equal(inverse_grid(pair["output"], d, cmap), gout)):
                    raise CacheIntegrityError(f"sample {s} ({names[s]}): pair {k} does not map back to its task")


def _index_tables(plans, per_task, byte_base, want) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_pairs = np.array([len(pl.grids) for pl in plans])
    n_test = np.array([int(pl.is_test.sum()) for pl in plans])
    task_of_sample = np.repeat(np.arange(len(plans)), want)
    dih = np.concatenate([v["dihedral"] for v in per_task]).astype(np.int8)
    cmaps = np.concatenate([v["cmaps"] for v in per_task])
    cell_start = (byte_base[:-1, None] * 2 + np.arange(want)[None, :] * np.array(
        [pl.n_cells_padded for pl in plans])[:, None]).ravel()
    pair_start = np.concatenate([[0], np.cumsum(np.repeat(n_pairs, want))[:-1]])
    task_ids = pd.Series([pl.task.id for pl in plans], dtype="string")[task_of_sample].reset_index(drop=True)
    cmap_str = pd.Series((cmaps + ord("0")).view("S10").ravel().astype("U10"), dtype="string")
    dih_str = pd.Series(dih).astype("string")
    samples = pd.DataFrame({
        "task_id": task_ids,
        "split": pd.Series([pl.task.split for pl in plans], dtype="string")[task_of_sample].reset_index(drop=True),
        "version": np.tile(np.arange(want, dtype=np.int32), len(plans)),
        "dihedral": dih,
        "color_map": cmap_str,
        "name": task_ids + "|||t" + dih_str + "|||" + cmap_str,
        "repeat": np.concatenate([v["repeat"] for v in per_task]),
        "cell_start": cell_start.astype(np.int64),
        "n_cells": np.repeat([pl.n_cells for pl in plans], want).astype(np.int32),
        "pair_start": pair_start.astype(np.int64),
        "n_demo": np.repeat(n_pairs - n_test, want).astype(np.int8),
        "n_test": np.repeat(n_test, want).astype(np.int8),
    })
    # pairs: per task, (want, P) blocks flattened sample-major
    blocks = []
    for t, (pl, v) in enumerate(zip(plans, per_task)):
        P = len(pl.grids)
        shp = pl.shapes[v["dihedral"]]  # (want, P, 4)
        sizes = pl.shapes[0, :, 0].astype(np.int64) * pl.shapes[0, :, 1] + pl.shapes[0, :, 2].astype(np.int64) * pl.shapes[0, :, 3]
        rel = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        starts = cell_start[t * want : (t + 1) * want, None] + rel[None, :]
        blocks.append({
            "sample": np.repeat(np.arange(t * want, (t + 1) * want), P),
            "is_test": np.tile(pl.is_test, want),
            "input_h": shp[..., 0].ravel(), "input_w": shp[..., 1].ravel(),
            "output_h": shp[..., 2].ravel(), "output_w": shp[..., 3].ravel(),
            "row_offset": v["offsets"][..., 0].ravel(), "col_offset": v["offsets"][..., 1].ravel(),
            "cell_start": starts.ravel(),
        })
    pairs = pd.DataFrame({k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]})
    return samples, pairs.astype({"sample": np.int32, "cell_start": np.int64})


def _manifest(plans, per_task, p: AugmentParams, samples, pairs, n_bytes: int) -> dict[str, Any]:
    shortfall = [{"task_id": pl.task.id, "distinct_versions": int(v["distinct"])}
                 for pl, v in zip(plans, per_task) if v["distinct"] < p.samples_per_task]
    return {
        "format_version": FORMAT_VERSION,
        "params": p.model_dump(),
        "tasks": {"train": sum(pl.task.split == "train" for pl in plans),
                  "eval": sum(pl.task.split == "eval" for pl in plans)},
        "samples": len(samples),
        "pairs": len(pairs),
        "cells_bytes": n_bytes,
        "repeated_samples": int(samples["repeat"].sum()),
        "shortfall_tasks": shortfall,
    }
