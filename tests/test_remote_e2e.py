"""End to end: the default DVC remote, a folder beside the repository, pushes and pulls the pipeline's
data, so that a clone can fetch what `dvc.lock` names instead of recomputing it; a fresh clone reads
cleanly."""
from __future__ import annotations

import sys

import pytest

from tests.helpers import TINY, commit_all, copy_repo, run, write_params

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]


def test_push_then_pull_into_a_fresh_clone(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    write_params(repo, **TINY)
    run(DVC + ["repro", "augment"], repo)
    commit_all(repo, "data")
    storage = tmp_path / "rlan-dvc-storage"  # ../../rlan-dvc-storage from repo/.dvc
    assert not storage.exists()
    assert "pushed" in run(DVC + ["push", "--with-deps", "augment"], repo).stdout
    assert any(p.is_file() for p in storage.rglob("*"))
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data" / "cache").exists()
    run(DVC + ["pull", "--with-deps", "augment"], clone)
    for rel in ("data/raw/pairs.parquet", "data/cache/cells.npy", "data/cache/manifest.json"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert "up to date" in run(DVC + ["status", "--with-deps", "augment"], clone).stdout


def test_a_fresh_clone_reads_cleanly(tmp_path):
    """A fresh clone holds no outputs of a run its user cannot fetch (no dvc.lock naming data that is
    nowhere, no metrics of another scale): `dvc exp show` has no unreadable cell (`!`), and DVC's
    read-only commands print no warning. (Metrics exist once something ran: `dvc metrics diff` then
    compares two experiments, e.g. stable_cpu fixed_cpu.)"""
    repo = copy_repo(tmp_path / "clone")
    commit_all(repo, "fresh clone")
    assert not (repo / "dvc.lock").exists() and not list((repo / "metrics").rglob("*.json"))
    for cmd in (["exp", "show", "--no-pager", "--md"], ["params", "diff"], ["status"]):
        out = run(DVC + cmd, repo)
        assert "WARNING" not in out.stderr and "ERROR" not in out.stderr, (cmd, out.stderr)
        assert "failed to load" not in out.stdout + out.stderr and "!" not in out.stdout, (cmd, out.stdout)
