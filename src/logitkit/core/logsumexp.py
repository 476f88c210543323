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

__all__ = ["transform", "two_diff", "shifted", "transform_grad_factor", "row_stats", "logsumexp", "quiet"]


def quiet(fn: Any) -> Any:
    """Run ``fn`` with NumPy's floating-point warnings off.

    The core computes ``-inf - (-inf)``, ``0 * inf`` and the like on masked or non-finite rows and
    then discards those values with ``where``; the warnings NumPy would print are noise. Torch and
    JAX never warn, so the context costs them nothing.
    """
    import functools
    import sys

    import numpy as np

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch = sys.modules.get("torch")
        # torch.compile cannot trace np.errstate (a graph break); traced code never runs NumPy.
        if torch is not None and torch.compiler.is_compiling():
            return fn(*args, **kwargs)
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


def _tanh_gap(xp: Any, u: Any) -> Any:
    """``1 - |tanh u|`` as ``2t / (1 + t)``, ``t = exp(-2|u|)``: no cancellation where tanh saturates."""
    t = xp.exp(-2.0 * xp.abs(u))
    return 2.0 * t / (1.0 + t)


def _div_residual(xp: Any, a: Any, temperature: float, q: Any) -> Any:
    """``a / T - q`` for ``q = fl(a / T)``, exactly up to one rounding, in ``a``'s dtype.

    Dekker's product (Veltkamp splitting, no fma needed) gives ``q·T = p + e`` exactly; then
    ``a - p`` is exact (Sterbenz: ``p`` is within an ulp or two of ``a``). Non-finite rows give 0.
    """
    import numpy as np

    wide = "64" in str(a.dtype)
    split = 134217729.0 if wide else 4097.0            # 2^27 + 1 / 2^12 + 1
    t = float(np.float64(temperature) if wide else np.float32(temperature))  # T as the ops round it
    t_hi = float(np.float64(t * split) - (np.float64(t * split) - t)) if wide else \
        float(np.float32(np.float32(t * split) - (np.float32(t * split) - np.float32(t))))
    t_lo = t - t_hi
    c = q * split
    q_hi = c - (c - q)
    q_lo = q - q_hi
    p = q * t
    e = ((q_hi * t_hi - p) + q_hi * t_lo + q_lo * t_hi) + q_lo * t_lo
    res = ((a - p) - e) / t
    return xp.where(xp.isfinite(res), res, 0.0)


