"""The JAX bridge of :mod:`logitkit.functional`: top-level functions on JAX arrays come here.

``functional`` has already validated every argument and moved the class axis last for
``cross_entropy``. This module only picks the custom-JVP row function and reduces with the shared
core reductions, so the loss maths lives in one place and autodiff never sees an ``N×V`` softmax.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .._namespace import acc_dtype
from ..core.reduction import reduce_loss, row_weights
from . import _rows

__all__ = ["cross_entropy", "softmax", "log_softmax"]


def cross_entropy(x: Any, y: Any, *, kind: str, ignore_index: int, reduction: str, z_loss: float,
                  weight: Any, label_smoothing: float, softcap: float | None,
                  temperature: float) -> Any:
    """Reduced cross-entropy of ``x`` (class axis last) in ``x``'s dtype.

    ``kind="index"``: ``y`` integer class indices of ``x.shape[:-1]``; ``kind="prob"``: ``y``
    floating probabilities of ``x.shape``. Gradients flow to ``x``, ``weight`` and, for
    probabilities, ``y``.
    """
    acc = acc_dtype(jnp, x.dtype)
    if kind == "index":
        opts = _rows.Options(ignore_index, float(label_smoothing), softcap, float(temperature))
        ce, lse = _rows.index_rows(x, y, weight, None, opts=opts)
        validf, wy = row_weights(jnp, y, weight, ignore_index, acc)
    elif kind == "prob":
        opts = _rows.Options(None, float(label_smoothing), softcap, float(temperature))
        ce, lse = _rows.prob_rows(x, y, weight, None, opts=opts)
        validf = wy = jnp.ones(ce.shape, acc)
    else:
        raise ValueError(f"kind: expected 'index' or 'prob', got {kind!r}")
    loss = reduce_loss(jnp, ce, lse, validf, wy, reduction, float(z_loss))
    return loss.astype(x.dtype)


def softmax(x: Any, axis: int, *, where: Any = None, temperature: float = 1.0) -> Any:
    """Softmax along ``axis`` (not moved); its reverse mode saves only the output."""
    return _rows.softmax(x, axis, where=where, temperature=temperature)


def log_softmax(x: Any, axis: int, *, where: Any = None, temperature: float = 1.0) -> Any:
    """Log-softmax along ``axis`` (not moved); its reverse mode saves only the output."""
    return _rows.log_softmax(x, axis, where=where, temperature=temperature)
