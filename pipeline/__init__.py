"""RLAN experiment pipeline: the library behind the DVC stages in `stages/`.

Kept import-light on purpose: the data stages import only numpy/pandas, not torch.
"""

__version__ = "0.1.0"
