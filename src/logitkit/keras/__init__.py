"""Keras 3 losses that are exact from logits, on the tensorflow, jax and torch backends.

>>> import keras, logitkit.keras
>>> loss = logitkit.keras.SparseCategoricalCrossentropy(from_logits=True)
>>> isinstance(loss, keras.losses.Loss)
True

Use it as Keras's own: ``model.compile(loss=logitkit.keras.SparseCategoricalCrossentropy())``.
Importing this package imports Keras (and so its backend); ``import logitkit`` does not.
"""

import importlib.util as _util
import sys as _sys

# Triton and TensorFlow each bundle LLVM, and Triton loaded after TensorFlow aborts the process
# ("Option 'bitcode-mdindex-threshold' registered more than once"); torch loads Triton lazily
# (custom ops, torch.compile). Loaded in the other order both work.
if "tensorflow" not in _sys.modules and _util.find_spec("triton") is not None:
    import triton  # noqa: F401

from ._losses import (
    CategoricalCrossentropy,
    SparseCategoricalCrossentropy,
    softmax_cross_entropy,
    sparse_softmax_cross_entropy,
)

__all__ = ["SparseCategoricalCrossentropy", "CategoricalCrossentropy", "sparse_softmax_cross_entropy",
           "softmax_cross_entropy"]
