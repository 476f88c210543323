"""logitkit for JAX: optax-compatible softmax cross-entropy losses, lean in both autodiff modes.

``softmax_cross_entropy``, ``softmax_cross_entropy_with_integer_labels`` and
``safe_softmax_cross_entropy`` take optax's arguments and return optax's results (more exactly);
``cross_entropy`` has every logitkit option. The forward of each keeps only per-row statistics
for the backward, which builds the gradient in one fused expression. Forward mode (``jax.jvp``,
``jax.jacfwd``) and every order of either mode work too. float16 / bfloat16 inputs are
accumulated in float32.

>>> import jax, jax.numpy as jnp, logitkit.jax as lj
>>> x = jnp.array([[2.0, 0.5, -1.0]]); y = jnp.array([0])
>>> jax.grad(lambda x: lj.softmax_cross_entropy_with_integer_labels(x, y).sum())(x).shape
(1, 3)
"""

from __future__ import annotations

from typing import Any

from ._losses import (
    cross_entropy,
    safe_softmax_cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

__all__ = [
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "safe_softmax_cross_entropy",
    "cross_entropy",
]


def __getattr__(name: str) -> Any:
    # The fused linear head lives in logitkit/jax/linear.py (a separate module); expose it here
    # once it exists without importing it eagerly.
    if name in ("linear_cross_entropy", "linear_token_logprobs", "linear_entropy", "linear_head"):
        try:
            from . import linear
        except ImportError as exc:
            raise AttributeError(f"module 'logitkit.jax' has no attribute {name!r}") from exc
        return getattr(linear, name)
    raise AttributeError(f"module 'logitkit.jax' has no attribute {name!r}")
