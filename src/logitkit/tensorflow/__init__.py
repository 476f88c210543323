"""TensorFlow support: every top-level logitkit function accepts ``tf.Tensor`` and ``tf.Variable``.

There is nothing to call here: ``logitkit.cross_entropy(logits, labels)`` on TensorFlow tensors
returns a ``tf.Tensor``, differentiable with ``tf.GradientTape``, in eager mode, inside
``tf.function`` and with ``jit_compile=True``. ``logitkit.softmax_cross_entropy_with_logits`` and
``logitkit.sparse_softmax_cross_entropy_with_logits`` follow ``tf.nn``'s semantics on TensorFlow
tensors. Importing this package imports TensorFlow; ``import logitkit`` does not.
"""

import importlib.util as _util
import sys as _sys

# Triton and TensorFlow each bundle LLVM, and Triton loaded after TensorFlow aborts the process
# ("Option 'bitcode-mdindex-threshold' registered more than once"); torch loads Triton lazily
# (custom ops, torch.compile). Loaded in the other order both work.
if "tensorflow" not in _sys.modules and _util.find_spec("triton") is not None:
    import triton  # noqa: F401

import tensorflow as _tf  # noqa: F401  (so that this package's import fails clearly without it)

from ._bridge import in_xla_context

__all__ = ["in_xla_context"]
