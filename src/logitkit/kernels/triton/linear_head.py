"""The per-token outputs of a linear head -- ``lse``, ``logprobs``, ``entropy`` -- without (N, V) logits.

For ``z = transform(hidden @ linear_weight.T + linear_bias)`` (softcap, then temperature) and
``ls = log_softmax(z)``, per row: ``lse = logsumexp(z)``, ``logprobs = ls[label]``,
``entropy = -sum p ls``. These are the outputs of :func:`logitkit.linear_head` other than the loss
(which :mod:`.linear_ce` computes) and the teacher divergences.

Forward, as :mod:`.linear_ce`: a program owns ``BM`` rows and a slice of the vocabulary, forms
``BM x BN`` logit tiles on chip with ``tl.dot`` and keeps per row the running max ``m``, ``t`` (the
sum of ``exp(z - m)`` without one maximal term, so that ``r = log1p(t)`` keeps its relative
accuracy for confident rows), ``a = sum exp(z - m) (z - m)`` and the label logit. A small kernel
merges the slices: ``lse = m + r``, ``logprobs = (z_y - m) - r``, ``entropy = r - a / (1 + t)``
(both terms >= 0: no cancellation, a confident row's ~1e-12 entropy keeps its digits).

Backward of ``sum g_lse lse + g_lp logprobs + g_ent entropy`` recomputes the logits chunk by chunk:
``dz = g_lse p + g_lp (onehot - p) - g_ent p (ls + entropy)`` (``onehot - p`` at the label as
``-expm1(ls_y)``), times the transform's derivative, then ``dW``, ``dhidden`` and ``dbias`` by the
kernels of :mod:`.linear_ce`. One more optional cotangent, ``g_smooth`` of ``-sum_c w_c z_c`` (label
smoothing's class sum, class weights ``w`` optional), adds ``-g_smooth w_c`` to ``dz``: with it the
cross-entropy of :mod:`.linear_ce` (weights, smoothing) is a combination of these cotangents, so a
loss with any other outputs takes one backward pass.

Ignored rows (``labels == ignore_index``) give 0 in every output and no gradient; a bad label gives
NaN ``logprobs`` for its row and sets the device flag (:mod:`._labels`). Without ``labels`` no row is
ignored and ``logprobs`` is ``None``.

>>> lse, lp, ent, m, r = linear_head_forward(h, W, y)                          # doctest: +SKIP
>>> dh, dW, db = linear_head_backward(h, W, y, m, r, ent, None, g_lp, g_ent)   # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _labels
from ._math import _exp, _expm1, _finish_r, _merge_lanes, _scalar, _transform, _div, split64
from .ce import _flag_bad, _row_scale, label_flag
from .linear_ce import (_check, _lce_dh_kernel, _lce_dw_kernel, _logit_tile, _num_sms, _tiles,
                        _upcast)
from .linear_ce import linear_ce_backward, linear_ce_forward  # noqa: F401  (the loss, for torch.head)

__all__ = ["linear_head_forward", "linear_head_backward"]


@triton.jit
def _lh_fwd_kernel(Hd, Wt, Bias, PM, PT, PA, PY, LABELS, N, V, H, stride_h, stride_w, cols_per_split,
                   cap_hi, cap_lo, it_hi, it_lo,
                   HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_TEMP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, IS_F64: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    softcap = _scalar(cap_hi, cap_lo, IS_F64)
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM)
    row_ok = rows < N
    if HAS_LABELS:
        y = tl.load(LABELS + rows, mask=row_ok, other=-1).to(tl.int64)
    v0 = sp * cols_per_split
    v1 = tl.minimum(v0 + cols_per_split, V)
    m = tl.full([BM], NEG, ACC)
    t = tl.zeros([BM], ACC)
    a = tl.zeros([BM], ACC)  # sum exp(z - m) (z - m) over the columns seen
    zy = tl.zeros([BM], ACC)
    for c in range(v0, v1, BN):
        cols = c + tl.arange(0, BN)
        col_ok = cols < v1
        z = _logit_tile(Hd, Wt, Bias, rows, cols, row_ok, col_ok, stride_h, stride_w, H,
                        HAS_BIAS, IEEE, UPCAST, IS_F64, BM, BN, BK).to(ACC)
        z, _f = _transform(z, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
        z = tl.where(col_ok[None, :], z, NEG)
        if HAS_LABELS:
            is_y = cols[None, :].to(tl.int64) == y[:, None]
            zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        bm = tl.max(tl.where(z == z, z, NEG), axis=1)
        m_new = tl.maximum(m, bm)
        ms = tl.where(m_new == NEG, 0.0, m_new)
        d = z - ms[:, None]
        e = _exp(d, IS_F64)
        is_max = (z == m_new[:, None]) & (z > NEG)
        cnt = tl.sum(is_max.to(tl.int32), axis=1).to(ACC)
        tile = tl.sum(tl.where(is_max, 0.0, e), axis=1)
        # -inf entries add nothing (0 * -inf would be NaN); the max terms add exactly 0
        tile_a = tl.sum(tl.where((z > NEG) & (is_max == 0), e * d, 0.0), axis=1)
        grew = m_new > m
        shift = tl.where(m == NEG, 0.0, m - ms)  # <= 0: the old max relative to the new one
        f = _exp(shift, IS_F64)
        f = tl.where(m == NEG, 0.0, f)
        # re-base the old sums on the new max: sum e^(z - m_new)(z - m_new) = f (a + shift (t + 1))
        a = tl.where(grew, f * (a + shift * (t + 1.0)), a) + tile_a
        t = tl.where(grew, (t + 1.0) * f + tile + (cnt - 1.0), t + tile + cnt)
        m = m_new
    off = sp.to(tl.int64) * N + rows
    tl.store(PM + off, m, mask=row_ok)
    tl.store(PT + off, t, mask=row_ok)
    tl.store(PA + off, a, mask=row_ok)
    if HAS_LABELS:
        tl.store(PY + off, zy, mask=row_ok)


@triton.jit
def _lh_combine_kernel(PM, PT, PA, PY, LABELS, LSE, LP, ENT, M_OUT, R_OUT, FLAG, N, V, n_splits,
                       ignore_index, HAS_LABELS: tl.constexpr, IS_F64: tl.constexpr, SP: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    sidx = tl.arange(0, SP)
    sok = sidx < n_splits
    off = sidx.to(tl.int64) * N + row
    pm = tl.load(PM + off, mask=sok, other=NEG)
    pt = tl.load(PT + off, mask=sok, other=0.0)
    pa = tl.load(PA + off, mask=sok, other=0.0)
    M, T = _merge_lanes(pm, pt, IS_F64)
    r = _finish_r(M, T, IS_F64)
    Ms = tl.where(M == NEG, 0.0, M)
    shift = tl.where(pm == NEG, 0.0, pm - Ms)
    f = tl.where(pm == NEG, 0.0, _exp(shift, IS_F64))
    A = tl.sum(f * (pa + shift * (pt + 1.0)), axis=0)
    ent = r - _div(A, 1.0 + T, IS_F64)
    lse = M + r
    if HAS_LABELS:
        lab = tl.load(LABELS + row).to(tl.int64)
        ignored = lab == ignore_index
        bad = ((lab < 0) | (lab >= V)) & (ignored == 0)
        zy = tl.sum(tl.load(PY + off, mask=sok, other=0.0), axis=0)
        lp = (zy - Ms) - r
        lp = tl.where(ignored, 0.0, tl.where(bad, float("nan"), lp))
        tl.store(LP + row, lp)
        ent = tl.where(ignored, 0.0, ent)
        lse = tl.where(ignored, 0.0, lse)
        _flag_bad(FLAG, bad, row, lab, V)
    tl.store(ENT + row, ent)
    tl.store(LSE + row, lse)
    tl.store(M_OUT + row, M)
    tl.store(R_OUT + row, r)


@triton.jit
def _lh_dz_kernel(Hd, Wt, Bias, LABELS, M_IN, R_IN, ENT, GLSE, GLP, GENT, GSM, CW, DZ,
                  N, V, H, c0, c1, stride_h, stride_w, stride_dz, s_lse, s_lp, s_ent, s_sm, ignore_index,
                  cap_hi, cap_lo, it_hi, it_lo,
                  HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GLSE: tl.constexpr,
                  HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, HAS_GSM: tl.constexpr,
                  HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_TEMP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, IS_F64: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    softcap = _scalar(cap_hi, cap_lo, IS_F64)
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM)
    row_ok = rows < N
    lcols = pid_v * BN + tl.arange(0, BN)
    cols = c0 + lcols
    col_ok = cols < c1
    m = tl.load(M_IN + rows, mask=row_ok, other=0.0).to(ACC)
    r = tl.load(R_IN + rows, mask=row_ok, other=0.0).to(ACC)
    ms = tl.where(m == NEG, 0.0, m)
    r64 = rows.to(tl.int64)
    z = _logit_tile(Hd, Wt, Bias, rows, cols, row_ok, col_ok, stride_h, stride_w, H,
                    HAS_BIAS, IEEE, UPCAST, IS_F64, BM, BN, BK).to(ACC)
    z, fac = _transform(z, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
    d = (z - ms[:, None]) - r[:, None]  # log_softmax
    p = _exp(d, IS_F64)
    dz = p * 0.0
    if HAS_GLSE:
        dz += tl.load(GLSE + r64 * s_lse, mask=row_ok, other=0.0).to(ACC)[:, None] * p
    if HAS_GENT:
        ent = tl.load(ENT + rows, mask=row_ok, other=0.0).to(ACC)
        g_ent = tl.load(GENT + r64 * s_ent, mask=row_ok, other=0.0).to(ACC)
        dz -= g_ent[:, None] * (p * (d + ent[:, None]))
    if HAS_LABELS:
        lab = tl.load(LABELS + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        ignored = (lab == ignore_index) | (row_ok == 0)
        bad = ((lab < 0) | (lab >= V)) & (ignored == 0)
        if HAS_GLP:
            g_lp = tl.load(GLP + r64 * s_lp, mask=row_ok, other=0.0).to(ACC)
            g_lp = tl.where(bad, float("nan"), g_lp)
            is_y = cols[None, :].to(tl.int64) == lab[:, None]
            # onehot - p at the label as -expm1(ls_y): a confident row keeps its tiny gradient
            dz -= g_lp[:, None] * tl.where(is_y, _expm1(d, IS_F64), p)
    else:
        ignored = row_ok == 0
    if HAS_GSM:
        # the cotangent of -sum_c w_c z_c (label smoothing's class sum): its gradient is -w_c
        g_sm = tl.load(GSM + r64 * s_sm, mask=row_ok, other=0.0).to(ACC)
        if HAS_WEIGHT:
            dz -= g_sm[:, None] * tl.load(CW + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:
            dz -= g_sm[:, None]
    if HAS_SOFTCAP or HAS_TEMP:
        dz = dz * fac
    ok = row_ok[:, None] & col_ok[None, :]
    dz = tl.where(ignored[:, None] | (ok == 0), 0.0, dz)
    tl.store(DZ + r64[:, None] * stride_dz + lcols[None, :], dz.to(DZ.dtype.element_ty), mask=ok)


def _validated(hidden, linear_weight, labels, linear_bias, softcap, temperature, weight=None):
    """linear_ce's checks (labels optional here); returns what it returns, labels ``None`` if absent,
    and the class weights in the accumulation dtype (or ``None``)."""
    has_labels = labels is not None
    if not has_labels:
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 2:
            raise ValueError("hidden: expected a 2-D torch.Tensor")
        labels = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    out = _check(hidden, linear_weight, labels, linear_bias, weight, 0.0, softcap, temperature)
    hidden, lw, labels, bias, w, _ws, N, H, V, acc = out
    return hidden, lw, labels if has_labels else None, bias, N, H, V, acc, w


def linear_head_forward(hidden, linear_weight, labels=None, linear_bias=None, *, ignore_index=-100,
                        softcap=None, temperature=1.0):
    """Per-row ``(lse, logprobs, entropy, m, r)`` of ``z = transform(hidden @ linear_weight.T + bias)``.

    Each ``(N,)`` float32 (float64 for float64 ``hidden``); ``logprobs`` is ``None`` without
    ``labels``; ignored rows give 0 in ``lse``, ``logprobs`` and ``entropy``. ``m, r``
    (``lse = m + r``, for every row) are what :func:`linear_head_backward` needs. Memory: ``O(N)``
    plus ``O(N * splits)`` partials; the logits never reach memory.

    >>> lse, lp, ent, m, r = linear_head_forward(h, W, y)   # doctest: +SKIP
    """
    hidden, lw, labels, bias, N, H, V, acc, _ = _validated(hidden, linear_weight, labels, linear_bias, softcap,
                                                            temperature)
    dev = hidden.device
    has_labels = labels is not None
    lse = torch.empty(N, dtype=acc, device=dev)
    lp = torch.empty(N, dtype=acc, device=dev) if has_labels else None
    ent = torch.empty(N, dtype=acc, device=dev)
    m = torch.empty(N, dtype=acc, device=dev)
    r = torch.empty(N, dtype=acc, device=dev)
    if N == 0:
        return lse, lp, ent, m, r
    if V == 0:
        raise ValueError("linear_weight: expected at least one class (V > 0)")
    if has_labels:
        _labels.poll(dev)  # raise a bad label an earlier call saw, before launching this one
    t = _tiles(hidden.dtype)
    BM, BN, BK = t["BM"], t["BN"], t["BK"]
    n_row_blocks = triton.cdiv(N, BM)
    want = max(1, triton.cdiv(4 * _num_sms(dev), n_row_blocks))  # about 4 programs per SM
    per_split = triton.cdiv(triton.cdiv(V, want), BN) * BN
    splits = triton.cdiv(V, per_split)
    pm = torch.empty(splits, N, dtype=acc, device=dev)
    pt = torch.empty_like(pm)
    pa = torch.empty_like(pm)
    py = torch.empty_like(pm) if has_labels else pm
    dummy = pm
    is64 = hidden.dtype == torch.float64
    _lh_fwd_kernel[(n_row_blocks, splits)](
        hidden, lw, bias if bias is not None else dummy, pm, pt, pa, py,
        labels if has_labels else dummy, N, V, H, hidden.stride(0), lw.stride(0), per_split,
        *split64(float(softcap) if softcap is not None else 1.0), *split64(1.0 / float(temperature)),
        HAS_BIAS=bias is not None, HAS_LABELS=has_labels, HAS_SOFTCAP=softcap is not None,
        HAS_TEMP=float(temperature) != 1.0, IEEE=hidden.dtype in (torch.float32, torch.float64),
        UPCAST=_upcast(hidden), IS_F64=is64, BM=BM, BN=BN, BK=BK,
        num_warps=8 if BM * BN >= 128 * 128 else 4)
    _lh_combine_kernel[(N,)](
        pm, pt, pa, py, labels if has_labels else dummy, lse, lp if has_labels else dummy, ent, m, r,
        label_flag(dev), N, V, splits, int(ignore_index), HAS_LABELS=has_labels, IS_F64=is64,
        SP=triton.next_power_of_2(splits), num_warps=1)
    if has_labels:
        _labels.after_launch(dev)
    return lse, lp, ent, m, r


def linear_head_backward(hidden, linear_weight, labels, m, r, entropy, g_lse, g_logprobs, g_entropy,
                         linear_bias=None, *, ignore_index=-100, softcap=None, temperature=1.0,
                         g_smooth=None, weight=None):
    """Gradients of ``sum_i g_lse[i] lse[i] + g_logprobs[i] logprobs[i] + g_entropy[i] entropy[i]``
    ``+ g_smooth[i] s[i]``, where ``s = -sum_c weight_c z_c`` (``weight_c = 1`` without ``weight``).

    ``s`` is the class sum of label smoothing: a cross-entropy row ``(1 - eps) w_y (-logprobs) +
    (eps / V) (sum_c w_c lse + s)`` is this objective with ``g_logprobs = -(1 - eps) w_y g``,
    ``g_lse = (eps / V) sum(w) g`` and ``g_smooth = (eps / V) g``, so any mixture of the loss and
    the other outputs takes one backward pass (:mod:`logitkit.torch.head` uses it that way).
    ``m, r, entropy``: from :func:`linear_head_forward` (``entropy`` may be ``None`` when
    ``g_entropy`` is); each ``g_*`` is ``(N,)``, a scalar, or ``None`` for an output that receives
    no gradient (``g_logprobs`` needs ``labels``). Returns ``(dhidden, dlinear_weight,
    dlinear_bias)`` in the inputs' dtypes (``None`` without a bias), float32 accumulation; extra
    memory an ``(N, VC)`` chunk of ``dz`` (``LOGITKIT_LCE_CHUNK`` classes, default ~64 MiB) and an
    ``(N, H)`` float32 accumulator.

    >>> dh, dW, db = linear_head_backward(h, W, y, m, r, ent, None, g_lp, 0.01)   # doctest: +SKIP
    """
    hidden, lw, labels, bias, N, H, V, acc, cw = _validated(hidden, linear_weight, labels, linear_bias, softcap,
                                                             temperature, weight)
    dev = hidden.device
    if g_logprobs is not None and labels is None:
        raise ValueError("g_logprobs: needs labels")
    if g_entropy is not None and entropy is None:
        raise ValueError("entropy: needed (from linear_head_forward) when g_entropy is given")

    def stat(v, name):
        v = v.reshape(-1).to(device=dev, dtype=acc).contiguous()
        if v.numel() != N:
            raise ValueError(f"{name}: expected {N} row values, got {v.numel()}")
        return v

    m, r = stat(m, "m"), stat(r, "r")
    ent = stat(entropy, "entropy") if g_entropy is not None else m
    gs = [(None, 0) if g is None else _row_scale(g, N, dev, name)
          for g, name in ((g_lse, "g_lse"), (g_logprobs, "g_logprobs"), (g_entropy, "g_entropy"),
                          (g_smooth, "g_smooth"))]
    dw = torch.empty_like(lw, memory_format=torch.contiguous_format)
    db32 = torch.empty(V, dtype=acc, device=dev) if bias is not None else None
    if N == 0 or V == 0 or H == 0 or all(g is None for g, _ in gs):
        dh = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        dw.zero_()
        return dh, dw, (db32.zero_().to(bias.dtype) if bias is not None else None)
    t = _tiles(hidden.dtype)
    BM, BN, BK, BH = t["BM"], t["BN"], t["BK"], t["BH"]
    env_chunk = os.environ.get("LOGITKIT_LCE_CHUNK")
    vc = int(env_chunk) if env_chunk else (64 << 20) // max(1, N * hidden.element_size())
    vc = max(BN, (vc // BN) * BN)
    vc = min(vc, triton.cdiv(V, BN) * BN)
    n_vblk = triton.cdiv(vc, BN)
    dz = torch.empty(N, vc, dtype=hidden.dtype, device=dev)
    dh_acc = torch.empty(N, H, dtype=acc, device=dev)
    dummy = m
    ieee = hidden.dtype in (torch.float32, torch.float64)
    is64 = hidden.dtype == torch.float64
    warps = 8 if BM * BN >= 128 * 128 else 4
    (gl, sl), (gp, sp_), (ge, se), (gs_, ss) = gs
    for i, c0 in enumerate(range(0, V, vc)):
        c1 = min(c0 + vc, V)
        width = c1 - c0
        _lh_dz_kernel[(triton.cdiv(N, BM), triton.cdiv(width, BN))](
            hidden, lw, bias if bias is not None else dummy, labels if labels is not None else dummy,
            m, r, ent, gl if gl is not None else dummy, gp if gp is not None else dummy,
            ge if ge is not None else dummy, gs_ if gs_ is not None else dummy, cw if cw is not None else dummy,
            dz, N, V, H, c0, c1, hidden.stride(0), lw.stride(0), dz.stride(0), sl, sp_, se, ss, int(ignore_index),
            *split64(float(softcap) if softcap is not None else 1.0), *split64(1.0 / float(temperature)),
            HAS_BIAS=bias is not None, HAS_LABELS=labels is not None, HAS_GLSE=gl is not None,
            HAS_GLP=gp is not None, HAS_GENT=ge is not None, HAS_GSM=gs_ is not None,
            HAS_WEIGHT=cw is not None, HAS_SOFTCAP=softcap is not None,
            HAS_TEMP=float(temperature) != 1.0, IEEE=ieee, UPCAST=_upcast(hidden), IS_F64=is64,
            BM=BM, BN=BN, BK=BK, num_warps=warps)
        _lce_dw_kernel[(triton.cdiv(width, BN), triton.cdiv(H, BH))](
            dz, hidden, dw, db32 if db32 is not None else dummy, dummy, N, H, width, c0,
            dz.stride(0), hidden.stride(0), dw.stride(0), n_vblk,
            HAS_BIAS=bias is not None, FILTER=False, IEEE=ieee, UPCAST=_upcast(hidden), IS_F64=is64,
            BN=BN, BH=BH, BM=BM, num_warps=warps)
        _lce_dh_kernel[(triton.cdiv(N, BM), triton.cdiv(H, BH))](
            dz, lw, dh_acc, dummy, N, H, width, c0, dz.stride(0), lw.stride(0), dh_acc.stride(0), n_vblk,
            FIRST=i == 0, FILTER=False, IEEE=ieee, UPCAST=_upcast(hidden), IS_F64=is64, BM=BM, BH=BH, BN=BN,
            num_warps=warps)
    del dz  # free the chunk before the output exists
    dh = dh_acc if hidden.dtype == acc else dh_acc.to(hidden.dtype)
    db = db32.to(bias.dtype) if bias is not None else None
    return dh, dw, db
