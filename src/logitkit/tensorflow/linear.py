"""The fused linear head (``linear_cross_entropy``, ``linear_entropy``, ``linear_head``) on TensorFlow.

Not built yet: each entry point refuses TensorFlow tensors with a ``TypeError`` that says what to
do instead, rather than materializing the ``(N, V)`` logits behind the caller's back.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fused_linear_cross_entropy", "fused_linear_entropy", "fused_linear_head"]

_MESSAGE = ("hidden: the fused linear head does not take TensorFlow tensors yet; compute "
            "logits = tf.matmul(hidden, linear_weight, transpose_b=True) (+ linear_bias) and call "
            "logitkit.cross_entropy / logitkit.entropy on them")


def fused_linear_cross_entropy(*args: Any, **kwargs: Any) -> Any:
    raise TypeError(_MESSAGE)


def fused_linear_entropy(*args: Any, **kwargs: Any) -> Any:
    raise TypeError(_MESSAGE)


def fused_linear_head(*args: Any, **kwargs: Any) -> Any:
    raise TypeError(_MESSAGE)
