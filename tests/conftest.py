"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest

from pipeline.arc import Task
from tests.helpers import tiny_task_set


@pytest.fixture
def tiny_tasks() -> list[Task]:
    return tiny_task_set()
