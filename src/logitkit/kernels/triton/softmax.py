"""Softmax, log_softmax and logsumexp stages (forward and backward) as Triton kernels.

One program per row. A row that fits one block is read once into registers; a wider row is
streamed twice: an online pass for ``(m, r)`` (per-lane max and sum without one maximal term,
merged at the end) and a second pass, in reverse block order so that it starts on the blocks
most likely still in L2, that writes the output. Float32 accumulation (float64 for float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._math import _div, _exp, _exp_minus, _finish_r, _lane_update, _merge_lanes, _scalar, split64
from .ce import _acc, _check_x, _config, _grid, _hints, _prefetch, _rows

__all__ = ["softmax_forward", "log_softmax_forward", "logsumexp_forward", "softmax_backward",
           "log_softmax_backward"]

_SOFTMAX, _LOG_SOFTMAX, _LOGSUMEXP = 0, 1, 2


@triton.jit
def _softmax_fwd_kernel(X, OUT, LSE, stride_x, stride_o, N, V, it_hi, it_lo,
                        MODE: tl.constexpr, HAS_TEMP: tl.constexpr, IS_F64: tl.constexpr,
                        SINGLE: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
                        EV_KEEP: tl.constexpr, EV_DROP: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    pid = tl.program_id(0)
    # persistent: a grid smaller than N (one program per SM for wide rows) walks the rows
    for row32 in range(pid, N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)  # int64 offsets: N * V may exceed 2**31
        x_row = X + row * stride_x
        cols = tl.arange(0, BLOCK)
        if SINGLE:
            mask = cols < V
            z = tl.load(x_row + cols, mask=mask, other=NEG).to(ACC)
            if HAS_TEMP:
                z = z * inv_temp
            M = tl.max(tl.where(z == z, z, NEG), axis=0)  # NaN never becomes the max
            Ms = tl.where(M == NEG, 0.0, M)
            e = _exp(z - Ms, IS_F64)
            is_max = (z == M) & (z > NEG)
            cnt = tl.sum(is_max.to(tl.int32), axis=0)
            T = tl.sum(tl.where(is_max, 0.0, e), axis=0) + tl.maximum(cnt - 1, 0).to(ACC)
            if MODE == 2:
                has_nan = tl.max((z != z).to(tl.int32), axis=0)
        else:
            mv = tl.full([BLOCK], NEG, ACC)
            tv = tl.zeros([BLOCK], ACC)
            nv = tl.zeros([BLOCK], tl.int32)
            if PREFETCH:
                xn = tl.load(x_row + cols, mask=cols < V, other=NEG, eviction_policy=EV_KEEP)
            for start in range(0, V, BLOCK):
                offs = start + cols
                if PREFETCH:
                    z = xn
                    nxt = offs + BLOCK
                    xn = tl.load(x_row + nxt, mask=nxt < V, other=NEG, eviction_policy=EV_KEEP)
                else:
                    z = tl.load(x_row + offs, mask=offs < V, other=NEG, eviction_policy=EV_KEEP)
                z = z.to(ACC)
                if HAS_TEMP:
                    z = z * inv_temp
                mv, tv = _lane_update(mv, tv, z, IS_F64)
                if MODE == 2:
                    nv = tl.maximum(nv, (z != z).to(tl.int32))
            M, T = _merge_lanes(mv, tv, IS_F64)
            Ms = tl.where(M == NEG, 0.0, M)
            if MODE == 2:
                has_nan = tl.max(nv, axis=0)
        r = _finish_r(M, T, IS_F64)
        if MODE == 2:
            lse = M + r
            # a row with +inf and no NaN has lse = +inf exactly (scipy's convention)
            lse = tl.where((M == float("inf")) & (has_nan == 0), float("inf"), lse)
            tl.store(LSE + row, lse)
        else:
            o_row = OUT + row * stride_o
            if SINGLE:
                if MODE == 0:
                    scale = tl.where(M == float("inf"), float("nan"), _div(1.0 + 0.0 * T, 1.0 + T, IS_F64))
                    out = e * scale
                else:
                    out = tl.where(M == NEG, NEG, (z - Ms) - r)
                tl.store(o_row + cols, out.to(OUT.dtype.element_ty), mask=mask)
            else:
                nb = tl.cdiv(V, BLOCK)
                if PREFETCH:
                    last = (nb - 1) * BLOCK + cols
                    xn = tl.load(x_row + last, mask=last < V, other=0.0, eviction_policy=EV_DROP)
                for k in range(0, nb):
                    offs = (nb - 1 - k) * BLOCK + cols
                    mask = offs < V
                    if PREFETCH:
                        z = xn
                        prv = offs - BLOCK
                        xn = tl.load(x_row + prv, mask=prv >= 0, other=0.0, eviction_policy=EV_DROP)
                    else:
                        z = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy=EV_DROP)
                    z = z.to(ACC)
                    if HAS_TEMP:
                        z = z * inv_temp
                    if MODE == 0:
                        out = _exp_minus(z - Ms, r, IS_F64)
                    else:
                        out = tl.where(M == NEG, NEG, (z - Ms) - r)
                    tl.store(o_row + offs, out.to(OUT.dtype.element_ty), mask=mask,
                             eviction_policy=EV_DROP)


@triton.jit
def _softmax_bwd_kernel(Y, DY, OUT, stride_y, stride_dy, stride_o, N, V,
                        LOG: tl.constexpr, IS_F64: tl.constexpr, SINGLE: tl.constexpr,
                        BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
                        EV_KEEP: tl.constexpr, EV_DROP: tl.constexpr):
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    pid = tl.program_id(0)
    # persistent: a grid smaller than N (one program per SM for wide rows) walks the rows
    for row32 in range(pid, N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)  # int64 offsets: N * V may exceed 2**31
        y_row = Y + row * stride_y
        d_row = DY + row * stride_dy
        o_row = OUT + row * stride_o
        cols = tl.arange(0, BLOCK)
        if SINGLE:
            mask = cols < V
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(d_row + cols, mask=mask, other=0.0).to(ACC)
            if LOG:
                s = tl.sum(dy, axis=0)
                out = dy - _exp(y, IS_F64) * s
            else:
                s = tl.sum(y * dy, axis=0)
                out = y * (dy - s)
            tl.store(o_row + cols, out.to(OUT.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], ACC)
            if PREFETCH:
                dn = tl.load(d_row + cols, mask=cols < V, other=0.0, eviction_policy=EV_KEEP)
                if not LOG:
                    yn = tl.load(y_row + cols, mask=cols < V, other=0.0, eviction_policy=EV_KEEP)
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                nxt = offs + BLOCK
                if PREFETCH:
                    dy = dn
                    dn = tl.load(d_row + nxt, mask=nxt < V, other=0.0, eviction_policy=EV_KEEP)
                else:
                    dy = tl.load(d_row + offs, mask=mask, other=0.0, eviction_policy=EV_KEEP)
                dy = dy.to(ACC)
                if LOG:
                    acc += dy
                else:
                    if PREFETCH:
                        y = yn
                        yn = tl.load(y_row + nxt, mask=nxt < V, other=0.0, eviction_policy=EV_KEEP)
                    else:
                        y = tl.load(y_row + offs, mask=mask, other=0.0, eviction_policy=EV_KEEP)
                    acc += y.to(ACC) * dy
            s = tl.sum(acc, axis=0)
            nb = tl.cdiv(V, BLOCK)
            if PREFETCH:
                last = (nb - 1) * BLOCK + cols
                yn = tl.load(y_row + last, mask=last < V, other=0.0, eviction_policy=EV_DROP)
                dn = tl.load(d_row + last, mask=last < V, other=0.0, eviction_policy=EV_DROP)
            for k in range(0, nb):
                offs = (nb - 1 - k) * BLOCK + cols
                mask = offs < V
                if PREFETCH:
                    y = yn
                    dy = dn
                    prv = offs - BLOCK
                    yn = tl.load(y_row + prv, mask=prv >= 0, other=0.0, eviction_policy=EV_DROP)
                    dn = tl.load(d_row + prv, mask=prv >= 0, other=0.0, eviction_policy=EV_DROP)
                else:
                    y = tl.load(y_row + offs, mask=mask, other=0.0, eviction_policy=EV_DROP)
                    dy = tl.load(d_row + offs, mask=mask, other=0.0, eviction_policy=EV_DROP)
                y = y.to(ACC)
                dy = dy.to(ACC)
                if LOG:
                    out = dy - _exp(y, IS_F64) * s
                else:
                    out = y * (dy - s)
                tl.store(o_row + offs, out.to(OUT.dtype.element_ty), mask=mask, eviction_policy=EV_DROP)


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not t > 0.0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    return t


def _forward(x, temperature, out, mode):
    _check_x(x)
    t = _check_temperature(temperature)
    x, out = _rows(x, None if mode == _LOGSUMEXP else out)
    N, V = x.shape
    if mode == _LOGSUMEXP:
        lse = torch.empty(N, dtype=_acc(x.dtype), device=x.device)
        res, o = lse, x
    else:
        if out is None:
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
        res, o, lse = out, out, x
    if N > 0 and V > 0:
        its, dt = x.element_size(), x.dtype
        block, warps, single = _config(V, its, "softmax", dt)
        _softmax_fwd_kernel[(_grid(N, single, x.device, its, "softmax", V, dt),)](
            x, o, lse, x.stride(0), o.stride(0), N, V, *split64(1.0 / t),
            MODE=mode, HAS_TEMP=t != 1.0, IS_F64=x.dtype == torch.float64, SINGLE=single,
            BLOCK=block, PREFETCH=_prefetch("softmax", V, dt), **_hints("softmax", V, dt), num_warps=warps)
    elif mode == _LOGSUMEXP:
        res.fill_(float("-inf"))  # log of an empty sum
    return res


def softmax_forward(x, *, temperature=1.0, out=None):
    """``softmax(x / temperature)`` along the last axis: ``exp((z - m) - r)``.

    ``x``: ``(N, V)`` CUDA tensor (class axis contiguous); ``out``: ``None`` (new), or a tensor of
    ``x``'s shape and dtype, possibly ``x`` itself. An all ``-inf`` row gives zeros; a row with
    NaN or ``+inf`` gives NaN.

    >>> p = softmax_forward(x, temperature=2.0)   # doctest: +SKIP
    """
    return _forward(x, temperature, out, _SOFTMAX)


def log_softmax_forward(x, *, temperature=1.0, out=None):
    """``log_softmax(x / temperature)``: ``(z - m) - r``; an all ``-inf`` row gives ``-inf``.

    >>> logp = log_softmax_forward(x, out=x)   # doctest: +SKIP
    """
    return _forward(x, temperature, out, _LOG_SOFTMAX)


def logsumexp_forward(x):
    """``log sum_c exp(x_c)`` per row, ``(N,)`` float32 (float64 for float64 ``x``).

    ``-inf`` for an all ``-inf`` (or empty) row, ``+inf`` for a row holding ``+inf`` and no NaN,
    NaN for a row holding NaN.

    >>> lse = logsumexp_forward(x)   # doctest: +SKIP
    """
    return _forward(x, 1.0, None, _LOGSUMEXP)


def _backward(y, dy, out, log):
    _check_x(y, "y")
    _check_x(dy, "dy")
    if tuple(dy.shape) != tuple(y.shape) or dy.dtype != y.dtype or dy.device != y.device:
        raise ValueError(f"dy: expected shape {tuple(y.shape)}, dtype {y.dtype} and device {y.device}, "
                         f"got {tuple(dy.shape)}, {dy.dtype} and {dy.device}")
    strided = y.shape[1] > 1 and (y.stride(1) != 1 or dy.stride(1) != 1)
    if out is not None and strided and (out is y or out is dy):
        raise ValueError("out: in-place needs a contiguous class axis")
    y, out = _rows(y, out)
    dy, _ = _rows(dy, None)
    N, V = y.shape
    if out is None:
        out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if N > 0 and V > 0:
        its, dt = y.element_size(), y.dtype
        block, warps, single = _config(V, its, "softmax_bwd", dt)
        _softmax_bwd_kernel[(_grid(N, single, y.device, its, "softmax_bwd", V, dt),)](
            y, dy, out, y.stride(0), dy.stride(0), out.stride(0), N, V,
            LOG=log, IS_F64=y.dtype == torch.float64, SINGLE=single, BLOCK=block,
            PREFETCH=_prefetch("softmax_bwd", V, dt), **_hints("softmax_bwd", V, dt), num_warps=warps)
    return out


def softmax_backward(y, dy, out=None):
    """Vector-Jacobian product of softmax: ``y * (dy - sum(y * dy))`` per row.

    ``y``: the forward output ``(N, V)``; ``dy``: the incoming gradient, same shape and dtype;
    ``out`` may be ``y`` or ``dy``. Accumulates in float32 (float64 for float64).

    >>> dx = softmax_backward(p, dp, out=dp)   # doctest: +SKIP
    """
    return _backward(y, dy, out, False)


def log_softmax_backward(y, dy, out=None):
    """Vector-Jacobian product of log_softmax: ``dy - exp(y) * sum(dy)`` per row.

    >>> dx = log_softmax_backward(logp, dlogp)   # doctest: +SKIP
    """
    return _backward(y, dy, out, True)
