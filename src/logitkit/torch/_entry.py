"""Compiled entry points of the eager small-call route (:mod:`._eager`), on raw tensor memory.

Calling a kernel of :mod:`logitkit.kernels.cpu` from Python costs more than a small problem's
whole kernel: NumPy views of each tensor, NumPy buffers for the row statistics, a separate label
check (``aminmax``) and count, and numba's typing of eight array arguments. Here one compiled call
per pass takes the tensors' addresses and sizes (integers), checks and counts the labels, runs the
rows and, for a reduced loss, sums the per-row losses in float64 and rounds once.

Rows of up to ``SHORT_C`` classes run :func:`_short_rows`; longer rows the kernels' serial
``ce_direct``. Both compute the same maths from the same pieces (the kernel's ``maxnum``,
``vexp_diff``, special rows); ``tests/torch/test_torch_fast_path.py`` compares them.

numba is imported when this module is, which :mod:`._eager` does on the first fast call.
:func:`ce_entry` hands out the compiled function's own entry point (numba's argument-typing
dispatcher skipped: the signature is fixed, eleven integers).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import carray, njit

from ..kernels.cpu import _kernels as _K

__all__ = ["ce_entry", "ce_backward_entry", "softmax_entry", "softmax_backward_entry", "SHORT_C"]

_addr = _K._addr
_ce_direct = _K.ce_direct_serial
_ce_backward = _K._serial["ce_backward"]
_sm_direct = _K.softmax_direct_serial
_sm_bwd = _K.softmax_bwd_serial
_sm_direct_par = _K.softmax_direct  # the parallel kernels: numba's thread count, set by the caller
_sm_bwd_par = _K.softmax_bwd
_NINF = -np.inf

# Rows of at most this many classes go through ``_short_rows``: ce_direct's per-row set-up (its
# vectorized passes, the block loop, row views) costs ~100 ns a row, more than a short row's
# arithmetic.
SHORT_C = 32


@njit(cache=True, error_model="numpy")
def _short_rows(x, y, ignore_index, inv, fused, g, buf, red, ce, m_out, r_out, stats):
    """``ce_direct`` (no weight, smoothing, z-loss or transform) for short rows; returns Σ ce.

    The same maths as the kernel, from its own pieces: the maximum by ``maxnum``, the sum of the
    non-maximal terms ``exp(x - m)`` (``vexp_diff``: float32 carries the difference's rounding)
    plus the ties, ``r = log1p(sum)``, the label's ``p - 1`` from ``expm1``, and the kernel's
    special rows (a maximum of -inf, +inf or NaN). The terms go to the gradient row (``fused``,
    scaled by ``inv``) or to ``buf`` (c,) in a loop of their own, which LLVM vectorizes. ``ce``
    receives the per-row losses when ``red`` is 2 (none); ``m_out`` / ``r_out`` the row
    statistics when ``stats``.
    """
    n, c = x.shape
    zero = _K.acc_zero(x)
    total = 0.0
    w = np.ones(0, x.dtype)
    for i in range(n):
        # elements by index, never a row view: a view costs two atomic reference counts a row
        yi = y[i]
        ignored = yi == ignore_index
        mx = _K.cast(_NINF, zero)
        for j in range(c):
            mx = _K.maxnum(mx, x[i, j])
        if not (mx > _NINF and mx < np.inf):
            if w.size != c:
                w = np.ones(c, x.dtype)
            ce_i, m, r = _K._ce_special(g[i] if fused else buf, yi, ignored, w, float(c), 0.0, 1.0, inv, mx,
                                        fused, zero)
        else:
            if fused:
                for j in range(c):
                    g[i, j] = _K.vexp_diff(x[i, j], mx)
            else:
                for j in range(c):
                    buf[j] = _K.vexp_diff(x[i, j], mx)
            s = 0.0
            ties = 0.0
            for j in range(c):
                if x[i, j] == mx:
                    ties += 1.0
                else:
                    s += np.float64(g[i, j] if fused else buf[j])
            m = np.float64(mx)
            sp = s + (ties - 1.0)
            r = np.float64(math.log1p(sp))
            if ignored:
                ce_i = 0.0
                if fused:
                    for j in range(c):
                        g[i, j] = zero
            else:
                dy = np.float64(x[i, yi]) - m
                ce_i = r - dy
                if fused:
                    s1 = 1.0 + sp
                    a = _K.cast(inv / s1, zero)
                    for j in range(c):
                        g[i, j] = g[i, j] * a
                    g[i, yi] = inv * ((math.expm1(dy) - sp) / s1)
        if stats:
            m_out[i] = m
            r_out[i] = r
        if red == 2:
            ce[i] = ce_i
        else:
            total += ce_i
    return total


def _make_ce(dt: Any) -> Any:
    @njit(cache=True, error_model="numpy")
    def ce_entry(xp, yp, lp, gp, mp, rp, n, c, ignore_index, red, fused):
        """Cross-entropy of rows at ``xp`` (n, c) and int64 labels at ``yp`` (n,), default options.

        Writes the loss at ``lp`` (a scalar for ``red`` 0 mean / 1 sum, the (n,) per-row losses
        for 2 none); with ``fused`` the gradient of that loss for a unit grad_output at ``gp``
        (n, c); where ``mp`` is not 0, the row statistics m and r at ``mp`` / ``rp`` (n,).
        Returns the number of rows not ignored, or ``-1 - i`` for ``i`` the position of the first
        label that is neither ``ignore_index`` nor in [0, c) (then nothing is written).
        """
        x = carray(_addr(xp), (n, c), dt)
        y = carray(_addr(yp), n, np.int64)
        valid = 0
        for i in range(n):
            yi = y[i]
            if yi == ignore_index:
                continue
            if yi < 0 or yi >= c:
                return -1 - i
            valid += 1
        inv = 1.0
        if red == 0:
            inv = 1.0 / valid if valid > 0 else 0.0  # a mean over no row is 0, with a zero gradient
        stats = mp != 0
        if stats:
            m = carray(_addr(mp), n, dt)
            r = carray(_addr(rp), n, dt)
        else:
            m = np.empty(n if c > SHORT_C else 0, dt)
            r = np.empty(n if c > SHORT_C else 0, dt)
        if red == 2:
            ce = carray(_addr(lp), n, dt)
        else:
            ce = np.empty(n if c > SHORT_C else 0, dt)
        if fused:
            g = carray(_addr(gp), (n, c), dt)
        else:
            g = np.empty((n if c > SHORT_C else 0, 0), dt)
        if c <= SHORT_C:
            total = _short_rows(x, y, ignore_index, inv, fused, g, np.empty(c, dt), red, ce, m, r, stats)
        else:
            g_z = np.zeros(n)
            g_ce = np.full(n, inv) if fused else g_z
            _ce_direct(x, y, np.ones(c, dt), float(c), ignore_index, 0.0, 0.0, g_ce, g_z, fused, g, False, ce, m, r)
            total = 0.0
            if red != 2:
                for i in range(n):
                    total += np.float64(ce[i])
        if red != 2:
            out = carray(_addr(lp), 1, dt)
            out[0] = total * inv
        return valid

    return ce_entry


def _make_ce_backward(dt: Any) -> Any:
    @njit(cache=True, error_model="numpy")
    def ce_backward_entry(xp, yp, mp, rp, gp, op, n, c, ignore_index):
        """The serial ``ce_backward`` kernel (default options): the gradient of ``Σ g·ce`` into
        ``op`` (n, c) from rows ``xp`` (n, c), labels ``yp`` (n,) already checked, the row
        statistics ``mp`` / ``rp`` and the per-row multipliers ``gp`` (n,), all in the rows' dtype."""
        g = carray(_addr(gp), n, dt)
        g_ce = np.empty(n)
        for i in range(n):
            g_ce[i] = g[i]
        _ce_backward(carray(_addr(xp), (n, c), dt), carray(_addr(yp), n, np.int64), carray(_addr(mp), n, dt),
                     carray(_addr(rp), n, dt), g_ce, np.zeros(n), np.ones(c, dt), float(c), ignore_index, 0.0, 0.0,
                     1.0, 1.0, False, carray(_addr(op), (n, c), dt), False, np.empty(0, dt), 1)
        return 0

    return ce_backward_entry


def _make_softmax(dt: Any, parallel: bool) -> tuple[Any, Any]:
    fwd_kernel = _sm_direct_par if parallel else _sm_direct
    bwd_kernel = _sm_bwd_par if parallel else _sm_bwd

    @njit(cache=True, error_model="numpy")
    def softmax_entry(xp, yp, n, c, mode):
        """The kernel's ``softmax_direct`` of rows at ``xp`` (n, c) into ``yp``; mode 0
        softmax, 1 log_softmax."""
        fwd_kernel(carray(_addr(xp), (n, c), dt), mode, carray(_addr(yp), (n, c), dt), False, np.empty(n, dt),
                   np.empty(n, dt))
        return 0

    @njit(cache=True, error_model="numpy")
    def softmax_backward_entry(yp, dyp, dxp, n, c, log):
        """The kernel's ``softmax_bwd``: ``dx`` at ``dxp`` from the output ``y`` and its
        cotangent ``dy`` (all (n, c), distinct buffers)."""
        bwd_kernel(carray(_addr(yp), (n, c), dt), carray(_addr(dyp), (n, c), dt), carray(_addr(dxp), (n, c), dt),
                   log, 0)
        return 0

    return softmax_entry, softmax_backward_entry


_ce32 = _make_ce(np.float32)
_ce64 = _make_ce(np.float64)
_ceb32 = _make_ce_backward(np.float32)
_ceb64 = _make_ce_backward(np.float64)
# [parallel][is64]: the serial kernels for small inputs, the parallel ones (numba's pool, the
# thread count the caller set) for inputs the kernels split over threads
_SM = [[_make_softmax(np.float32, False), _make_softmax(np.float64, False)],
       [_make_softmax(np.float32, True), _make_softmax(np.float64, True)]]
_entry_points: dict = {}


def _entry_point(disp: Any, *warm: Any) -> Any:
    """``disp``'s compiled function's own entry point (it takes exactly the integers of its one
    signature: numba's argument typing skipped), compiled or loaded from the cache first by a
    call on ``warm`` (empty sizes: nothing is read or written)."""
    ep = _entry_points.get(disp)
    if ep is None:
        if not disp.signatures:
            disp(*warm)
        ep = _entry_points[disp] = disp.overloads[disp.signatures[0]].entry_point
    return ep


def ce_entry(is64: bool) -> Any:
    """The compiled cross-entropy entry for float64 (``is64``) or float32 rows."""
    return _entry_point(_ce64 if is64 else _ce32, 0, 0, 0, 0, 0, 0, 0, 0, -100, 2, False)


def ce_backward_entry(is64: bool) -> Any:
    """The compiled cross-entropy backward entry (serial, default options) for float64 / float32 rows."""
    return _entry_point(_ceb64 if is64 else _ceb32, 0, 0, 0, 0, 0, 0, 0, 0, -100)


def softmax_entry(is64: bool, parallel: bool = False) -> Any:
    """The compiled softmax / log_softmax forward entry (``parallel``: over numba's threads)."""
    return _entry_point(_SM[parallel][is64][0], 0, 0, 0, 0, 0)


def softmax_backward_entry(is64: bool, parallel: bool = False) -> Any:
    """The compiled softmax / log_softmax backward entry (``parallel``: over numba's threads)."""
    return _entry_point(_SM[parallel][is64][1], 0, 0, 0, 0, 0, False)
