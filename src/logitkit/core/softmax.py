"""Core softmax / log_softmax and their backward rules, against the namespace ``xp``."""

from __future__ import annotations

import math
from typing import Any

from .._namespace import acc_dtype
from .logsumexp import row_stats, transform

__all__ = ["softmax", "log_softmax", "softmax_backward", "log_softmax_backward"]


def softmax(xp: Any, x: Any, axis: int = -1, where: Any = None, temperature: float = 1.0) -> Any:
    """``exp(z - m) / Σ exp(z - m)`` with ``z = x / temperature``; masked entries and all-masked rows give 0."""
    z = transform(xp, xp.astype(x, acc_dtype(xp, x.dtype)), None, temperature)
    _, r, e = row_stats(xp, z, axis, where)
    return xp.astype(e / xp.exp(r), x.dtype)


def log_softmax(xp: Any, x: Any, axis: int = -1, where: Any = None, temperature: float = 1.0) -> Any:
    """``(z - m) - r``; masked entries and all-masked rows give ``-inf``."""
    z = transform(xp, xp.astype(x, acc_dtype(xp, x.dtype)), None, temperature)
    m, r, _ = row_stats(xp, z, axis, where)
    out = xp.where(m == -math.inf, -math.inf, (z - m) - r)
    if where is not None:
        out = xp.where(where, out, -math.inf)
    return xp.astype(out, x.dtype)


def softmax_backward(xp: Any, y: Any, dy: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of softmax: ``y * (dy - Σ y·dy)`` (``y`` the forward output)."""
    acc = acc_dtype(xp, y.dtype)
    ya, dya = xp.astype(y, acc), xp.astype(dy, acc)
    return xp.astype(ya * (dya - xp.sum(ya * dya, axis=axis, keepdims=True)), y.dtype)


def log_softmax_backward(xp: Any, y: Any, dy: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of log_softmax: ``dy - exp(y) * Σ dy`` (``y`` the forward output)."""
    acc = acc_dtype(xp, y.dtype)
    ya, dya = xp.astype(y, acc), xp.astype(dy, acc)
    return xp.astype(dya - xp.exp(ya) * xp.sum(dya, axis=axis, keepdims=True), y.dtype)
