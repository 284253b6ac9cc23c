"""The model families, one folder each, and the parts they share.

    pipeline/model/family.py   the interface the training loop and the evaluator call, and the registry
    pipeline/model/rlan/       RLAN: context encoder, DSC, MSRE, HyperLoRA, recursive solver
    pipeline/model/trm/        TRM: the tiny recursive network, puzzle embeddings, deep supervision
    pipeline/model/stablemax.py, io.py   shared: probabilities (stablemax), model files
      (the averaged weights are torch's AveragedModel, built by the training loop)

The canvas both families read and write is `pipeline.canvas` (TRM's tokens: PAD 0, EOS 1, colour c as c + 2).
"""

from pipeline.model.rlan import RLAN, Output, TaskContext

__all__ = ["RLAN", "Output", "TaskContext"]
