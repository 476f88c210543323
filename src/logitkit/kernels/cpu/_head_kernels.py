"""Numba row kernel of the fused LM head (:mod:`logitkit.core.linear_head`); imports numba.

One pass per row of raw logits ``x`` (float32 / float64, the chunk buffer of the head driver)
computes every per-token statistic the head needs -- ``m, r`` (lse = m + r), the cross-entropy
terms (class weights, label smoothing), the label's log-probability, the entropy, the argmax and
the forward KL, reverse KL or generalized JSD against a dense teacher -- and, when asked,
overwrites the row with the gradient with respect to ``x`` of ``Σ_k g_k · value_k`` for any
combination of row cotangents ``g_ce, g_lse, g_lp, g_ent, g_kl`` (and ``g_sq`` of ``lse²``, the z-loss):

    dz_c = α p_c + κ p_c ls_c − β w_c − γ [c = y] − g_kl q_c,   dx = dz / T

with ``α = a_ce + g_lse + 2 g_sq lse − g_lp − g_ent H + g_kl``, ``κ = −g_ent``, ``β = b_ce``,
``γ = c_ce − g_lp`` (``a_ce, b_ce, c_ce`` the cross-entropy coefficients of
:func:`logitkit.kernels.cpu._kernels._ce_coefs`). The label's entry is written as
``γ (p_y − 1) + (α − γ) p_y + ...`` with ``p_y − 1`` from ``expm1`` so that confident rows keep
their ~1e-13 gradients.

Accuracy: ``d = (x − max x) / T`` (one rounding, as the CE kernels), the sum of ``exp(d)`` over the
non-maximal terms with the maximal ones counted exactly (``r = log1p(sum + ties − 1)``); the
entropy ``H = r + Σ e (−d) / S`` (every term ≥ 0) and the divergence
``KL = Σ q (u − d) − r_t + r`` (``u`` the teacher's shifted logits, the difference formed in
float64) accumulate per block of :data:`_B` terms and in float64 across blocks. The reverse KL
(``div`` 1) is ``Σ e (d − u) / Σ e − r + r_t`` with ``e = exp(d)`` in float64 (the p-weighted
mean of ``d − u``), and its gradient ``g p (d − u − (r − r_t + KL))`` forms ``d − u − ·`` in
float64: it cancels where ``p`` is large. The JSD (``div`` 2, :func:`_blk_jsd`) is a third pass per row in
float64 once both rows' ``r`` are known, and its gradient ``(1−β) g p (ls − log M − D)`` forms
``ls − log M`` per element in float64 too.

Rows the kernel does not finish -- a maximum that is not finite (masked or +inf rows), a NaN
anywhere in the row or its teacher row, a label outside ``[0, V)`` -- are flagged in ``special``
and left untouched; the driver computes them with the array-level core (same semantics).

Caching: the kernels inline helpers of :mod:`._kernels`, and numba's on-disk cache checks only the
source file of the cached function, so this module registers cache locators whose source stamp
covers both files (a change to either recompiles).
"""
from __future__ import annotations

import math
import os
import types as _pytypes

import numpy as np
from numba import prange

from . import _kernels as _k
from ._kernels import (_B, _NINF, _ce_coefs, _ce_loss, _count_max, _jit, _jit_exact, _rowmax, _smooth_sum,
                       acc_zero, cast, exp64, vexp_neg)

_DEPS = (os.path.abspath(__file__), os.path.abspath(_k.__file__))


def _register_locators() -> None:
    """Cache locators for this file whose stamp is that of this file and of ``_kernels.py``."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba layout changed: numba's default locators
        return
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or any(getattr(c, "_logitkit_head", False) for c in impl._locator_classes):
        return

    class _Mixin:
        _logitkit_head = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.abspath(py_file) != _DEPS[0]:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return tuple((os.stat(p).st_mtime, os.stat(p).st_size) for p in _DEPS)

    bases = [getattr(caching, n, None) for n in ("UserProvidedCacheLocator", "InTreeCacheLocator",
                                                 "UserWideCacheLocator")]
    new = [type("Head" + b.__name__, (_Mixin, b), {}) for b in bases if b is not None]
    impl._locator_classes[:0] = new


_register_locators()


@_jit_exact()
def _shifted(xj, mx, t, one):
    """``(d, lo)`` with ``d + lo`` = (x − mx) / t to about twice the working precision: the
    rounding error of x − mx (TwoSum) and the division's remainder (an FMA under ``contract``).
    A float32 d alone is off by up to ~2e-6 at d ≈ −35, which is the whole relative error
    budget of a confident row's ~1e-12 loss (its sum consists of such terms)."""
    s = xj - mx
    bv = s - xj
    av = s - bv
    lo = (xj - av) + ((-mx) - bv)
    if t == one:
        return s, lo
    d = s / t
    rem = s - d * t
    return d, (rem + lo) / t


