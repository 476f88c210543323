"""Scalar building blocks for the numba kernels: bit casts, ``maxnum``, half conversions, exp, tanh.

Everything here vectorizes inside a loop compiled with ``fastmath=FM`` (reassociation only, *no*
``nnan``/``ninf``: -inf must stay a mask and NaN must propagate).  The exp/tanh bodies are compiled
with ``contract`` only and are inlined by LLVM (not by numba), so their Cody-Waite range reduction
and magic-number rounding keep their order even inside a reassociating caller.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# Flags for the reduction loops: reassoc lets LLVM split sums into vector lanes; nnan/ninf are
# deliberately absent so comparisons and selects keep IEEE meaning for -inf and NaN, and arcp is
# absent so that x / temperature stays a correctly rounded division (a rounded reciprocal would
# shift every z by the same relative error, which does not average out in the sum).
FM = {"reassoc", "contract", "nsz", "afn"}
# Flags for exp/tanh bodies: no reassociation (it would fold (t + MAGIC) - MAGIC into t).
EXACT = {"contract"}


def _jit(**kw):
    return njit(cache=True, fastmath=FM, **kw)


def _jit_exact(**kw):
    return njit(cache=True, fastmath=EXACT, **kw)


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
    """exp for float32 (max error ~1.5 ulp; exp(0) == 1 exactly; exp(-inf) == 0; NaN -> NaN)."""
    d = _F32(-110.0) if d < _F32(-110.0) else d
    d = _F32(60.0) if d > _F32(60.0) else d
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


_E64 = tuple(1.0 / float(np.prod(np.arange(1, k + 2, dtype=np.float64))) for k in range(12, -1, -1))


@_jit_exact()
def exp64(d):
    """exp for float64 (error < 1 ulp-ish; same special values as exp32)."""
    d = -760.0 if d < -760.0 else d
    d = 700.0 if d > 700.0 else d
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


def vtanh(u):
    """tanh dispatched on the floating type."""


@overload(vtanh)
def _ol_vtanh(u):
    if u == types.float32:
        return lambda u: tanh32(u)
    if u == types.float64:
        return lambda u: tanh64(u)
    return None


def acc_zero(arr):
    """Zero of the accumulation type of ``arr``'s elements (float64 for float64, else float32)."""


@overload(acc_zero)
def _ol_acc_zero(arr):
    if arr.dtype == types.float64:
        return lambda arr: np.float64(0.0)
    if arr.dtype in (types.float32, types.int16, types.uint16):
        return lambda arr: np.float32(0.0)
    return None
