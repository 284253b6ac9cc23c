"""TRM, the Tiny Recursive Model: `layers.py` its network's pieces, `puzzle.py` the puzzle embeddings
and their sign-SGD, `model.py` the recursion and deep supervision; `family.py` is what the training
loop and the evaluator call (pipeline.model.family)."""

from pipeline.model.trm.model import TRM, Carry, Segment

__all__ = ["TRM", "Carry", "Segment"]
