"""The RLAN model, one module per part; `pipeline.model.io` saves and loads it."""

from pipeline.model.rlan import RLAN, Output, TaskContext

__all__ = ["RLAN", "Output", "TaskContext"]