@_jit()
def _blk_stats(src, mx, t, want_a):
    """Σ exp(d) over the non-maximal terms and Σ exp(d)·(−d), d = (x − mx) / t, in src's dtype;
    exp(d) is corrected by the rounding error of d (``_shifted``)."""
    zero = mx - mx
    one = zero + cast(1.0, mx)
    s = zero
    a = zero
    for j in range(src.size):
        xj = src[j]
        d, lo = _shifted(xj, mx, t, one)
        e = vexp_neg(d)
        e = zero if e == zero else e + e * lo  # (a masked class has lo = NaN)
        s += zero if xj == mx else e
        if want_a:
            a += zero if e == zero else e * (-d)
    return s, a


@_jit()
def _blk_kl(sr, smx, st, tr, tmx, tt):
    """``(Σ exp(u)·(u − d), Σ exp(u))`` in float64, u = (t − tmx)·tt, d = (x − smx)·st (reciprocal
    temperatures); terms with exp(u) = 0 count 0. KL = Σ q (u − d) − r_t + r is a difference of
    numbers ~10 for a ~0.1 result: a float32 exp or sum here costs ~1e-6 of it."""
    s = 0.0
    t = 0.0
    for j in range(sr.size):
        u64 = (np.float64(tr[j]) - np.float64(tmx)) * tt
        d64 = (np.float64(sr[j]) - np.float64(smx)) * st
        eu = exp64(u64)
        t += eu
        s += 0.0 if eu == 0.0 else eu * (u64 - d64)
    return s, t


@_jit()
def _blk_rkl(sr, smx, st, tr, tmx, tt):
    """``(Σ exp(d)·(d − u), Σ exp(u), Σ exp(d))`` in float64 (the reverse KL's sums; see
    :func:`_blk_kl`); terms with exp(d) = 0 count 0."""
    s = 0.0
    t = 0.0
    a = 0.0
    for j in range(sr.size):
        u64 = (np.float64(tr[j]) - np.float64(tmx)) * tt
        d64 = (np.float64(sr[j]) - np.float64(smx)) * st
        eu = exp64(u64)
        ed = exp64(d64)
        t += eu
        a += ed
        s += 0.0 if ed == 0.0 else ed * (d64 - u64)
    return s, t, a


@_jit_exact()
def _blk_jsd(sr, smx, st, tr, tmx, tt, r, rt, c0, lb, l1b):
    """``(Σ q (lt − log M), Σ q, Σ p (ls − log M), Σ p)`` in float64 for the generalized JSD,
    ``M = β q + (1−β) p``: with ``u' = ls − lt + log((1−β)/β)`` (``c0``) and
    ``l = log(1 + e^−|u'|)``, ``lt − log M = −log β − max(u', 0) − l`` and
    ``ls − log M = −log(1−β) + min(u', 0) − l`` (``lb``, ``l1b``: log β, log(1−β))."""
    a = 0.0
    qs = 0.0
    d = 0.0
    ps = 0.0
    for j in range(sr.size):
        ls = (np.float64(sr[j]) - np.float64(smx)) * st - r
        lt = (np.float64(tr[j]) - np.float64(tmx)) * tt - rt
        p = math.exp(ls)
        q = math.exp(lt)
        if p > 0.0 or q > 0.0:
            up = (ls - lt) + c0
            l1p = math.log1p(math.exp(-abs(up)))
            if q > 0.0:
                a += q * ((-lb - l1p) - (up if up > 0.0 else 0.0))
                qs += q
            if p > 0.0:
                d += p * ((-l1b - l1p) + (up if up < 0.0 else 0.0))
                ps += p
    return a, qs, d, ps


