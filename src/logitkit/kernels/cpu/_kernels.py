"""Numba row kernels for the stage contract of :mod:`logitkit.kernels` (imports numba).

Layout of every row computation (one row of V values fits in L2, so only pass 1 reads DRAM and
only pass 3 writes it):

* pass 1: row maximum (``llvm.maxnum`` reduction, vectorized; NaN ignored here, caught below);
* pass 2: ``e = exp(z - m)`` stored in the output row (or a per-thread float32/float64 buffer),
  with the float64 sum of the non-maximal terms and an exact count of the maximal ones, so that
  ``r = log1p(sum - 1 + ties)`` keeps the ~1e-13 losses of confident rows;
* pass 3: the output row is rescaled in place in cache.

*Direct* kernels serve float32/float64 without softcap and read the input row itself; *buffered*
kernels serve float16 (int16 view), bfloat16 (uint16 view) and softcap: pass 1 writes the
transformed row ``z`` into a per-thread accumulation-dtype buffer (conversion per row, never of
the whole array).  Functions that read one row and write another come in an ``_inplace`` variant
taking a single array, because LLVM's run-time overlap check sends exactly aliasing rows to scalar
code.  Rows whose maximum is not finite take a scalar special path: all ``-inf`` -> m=-inf, r=0,
softmax 0; ``+inf`` or all NaN -> NaN for that row.  A NaN among finite values propagates through
the sum (no ``nnan`` flag), so the row becomes NaN.

Only the reduction loops are compiled with reassociation (``_jit``); everything else uses
``_jit_exact`` so that ``(z - m) - r`` and ``sum + (ties - 1)`` are never regrouped into forms that
round away a confident row's ~1e-13 log-probability.

All numba code lives in this one module on purpose: numba's on-disk cache checks only the source
file of the cached function, so a helper in another file could change without invalidating it.
"""
from __future__ import annotations

import math
import sys
import types as _pytypes

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


_NINF = -np.inf

# ============================================================================ scalar building blocks
# Bit casts, maxnum, half conversions, exp and tanh.  They vectorize inside loops compiled with
# FM; exp/tanh bodies are compiled with EXACT and inlined by LLVM (not numba), so their
# Cody-Waite reduction and magic-number rounding keep their order inside a reassociating caller.

# Flags for the reduction loops: reassoc lets LLVM split sums into vector lanes; nnan/ninf are
# deliberately absent so comparisons and selects keep IEEE meaning for -inf and NaN, and arcp is
# absent so that x / temperature stays a correctly rounded division (a rounded reciprocal would
# shift every z by the same relative error, which does not average out in the sum).
FM = {"reassoc", "contract", "nsz", "afn"}
# Flags for exp/tanh bodies: no reassociation (it would fold (t + MAGIC) - MAGIC into t).
EXACT = {"contract"}


# error_model="numpy": a float division is the IEEE one (no ZeroDivisionError check).  The check's
# branch kept every loop holding a division (x / cap, tanh's 2 / (e + 1), sech^2) scalar: the
# softcap row passes ran ~15x slower.  Every divisor here is validated positive or >= 1 anyway.
def _jit(**kw):
    return njit(cache=True, fastmath=FM, error_model="numpy", **kw)


def _jit_exact(**kw):
    return njit(cache=True, fastmath=EXACT, error_model="numpy", **kw)


# --- bit casts -------------------------------------------------------------------------------
@intrinsic
def bits32(typingctx, v):
    """float32 -> int32 with the same bits."""
    def cg(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), cg


@intrinsic
def float32_from_bits(typingctx, v):
    """int32 -> float32 with the same bits."""
    def cg(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), cg


@intrinsic
def bits64(typingctx, v):
    """float64 -> int64 with the same bits."""
    def cg(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), cg


@intrinsic
def float64_from_bits(typingctx, v):
    """int64 -> float64 with the same bits."""
    def cg(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), cg


@intrinsic
def maxnum(typingctx, a, b):
    """llvm.maxnum: the larger of a and b, ignoring a NaN operand; vectorizes as a reduction."""
    if a != b or a not in (types.float32, types.float64):
        return None

    def cg(context, builder, sig, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)
    return a(a, b), cg


@intrinsic
def half_bits_to_float32(typingctx, v):
    """IEEE binary16 stored as int16 bits -> float32 (exact; F16C vcvtph2ps when vectorized)."""
    def cg(context, builder, sig, args):
        h = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(h, ir.FloatType())
    return types.float32(types.int16), cg


@intrinsic
def float32_to_half_bits(typingctx, v):
    """float32 -> binary16 bits (round to nearest even, overflow to inf, NaN kept)."""
    def cg(context, builder, sig, args):
        h = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))
    return types.int16(types.float32), cg


# --- storage conversions ---------------------------------------------------------------------
# float16 arrays are passed as int16 views and bfloat16 arrays as uint16 views (numba has no CPU
# half types); the element type selects the conversion at compile time.
def to_acc(v):
    """Storage element -> accumulation scalar (float32, or float64 for float64)."""


@overload(to_acc, jit_options={"fastmath": FM})
def _ol_to_acc(v):
    if v in (types.float32, types.float64):
        return lambda v: v
    if v == types.int16:
        return lambda v: half_bits_to_float32(v)
    if v == types.uint16:
        return lambda v: float32_from_bits(np.int32(np.uint32(v) << np.uint32(16)))
    return None


def from_acc(v, arr):
    """Accumulation scalar -> element of ``arr`` (rounded to nearest even)."""


@overload(from_acc, jit_options={"fastmath": FM})
def _ol_from_acc(v, arr):
    dt = arr.dtype
    if dt == types.float32:
        return lambda v, arr: np.float32(v)
    if dt == types.float64:
        return lambda v, arr: np.float64(v)
    if dt == types.int16:
        return lambda v, arr: float32_to_half_bits(np.float32(v))
    if dt == types.uint16:
        def impl(v, arr):
            u = np.uint32(bits32(np.float32(v)))
            rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            # NaN must stay NaN: rounding its payload could carry it into inf.
            isnan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            quiet = (u >> np.uint32(16)) | np.uint32(0x0040)
            return np.uint16(quiet if isnan else rounded)
        return impl
    return None


def cast(v, ref):
    """``v`` converted to the floating type of the scalar ``ref``."""


@overload(cast)
def _ol_cast(v, ref):
    if ref == types.float32:
        return lambda v, ref: np.float32(v)
    if ref == types.float64:
        return lambda v, ref: np.float64(v)
    return None


# --- exp ---------------------------------------------------------------------------------------
# exp(d) = 2**k * exp(rr), k = round(d / ln 2) by the magic-number add, rr = d - k ln2 (Cody-Waite,
# two constants), exp(rr) = 1 + rr*q(rr) on |rr| <= ln2/2.  2**(k+off) is built from bits and the
# final multiply by 2**-off rounds once into the subnormal range, so tiny terms stay exact.
# Clamping keeps k in range; comparisons are written so that NaN passes through unchanged and
# -inf becomes exactly 0.
_F32 = np.float32
_E32 = tuple(_F32(c) for c in (
    0.0013843643246218562, 0.008374163880944252, 0.04166800156235695,
    0.16666431725025177, 0.4999999403953552, 1.0))  # near-minimax, rel. error 2e-9


@_jit_exact()
def exp32(d):
    """exp for float32 on d <= 40 (max error ~1.5 ulp; exp(0) == 1 exactly; exp(-inf) == 0;
    NaN -> NaN); larger d saturate at exp(40), which is all tanh needs."""
    d = _F32(-110.0) if d < _F32(-110.0) else d
    d = _F32(40.0) if d > _F32(40.0) else d  # k <= 58: the biased exponent k + 191 stays < 255
    kb = d * _F32(1.4426950408889634) + _F32(12582912.0)
    kf = kb - _F32(12582912.0)
    r = d - kf * _F32(0.693359375)
    r = r - kf * _F32(-2.12194440e-4)
    p = _E32[0]
    p = p * r + _E32[1]
    p = p * r + _E32[2]
    p = p * r + _E32[3]
    p = p * r + _E32[4]
    p = p * r + _E32[5]
    p = p * r + _F32(1.0)
    bits = (bits32(kb) - np.int32(0x4B400000) + np.int32(127 + 64)) << np.int32(23)
    return (p * float32_from_bits(bits)) * _F32(2.0 ** -64)


@_jit_exact()
def expneg32(d):
    """exp32 for d <= 0 (or NaN, -inf): the forward passes subtract the row maximum, so the upper
    clamp is dropped (one instruction of ~20 in the hottest loop)."""
    d = _F32(-110.0) if d < _F32(-110.0) else d
    kb = d * _F32(1.4426950408889634) + _F32(12582912.0)
    kf = kb - _F32(12582912.0)
    r = d - kf * _F32(0.693359375)
    r = r - kf * _F32(-2.12194440e-4)
    p = _E32[0]
    p = p * r + _E32[1]
    p = p * r + _E32[2]
    p = p * r + _E32[3]
    p = p * r + _E32[4]
    p = p * r + _E32[5]
    p = p * r + _F32(1.0)
    bits = (bits32(kb) - np.int32(0x4B400000) + np.int32(127 + 64)) << np.int32(23)
    return (p * float32_from_bits(bits)) * _F32(2.0 ** -64)


