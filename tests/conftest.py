"""Fixtures shared by the tests."""

from __future__ import annotations

import os

import pytest

from pipeline.arc import Task
from tests.helpers import tiny_task_set

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the 2 cores of CI: each worker, and the DVC, stage and training
    # processes it starts, keeps to one thread instead of each taking every core.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_tasks() -> list[Task]:
    return tiny_task_set()


@pytest.fixture(autouse=True)
def _tracking_uri_not_leaked():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which every later test's DVC and stage
    processes would inherit: whatever a test sets is put back after it."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != env:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


# The modules that take longest, first: `make test`'s workers take whole modules in collection order,
# so a long module collected last would run alone at the end (measured: 400 s for the queue test).
LONG_FIRST = ("test_docs_commands.py", "test_queue_e2e.py", "test_make_run_e2e.py", "test_experiments_e2e.py",
              "test_pipeline_e2e.py", "test_lineage_e2e.py", "test_trm_e2e.py", "test_gpu_check.py",
              "test_store_faults.py", "test_distributed.py", "test_tracking.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest as collected
