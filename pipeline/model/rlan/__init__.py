"""RLAN, one module per part (`model.py` puts them together); `family.py` is what the training
loop and the evaluator call (pipeline.model.family)."""

from pipeline.model.rlan.model import RLAN, Output, TaskContext

__all__ = ["RLAN", "Output", "TaskContext"]