@_jit_exact()
def _exp32_lo_core(d, lo):
    """2^k exp(r + lo) for float32 d in [-110, 0] (no clamp) and a low part |lo| <= ulp(d): lo
    joins the reduced argument, so d + lo counts to twice float32's precision."""
    kb = d * _F32(1.4426950408889634) + _F32(12582912.0)
    kf = kb - _F32(12582912.0)
    r = d - kf * _F32(0.693359375)
    r = r - kf * _F32(-2.12194440e-4)
    r = r + lo
    p = _E32[0]
    p = p * r + _E32[1]
    p = p * r + _E32[2]
    p = p * r + _E32[3]
    p = p * r + _E32[4]
    p = p * r + _E32[5]
    p = p * r + _F32(1.0)
    bits = (bits32(kb) - np.int32(0x4B400000) + np.int32(127 + 64)) << np.int32(23)
    return (p * float32_from_bits(bits)) * _F32(2.0 ** -64)


@_jit_exact()
def expneg32_lo(d, lo):
    """exp(d + lo) for float32 d <= 0 (or -inf, NaN) and its low part lo."""
    lo = lo if d > _F32(-110.0) else _F32(0.0)  # -inf and NaN d: no low part (it may be NaN)
    return _exp32_lo_core(_F32(-110.0) if d < _F32(-110.0) else d, lo)


@_jit_exact()
def expdiff32(a, m):
    """exp(a - m) for float32 a <= m, with the difference carried to twice float32's precision.

    A rounded ``a - m`` is off by up to half an ulp of the difference: at a gap of 30 that is
    1e-6 absolute in the exponent, so 1e-6 relative in the term, twice the 2^-21 contract on a
    confident row whose loss is the sum of such terms.  TwoSum gives the rounding error exactly
    (no multiplication, so ``contract`` cannot change it; the body is never reassociated).
    Clamping ``a`` (not the difference) keeps TwoSum finite, so no select guards its result:
    this is the hottest loop, and the body costs ~5 additions more than expneg32."""
    lim = m - _F32(110.0)
    a = lim if a < lim else a  # -inf: a term that underflows to 0 alike; NaN stays NaN
    s = a - m
    bb = s - a
    return _exp32_lo_core(s, (a - (s - bb)) + ((-m) - bb))


@_jit_exact()
def tdiff32(a, xm, inv_t):
    """``(hi, exp(hi + lo))`` for ``(a - xm) / T`` formed in float64 (exact difference, one
    rounding of the product by 1/T) and split into float32 ``hi + lo``."""
    q = (np.float64(a) - np.float64(xm)) * inv_t
    hi = np.float32(q)
    return hi, expneg32_lo(hi, np.float32(q - np.float64(hi)))


_E64 = tuple(1.0 / float(np.prod(np.arange(1, k + 2, dtype=np.float64))) for k in range(12, -1, -1))


@_jit_exact()
def exp64(d):
    """exp for float64 on d <= 600 (error < 1 ulp; same special values as exp32)."""
    d = -760.0 if d < -760.0 else d
    d = 600.0 if d > 600.0 else d  # k <= 866: the biased exponent k + 1151 stays < 2047
    kb = d * 1.4426950408889634 + 6755399441055744.0
    kf = kb - 6755399441055744.0
    r = d - kf * 6.93147180369123816490e-01
    r = r - kf * 1.90821492927058770002e-10
    p = _E64[0]
    for c in _E64[1:]:
        p = p * r + c
    p = p * r + 1.0
    bits = (bits64(kb) - np.int64(0x4338000000000000) + np.int64(1023 + 128)) << np.int64(52)
    return (p * float64_from_bits(bits)) * (2.0 ** -128)


def vexp(d):
    """exp dispatched on the floating type (exp32 / exp64)."""


@overload(vexp)
def _ol_vexp(d):
    if d == types.float32:
        return lambda d: exp32(d)
    if d == types.float64:
        return lambda d: exp64(d)
    return None


# --- tanh ----------------------------------------------------------------------------------------
# |u| small: odd Taylor polynomial; otherwise 1 - 2/(exp(2|u|) + 1) with the sign restored.
_T = (1.0, -0.3333333333333333, 0.13333333333333333, -0.05396825396825397, 0.021869488536155203,
      -0.008863235529902197, 0.003592128036572481, -0.0014558343870513183, 0.000590027440945586,
      -0.00023912911424355248, 9.691537956929451e-05, -3.927832388331683e-05,
      1.5918905069328964e-05, -6.451689215655431e-06, 2.6147711512907546e-06,
      -1.0597268320104654e-06)
_T32 = tuple(_F32(c) for c in _T[9:0:-1])
_T64 = tuple(_T[15:0:-1])


@_jit_exact()
def tanh32(u):
    a = abs(u)
    u2 = u * u
    p = _T32[0]
    for c in _T32[1:]:
        p = p * u2 + c
    small = u + u * u2 * p
    e = exp32(a + a)
    big = _F32(1.0) - _F32(2.0) / (e + _F32(1.0))
    big = big if u > _F32(0.0) else -big
    return small if a < _F32(0.5) else big


@_jit_exact()
def tanh64(u):
    a = abs(u)
    u2 = u * u
    p = _T64[0]
    for c in _T64[1:]:
        p = p * u2 + c
    small = u + u * u2 * p
    e = exp64(a + a)
    big = 1.0 - 2.0 / (e + 1.0)
    big = big if u > 0.0 else -big
    return small if a < 0.4 else big


def vexp_neg(d):
    """exp for d <= 0 dispatched on the floating type (expneg32 / exp64)."""


@overload(vexp_neg)
def _ol_vexp_neg(d):
    if d == types.float32:
        return lambda d: expneg32(d)
    if d == types.float64:
        return lambda d: exp64(d)
    return None


def vexp_diff(a, m):
    """exp(a - m) for a <= m dispatched on the floating type: float32 compensates the rounding of
    the difference (expdiff32), float64 needs no compensation (exp64)."""


@overload(vexp_diff)
def _ol_vexp_diff(a, m):
    if a == types.float32 and m == types.float32:
        return lambda a, m: expdiff32(a, m)
    if a == types.float64 and m == types.float64:
        return lambda a, m: exp64(a - m)
    return None


def vtanh(u):
    """tanh dispatched on the floating type."""


@overload(vtanh)
def _ol_vtanh(u):
    if u == types.float32:
        return lambda u: tanh32(u)
    if u == types.float64:
        return lambda u: tanh64(u)
    return None


@_jit_exact()
def sech2(u):
    """sech(u)**2 = 4e / (1 + e)**2 with e = exp(-2|u|): a few ulp relative error for every u
    (1 - tanh(u)**2 cancels for |u| > ~3 and would lose all digits); 0 at +-inf, NaN for NaN."""
    one = cast(1.0, u)
    a = abs(u)
    e = vexp_neg(-(a + a))
    return ((one + one) * (e + e)) / ((one + e) * (one + e))


def acc_zero(arr):
    """Zero of the accumulation type of ``arr``'s elements (float64 for float64, else float32)."""


@overload(acc_zero)
def _ol_acc_zero(arr):
    if arr.dtype == types.float64:
        return lambda arr: np.float64(0.0)
    if arr.dtype in (types.float32, types.int16, types.uint16):
        return lambda arr: np.float32(0.0)
    return None


# ============================================================================ row passes


# ----------------------------------------------------------------------------- pass 1
@_jit()
def _rowmax(row, zero):
    m = cast(_NINF, zero)
    for j in range(row.size):
        m = maxnum(m, to_acc(row[j]))
    return m


# A maxnum reduction in the same loop as a store does not vectorize (LLVM 22), so the transform
# and the maximum are two loops; the second reads the buffer from L1/L2.
@_jit()
def _zfill(row, buf, t):
    """buf = x / T (accumulation dtype, correctly rounded division); returns max."""
    for j in range(row.size):
        buf[j] = to_acc(row[j]) / t
    return _rowmax(buf, t)


@_jit()
def _zfill_cap(row, buf, cap, t):
    """buf = cap * tanh(x / cap) / T; returns max."""
    for j in range(row.size):
        buf[j] = cap * vtanh(to_acc(row[j]) / cap) / t
    return _rowmax(buf, t)


# z - max z is formed from x, never as x/T - max(x)/T: near a common offset of 1e4, x/T rounds by
# 1e-4 absolute (float32), 200x the loss contract.  Without softcap, x - max x is exact there
# (Sterbenz) and one division rounds; with softcap, s = cap tanh(x / cap) is formed in float64
# so that s - s_max keeps its digits (a float32 s of ~1e4 would round by 5e-4).
@_jit_exact()
def _dfill_t(row, buf, xm, t):
    """buf = (x - xm) / T in the accumulation dtype."""
    for j in range(row.size):
        buf[j] = (to_acc(row[j]) - xm) / t