@_jit_exact()
def _grad_row(xr, mx, t, r, a_s, k_s, bw, w, tr, tmx, tt, gq, use_t, inv_t, rk, rc, use_r, jr, jrt, jc, use_j):
    """xr[c] = (a_s e_c + k_s e_c (d_c − r) − bw w_c − gq q'_c + rk e_c (d_c − u_c − rc)) / T with
    e = exp(d) (the last term, the reverse KL's, with d − u − rc in float64: it cancels where
    e is large). ``use_j``: the JSD's term instead, ``rk e_c (ls_c − log M_c − rc)`` (see
    :func:`_blk_jsd`; ``jr, jrt`` the student's and teacher's r, ``jc = (c0, log(1−β))``)."""
    zero = mx - mx
    a32 = cast(a_s, mx)
    k32 = cast(k_s, mx)
    r32 = cast(r, mx)
    b32 = cast(bw, mx)
    g32 = cast(gq, mx)
    it = cast(inv_t, mx)
    ttz = cast(tt, mx)
    for j in range(xr.size):
        d = (xr[j] - mx) / t
        e = vexp_neg(d)
        g = a32 * e
        if k_s != 0.0:
            g += zero if e == zero else k32 * e * (d - r32)
        if bw != 0.0:
            g -= b32 * w[j]
        if use_t:
            g -= g32 * vexp_neg((tr[j] - tmx) * ttz)
        if use_r and e != zero:
            dd = (np.float64(xr[j]) - np.float64(mx)) * inv_t - (np.float64(tr[j]) - np.float64(tmx)) * tt
            g += cast(rk * (dd - rc), mx) * e
        if use_j and e != zero:
            ls = (np.float64(xr[j]) - np.float64(mx)) * inv_t - jr
            lt = (np.float64(tr[j]) - np.float64(tmx)) * tt - jrt
            up = (ls - lt) + jc[0]
            es = (-jc[1] - math.log1p(math.exp(-abs(up)))) + (up if up < 0.0 else 0.0)
            g += cast(rk * (es - rc), mx) * e
        xr[j] = g * it


@_jit_exact()
def _argmax(xr, mx):
    for j in range(xr.size):
        if xr[j] == mx:
            return j
    return 0