def two_diff(xp: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """``(d, lo)`` with ``d = fl(a − b)`` and ``d + lo == a − b`` exactly (Knuth's TwoSum; no
    multiplication, so neither fma contraction nor autograd changes it: ``lo``'s derivative is
    0). Where ``d`` is not finite, ``lo = 0``.

    >>> import numpy as np
    >>> d, lo = two_diff(np, np.float32(-29.7), np.float32(1.0000001))
    >>> float(d) + float(lo) == float(np.float32(-29.7)) - float(np.float32(1.0000001))
    True
    """
    d = a - b
    bb = d - a
    lo = (a - (d - bb)) + (-b - bb)
    return d, xp.where(xp.isfinite(lo), lo, 0.0)


def shifted(xp: Any, x: Any, softcap: float | None, temperature: float, axis: int = -1,
            where: Any = None, with_lo: bool = False) -> tuple:
    """``(d, m, delta)`` of the transformed logits ``z`` of :func:`transform` along ``axis``.

    ``d = z - max z`` computed from ``x`` as ``(s - s_max) / T`` with ``s`` the softcapped logits,
    never as ``x/T - max(x)/T``: the rounding of ``x/T`` near a common offset of 1e4 would be
    1e-4 absolute, 200x the float32 contract. Softcap differences use
    ``tanh a - tanh b = tanh(a - b)·(1 - tanh a·tanh b)`` with the second factor formed without
    cancellation, so they keep full relative accuracy too. ``m`` is ``max z`` rounded to ``x``'s
    dtype and ``delta = max z - m`` its rounding error (0 when ``T = 1`` without softcap): a
    row's ``lse = m + delta + r`` where ``r = log Σ exp(d)``. Masked entries (``where``) and
    an all ``-inf`` row behave as in :func:`row_stats` (``d = -inf``). Shapes: ``d`` like ``x``,
    ``m`` and ``delta`` with ``axis`` kept at size 1.

    ``with_lo``: also return ``lo`` (like ``d``) with ``d + lo`` the difference to twice the
    precision of ``x``'s dtype (TwoSum, then the division residual), for float32 and narrower
    without softcap; ``None`` otherwise. A rounded float32 ``x − max`` is off by up to half an
    ulp of the gap, 1e-6 relative in ``exp`` at a gap of 30: twice the contract on a confident
    row, whose loss is a sum of such terms. :func:`row_stats` takes ``lo``.

    >>> import numpy as np
    >>> d, m, delta = shifted(np, np.array([10000.346, 10000.821], np.float32), None, 3.0)
    >>> float(d[0]) == float(np.float32((np.float32(10000.346) - np.float32(10000.821)) / 3))
    True
    """
    neg_inf = -math.inf
    if with_lo and softcap is not None and "64" not in str(x.dtype):
        return _shifted_softcap_split(xp, x, softcap, temperature, axis, where)
    xs = x if where is None else xp.where(where, x, neg_inf)
    xm = _max_keep(xp, xs, axis)
    lo = None
    if softcap is None:
        xm0 = xp.where(xp.isfinite(xm), xm, 0.0)
        sm = xm
        if with_lo and "64" not in str(xs.dtype):
            d, lo = two_diff(xp, xs, xm0)  # -inf entries (and NaN rows) carry lo = 0
        else:
            d = xs - xm0
    else:
        c = softcap
        gap = xp.where(x == xm, 0.0, x - xm)  # exact 0 at the maximum, also for equal infinities
        ta, tm = xp.tanh(x / c), xp.tanh(xm / c)
        same_sign = (x >= 0) == (xm >= 0)
        # 1 - tanh a tanh b: (1 - |ta|) + |ta| (1 - |tm|) for equal signs, 1 + |ta tm| otherwise.
        factor = xp.where(same_sign, _tanh_gap(xp, x / c) + xp.abs(ta) * _tanh_gap(xp, xm / c),
                          1.0 + xp.abs(ta * tm))
        d = (c * xp.tanh(gap / c)) * factor
        if where is not None:
            d = xp.where(where, d, neg_inf)
        sm = c * tm
    if temperature == 1.0:
        return (d, sm, xp.zeros_like(sm), lo) if with_lo else (d, sm, xp.zeros_like(sm))
    q = d / temperature
    if lo is not None:
        lo = _div_residual(xp, d, temperature, q) + lo / temperature
    m = sm / temperature
    delta = _div_residual(xp, sm, temperature, m)
    return (q, m, delta, lo) if with_lo else (q, m, delta)


def _shifted_softcap_split(xp: Any, x: Any, softcap: float, temperature: float, axis: int, where: Any) -> tuple:
    """:func:`shifted` with ``with_lo`` for float32 softcap: ``cap·tanh`` differences formed in
    float64 (a float32 tanh rounds the capped logits themselves by ~1e-7 relative, 1e-6 absolute
    in the exponent of a gap of 20: 2.7x the contract on a confident row), then split into
    float32 ``d + lo``. Where the library has no float64 (JAX without x64) ``lo`` is 0."""
    if getattr(xp, "__name__", "") == "jax.numpy":
        import jax

        if not jax.config.jax_enable_x64:
            return (*shifted(xp, x, softcap, temperature, axis, where), None)
    dt = x.dtype
    d64, m64, delta64 = shifted(xp, xp.astype(x, xp.float64), softcap, temperature, axis, where)
    d = xp.astype(d64, dt)
    lo = d64 - xp.astype(d, xp.float64)
    lo = xp.astype(xp.where(xp.isfinite(lo), lo, 0.0), dt)
    m = xp.astype(m64, dt)
    delta = xp.astype(xp.where(xp.isfinite(m64), (m64 - xp.astype(m, xp.float64)) + delta64, 0.0), dt)
    return d, m, delta, lo


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
def row_stats(xp: Any, z: Any, axis: int = -1, where: Any = None, lo: Any = None) -> tuple[Any, Any, Any]:
    """``(m, r, e)`` along ``axis`` (kept as a size-1 axis).

    ``m = max z``, ``r = log Σ exp(z - m)`` computed as ``log1p`` of the sum without one maximal
    term (ties counted exactly), ``e = exp(z - m)`` (0 where masked). An all ``-inf`` (or fully
    masked) row gives ``m = -inf, r = 0, e = 0``; a row holding NaN gives NaN; a row holding
    ``+inf`` (and no NaN) gives ``m = +inf`` and NaN ``r``, so that every loss of it is NaN, while
    :func:`logsumexp` reports ``+inf`` for it. ``lo``: the low part of ``z`` (from
    :func:`shifted`), folded in as ``exp(z + lo) = exp(z)·(1 + lo)`` to first order.
    """
    return _row_stats(xp, z, axis, where, lo)


def _row_stats(xp: Any, z: Any, axis: int, where: Any, lo: Any = None) -> tuple[Any, Any, Any]:
    neg_inf = -math.inf
    if where is not None:
        z = xp.where(where, z, neg_inf)
    m = _max_keep(xp, z, axis)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, 0.0)
    e = xp.exp(z - m0)
    if lo is not None:
        e = e + e * lo
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
    # z - max z with its float32 rounding error (lo): a row like [0, -30] has lse ~ 1e-13
    d, m, _, lo = shifted(xp, z, None, 1.0, axis, None, with_lo=True)
    _, r, _ = row_stats(xp, d, axis, None, lo)
    # re-selected so that autograd hands a fully masked row's max no 1/V gradient (row_stats)
    m = xp.where(m == -math.inf, -math.inf, m)
    lse = m + r
    # A row with +inf and no NaN has lse = +inf exactly (scipy's convention).
    has_nan = xp.any(xp.isnan(z), axis=axis, keepdims=True)
    lse = xp.where((m == math.inf) & ~has_nan, math.inf, lse)
    if not keepdims:
        lse = xp.squeeze(lse, axis=axis)
    return xp.astype(lse, x.dtype)