@_jit()
def _blk_fill_t(src, buf, xm, inv_t):
    zero = xm - xm
    s = zero
    for j in range(src.size):
        hi, e = tdiff32(to_acc(src[j]), xm, inv_t)
        buf[j] = hi
        s += zero if hi == zero else e
    return s


def _dfill_t_sum(row, buf, xm, temp, zero):
    """buf = (x - xm) / T; returns the float64 sum of exp(buf) over the entries that are not 0,
    each from (x - xm)/T to twice float32's precision (float32 accumulation), or -1.0 where
    the accumulation dtype's own sum is exact enough (float64)."""


@overload(_dfill_t_sum, jit_options={"fastmath": EXACT, "error_model": "numpy"})
def _ol_dfill_t_sum(row, buf, xm, temp, zero):
    if zero == types.float32:
        def impl(row, buf, xm, temp, zero):
            inv_t = 1.0 / temp
            n = row.size
            s = 0.0
            for b in range(0, n, _B):
                e = min(b + _B, n)
                s += np.float64(_blk_fill_t(row[b:e], buf[b:e], xm, inv_t))
            return s
        return impl

    def impl64(row, buf, xm, temp, zero):
        _dfill_t(row, buf, xm, cast(temp, zero))
        return -1.0
    return impl64


@_jit_exact()
def _dfill_cap(row, buf, xm, cap, sm, t, zero):
    """buf = (cap tanh(x / cap) - sm) / T, formed in float64 (cap, sm, t float64), and exactly 0
    where x == xm (vectorized tanh64 may round differently from the scalar one that gave sm)."""
    for j in range(row.size):
        xj = to_acc(row[j])
        s = cap * tanh64(np.float64(xj) / cap)
        buf[j] = zero if xj == xm else cast((s - sm) / t, zero)


@_jit_exact()
def _shift_row(xr, buf, temp, cap, use_cap, zero):
    """Fill ``buf`` with ``d = z - max z`` of ``z = softcap(x) / T``; returns ``(m, delta)``: max z
    in the accumulation dtype and its rounding error (float64).  ``r = log sum exp(d)`` is then
    relative to the exact max (lse = m + delta + r; kept as m + r, to the rounding of m), so a
    confident row's tiny r keeps its digits.  A row whose max is not finite (no softcap) leaves
    ``buf`` unfilled.  The third result is the sum of the non-zero ``exp(buf)`` from the
    difference carried beyond float32 (:func:`_dfill_t_sum`), or -1.0 where the caller's sum of
    ``exp(buf)`` stands (softcap, float64)."""
    xm = _rowmax(xr, zero)
    sc = -1.0
    if use_cap:
        sm = cap * tanh64(np.float64(xm) / cap)
        _dfill_cap(xr, buf, xm, cap, sm, temp, zero)
    else:
        sm = np.float64(xm)
        if not (xm > _NINF and xm < np.inf):
            return cast(sm / temp, zero), 0.0, sc
        sc = _dfill_t_sum(xr, buf, xm, temp, zero)
    q = sm / temp
    m = cast(q, zero)
    return m, q - np.float64(m), sc


@_jit_exact()
def _gap(q, m, zero):
    """max z - m for the exact max z = q (float64) of this row: 0 when m is q rounded, as the
    forward pass stores it (r is then relative to q itself); else the difference (a max from
    elsewhere, e.g. another vocabulary shard)."""
    return 0.0 if np.float64(cast(q, zero)) == m else q - m


@_jit_exact()
def _row_shift(xr, m, r, temp, cap, use_cap, zero):
    """For given row stats (lse = m + r): ``(xm0, sm, c)`` with z - m - r = d + c, where
    d = (x - xm0) / T (no softcap; xm0 = max x, or 0 for a row without a finite max) or
    (cap tanh(x / cap) - sm) / T (softcap), c in float64."""
    xm = _rowmax(xr, zero)
    if use_cap:
        sm = cap * tanh64(np.float64(xm) / cap)
        return xm, sm, _gap(sm / temp, m, zero) - r
    xm0 = xm if (xm > _NINF and xm < np.inf) else zero
    return xm0, np.float64(xm0), _gap(np.float64(xm0) / temp, m, zero) - r


# ----------------------------------------------------------------------------- pass 2
# d = z - m <= 0; exp(0) == 1 exactly.  The sum leaves out every maximal term (d == 0) and the
# ties are counted exactly, so r = log1p(sum + ties - 1) keeps a confident row's ~1e-13.
# Sums run over blocks of _B elements in the accumulation dtype (one vector reduction, ~8 terms per
# lane) and the block sums are added in float64: a float64 accumulator in the inner loop costs ~40%
# of this, the hottest loop.  Block views (not offset indices) keep LLVM vectorizing the inner loop;
# a second reduction in the same loop (the tie count) does not vectorize, so ties are one more
# cheap pass over the cached row.
_B = 512


@_jit()
def _count_max(src, mx):
    """Number of elements equal to mx, as an accumulation-dtype float (exact below 2**24 a lane)."""
    zero = mx - mx
    one = zero + cast(1.0, mx)
    c = zero
    for j in range(src.size):
        c += one if to_acc(src[j]) == mx else zero
    return c


@_jit()
def _blk_sum(src, mx):
    zero = mx - mx
    s = zero
    for j in range(src.size):
        a = to_acc(src[j])
        e = vexp_diff(a, mx)
        s += zero if a == mx else e
    return s


@_jit()
def _blk_store(src, dst, mx):
    zero = mx - mx
    s = zero
    for j in range(src.size):
        a = src[j]
        e = vexp_diff(a, mx)
        dst[j] = e
        s += zero if a == mx else e
    return s


@_jit()
def _blk_store_inplace(row, mx):
    zero = mx - mx
    s = zero
    for j in range(row.size):
        a = row[j]
        e = vexp_diff(a, mx)
        row[j] = e
        s += zero if a == mx else e
    return s


@_jit_exact()
def _exp_store(src, dst, mx):
    """dst = exp(src - mx); returns (sum of the non-maximal terms in float64, tie count)."""
    ties = _count_max(src, mx)
    n = src.size
    s = 0.0
    for b in range(0, n, _B):
        e = min(b + _B, n)
        s += np.float64(_blk_store(src[b:e], dst[b:e], mx))
    return s, np.float64(ties)


@_jit_exact()
def _exp_store_inplace(row, mx):
    ties = _count_max(row, mx)  # before the row is overwritten
    n = row.size
    s = 0.0
    for b in range(0, n, _B):
        s += np.float64(_blk_store_inplace(row[b:min(b + _B, n)], mx))
    return s, np.float64(ties)


@_jit_exact()
def _exp_sum(src, mx):
    ties = _count_max(src, mx)
    n = src.size
    s = 0.0
    for b in range(0, n, _B):
        s += np.float64(_blk_sum(src[b:min(b + _B, n)], mx))
    return s, np.float64(ties)


@_jit()
def _smooth_sum(src, mx, w):
    """sum_c w_c (m - z_c) with 0 for w_c == 0 (so a masked class of weight 0 adds no NaN)."""
    s = 0.0
    zero = mx - mx
    for j in range(src.size):
        wj = w[j]
        t = wj * (mx - to_acc(src[j]))
        s += np.float64(zero if wj == zero else t)
    return s


# ----------------------------------------------------------------------------- pass 3
@_jit_exact()
def _scale(row, a):
    for j in range(row.size):
        row[j] = row[j] * a


@_jit_exact()
def _affine_w(row, a, b, w):
    for j in range(row.size):
        row[j] = row[j] * a - b * w[j]


@_jit_exact()
def _store_scale(buf, out, a):
    for j in range(buf.size):
        out[j] = from_acc(buf[j] * a, out)


@_jit_exact()
def _store_affine_w(buf, out, a, b, w):
    for j in range(buf.size):
        out[j] = from_acc(buf[j] * a - b * w[j], out)


@_jit_exact()
def _store_softcap(buf, out, m, a, b, w, f):
    """out = (exp(z - m) a - b w) f, the softcap chain rule with f = sech(x / cap)^2."""
    for j in range(buf.size):
        g = vexp(buf[j] - m) * a - b * w[j]
        out[j] = from_acc(g * f[j], out)


@_jit_exact()
def _sech2_fill(row, f, cap):
    """f = sech(x / cap)^2, from x itself (recovering it from z = cap tanh(x / cap) would cancel);
    a loop of its own, so that it vectorizes."""
    for j in range(row.size):
        f[j] = sech2(to_acc(row[j]) / cap)


@_jit_exact()
def _logsm(src, dst, mx, r):
    for j in range(src.size):
        dst[j] = (src[j] - mx) - r


@_jit_exact()
def _logsm_inplace(row, mx, r):
    for j in range(row.size):
        row[j] = (row[j] - mx) - r


@_jit_exact()
def _store_logsm(buf, out, m, r):
    for j in range(buf.size):
        out[j] = from_acc((buf[j] - m) - r, out)


@_jit_exact()
def _fill(out, v):
    for j in range(out.size):
        out[j] = from_acc(v, out)


