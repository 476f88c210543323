"""Device helpers shared by the Triton kernels (``@triton.jit`` functions only).

Triton's interpreter has no libdevice, so ``tanh``, ``log1p`` and ``expm1`` are written here from
``exp2``/``log`` plus short series where those lose relative accuracy; the same code then runs on
the GPU and in the CPU interpreter. ``IS_F64`` selects float64 accumulation (natural ``exp``/``log``
and more series terms); float32 paths use ``exp2`` with ``log2(e)`` folded into the argument.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)
# log2(e) = LOG2E_HI + LOG2E_LO, both float32: multiplying by the float32-rounded log2(e) alone
# would bias every exp(d) by d * 1.3e-8 (5e-7 relative at d = -40, the size of a confident
# row's terms); the split removes the bias and leaves one random rounding.
LOG2E_HI = 1.4426950216293335
LOG2E_LO = 1.925963033500011e-08


def split64(v: float) -> tuple[float, float]:
    """``v`` as two float32-exact parts ``hi + lo`` (Triton passes Python floats as float32;
    :func:`_scalar` rebuilds about 48 bits of ``v`` for float64 kernels)."""
    import numpy as np

    hi = float(np.float32(v))
    lo = float(np.float32(v - hi)) if np.isfinite(hi) else 0.0
    return hi, lo


@triton.jit
def _scalar(hi, lo, IS_F64: tl.constexpr):
    """A runtime scalar in the accumulation dtype from its :func:`split64` parts."""
    if IS_F64:
        one = tl.full([], 1.0, tl.float64)
        return one * hi + one * lo
    else:
        one = tl.full([], 1.0, tl.float32)
        return one * hi


@triton.jit
def _div(a, b, IS_F64: tl.constexpr):
    """``a / b`` correctly rounded (the GPU's default float32 division is approximate, 2 ulp);
    for the few per-row divisions whose error would show in a confident row's loss."""
    if IS_F64:
        return a / b
    else:
        return tl.math.div_rn(a + 0.0 * b, b)


@triton.jit
def _exp(d, IS_F64: tl.constexpr):
    """``exp(d)``: ``exp2(d * log2 e)`` in float32 (one MUFU op, split constant), ``exp`` in float64."""
    if IS_F64:
        return tl.exp(d)
    else:
        return tl.exp2(tl.fma(d, 1.4426950216293335, d * 1.925963033500011e-08))


@triton.jit
def _exp_minus(d, r, IS_F64: tl.constexpr):
    """``exp(d - r)`` for a per-element ``d`` and a per-row ``r``: two FMAs and one ``exp2``
    in float32 (the row's ``-r log2 e`` is loop-invariant)."""
    if IS_F64:
        return tl.exp(d - r)
    else:
        nrl = -(r * 1.4426950216293335 + r * 1.925963033500011e-08)
        return tl.exp2(tl.fma(d, 1.4426950216293335, tl.fma(d, 1.925963033500011e-08, nrl)))


@triton.jit
def _expm1_taylor(d, NT: tl.constexpr):
    # expm1(d) = d (1 + d/2 (1 + d/3 (1 + ...))), Horner from the last kept term.
    p = d * 0.0 + 1.0
    for k in tl.static_range(NT, 1, -1):
        p = 1.0 + (d / k) * p
    return d * p


@triton.jit
def _expm1(d, IS_F64: tl.constexpr):
    """``exp(d) - 1`` with full relative accuracy near 0 (Taylor for ``|d| < 0.5``)."""
    if IS_F64:
        small = _expm1_taylor(d, 18)
    else:
        small = _expm1_taylor(d, 10)
    big = _exp(d, IS_F64) - 1.0
    return tl.where(tl.abs(d) < 0.5, small, big)


@triton.jit
def _log1p(t, IS_F64: tl.constexpr):
    """``log(1 + t)`` for ``t >= 0`` (NaN and +inf propagate).

    For ``t <= 1``: ``2 atanh(s)`` with ``s = t / (2 + t) <= 1/3``, a series in ``s**2 <= 1/9``;
    above that ``log(1 + t) >= log 2`` has no cancellation.
    """
    s = _div(t, 2.0 + t, IS_F64)
    s2 = s * s
    one = s * 0.0 + 1.0  # a 1 in t's dtype, so float64 coefficients are not rounded to float32
    if IS_F64:
        p = one / 35
        for k in tl.static_range(16, -1, -1):
            p = s2 * p + one / (2 * k + 1)
    else:
        p = one / 17
        for k in tl.static_range(7, -1, -1):
            p = s2 * p + one / (2 * k + 1)
    small = 2.0 * s * p
    big = tl.log(1.0 + t)
    return tl.where(t <= 1.0, small, big)


@triton.jit
def _tanh_sech2(u, IS_F64: tl.constexpr):
    """``(tanh(u), sech(u)**2)`` to a few ulp each.

    ``tanh``: ``-expm1(-2a) / (2 + expm1(-2a))`` for small ``a = |u|``, ``(1 - e) / (1 + e)`` with
    ``e = exp(-2a)`` otherwise; the sign restored last. ``sech**2 = 4e / (1 + e)**2`` keeps full
    relative accuracy where ``1 - tanh**2`` would cancel (``|u| > 3`` or so); below ``a = 0.35``
    ``tanh**2 < 0.12`` and ``1 - tanh**2`` is exact enough.
    """
    a = tl.abs(u)
    if IS_F64:
        em = _expm1_taylor(-2.0 * a, 17)
    else:
        em = _expm1_taylor(-2.0 * a, 9)
    small = -em / (2.0 + em)
    e = _exp(-2.0 * a, IS_F64)
    big = (1.0 - e) / (1.0 + e)
    is_small = a < 0.35
    th = tl.where(is_small, small, big)
    sech2 = tl.where(is_small, 1.0 - small * small, (4.0 * e) / ((1.0 + e) * (1.0 + e)))
    return tl.where(u < 0.0, -th, th), sech2


@triton.jit
def _transform(x, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
               IS_F64: tl.constexpr):
    """``z = softcap * tanh(x / softcap) * inv_temp`` and ``dz/dx`` (1.0 when neither is set)."""
    if HAS_SOFTCAP:
        th, fac = _tanh_sech2(x / softcap, IS_F64)
        z = softcap * th
        if HAS_TEMP:
            z = z * inv_temp
            fac = fac * inv_temp
    else:
        z = x
        if HAS_TEMP:
            z = z * inv_temp
        fac = inv_temp
    return z, fac


@triton.jit
def _lane_update(m, t, z, IS_F64: tl.constexpr):
    """Online per-lane state: ``m`` the lane max, ``t`` the lane's sum of ``exp(z - m)``
    *without one maximal term*. A new max turns the old max into an ordinary term:
    ``t <- (t + 1) exp(m_old - z)``; a tie adds exactly 1 (``exp(0)``). NaN ``z`` never becomes
    the max and poisons ``t``; ``-inf`` adds nothing (guarded: ``-inf - -inf`` is NaN)."""
    gt = z > m
    e = _exp(-tl.abs(z - m), IS_F64)
    e = tl.where(z == float("-inf"), 0.0, e)
    t = tl.where(gt, (t + 1.0) * e, t + e)
    m = tl.where(gt, z, m)
    return m, t


@triton.jit
def _merge_lanes(m, t, IS_F64: tl.constexpr):
    """Row ``(M, T)`` from per-lane states: ``T = sum exp(z - M)`` without one maximal term.

    Lanes at the max contribute ``t`` (their max is an exact 1, counted separately so that a tiny
    ``T`` keeps its relative accuracy); the others ``(t + 1) exp(m - M)``.
    """
    M = tl.max(m, axis=0)
    at_max = (m == M) & (m > float("-inf"))
    scaled = (t + 1.0) * _exp(m - M, IS_F64)
    contrib = tl.where(at_max, t, tl.where(m == float("-inf"), t, scaled))
    cnt = tl.sum(at_max.to(tl.int32), axis=0)
    T = tl.sum(contrib, axis=0) + tl.maximum(cnt - 1, 0).to(contrib.dtype)
    return M, T


@triton.jit
def _finish_r(M, T, IS_F64: tl.constexpr):
    """``r = log1p(T)``; 0 for an all ``-inf`` row (NaN stays NaN); NaN when ``M = +inf``."""
    r = _log1p(T, IS_F64)
    r = tl.where(M == float("inf"), float("nan"), r)
    return r