@_jit_exact(parallel=True)
def head_rows(x, lab, has_lab, ii, w, wsum, eps, temps, tx, use_t, div, beta, tt, want_ent, want_am,
              cots, want_grad, st, special):
    """Per-row statistics into ``st`` (8, n) float64: m, r, ce, lp, ent, kl, argmax, aux (the
    divergence's part the gradient subtracts; ``div`` 0 kl, 1 reverse_kl, 2 jsd with ``beta``); gradient
    into ``x`` when ``want_grad`` (``cots`` (6, n): g_ce, g_lse, g_lp, g_ent, g_kl and g_sq, the
    cotangent of lse², i.e. of the z-loss)."""
    n, v = x.shape
    rev = div == 1
    jsd = div == 2
    lb = math.log(beta) if jsd else 0.0
    l1b = math.log1p(-beta) if jsd else 0.0
    jc = (l1b - lb, l1b)
    for i in prange(n):
        xr = x[i]
        zero = acc_zero(xr)
        y = lab[i] if has_lab else 0
        if has_lab and y == ii:
            if want_grad:
                for j in range(v):
                    xr[j] = zero
            for k in range(8):
                st[k, i] = 0.0
            continue
        if y < 0 or y >= v:
            special[i] = 1
            continue
        T = temps[i]
        tz = cast(T, zero)
        mx = _rowmax(xr, zero)
        if not (mx > _NINF and mx < np.inf):
            special[i] = 1
            continue
        ties = np.float64(_count_max(xr, mx))
        need_a = want_ent or (want_grad and cots[3, i] != 0.0)
        s = 0.0
        a = 0.0
        for b in range(0, v, _B):
            bs, ba = _blk_stats(xr[b:min(b + _B, v)], mx, tz, need_a)
            s += np.float64(bs)
            a += np.float64(ba)
        sp = s + (ties - 1.0)
        r = math.log1p(sp)
        S = 1.0 + sp
        ent = r + a / S
        m = np.float64(mx) / T
        dy = (np.float64(xr[y]) - np.float64(mx)) / T
        wy = np.float64(w[y])
        sm = _smooth_sum(xr, mx, w) / T if eps != 0.0 else 0.0
        kl = 0.0
        aux = 0.0
        rt = 0.0
        St = 1.0
        tmx = zero
        if use_t:
            trw = tx[i]
            tmx = _rowmax(trw, zero)
            if not (tmx > _NINF and tmx < np.inf):
                special[i] = 1
                continue
            ks = 0.0
            St = 0.0
            Ss = 0.0
            for b in range(0, v, _B):
                e_ = min(b + _B, v)
                if rev or jsd:
                    bk, bt, bs = _blk_rkl(xr[b:e_], mx, 1.0 / T, trw[b:e_], tmx, 1.0 / tt)
                    Ss += bs
                else:
                    bk, bt = _blk_kl(xr[b:e_], mx, 1.0 / T, trw[b:e_], tmx, 1.0 / tt)
                ks += bk
                St += bt
            rt = math.log(St)  # St >= 1 (the maximal terms are exactly 1), all in float64
            if jsd:
                ja, jq, jd, jp = 0.0, 0.0, 0.0, 0.0
                for b in range(0, v, _B):
                    e_ = min(b + _B, v)
                    ba, bq, bd, bp = _blk_jsd(xr[b:e_], mx, 1.0 / T, trw[b:e_], tmx, 1.0 / tt, r, rt,
                                              l1b - lb, lb, l1b)
                    ja += ba
                    jq += bq
                    jd += bd
                    jp += bp
                aux = jd / jp
                kl = beta * (ja / jq) + (1.0 - beta) * aux
            elif rev:
                # Σ p (ls − lt) as the p-weighted mean of d − u (Σ exp(d) in the same float64
                # terms), then − r + rt; an infinite one (the teacher masks a class the student
                # keeps) is left to the core, with its semantics
                kl = ks / Ss - r + rt
                if not kl < np.inf:
                    special[i] = 1
                    continue
            else:
                kl = ks / St - rt + r
            if not jsd:
                aux = kl
        if r != r or ent != ent or kl != kl or (eps != 0.0 and sm != sm):
            special[i] = 1
            continue
        ce = _ce_loss(eps, wy, r, dy, sm, wsum, v) if has_lab else 0.0
        st[0, i] = m
        st[1, i] = r
        st[2, i] = ce
        st[3, i] = dy - r
        st[4, i] = ent
        st[5, i] = kl
        st[6, i] = np.float64(_argmax(xr, mx)) if want_am else 0.0
        st[7, i] = aux
        if not want_grad:
            continue
        gce = cots[0, i]
        glp = cots[2, i]
        gent = cots[3, i]
        gkl = cots[4, i]
        ac, bc, cc = (_ce_coefs(eps, wy, wsum, v, gce, 0.0, 1.0) if has_lab else (0.0, 0.0, 0.0))
        alpha = ac + cots[1, i] + 2.0 * cots[5, i] * (m + r) - glp - gent * ent + (gkl if div == 0 else 0.0)
        gamma = cc - glp
        kappa = -gent
        inv_t = 1.0 / T
        trw = tx[i] if use_t else xr
        use_r = use_t and rev and gkl != 0.0
        use_j = use_t and jsd and gkl != 0.0
        rc = aux if jsd else r - rt + kl
        rk = (1.0 - beta) * gkl / S if jsd else gkl / S
        _grad_row(xr, mx, tz, r, alpha / S, kappa / S, bc, w, trw, tmx,
                  1.0 / tt, gkl / St, use_t and div == 0 and gkl != 0.0, inv_t, rk, rc, use_r, r, rt, jc, use_j)
        if has_lab:
            pm1 = (math.expm1(dy) - sp) / S
            py = pm1 + 1.0
            gy = gamma * pm1 + (alpha - gamma) * py + kappa * py * (dy - r)
            gy -= bc * wy
            if use_t and div == 0 and gkl != 0.0:
                gy -= gkl * math.exp((np.float64(tx[i][y]) - np.float64(tmx)) / tt) / St
            if use_r:
                gy += gkl * py * ((dy - (np.float64(tx[i][y]) - np.float64(tmx)) / tt) - rc)
            if use_j:
                upy = ((dy - r) - ((np.float64(tx[i][y]) - np.float64(tmx)) / tt - rt)) + jc[0]
                esy = (-l1b - math.log1p(math.exp(-abs(upy)))) + (upy if upy < 0.0 else 0.0)
                gy += (1.0 - beta) * gkl * py * (esy - rc)
            xr[y] = cast(gy * inv_t, zero)


def _serial_clone(fn):
    py = fn.py_func
    f = _pytypes.FunctionType(py.__code__, py.__globals__, py.__name__ + "_serial", py.__defaults__,
                              py.__closure__)
    f.__qualname__ = py.__qualname__ + "_serial"
    f.__module__ = py.__module__
    f.__doc__ = py.__doc__
    return _jit_exact()(f)


head_rows_serial = _serial_clone(head_rows)