@_jit_exact()
def _fill_masked_grad(out, y, b, w, c, zero):
    """Gradient of a fully masked (all -inf) row: p = 0, so -b w_c, and -c more at the label."""
    for j in range(out.size):
        out[j] = from_acc(cast(-b * w[j], zero), out)
    out[y] = from_acc(cast(-b * w[y] - c, zero), out)


# ----------------------------------------------------------------------------- CE forward(+backward)
@_jit_exact()
def _ce_loss(eps, wy, r, dy, sm, wsum, v):
    """(1-eps) w_y (m - z_y + r) + eps/V sum_c w_c (m - z_c + r); dy = z_y - m."""
    lab = (1.0 - eps) * wy
    t = lab * (r - dy) if lab != 0.0 else 0.0
    if eps != 0.0:
        t += eps / v * (sm + wsum * r)
    return t


@_jit_exact()
def _ce_coefs(eps, wy, wsum, v, gce, gp, inv_t):
    """Per-row coefficients: grad_z = A p - B w_c - C [c == y] (times 1/T already); ``gp`` is the
    extra multiplier of p (``g_z * 2 z_loss (m + r)``, or the cotangent of lse)."""
    a = inv_t * (gce * ((1.0 - eps) * wy + eps / v * wsum) + gp)
    b = inv_t * gce * eps / v
    c = inv_t * gce * (1.0 - eps) * wy
    return a, b, c


@_jit_exact()
def _label_grad(c, a, b, wy, pm1):
    """grad_z at the label, A p_y - B w_y - C, written as C (p_y - 1) + (A - C) p_y - B w_y with
    p_y - 1 from expm1, so a confident row keeps the relative accuracy of its ~1e-13 gradient."""
    return c * pm1 + (a - c) * (pm1 + 1.0) - b * wy


@_jit_exact()
def _ce_special(orow, y, ignored, w, wsum, eps, inv_t, gce, mval, want_grad, zero):
    """Rows whose maximum is not finite.  Returns (ce, m, r) as float64."""
    if ignored:
        if want_grad:
            _fill(orow, zero)
        return 0.0, mval, (0.0 if mval == _NINF else np.nan)
    if mval == _NINF:  # every class masked: p = 0, the loss is infinite but never NaN
        if want_grad:
            v = orow.size
            b = inv_t * gce * eps / v
            c = inv_t * gce * (1.0 - eps) * w[y]
            _fill_masked_grad(orow, y, b, w, c, zero)
        return np.inf, mval, 0.0
    if want_grad:
        _fill(orow, cast(np.nan, zero))
    return np.nan, mval, np.nan


@_jit_exact()
def _bad_label(y, ignored, v):
    """A label neither ignored nor in [0, V).  Host callers validate first; labels that come
    unvalidated from a compiled program (the XLA FFI handlers) give NaN rows instead of reading
    outside the row."""
    return (not ignored) and (y < 0 or y >= v)


@_jit_exact()
def _bad_row(orow, bad, want_grad, ce, zero):
    """The row's loss: ``ce``, or NaN (and a NaN gradient row) for a bad label."""
    if not bad:
        return ce
    if want_grad:
        _fill(orow, cast(np.nan, zero))
    return np.nan


@_jit_exact(parallel=True)
def ce_direct(x, labels, w, wsum, ignore_index, eps, zl, g_ce, g_z, want_grad, out,
              inplace, ce, m_out, r_out):
    """float32/float64 logits, no softcap, temperature 1.  Writes ce/m/r (N,) and, if want_grad, out (N, V)."""
    n, v = x.shape
    for i in prange(n):
        xr = x[i]
        orow = out[i]
        zero = acc_zero(xr)
        y = labels[i]
        ignored = y == ignore_index
        bad = _bad_label(y, ignored, v)
        mx = _rowmax(xr, zero)
        if not (mx > _NINF and mx < np.inf):
            c_, m_, r_ = _ce_special(orow, y, ignored or bad, w, wsum, eps, 1.0, g_ce[i], mx,
                                     want_grad, zero)
            ce[i] = _bad_row(orow, bad, want_grad, c_, zero)
            m_out[i] = m_
            r_out[i] = r_
            continue
        m = np.float64(mx)
        if ignored or bad:
            s, ties = _exp_sum(xr, mx)
            if want_grad:
                _fill(orow, zero)
            ce[i] = _bad_row(orow, bad, want_grad, 0.0, zero)
            m_out[i] = m
            r_out[i] = math.log1p(s + (ties - 1))
            continue
        dy = np.float64(xr[y]) - m
        sm = _smooth_sum(xr, mx, w) if eps != 0.0 else 0.0
        if want_grad:
            if inplace:
                s, ties = _exp_store_inplace(xr, mx)
            else:
                s, ties = _exp_store(xr, orow, mx)
        else:
            s, ties = _exp_sum(xr, mx)
        sp = s + (ties - 1)
        r = math.log1p(sp)
        wy = np.float64(w[y])
        ce[i] = _ce_loss(eps, wy, r, dy, sm, wsum, v)
        m_out[i] = m
        r_out[i] = r
        if want_grad:
            a, b, c = _ce_coefs(eps, wy, wsum, v, g_ce[i], g_z[i] * 2.0 * zl * (m + r), 1.0)
            s1 = 1.0 + sp
            if eps != 0.0:
                _affine_w(orow, cast(a / s1, zero), cast(b, zero), w)
            else:
                _scale(orow, cast(a / s1, zero))
            orow[y] = _label_grad(c, a, b, wy, (math.expm1(dy) - sp) / s1)


@_jit_exact(parallel=True)
def ce_buffered(x, labels, w, wsum, ignore_index, eps, zl, temp, cap, use_cap, g_ce, g_z,
                want_grad, out, ce, m_out, r_out, buf_proto, nchunk):
    """Any storage dtype (float16/bfloat16 as int16/uint16 views) and softcap, via a per-thread
    buffer of the accumulation dtype (``buf_proto`` gives it); rows split in ``nchunk`` blocks."""
    n, v = x.shape
    for ch in prange(nchunk):
        buf = np.empty(v, buf_proto.dtype)
        fac = np.empty(v if use_cap and want_grad else 0, buf_proto.dtype)
        zero = acc_zero(buf)
        inv_t = 1.0 / temp
        tz = cast(temp, zero)
        capa = cast(cap, zero)
        for i in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            xr = x[i]
            orow = out[i]
            y = labels[i]
            ignored = y == ignore_index
            bad = _bad_label(y, ignored, v)
            m, delta, sc = _shift_row(xr, buf, temp, cap, use_cap, zero)  # buf = z - max z
            if not (m > _NINF and m < np.inf):
                c_, m_, r_ = _ce_special(orow, y, ignored or bad, w, wsum, eps, inv_t, g_ce[i], m,
                                         want_grad, zero)
                ce[i] = _bad_row(orow, bad, want_grad, c_, zero)
                m_out[i] = m_
                r_out[i] = r_
                continue
            m64 = np.float64(m) + delta  # max z
            if ignored or bad:
                s, ties = _exp_sum(buf, zero)
                s = sc if sc >= 0.0 else s
                if want_grad:
                    _fill(orow, zero)
                ce[i] = _bad_row(orow, bad, want_grad, 0.0, zero)
                m_out[i] = m
                r_out[i] = math.log1p(s + (ties - 1))
                continue
            dy = np.float64(buf[y])
            sm = _smooth_sum(buf, zero, w) if eps != 0.0 else 0.0
            if want_grad and not use_cap:
                s, ties = _exp_store_inplace(buf, zero)
            else:
                s, ties = _exp_sum(buf, zero)
            s = sc if sc >= 0.0 else s
            sp = s + (ties - 1)
            r = math.log1p(sp)
            wy = np.float64(w[y])
            ce[i] = _ce_loss(eps, wy, r, dy, sm, wsum, v)
            m_out[i] = m
            r_out[i] = r
            if want_grad:
                a, b, c = _ce_coefs(eps, wy, wsum, v, g_ce[i], g_z[i] * 2.0 * zl * (m64 + r),
                                    inv_t)
                s1 = 1.0 + sp
                gy = _label_grad(c, a, b, wy, (math.expm1(dy) - sp) / s1)
                if use_cap:
                    _sech2_fill(xr, fac, capa)  # reads x before orow (maybe x) is written
                    gy = gy * np.float64(fac[y])
                    _store_softcap(buf, orow, zero, cast(a / s1, zero), cast(b, zero), w, fac)
                else:
                    _store_affine_w(buf, orow, cast(a / s1, zero), cast(b, zero), w)
                orow[y] = from_acc(cast(gy, zero), orow)


# ----------------------------------------------------------------------------- CE backward (given m, r)
@_jit_exact()
def _bwd(src, dst, xm, m, r, a, b, w, temp, use_t):
    """p = exp((z - m) - r): z = x at T = 1; else z = (x - xm) / T with m = -c, r = 0."""
    for j in range(src.size):
        z = to_acc(src[j])
        if use_t:
            z = (z - xm) / temp
        p = vexp((z - m) - r)
        dst[j] = from_acc(p * a - b * w[j], dst)


