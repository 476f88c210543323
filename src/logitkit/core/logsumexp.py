"""Row statistics shared by every function: the max ``m`` and ``r = log Σ exp(z - m)``.

``lse = m + r`` is kept as two numbers because the pair is more accurate than their sum: a
cross-entropy ``lse - z_y`` becomes ``(m - z_y) + r`` (the first term exact for close values,
the second tiny for confident rows), and a softmax ``exp((z - m) - r)`` never sees an offset
like 1e4 rounded into ``lse``.
"""

from __future__ import annotations

import math
from typing import Any

from .._namespace import acc_dtype

__all__ = ["transform", "transform_grad_factor", "row_stats", "logsumexp", "quiet"]


def quiet(fn: Any) -> Any:
    """Run ``fn`` with NumPy's floating-point warnings off.

    The core computes ``-inf - (-inf)``, ``0 * inf`` and the like on masked or non-finite rows and
    then discards those values with ``where``; the warnings NumPy would print are noise. Torch and
    JAX never warn, so the context costs them nothing.
    """
    import functools

    import numpy as np

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def transform(xp: Any, x: Any, softcap: float | None, temperature: float) -> Any:
    """``softcap * tanh(x / softcap)`` (if set), then ``/ temperature``; in ``x``'s dtype."""
    if softcap is not None:
        x = xp.tanh(x / softcap) * softcap
    if temperature != 1.0:
        x = x / temperature
    return x


def transform_grad_factor(xp: Any, x: Any, softcap: float | None, temperature: float) -> Any:
    """d z / d x of :func:`transform`, or ``None`` where it is the constant 1."""
    factor = None
    if softcap is not None:
        # 1 - tanh(u)^2 cancels for |u| > ~3; sech(u)^2 = 4t / (1 + t)^2 with t = exp(-2|u|)
        # keeps full relative accuracy (and underflows to 0 only where the true value does).
        t = xp.exp(-2.0 * xp.abs(x / softcap))
        factor = 4.0 * t / ((1.0 + t) * (1.0 + t))
    if temperature != 1.0:
        factor = (1.0 / temperature) if factor is None else factor / temperature
    return factor


@quiet
def row_stats(xp: Any, z: Any, axis: int = -1, where: Any = None) -> tuple[Any, Any, Any]:
    """``(m, r, e)`` along ``axis`` (kept as a size-1 axis).

    ``m = max z``, ``r = log Σ exp(z - m)`` computed as ``log1p`` of the sum without one maximal
    term (ties counted exactly), ``e = exp(z - m)`` (0 where masked). An all ``-inf`` (or fully
    masked) row gives ``m = -inf, r = 0, e = 0``; a row holding NaN gives NaN; a row holding
    ``+inf`` (and no NaN) gives ``m = +inf`` and NaN ``r``, so that every loss of it is NaN, while
    :func:`logsumexp` reports ``+inf`` for it.
    """
    return _row_stats(xp, z, axis, where)


def _row_stats(xp: Any, z: Any, axis: int, where: Any) -> tuple[Any, Any, Any]:
    neg_inf = -math.inf
    if where is not None:
        z = xp.where(where, z, neg_inf)
    m = _max_keep(xp, z, axis)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, 0.0)
    e = xp.exp(z - m0)
    is_max = z == m
    ties = xp.sum(xp.astype(is_max, e.dtype), axis=axis, keepdims=True) - 1.0
    t = xp.sum(xp.where(is_max, 0.0, e), axis=axis, keepdims=True) + ties
    r = xp.log1p(t)
    all_masked = m == neg_inf
    r = xp.where(all_masked, 0.0, xp.where(m == math.inf, math.nan, r))
    e = xp.where(finite, e, xp.where(all_masked, 0.0, math.nan))
    # Autograd would hand a fully masked row d max / d z = 1/V through ``m``; its softmax, and so
    # every gradient of it, is 0. Re-selecting the constant cuts that path.
    m = xp.where(all_masked, neg_inf, m)
    return m, r, e


def _max_keep(xp: Any, z: Any, axis: int) -> Any:
    if z.shape[axis] == 0:
        # The max of nothing is -inf, so an empty row behaves like a fully masked one.
        return xp.sum(z, axis=axis, keepdims=True) - math.inf
    return xp.max(z, axis=axis, keepdims=True)


@quiet
def logsumexp(x: Any, axis: int = -1, *, keepdims: bool = False, where: Any = None, xp: Any = None) -> Any:
    r"""Core ``log Σ_j exp(x_j)`` along ``axis`` (see :func:`logitkit.logsumexp`)."""
    z = xp.astype(x, acc_dtype(xp, x.dtype))
    if where is not None:
        z = xp.where(where, z, -math.inf)  # a masked NaN takes no part either
    m, r, _ = row_stats(xp, z, axis, None)
    lse = m + r
    # A row with +inf and no NaN has lse = +inf exactly (scipy's convention).
    has_nan = xp.any(xp.isnan(z), axis=axis, keepdims=True)
    lse = xp.where((m == math.inf) & ~has_nan, math.inf, lse)
    if not keepdims:
        lse = xp.squeeze(lse, axis=axis)
    return xp.astype(lse, x.dtype)