@_jit_exact()
def _bwd_inplace(row, xm, m, r, a, b, w, temp, use_t):
    for j in range(row.size):
        z = to_acc(row[j])
        if use_t:
            z = (z - xm) / temp
        p = vexp((z - m) - r)
        row[j] = from_acc(p * a - b * w[j], row)


@_jit_exact()
def _bwd_cap(src, dst, buf, fac, xm, sm, c, a, b, w, temp, cap):
    """Softcap backward in loops through ``buf`` (d = z - max z) and ``fac`` (sech(x/cap)^2; one
    loop holding both tanh and exp is not inlined/vectorized by LLVM); p = exp(d + c); dst may
    be src, since each loop reads one array and writes another."""
    _dfill_cap(src, buf, xm, cap, sm, temp, c - c)
    _sech2_fill(src, fac, cast(cap, c))
    for j in range(src.size):
        p = vexp(buf[j] + c)
        dst[j] = from_acc((p * a - b * w[j]) * fac[j], dst)


@_jit_exact(parallel=True)
def ce_backward(x, labels, m_in, r_in, g_ce, g_z, w, wsum, ignore_index, eps, zl, temp, cap,
                use_cap, out, inplace, buf_proto, nchunk):
    """One read of x and one write of out per row: p = exp(z - m - r)."""
    n, v = x.shape
    inv_t = 1.0 / temp
    use_t = temp != 1.0
    for ch in prange(nchunk):
        buf = np.empty(2 * v if use_cap else 0, buf_proto.dtype)  # z and sech^2 rows
        for i in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            gp = g_z[i] * 2.0 * zl * (np.float64(m_in[i]) + np.float64(r_in[i]))
            _ce_backward_row(x[i], out[i], labels[i], m_in[i], r_in[i], g_ce[i], gp, w, wsum,
                             ignore_index, eps, temp, inv_t, use_t, cap, use_cap, inplace, buf)


@_jit_exact()
def _ce_backward_row(xr, orow, y, m_in, r_in, gce, gp, w, wsum, ignore_index, eps, temp,
                     inv_t, use_t, cap, use_cap, inplace, buf):
    v = xr.size
    zero = acc_zero(xr)
    if y == ignore_index:
        _fill(orow, zero)
        return
    if y < 0 or y >= v:  # unvalidated labels (XLA FFI): a NaN row, never a read out of bounds
        _fill(orow, cast(np.nan, zero))
        return
    m = np.float64(m_in)
    r = np.float64(r_in)
    wy = np.float64(w[y])
    a, b, c = _ce_coefs(eps, wy, wsum, v, gce, gp, inv_t)
    if not (m > _NINF and m < np.inf and r == r and r < np.inf):
        if m == _NINF and r == 0.0:
            _fill_masked_grad(orow, y, b, w, c, zero)
        else:
            _fill(orow, cast(np.nan, zero))
        return
    xy = to_acc(xr[y])  # read before an in-place pass overwrites it
    tz = cast(temp, zero)
    az = cast(a, zero)
    bz = cast(b, zero)
    xm0, sm, sh = zero, 0.0, 0.0
    if use_cap or use_t:
        # z - m - r = d + sh with d = z - max z from x (see _shift_row) and sh per row
        xm0, sm, sh = _row_shift(xr, m, r, temp, cap, use_cap, zero)
    if use_cap:
        capa = cast(cap, zero)
        fy = np.float64(sech2(xy / capa))
        _bwd_cap(xr, orow, buf[:v], buf[v:], xm0, sm, cast(sh, zero), az, bz, w, temp, cap)
        dy = 0.0 if xy == xm0 else (cap * tanh64(np.float64(xy) / cap) - sm) / temp
        gy = _label_grad(c, a, b, wy, math.expm1(dy + sh)) * fy
    elif use_t:
        msh = cast(-sh, zero)
        if inplace:
            _bwd_inplace(xr, xm0, msh, zero, az, bz, w, tz, use_t)
        else:
            _bwd(xr, orow, xm0, msh, zero, az, bz, w, tz, use_t)
        dy = (np.float64(xy) - np.float64(xm0)) / temp
        gy = _label_grad(c, a, b, wy, math.expm1(dy + sh))
    else:
        # (z - m) - r in the accumulation dtype: z - m is exact near the max, m + r would round
        ma = cast(m, zero)
        ra = cast(r, zero)
        if inplace:
            _bwd_inplace(xr, zero, ma, ra, az, bz, w, tz, use_t)
        else:
            _bwd(xr, orow, zero, ma, ra, az, bz, w, tz, use_t)
        pm1 = math.expm1((np.float64(xy) - m) - r)
        gy = _label_grad(c, a, b, wy, pm1)
    orow[y] = from_acc(cast(gy, zero), orow)


# ----------------------------------------------------------------------------- softmax family
# mode: 0 softmax, 1 log_softmax, 2 logsumexp only (out unused)
@_jit_exact()
def _sm_special(orow, mval, mode, zero):
    if mode == 2:
        return
    if mval == _NINF:
        _fill(orow, zero if mode == 0 else cast(_NINF, zero))
    else:
        _fill(orow, cast(np.nan, zero))


@_jit_exact(parallel=True)
def softmax_direct(x, mode, out, inplace, m_out, r_out):
    """float32/float64, temperature 1, no softcap."""
    n, v = x.shape
    for i in prange(n):
        xr = x[i]
        orow = out[i]
        zero = acc_zero(xr)
        mx = _rowmax(xr, zero)
        if not (mx > _NINF and mx < np.inf):
            _sm_special(orow, mx, mode, zero)
            m_out[i] = mx
            r_out[i] = 0.0 if mx == _NINF else np.nan
            continue
        if mode == 0:
            if inplace:
                s, ties = _exp_store_inplace(xr, mx)
            else:
                s, ties = _exp_store(xr, orow, mx)
        else:
            s, ties = _exp_sum(xr, mx)
        sp = s + (ties - 1)
        r = math.log1p(sp)
        m_out[i] = mx
        r_out[i] = r
        if mode == 0:
            _scale(orow, cast(1.0 / (1.0 + sp), zero))
        elif mode == 1:
            if inplace:
                _logsm_inplace(xr, mx, cast(r, zero))
            else:
                _logsm(xr, orow, mx, cast(r, zero))


@_jit_exact(parallel=True)
def softmax_buffered(x, mode, temp, cap, use_cap, out, m_out, r_out, buf_proto, nchunk):
    """Any storage dtype, temperature and softcap, through a per-thread row buffer."""
    n, v = x.shape
    for ch in prange(nchunk):
        buf = np.empty(v, buf_proto.dtype)
        zero = acc_zero(buf)
        tz = cast(temp, zero)
        capa = cast(cap, zero)
        for i in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            xr = x[i]
            orow = out[i]
            m, delta, sc = _shift_row(xr, buf, temp, cap, use_cap, zero)  # buf = z - max z
            if not (m > _NINF and m < np.inf):
                _sm_special(orow, m, mode, zero)
                m_out[i] = m
                r_out[i] = 0.0 if m == _NINF else np.nan
                continue
            if mode == 0:
                s, ties = _exp_store_inplace(buf, zero)
            else:
                s, ties = _exp_sum(buf, zero)
            s = sc if sc >= 0.0 else s
            sp = s + (ties - 1)
            r = math.log1p(sp)
            m_out[i] = m
            r_out[i] = r
            if mode == 0:
                _store_scale(buf, orow, cast(1.0 / (1.0 + sp), zero))
            elif mode == 1:
                _store_logsm(buf, orow, zero, cast(r, zero))


# ----------------------------------------------------------------------------- softmax backward
# alias: 0 out is a third array, 1 out is y, 2 out is dy
@_jit()
def _dot(y, dy):
    s = 0.0
    for j in range(y.size):
        s += np.float64(to_acc(y[j]) * to_acc(dy[j]))
    return s


@_jit()
def _sum(dy):
    s = 0.0
    for j in range(dy.size):
        s += np.float64(to_acc(dy[j]))
    return s


@_jit_exact()
def _sm_bwd(y, dy, o, d):
    for j in range(y.size):
        o[j] = from_acc(to_acc(y[j]) * (to_acc(dy[j]) - d), o)


@_jit_exact()
def _sm_bwd_y(yo, dy, d):
    for j in range(yo.size):
        yo[j] = from_acc(to_acc(yo[j]) * (to_acc(dy[j]) - d), yo)


@_jit_exact()
def _sm_bwd_dy(y, dyo, d):
    for j in range(y.size):
        dyo[j] = from_acc(to_acc(y[j]) * (to_acc(dyo[j]) - d), dyo)


@_jit_exact()
def _lsm_bwd(y, dy, o, s):
    for j in range(y.size):
        o[j] = from_acc(to_acc(dy[j]) - vexp(to_acc(y[j])) * s, o)


@_jit_exact()
def _lsm_bwd_y(yo, dy, s):
    for j in range(yo.size):
        yo[j] = from_acc(to_acc(dy[j]) - vexp(to_acc(yo[j])) * s, yo)


@_jit_exact()
def _lsm_bwd_dy(y, dyo, s):
    for j in range(y.size):
        dyo[j] = from_acc(to_acc(dyo[j]) - vexp(to_acc(y[j])) * s, dyo)


@_jit_exact(parallel=True)
def softmax_bwd(y, dy, out, log, alias):
    """log=False: out = y (dy - sum(y dy)); log=True: out = dy - exp(y) sum(dy)."""
    n, v = y.shape
    for i in prange(n):
        yr = y[i]
        dr = dy[i]
        orow = out[i]
        zero = acc_zero(yr)
        if log:
            s = cast(_sum(dr), zero)
            if alias == 1:
                _lsm_bwd_y(orow, dr, s)
            elif alias == 2:
                _lsm_bwd_dy(yr, orow, s)
            else:
                _lsm_bwd(yr, dr, orow, s)
        else:
            d = cast(_dot(yr, dr), zero)
            if alias == 1:
                _sm_bwd_y(orow, dr, d)
            elif alias == 2:
                _sm_bwd_dy(yr, orow, d)
            else:
                _sm_bwd(yr, dr, orow, d)


# ----------------------------------------------------------------------------- serial variants
# Every parallel kernel also exists compiled without parallel=True (prange runs as range), so that
# no OpenMP/TBB parallel region starts at all:
# * small inputs: waking the thread pool costs ~0.1 ms on an idle machine and 10-20 ms on a loaded
#   one, while a 256 x 1000 float32 row pass takes ~0.1 ms on one thread;
# * a child forked from a process whose GNU OpenMP pool is live (it aborts in a parallel region).
# The clones have their own qualname ("<name>_serial"), hence their own on-disk cache entries, which
# never mix with the parallel entries of the same source.
@_jit_exact(parallel=True)
def ce_backward_p(x, labels, m_in, r_in, g_ce, g_p, w, wsum, ignore_index, eps, temp, cap,
                  use_cap, out, buf_proto, nchunk):
    """``ce_backward`` with the whole multiplier of ``p`` given per row (``g_p``: the cotangent of
    the row's lse), as the XLA handler needs; never in place."""
    n, v = x.shape
    inv_t = 1.0 / temp
    use_t = temp != 1.0
    for ch in prange(nchunk):
        buf = np.empty(2 * v if use_cap else 0, buf_proto.dtype)
        for i in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            _ce_backward_row(x[i], out[i], labels[i], m_in[i], r_in[i], g_ce[i], g_p[i], w, wsum,
                             ignore_index, eps, temp, inv_t, use_t, cap, use_cap, False, buf)


# ----------------------------------------------------------------------------- probability labels
# Targets t_c = ((1 - eps) y_c + eps / V) w_c (w = 1 when ``w`` is empty); classes with t_c = 0 take
# no part in the loss (0 log 0 = 0, so a -inf logit there is fine).
@_jit_exact()
def _target(yv, j, w, eps, inv_v):
    t = np.float64(yv) * (1.0 - eps) + eps * inv_v
    return t * np.float64(w[j]) if w.size else t


@_jit()
def _prob_dot(buf, yr, m, w, eps, inv_v):
    """(sum_c t_c (z_c - m) over t_c != 0, sum_c t_c), in float64."""
    dot = 0.0
    mass = 0.0
    for j in range(buf.size):
        t = _target(yr[j], j, w, eps, inv_v)
        d = np.float64(buf[j]) - np.float64(m)
        dot += 0.0 if t == 0.0 else t * d
        mass += t
    return dot, mass


@_jit_exact(parallel=True)
def prob_forward(x, y, w, eps, temp, cap, use_cap, ce, m_out, r_out, mass_out, buf_proto, nchunk):
    """Per row: ``ce = mass r - sum_c t_c (z_c - m)``, ``m``, ``r`` and ``mass = sum_c t_c``;
    ``y`` (N, V) in the accumulation dtype.  All -inf rows: r = 0, ce = 0 if mass == 0 else inf."""
    n, v = x.shape
    inv_v = 1.0 / v
    for ch in prange(nchunk):
        buf = np.empty(v, buf_proto.dtype)
        zero = acc_zero(buf)
        tz = cast(temp, zero)
        capa = cast(cap, zero)
        for i in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            m, delta, sc = _shift_row(x[i], buf, temp, cap, use_cap, zero)  # buf = z - max z
            if not (m > _NINF and m < np.inf):
                mass = 0.0
                for j in range(v):
                    mass += _target(y[i, j], j, w, eps, inv_v)
                m_out[i] = m
                mass_out[i] = mass
                if m == _NINF:
                    r_out[i] = 0.0
                    ce[i] = 0.0 if mass == 0.0 else np.inf
                else:
                    r_out[i] = np.nan
                    ce[i] = np.nan
                continue
            s, ties = _exp_sum(buf, zero)
            s = sc if sc >= 0.0 else s
            r = math.log1p(s + (ties - 1))
            dot, mass = _prob_dot(buf, y[i], zero, w, eps, inv_v)
            ce[i] = mass * r - dot
            m_out[i] = m
            r_out[i] = r
            mass_out[i] = mass


@_jit_exact()
def _prob_store(buf, yr, orow, m, r, a, g, w, eps, inv_v):
    """out = exp(z - m - r) a - g t_c."""
    for j in range(buf.size):
        p = vexp((buf[j] - m) - r)
        orow[j] = from_acc(p * a - g * cast(_target(yr[j], j, w, eps, inv_v), a), orow)


@_jit_exact(parallel=True)
def prob_backward(x, y, m_in, r_in, mass, g_ce, g_lse, w, eps, temp, cap, use_cap, out,
                  buf_proto, nchunk):
    """``dz_c = p_c (g_ce mass + g_lse) - g_ce t_c``, times ``sech(x/cap)^2 / T``."""
    n, v = x.shape
    inv_v = 1.0 / v
    inv_t = 1.0 / temp
    for ch in prange(nchunk):
        buf = np.empty(v, buf_proto.dtype)
        fac = np.empty(v if use_cap else 0, buf_proto.dtype)
        zero = acc_zero(buf)
        tz = cast(temp, zero)
        capa = cast(cap, zero)
        for i in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            xr = x[i]
            orow = out[i]
            m = np.float64(m_in[i])
            r = np.float64(r_in[i])
            if m == np.inf or m != m or r != r:
                _fill(orow, cast(np.nan, zero))
                continue
            if m == _NINF:  # p = 0 (and z - m would be NaN)
                _zfill(xr, buf, tz)
                m = 0.0
                r = np.inf
            else:
                # buf = d = z - max z from x (see _shift_row), exp(d + c) = exp(z - m - r)
                xm0, sm, c = _row_shift(xr, m, r, temp, cap, use_cap, zero)
                if use_cap:
                    _dfill_cap(xr, buf, xm0, cap, sm, temp, zero)
                else:
                    _dfill_t(xr, buf, xm0, tz)
                m = -c
                r = 0.0
            if use_cap:
                _sech2_fill(xr, fac, capa)
            gce = np.float64(g_ce[i])
            a = (gce * np.float64(mass[i]) + np.float64(g_lse[i])) * inv_t
            _prob_store(buf, y[i], orow, cast(m, zero), cast(r, zero), cast(a, zero),
                        cast(gce * inv_t, zero), w, eps, inv_v)
            if use_cap:
                for j in range(v):
                    orow[j] = from_acc(to_acc(orow[j]) * fac[j], orow)


_PARALLEL = ("ce_direct", "ce_buffered", "ce_backward", "ce_backward_p", "softmax_direct",
             "softmax_buffered", "softmax_bwd", "prob_forward", "prob_backward")


def _serial_clone(fn):
    py = fn.py_func
    f = _pytypes.FunctionType(py.__code__, py.__globals__, py.__name__ + "_serial",
                              py.__defaults__, py.__closure__)
    f.__qualname__ = py.__qualname__ + "_serial"
    f.__module__ = py.__module__
    f.__doc__ = py.__doc__
    return _jit_exact()(f)


_serial = {name: _serial_clone(globals()[name]) for name in _PARALLEL}


def serial(name):
    """The kernel ``name`` compiled single-threaded (small inputs, forked children)."""
    return _serial[name]


# ============================================================================ XLA FFI handlers
# JAX on the CPU calls these through XLA's typed FFI (``jax.ffi.ffi_call``; registration and the
# JAX side live in :mod:`logitkit.jax._ffi`).  A handler is a C function ``XLA_FFI_Error*(
# XLA_FFI_CallFrame*)`` compiled here with ``cfunc``; it reads XLA's call frame at the byte offsets
# of ``xla/ffi/api/c_api.h`` (API 0.x, x86-64/aarch64 LP64 layout), so the kernels read XLA's
# input buffers and write its output buffers directly: no copy, no Python, no GIL.
#
# Call frame: +8 extension_start, +32 stage, +56 args.size, +72 args.args, +112 rets.rets,
# +136 attrs.size, +160 attrs.attrs.  Buffer: +24 data, +32 rank, +40 dims.  Array attribute:
# +8 size, +16 data.  ``threads`` 1 runs the serial kernels; above 1, the parallel kernels run
# on the pool of the XLA thread that calls (numba's thread count is per calling thread and not
# set here: ``numba.set_num_threads`` in compiled code would make the handlers uncacheable), the
# chunked ones on ``threads`` chunks.  Labels arrive as int32 already mapped by the JAX side: -1 ignored, -2 (or
# anything outside [0, V)) a bad index, which gives a NaN row.  ``params`` (float64 array
# attribute): eps, temperature, softcap, use_softcap, threads.

_FFI_OK = 0                  # a NULL XLA_FFI_Error*: success
_FFI_EXECUTE = 3             # XLA_FFI_ExecutionStage_EXECUTE
_FFI_METADATA = 1            # XLA_FFI_Extension_Metadata
_FFI_IGNORE = -1             # the ignore code of the labels the JAX side passes


@intrinsic
def _addr(typingctx, a):
    """int64 address -> void* (for ``carray``)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return sig, codegen


_HUGE = 1 << 21                                      # a transparent huge page on x86-64/aarch64
_MADV_HUGEPAGE = 14 if sys.platform.startswith("linux") else 0


@intrinsic
def _madvise(typingctx, a, length, advice):
    """libc ``madvise(addr, length, advice)`` (resolved by name when the code is linked, so the
    compiled handler stays cacheable)."""
    sig = types.int32(types.int64, types.int64, types.int32)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [i8p, ir.IntType(64), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "madvise")
        return builder.call(fn, [builder.inttoptr(args[0], i8p), args[1], args[2]])

    return sig, codegen


@_jit_exact()
def _advise_huge_pages(a, nbytes):
    """Ask for transparent huge pages on the 2 MiB-aligned interior of a large output buffer.

    XLA allocates big outputs fresh (mmap) and, unlike NumPy, does not ask for huge pages, so the
    kernel's first write faults every 4 KiB page: 128K faults for a 512 MB gradient, more time than
    the kernel itself on this kind of machine. Advice only: the data and its size are unchanged."""
    if _MADV_HUGEPAGE == 0 or nbytes < 4 * _HUGE:
        return
    start = (a + _HUGE - 1) // _HUGE * _HUGE
    end = (a + nbytes) // _HUGE * _HUGE
    if end > start:
        _madvise(start, end - start, np.int32(_MADV_HUGEPAGE))


@_jit_exact()
def _i64(a):
    return carray(_addr(a), 1, np.int64)[0]


@_jit_exact()
def _i32(a):
    return carray(_addr(a), 1, np.int32)[0]


@_jit_exact()
def _ffi_execute(frame):
    """True for the execute stage; answers XLA's metadata query (API version 0.1, no traits)."""
    ext = _i64(frame + 8)
    if ext != 0 and _i32(ext + 8) == _FFI_METADATA:
        md = _i64(ext + 24)
        ver = carray(_addr(md + 24), 2, np.int32)
        ver[0] = 0
        ver[1] = 1
        carray(_addr(md + 32), 1, np.uint32)[0] = 0
        return False
    return _i32(frame + 32) == _FFI_EXECUTE


@_jit_exact()
def _ffi_shape(lst, k):
    """(rows, last dim) of buffer ``k`` of an args/rets list: leading dims flattened."""
    b = _i64(lst + 8 * k)
    rank = _i64(b + 32)
    dims = carray(_addr(_i64(b + 40)), rank, np.int64)
    n = 1
    for d in range(rank - 1):
        n *= dims[d]
    return n, (dims[rank - 1] if rank > 0 else 1)


@_jit_exact()
def _ffi_data(lst, k):
    return _i64(_i64(lst + 8 * k) + 24)


@_jit_exact()
def _ffi_weight(lst, k, v, acc):
    """The class weights: buffer ``k`` when it has V entries, ones when it is empty (no weight:
    the ones live on numba's heap, not among XLA's temporaries)."""
    if _ffi_shape(lst, k)[1] == 0:
        return np.ones(v, acc)
    return carray(_addr(_ffi_data(lst, k)), v, acc)


@_jit_exact()
def _ffi_weight_or_empty(lst, k, v, acc):
    """The class weights (V,), or an empty array meaning none (the probability kernels test
    ``w.size``)."""
    return carray(_addr(_ffi_data(lst, k)), v if _ffi_shape(lst, k)[1] != 0 else 0, acc)


@_jit_exact()
def _ffi_params(frame):
    at = _i64(_i64(frame + 160))
    return carray(_addr(_i64(at + 16)), _i64(at + 8), np.float64)


@_jit()
def _wsum(w):
    s = 0.0
    for j in range(w.size):
        s += np.float64(w[j])
    return s


@_jit_exact()
def _ffi_forward_buffered(x, lab, w, wsum, eps, temp, cap, use_cap, nt, g, ok, ce, m, r):
    if nt > 1:
        ce_buffered(x, lab, w, wsum, _FFI_IGNORE, eps, 0.0, temp, cap, use_cap, g, g, False, ok,
                    ce, m, r, w[:0], min(x.shape[0], nt))
    else:
        ce_buffered_serial(x, lab, w, wsum, _FFI_IGNORE, eps, 0.0, temp, cap, use_cap, g, g,
                           False, ok, ce, m, r, w[:0], 1)


@_jit_exact()
def _ffi_forward_any(x, lab, w, prm, ce, m, r):
    """float32/float64 storage: the direct kernel where no transform applies."""
    n = x.shape[0]
    eps, temp, cap, use_cap, nt = prm[0], prm[1], prm[2], prm[3] != 0.0, int(prm[4])
    wsum = _wsum(w)
    g = np.zeros(n)
    ok = np.empty((n, 0), x.dtype)
    if use_cap or temp != 1.0:
        _ffi_forward_buffered(x, lab, w, wsum, eps, temp, cap, use_cap, nt, g, ok, ce, m, r)
    elif nt > 1:
        ce_direct(x, lab, w, wsum, _FFI_IGNORE, eps, 0.0, g, g, False, ok, False, ce, m, r)
    else:
        ce_direct_serial(x, lab, w, wsum, _FFI_IGNORE, eps, 0.0, g, g, False, ok, False, ce, m, r)


@_jit_exact()
def _ffi_forward_half(x, lab, w, prm, ce, m, r):
    """float16 (int16 view) / bfloat16 (uint16 view) storage: always through the row buffer."""
    n = x.shape[0]
    g = np.zeros(n)
    ok = np.empty((n, 0), x.dtype)
    _ffi_forward_buffered(x, lab, w, _wsum(w), prm[0], prm[1], prm[2], prm[3] != 0.0,
                          int(prm[4]), g, ok, ce, m, r)


@_jit_exact()
def _ffi_backward(x, lab, m, r, gce, gp, w, prm, out):
    eps, temp, cap, use_cap, nt = prm[0], prm[1], prm[2], prm[3] != 0.0, int(prm[4])
    wsum = _wsum(w)
    if nt > 1:
        ce_backward_p(x, lab, m, r, gce, gp, w, wsum, _FFI_IGNORE, eps, temp, cap, use_cap, out,
                      w[:0], min(x.shape[0], nt))
    else:
        ce_backward_p_serial(x, lab, m, r, gce, gp, w, wsum, _FFI_IGNORE, eps, temp, cap,
                             use_cap, out, w[:0], 1)


# Handler templates: ``_XDT`` (storage dtype), ``_ACC`` and ``_FWD`` are globals bound per clone
# (see ``ffi_handler``), so each compiled handler holds the kernels of one dtype only.
def _ffi_ce_forward(frame):
    """args: x (..., V), labels (...) int32, weight (V,) or (0,) acc; rets: ce, m, r (...) acc."""
    if not _ffi_execute(frame):
        return _FFI_OK
    args = _i64(frame + 72)
    rets = _i64(frame + 112)
    n, v = _ffi_shape(args, 0)
    if n == 0:
        return _FFI_OK
    x = carray(_addr(_ffi_data(args, 0)), (n, v), _XDT)
    lab = carray(_addr(_ffi_data(args, 1)), n, np.int32)
    w = _ffi_weight(args, 2, v, _ACC)
    ce = carray(_addr(_ffi_data(rets, 0)), n, _ACC)
    m = carray(_addr(_ffi_data(rets, 1)), n, _ACC)
    r = carray(_addr(_ffi_data(rets, 2)), n, _ACC)
    _FWD(x, lab, w, _ffi_params(frame), ce, m, r)
    return _FFI_OK


def _ffi_ce_backward(frame):
    """args: x (..., V), labels (...) int32, m, r, g_ce, g_lse (...) acc, weight (V,) or (0,) acc;
    rets: dx (..., V) in x's dtype."""
    if not _ffi_execute(frame):
        return _FFI_OK
    args = _i64(frame + 72)
    rets = _i64(frame + 112)
    n, v = _ffi_shape(args, 0)
    if n == 0:
        return _FFI_OK
    x = carray(_addr(_ffi_data(args, 0)), (n, v), _XDT)
    lab = carray(_addr(_ffi_data(args, 1)), n, np.int32)
    m = carray(_addr(_ffi_data(args, 2)), n, _ACC)
    r = carray(_addr(_ffi_data(args, 3)), n, _ACC)
    gce = carray(_addr(_ffi_data(args, 4)), n, _ACC)
    gp = carray(_addr(_ffi_data(args, 5)), n, _ACC)
    w = _ffi_weight(args, 6, v, _ACC)
    out = carray(_addr(_ffi_data(rets, 0)), (n, v), _XDT)
    _advise_huge_pages(_ffi_data(rets, 0), out.nbytes)
    _ffi_backward(x, lab, m, r, gce, gp, w, _ffi_params(frame), out)
    return _FFI_OK


def _ffi_prob_forward(frame):
    """args: x (..., V), y (..., V) acc, weight (V,) or (0,) acc; rets: ce, m, r, mass (...) acc."""
    if not _ffi_execute(frame):
        return _FFI_OK
    args = _i64(frame + 72)
    rets = _i64(frame + 112)
    n, v = _ffi_shape(args, 0)
    if n == 0:
        return _FFI_OK
    x = carray(_addr(_ffi_data(args, 0)), (n, v), _XDT)
    y = carray(_addr(_ffi_data(args, 1)), (n, v), _ACC)
    w = _ffi_weight_or_empty(args, 2, v, _ACC)
    ce = carray(_addr(_ffi_data(rets, 0)), n, _ACC)
    m = carray(_addr(_ffi_data(rets, 1)), n, _ACC)
    r = carray(_addr(_ffi_data(rets, 2)), n, _ACC)
    mass = carray(_addr(_ffi_data(rets, 3)), n, _ACC)
    prm = _ffi_params(frame)
    nt = int(prm[4])
    if nt > 1:
        prob_forward(x, y, w, prm[0], prm[1], prm[2], prm[3] != 0.0, ce, m, r, mass, w[:0],
                     min(n, nt))
    else:
        prob_forward_serial(x, y, w, prm[0], prm[1], prm[2], prm[3] != 0.0, ce, m, r, mass,
                            w[:0], 1)
    return _FFI_OK


def _ffi_prob_backward(frame):
    """args: x, y (..., V), m, r, mass, g_ce, g_lse (...) acc, weight (V,) or (0,) acc;
    rets: dx (..., V) in x's dtype."""
    if not _ffi_execute(frame):
        return _FFI_OK
    args = _i64(frame + 72)
    rets = _i64(frame + 112)
    n, v = _ffi_shape(args, 0)
    if n == 0:
        return _FFI_OK
    x = carray(_addr(_ffi_data(args, 0)), (n, v), _XDT)
    y = carray(_addr(_ffi_data(args, 1)), (n, v), _ACC)
    m = carray(_addr(_ffi_data(args, 2)), n, _ACC)
    r = carray(_addr(_ffi_data(args, 3)), n, _ACC)
    mass = carray(_addr(_ffi_data(args, 4)), n, _ACC)
    gce = carray(_addr(_ffi_data(args, 5)), n, _ACC)
    glse = carray(_addr(_ffi_data(args, 6)), n, _ACC)
    w = _ffi_weight_or_empty(args, 7, v, _ACC)
    out = carray(_addr(_ffi_data(rets, 0)), (n, v), _XDT)
    _advise_huge_pages(_ffi_data(rets, 0), out.nbytes)
    prm = _ffi_params(frame)
    nt = int(prm[4])
    if nt > 1:
        prob_backward(x, y, m, r, mass, gce, glse, w, prm[0], prm[1], prm[2], prm[3] != 0.0, out,
                      w[:0], min(n, nt))
    else:
        prob_backward_serial(x, y, m, r, mass, gce, glse, w, prm[0], prm[1], prm[2],
                             prm[3] != 0.0, out, w[:0], 1)
    return _FFI_OK


def _ffi_softmax_forward(frame):
    """args: x (..., V); rets: softmax or log_softmax of x / T (x's dtype).
    params: mode (0 softmax, 1 log_softmax), temperature, threads."""
    if not _ffi_execute(frame):
        return _FFI_OK
    args = _i64(frame + 72)
    rets = _i64(frame + 112)
    n, v = _ffi_shape(args, 0)
    if n == 0 or v == 0:
        return _FFI_OK
    x = carray(_addr(_ffi_data(args, 0)), (n, v), _XDT)
    out = carray(_addr(_ffi_data(rets, 0)), (n, v), _XDT)
    _advise_huge_pages(_ffi_data(rets, 0), out.nbytes)
    prm = _ffi_params(frame)
    _SMF(x, int(prm[0]), prm[1], int(prm[2]), out, np.empty(n, _ACC), np.empty(n, _ACC))
    return _FFI_OK


@_jit_exact()
def _ffi_sm_buffered(x, mode, temp, nt, out, m, r, proto):
    if nt > 1:
        softmax_buffered(x, mode, temp, 1.0, False, out, m, r, proto, min(x.shape[0], nt))
    else:
        softmax_buffered_serial(x, mode, temp, 1.0, False, out, m, r, proto, 1)


@_jit_exact()
def _ffi_sm_any(x, mode, temp, nt, out, m, r):
    """float32/float64 storage: the direct kernel at temperature 1."""
    if temp != 1.0:
        _ffi_sm_buffered(x, mode, temp, nt, out, m, r, m[:0])
    elif nt > 1:
        softmax_direct(x, mode, out, False, m, r)
    else:
        softmax_direct_serial(x, mode, out, False, m, r)


@_jit_exact()
def _ffi_sm_half(x, mode, temp, nt, out, m, r):
    _ffi_sm_buffered(x, mode, temp, nt, out, m, r, m[:0])


def _ffi_softmax_backward(frame):
    """args: y (the forward's output), dy (..., V); rets: dx = y (dy - sum y dy), or for
    log_softmax dy - exp(y) sum dy.  params: log (0/1), threads."""
    if not _ffi_execute(frame):
        return _FFI_OK
    args = _i64(frame + 72)
    rets = _i64(frame + 112)
    n, v = _ffi_shape(args, 0)
    if n == 0 or v == 0:
        return _FFI_OK
    y = carray(_addr(_ffi_data(args, 0)), (n, v), _XDT)
    dy = carray(_addr(_ffi_data(args, 1)), (n, v), _XDT)
    out = carray(_addr(_ffi_data(rets, 0)), (n, v), _XDT)
    _advise_huge_pages(_ffi_data(rets, 0), out.nbytes)
    prm = _ffi_params(frame)
    if int(prm[1]) > 1:
        softmax_bwd(y, dy, out, prm[0] != 0.0, 0)
    else:
        softmax_bwd_serial(y, dy, out, prm[0] != 0.0, 0)
    return _FFI_OK


softmax_direct_serial = _serial["softmax_direct"]
softmax_buffered_serial = _serial["softmax_buffered"]
softmax_bwd_serial = _serial["softmax_bwd"]
prob_forward_serial = _serial["prob_forward"]
prob_backward_serial = _serial["prob_backward"]
ce_direct_serial = _serial["ce_direct"]
ce_buffered_serial = _serial["ce_buffered"]
ce_backward_p_serial = _serial["ce_backward_p"]

# dtype name -> (storage dtype, accumulation dtype, CE forward driver, softmax forward driver)
_FFI_DTYPES = {
    "float32": (np.float32, np.float32, _ffi_forward_any, _ffi_sm_any),
    "float64": (np.float64, np.float64, _ffi_forward_any, _ffi_sm_any),
    "float16": (np.int16, np.float32, _ffi_forward_half, _ffi_sm_half),
    "bfloat16": (np.uint16, np.float32, _ffi_forward_half, _ffi_sm_half),
}
_FFI_TEMPLATES = {"ce_forward": _ffi_ce_forward, "ce_backward": _ffi_ce_backward,
                  "prob_forward": _ffi_prob_forward, "prob_backward": _ffi_prob_backward,
                  "softmax_forward": _ffi_softmax_forward,
                  "softmax_backward": _ffi_softmax_backward}
_ffi_compiled = {}


def ffi_handler(kind, dtype):
    """The compiled XLA FFI handler ``kind`` (a key of ``_FFI_TEMPLATES``) for logits of dtype
    name ``dtype``; its ``.ctypes`` is the function pointer to register."""
    key = (kind, dtype)
    if key not in _ffi_compiled:
        # A handler loaded from the on-disk cache links against the threading layer's symbols
        # (allocate_sched, ...), which numba loads only when a parallel kernel first launches.
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()
        xdt, acc, fwd, smf = _FFI_DTYPES[dtype]
        tmpl = _FFI_TEMPLATES[kind]
        g = dict(globals(), _XDT=xdt, _ACC=acc, _FWD=fwd, _SMF=smf)
        f = _pytypes.FunctionType(tmpl.__code__, g, f"{tmpl.__name__}_{dtype}")
        f.__qualname__ = f"{tmpl.__qualname__}_{dtype}"
        f.__module__ = tmpl.__module__
        _ffi_compiled[key] = cfunc(types.int64(types.int64), cache=True, error_model="numpy")(f)
    return _ffi_compiled[key]
