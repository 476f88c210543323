"""Linear cross-entropy (``logits = hidden @ linear_weight.T + linear_bias``) without (N, V) logits.

Forward (CCE style): a program owns ``BM`` rows and a slice of the vocabulary; it computes
``BM x BN`` logit tiles on chip with ``tl.dot`` (float32 accumulation) and merges them into a
running ``(m, t)`` per row (``t`` = sum of ``exp(z - m)`` without one maximal term, ties
counted), the label logit (taken from the same tile, so that ``m - z_y`` is exactly 0 for a
confident row) and, for label smoothing, ``sum_c w_c (m - z_c)`` against the running max. A small
kernel merges the vocabulary slices and applies the cross-entropy formula of
:mod:`logitkit.kernels` to the logits ``z``.

Backward recomputes the logits chunk by chunk over the vocabulary (``VC`` classes at a time):

1. ``dz`` tiles (``BM x BN``, from the logit tile and the saved ``m, r``) are written for the
   chunk only (``N x VC`` in the input dtype; the logits themselves never reach memory);
2. ``dW[chunk] = dz.T @ hidden``: each ``BN x BH`` output tile reduces over all ``N`` rows in
   float32 registers and is written once, in the weight's dtype (no float32 copy of ``dW``);
3. ``dhidden += dz @ W[chunk]`` into an ``(N, H)`` float32 accumulator, rounded to the input
   dtype at the end; ``dbias`` is the column sum of ``dz`` (float32).

``filter_eps`` (off by default, so gradients are exact) skips tiles in which every softmax value
is below ``filter_eps`` and no label falls: step 1 stores nothing for them and steps 2 and 3 skip
them; the number of skipped tiles is returned (a device tensor, no sync).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._math import _exp, _expm1, _finish_r, _merge_lanes, _scalar, _transform, split64
from . import _labels
from .ce import _acc, _flag_bad, label_flag

__all__ = ["linear_ce_forward", "linear_ce_backward"]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``: float32 operands in IEEE precision (no TF32), others on tensor cores.
    ``UPCAST`` (set only under TRITON_INTERPRET) widens bfloat16 operands first: the interpreter
    multiplies bfloat16's raw bits otherwise; bfloat16 products are exact in float32, so the
    result is the same."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logit_tile(H_ptr, W_ptr, B_ptr, rows, cols, row_ok, col_ok, stride_h, stride_w, H,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, IS_F64: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``hidden[rows] @ W[cols].T (+ bias[cols])`` as a ``BM x BN`` float32 (float64) tile."""
    if IS_F64:
        acc = tl.zeros([BM, BN], tl.float64)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
    ks = tl.arange(0, BK)
    h_ptrs = H_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = W_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    for k in range(0, H, BK):
        kmask = (k + ks) < H
        a = tl.load(h_ptrs + k, mask=row_ok[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs + k, mask=col_ok[None, :] & kmask[:, None], other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    return acc


@triton.jit
def _lce_fwd_kernel(Hd, Wt, Bias, CW, PM, PT, PS, PW, PY, LABELS,
                    N, V, H, stride_h, stride_w, cols_per_split, ignore_index,
                    cap_hi, cap_lo, it_hi, it_lo,
                    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, IS_F64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
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
    y = tl.load(LABELS + rows, mask=row_ok, other=-1).to(tl.int64)
    v0 = sp * cols_per_split
    v1 = tl.minimum(v0 + cols_per_split, V)
    m = tl.full([BM], NEG, ACC)
    t = tl.zeros([BM], ACC)
    s = tl.zeros([BM], ACC)     # sum over seen columns of w_c (m - z_c)
    wseen = tl.zeros([BM], ACC)  # sum over seen columns of w_c
    zy = tl.zeros([BM], ACC)
    for c in range(v0, v1, BN):
        cols = c + tl.arange(0, BN)
        col_ok = cols < v1
        z = _logit_tile(Hd, Wt, Bias, rows, cols, row_ok, col_ok, stride_h, stride_w, H,
                        HAS_BIAS, IEEE, UPCAST, IS_F64, BM, BN, BK).to(ACC)
        z, _f = _transform(z, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
        z = tl.where(col_ok[None, :], z, NEG)
        is_y = cols[None, :].to(tl.int64) == y[:, None]
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        bm = tl.max(tl.where(z == z, z, NEG), axis=1)
        m_new = tl.maximum(m, bm)
        ms = tl.where(m_new == NEG, 0.0, m_new)
        e = _exp(z - ms[:, None], IS_F64)
        is_max = (z == m_new[:, None]) & (z > NEG)
        cnt = tl.sum(is_max.to(tl.int32), axis=1).to(ACC)
        tile = tl.sum(tl.where(is_max, 0.0, e), axis=1)
        grew = m_new > m
        old = (t + 1.0) * _exp(m - ms, IS_F64)  # the old max becomes an ordinary term
        t = tl.where(grew, old + tile + (cnt - 1.0), t + tile + cnt)
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(CW + cols, mask=col_ok, other=0.0).to(ACC)
            else:
                w = col_ok.to(ACC)
            s += tl.where(wseen == 0.0, 0.0, wseen * (m_new - m))
            s += tl.sum(tl.where(col_ok[None, :], w[None, :] * (ms[:, None] - z), 0.0), axis=1)
            wseen += tl.sum(w, axis=0)
        m = m_new
    off = sp.to(tl.int64) * N + rows
    tl.store(PM + off, m, mask=row_ok)
    tl.store(PT + off, t, mask=row_ok)
    tl.store(PY + off, zy, mask=row_ok)
    if HAS_SMOOTH:
        tl.store(PS + off, s, mask=row_ok)
        tl.store(PW + off, wseen, mask=row_ok)


@triton.jit
def _lce_combine_kernel(PM, PT, PS, PW, PY, LABELS, CW, WSUM, CE, M_OUT, R_OUT, FLAG,
                        N, V, n_splits, ignore_index, eps_hi, eps_lo,
                        HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, IS_F64: tl.constexpr,
                        SP: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    eps = _scalar(eps_hi, eps_lo, IS_F64)
    row = tl.program_id(0).to(tl.int64)
    sidx = tl.arange(0, SP)
    sok = sidx < n_splits
    off = sidx.to(tl.int64) * N + row
    pm = tl.load(PM + off, mask=sok, other=NEG)
    pt = tl.load(PT + off, mask=sok, other=0.0)
    M, T = _merge_lanes(pm, pt, IS_F64)
    r = _finish_r(M, T, IS_F64)
    zy = tl.sum(tl.load(PY + off, mask=sok, other=0.0), axis=0)
    lab = tl.load(LABELS + row).to(tl.int64)
    ignored = lab == ignore_index
    bad = ((lab < 0) | (lab >= V)) & (ignored == 0)
    valid = (ignored == 0) & (bad == 0)
    y = tl.where(valid, lab, 0)
    if HAS_WEIGHT:
        wy = tl.load(CW + y).to(ACC)
    else:
        wy = 1.0
    nll = tl.where(M == NEG, float("inf"), (M - zy) + r)
    ce = tl.where(eps == 1.0, 0.0, ((1.0 - eps) * wy) * nll)
    if HAS_SMOOTH:
        ps = tl.load(PS + off, mask=sok, other=0.0)
        pw = tl.load(PW + off, mask=sok, other=0.0)
        # each slice's sum is against its own max: shift it to the row max
        S = tl.sum(ps + tl.where(pw == 0.0, 0.0, pw * (M - pm)), axis=0)
        if HAS_WEIGHT:
            W = tl.load(WSUM).to(ACC)
        else:
            W = V * 1.0
        smooth = tl.where(M == NEG, float("inf"), S + W * r)
        ce = ce + (eps / V) * smooth
    ce = tl.where(valid, ce, 0.0)
    ce = tl.where(bad, float("nan"), ce)
    tl.store(CE + row, ce)
    tl.store(M_OUT + row, M)
    tl.store(R_OUT + row, r)
    _flag_bad(FLAG, bad, row, lab, V)


@triton.jit
def _lce_dz_kernel(Hd, Wt, Bias, CW, WSUM, LABELS, M_IN, R_IN, GCE, GZ, DZ, SKIP, NSKIP,
                   N, V, H, c0, c1, stride_h, stride_w, stride_dz, n_vblk, stride_gce, stride_gz,
                   ignore_index, eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, it_hi, it_lo,
                   fe_hi, fe_lo,
                   HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                   HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                   FILTER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, IS_F64: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    eps = _scalar(eps_hi, eps_lo, IS_F64)
    z_loss = _scalar(zl_hi, zl_lo, IS_F64)
    softcap = _scalar(cap_hi, cap_lo, IS_F64)
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM)
    row_ok = rows < N
    lcols = pid_v * BN + tl.arange(0, BN)  # column within the chunk
    cols = c0 + lcols
    col_ok = cols < c1
    lab = tl.load(LABELS + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    ignored = (lab == ignore_index) | (row_ok == 0)
    bad = ((lab < 0) | (lab >= V)) & (ignored == 0)
    valid = (ignored == 0) & (bad == 0)
    y = tl.where(valid, lab, -1)
    m = tl.load(M_IN + rows, mask=row_ok, other=0.0).to(ACC)
    r = tl.load(R_IN + rows, mask=row_ok, other=0.0).to(ACC)
    gce = tl.load(GCE + rows.to(tl.int64) * stride_gce, mask=row_ok, other=0.0).to(ACC)
    if HAS_WEIGHT:
        wy = tl.load(CW + tl.where(valid, lab, 0)).to(ACC)
    else:
        wy = 1.0
    B = gce * ((1.0 - eps) * wy)
    B = tl.where(bad, float("nan"), tl.where(valid, B, 0.0))
    D = gce * 0.0
    if HAS_SMOOTH:
        C = tl.where(ignored, 0.0, gce * (eps / V))
        if HAS_WEIGHT:
            W = tl.load(WSUM).to(ACC)
        else:
            W = V * 1.0
        D = C * W
    if HAS_ZLOSS:
        gz = tl.load(GZ + rows.to(tl.int64) * stride_gz, mask=row_ok, other=0.0).to(ACC)
        D = D + tl.where(ignored | (m == NEG), 0.0, gz * (2.0 * z_loss) * (m + r))
    ms = tl.where(m == NEG, 0.0, m)

    z = _logit_tile(Hd, Wt, Bias, rows, cols, row_ok, col_ok, stride_h, stride_w, H,
                    HAS_BIAS, IEEE, UPCAST, IS_F64, BM, BN, BK).to(ACC)
    z, fac = _transform(z, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
    d = (z - ms[:, None]) - r[:, None]
    p = _exp(d, IS_F64)
    is_y = cols[None, :].to(tl.int64) == y[:, None]
    # p - 1 at the label as expm1: a confident row keeps its ~1e-13 gradient exactly
    q = tl.where(is_y, _expm1(d, IS_F64), p)
    dz = B[:, None] * q
    if HAS_SMOOTH or HAS_ZLOSS:
        dz += D[:, None] * p
    if HAS_SMOOTH:
        if HAS_WEIGHT:
            dz -= C[:, None] * tl.load(CW + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:
            dz -= C[:, None]
    if HAS_SOFTCAP or HAS_TEMP:
        dz = dz * fac
    ok = row_ok[:, None] & col_ok[None, :]
    dz = tl.where(ignored[:, None] | (ok == 0), 0.0, dz)
    ptrs = DZ + rows[:, None].to(tl.int64) * stride_dz + lcols[None, :]
    if FILTER:
        filter_eps = _scalar(fe_hi, fe_lo, IS_F64)
        pmax = tl.max(tl.max(tl.where(ok & valid[:, None], p, 0.0), axis=1), axis=0)
        has_label = tl.max(tl.max(is_y.to(tl.int32), axis=1), axis=0)
        has_bad = tl.max(bad.to(tl.int32), axis=0)
        skip = (pmax < filter_eps) & (has_label == 0) & (has_bad == 0)
        tl.store(SKIP + pid_n * n_vblk + pid_v, skip.to(tl.int8))
        tl.atomic_add(NSKIP, 1, mask=skip)
        if skip == 0:
            tl.store(ptrs, dz.to(DZ.dtype.element_ty), mask=ok)
    else:
        tl.store(ptrs, dz.to(DZ.dtype.element_ty), mask=ok)


@triton.jit
def _lce_dw_kernel(DZ, Hd, DW, DB, SKIP, N, H, vc, c0, stride_dz, stride_h, stride_dw, n_vblk,
                   HAS_BIAS: tl.constexpr, FILTER: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr, IS_F64: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
                   BM: tl.constexpr):
    """``dW[c0 + v, h] = sum_n dz[n, v] hidden[n, h]`` for one ``BN x BH`` tile (reduction over N)."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    lv = pid_v * BN + tl.arange(0, BN)
    hs = pid_h * BH + tl.arange(0, BH)
    v_ok = lv < vc
    h_ok = hs < H
    ns = tl.arange(0, BM)
    if IS_F64:
        acc = tl.zeros([BN, BH], tl.float64)
        db = tl.zeros([BN], tl.float64)
    else:
        acc = tl.zeros([BN, BH], tl.float32)
        db = tl.zeros([BN], tl.float32)
    for n0 in range(0, N, BM):
        run = True
        if FILTER:
            run = tl.load(SKIP + (n0 // BM) * n_vblk + pid_v) == 0
        if run:
            n = n0 + ns
            n_ok = n < N
            dzt = tl.load(DZ + n[None, :].to(tl.int64) * stride_dz + lv[:, None],
                          mask=v_ok[:, None] & n_ok[None, :], other=0.0)  # BN x BM
            hb = tl.load(Hd + n[:, None].to(tl.int64) * stride_h + hs[None, :],
                         mask=n_ok[:, None] & h_ok[None, :], other=0.0)  # BM x BH
            acc = _dot(dzt, hb, acc, IEEE, UPCAST)
            if HAS_BIAS:
                db += tl.sum(dzt.to(db.dtype), axis=1)
    out = DW + (c0 + lv[:, None]).to(tl.int64) * stride_dw + hs[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=v_ok[:, None] & h_ok[None, :])
    if HAS_BIAS:
        if pid_h == 0:
            tl.store(DB + c0 + lv, db, mask=v_ok)


@triton.jit
def _lce_dh_kernel(DZ, Wt, DH_ACC, SKIP, N, H, vc, c0, stride_dz, stride_w, stride_acc,
                   n_vblk, FIRST: tl.constexpr,
                   FILTER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   IS_F64: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr):
    """``dh_acc[n, h] += sum_{v in chunk} dz[n, v] W[c0 + v, h]`` for one ``BM x BH`` tile
    (float32 accumulator; ``FIRST`` chunk stores instead of adding)."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    n = pid_n * BM + tl.arange(0, BM)
    hs = pid_h * BH + tl.arange(0, BH)
    n_ok = n < N
    h_ok = hs < H
    vs = tl.arange(0, BN)
    if IS_F64:
        acc = tl.zeros([BM, BH], tl.float64)
    else:
        acc = tl.zeros([BM, BH], tl.float32)
    for v0 in range(0, vc, BN):
        run = True
        if FILTER:
            run = tl.load(SKIP + pid_n * n_vblk + v0 // BN) == 0
        if run:
            lv = v0 + vs
            v_ok = lv < vc
            dz = tl.load(DZ + n[:, None].to(tl.int64) * stride_dz + lv[None, :],
                         mask=n_ok[:, None] & v_ok[None, :], other=0.0)  # BM x BN
            wb = tl.load(Wt + (c0 + lv[:, None]).to(tl.int64) * stride_w + hs[None, :],
                         mask=v_ok[:, None] & h_ok[None, :], other=0.0)  # BN x BH
            acc = _dot(dz, wb, acc, IEEE, UPCAST)
    mask = n_ok[:, None] & h_ok[None, :]
    acc_ptrs = DH_ACC + n[:, None].to(tl.int64) * stride_acc + hs[None, :]
    if not FIRST:
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
    tl.store(acc_ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# host side


def _tiles(dtype: torch.dtype) -> dict:
    """Tile sizes: ``LOGITKIT_LCE_TILES=BM,BN,BK,BH`` overrides (tests use small tiles)."""
    env = os.environ.get("LOGITKIT_LCE_TILES")
    if env:
        bm, bn, bk, bh = (int(v) for v in env.split(","))
    elif dtype == torch.float64:
        bm, bn, bk, bh = 64, 64, 32, 64
    elif dtype == torch.float32:
        bm, bn, bk, bh = 64, 128, 32, 64
    else:
        bm, bn, bk, bh = 128, 128, 64, 128
    return dict(BM=bm, BN=bn, BK=bk, BH=bh)


def _upcast(hidden: torch.Tensor) -> bool:
    return hidden.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(hidden, linear_weight, labels, linear_bias, weight, label_smoothing, softcap, temperature):
    for name, t in (("hidden", hidden), ("linear_weight", linear_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    N, H = hidden.shape
    V = linear_weight.shape[0]
    if linear_weight.shape[1] != H:
        raise ValueError(f"linear_weight: expected shape (V, {H}), got {tuple(linear_weight.shape)}")
    if linear_weight.dtype != hidden.dtype:
        raise TypeError(f"linear_weight: expected dtype {hidden.dtype} like hidden, "
                        f"got {linear_weight.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels: expected an integer torch.Tensor of class indices")
    if labels.numel() != N:
        raise ValueError(f"labels: expected {N} class indices, got shape {tuple(labels.shape)}")
    if linear_bias is not None and tuple(linear_bias.reshape(-1).shape) != (V,):
        raise ValueError(f"linear_bias: expected shape ({V},), got {tuple(linear_bias.shape)}")
    if weight is not None and weight.numel() != V:
        raise ValueError(f"weight: expected {V} class weights, got shape {tuple(weight.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap: expected a positive number or None, got {softcap}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    dev = hidden.device
    acc = _acc(hidden.dtype)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    linear_weight = linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous()
    labels = labels.reshape(-1).to(dev).contiguous()
    bias = linear_bias.reshape(-1).to(dev).contiguous() if linear_bias is not None else None
    if weight is not None:
        weight = weight.reshape(-1).to(device=dev, dtype=acc).contiguous()
        wsum = weight.sum().reshape(1)
    else:
        wsum = None
    return hidden, linear_weight, labels, bias, weight, wsum, N, H, V, acc


def linear_ce_forward(hidden, linear_weight, labels, linear_bias=None, *, weight=None,
                      ignore_index=-100, label_smoothing=0.0, softcap=None, temperature=1.0):
    """Per-row cross-entropy of ``z = transform(hidden @ linear_weight.T + linear_bias)``.

    ``hidden``: ``(N, H)``; ``linear_weight``: ``(V, H)``, same dtype; ``linear_bias``: ``(V,)``
    or ``None``; ``weight``: class weights ``(V,)``. Returns ``(ce, m, r)``, ``(N,)`` each in float32
    (float64 for float64), exactly as :func:`logitkit.kernels.triton.ce_forward` on the logits
    computed in float32. Memory: ``O(N)`` plus ``O(N * splits)`` partials.

    >>> ce, m, r = linear_ce_forward(h, W, y)   # doctest: +SKIP
    """
    hidden, lw, labels, bias, weight, wsum, N, H, V, acc = _check(
        hidden, linear_weight, labels, linear_bias, weight, label_smoothing, softcap, temperature)
    dev = hidden.device
    ce = torch.empty(N, dtype=acc, device=dev)
    m = torch.empty(N, dtype=acc, device=dev)
    r = torch.empty(N, dtype=acc, device=dev)
    if N == 0:
        return ce, m, r
    if V == 0:
        raise ValueError("linear_weight: expected at least one class (V > 0)")
    _labels.poll(dev)  # raise a bad label an earlier call saw, before launching this one
    t = _tiles(hidden.dtype)
    BM, BN, BK = t["BM"], t["BN"], t["BK"]
    n_row_blocks = triton.cdiv(N, BM)
    want = max(1, triton.cdiv(4 * _num_sms(dev), n_row_blocks))  # about 4 programs per SM
    per_split = triton.cdiv(triton.cdiv(V, want), BN) * BN
    splits = triton.cdiv(V, per_split)
    eps = float(label_smoothing)
    smooth = eps > 0.0
    pm = torch.empty(splits, N, dtype=acc, device=dev)
    pt = torch.empty_like(pm)
    py = torch.empty_like(pm)
    ps = torch.empty_like(pm) if smooth else pm
    pw = torch.empty_like(pm) if smooth else pm
    dummy = pm
    flags = dict(HAS_BIAS=bias is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTH=smooth,
                 IS_F64=hidden.dtype == torch.float64)
    _lce_fwd_kernel[(n_row_blocks, splits)](
        hidden, lw, bias if bias is not None else dummy, weight if weight is not None else dummy,
        pm, pt, ps, pw, py, labels, N, V, H, hidden.stride(0), lw.stride(0), per_split,
        int(ignore_index), *split64(float(softcap) if softcap is not None else 1.0),
        *split64(1.0 / float(temperature)),
        HAS_SOFTCAP=softcap is not None, HAS_TEMP=float(temperature) != 1.0,
        IEEE=hidden.dtype in (torch.float32, torch.float64), UPCAST=_upcast(hidden), BM=BM, BN=BN, BK=BK,
        num_warps=8 if BM * BN >= 128 * 128 else 4, **flags)
    flags.pop("HAS_BIAS")
    _lce_combine_kernel[(N,)](
        pm, pt, ps, pw, py, labels, weight if weight is not None else dummy,
        wsum if wsum is not None else dummy, ce, m, r, label_flag(dev), N, V, splits,
        int(ignore_index), *split64(eps), SP=triton.next_power_of_2(splits), num_warps=1, **flags)
    _labels.after_launch(dev)
    return ce, m, r


def linear_ce_backward(hidden, linear_weight, labels, m, r, g_ce, g_z, linear_bias=None, *,
                       weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                       softcap=None, temperature=1.0, filter_eps=None):
    """Gradients of ``sum_i g_ce[i] ce[i] + g_z[i] z_loss lse[i]**2`` for linear cross-entropy.

    ``m, r``: from :func:`linear_ce_forward`; ``g_ce, g_z``: ``(N,)`` per-row multipliers (or
    scalars). Returns ``(dhidden, dlinear_weight, dlinear_bias, skipped)``: gradients in the
    dtypes of ``hidden``, ``linear_weight`` and ``linear_bias`` (``None`` without a bias; float32
    accumulation throughout) and ``skipped``, a device int32 tensor counting the ``BM x BN`` tiles
    that ``filter_eps`` left out (0 when it is ``None``, the exact default). ``filter_eps`` needs
    ``label_smoothing == 0`` (smoothing gives every class a gradient). Extra memory: an
    ``(N, VC)`` chunk of ``dz`` (``LOGITKIT_LCE_CHUNK`` classes, default about 64 MiB) and an
    ``(N, H)`` float32 accumulator for low-precision ``hidden``.

    >>> dh, dW, db, skipped = linear_ce_backward(h, W, y, m, r, g, g)   # doctest: +SKIP
    """
    from .ce import _row_scale

    hidden, lw, labels, bias, weight, wsum, N, H, V, acc = _check(
        hidden, linear_weight, labels, linear_bias, weight, label_smoothing, softcap, temperature)
    dev = hidden.device
    eps, zl = float(label_smoothing), float(z_loss)
    if filter_eps is not None and eps > 0.0:
        raise ValueError("filter_eps: needs label_smoothing == 0 (smoothing gives every class a gradient)")
    if filter_eps is not None and not float(filter_eps) > 0.0:
        raise ValueError(f"filter_eps: expected a positive number or None, got {filter_eps}")
    m = m.reshape(-1).to(device=dev, dtype=acc).contiguous()
    r = r.reshape(-1).to(device=dev, dtype=acc).contiguous()
    if m.numel() != N or r.numel() != N:
        raise ValueError(f"m, r: expected {N} row statistics each, got {m.numel()} and {r.numel()}")
    g1, s1 = _row_scale(g_ce, N, dev, "g_ce")
    g2, s2 = _row_scale(g_z, N, dev, "g_z") if zl != 0.0 else (g1, 0)
    dw = torch.empty_like(lw, memory_format=torch.contiguous_format)
    db32 = torch.empty(V, dtype=acc, device=dev) if bias is not None else None
    skipped = torch.zeros(1, dtype=torch.int32, device=dev)
    if N == 0 or V == 0 or H == 0:
        dh = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        dw.zero_()
        if db32 is not None:
            db32.zero_()
        return dh, dw, (db32.to(bias.dtype) if bias is not None else None), skipped
    t = _tiles(hidden.dtype)
    BM, BN, BK, BH = t["BM"], t["BN"], t["BK"], t["BH"]
    env_chunk = os.environ.get("LOGITKIT_LCE_CHUNK")
    if env_chunk:
        vc = int(env_chunk)
    else:
        vc = (64 << 20) // max(1, N * hidden.element_size())
    vc = max(BN, (vc // BN) * BN)
    vc = min(vc, triton.cdiv(V, BN) * BN)
    n_vblk = triton.cdiv(vc, BN)
    dz = torch.empty(N, vc, dtype=hidden.dtype, device=dev)
    # float32 accumulator over the chunks (the result itself for float32 / float64 hidden)
    dh_acc = torch.empty(N, H, dtype=acc, device=dev)
    filt = filter_eps is not None
    skip = torch.empty(triton.cdiv(N, BM), n_vblk, dtype=torch.int8, device=dev) if filt else skipped
    dummy = m
    ieee = hidden.dtype in (torch.float32, torch.float64)
    is64 = hidden.dtype == torch.float64
    warps = 8 if BM * BN >= 128 * 128 else 4
    chunks = list(range(0, V, vc))
    for i, c0 in enumerate(chunks):
        c1 = min(c0 + vc, V)
        width = c1 - c0
        _lce_dz_kernel[(triton.cdiv(N, BM), triton.cdiv(width, BN))](
            hidden, lw, bias if bias is not None else dummy, weight if weight is not None else dummy,
            wsum if wsum is not None else dummy, labels, m, r, g1, g2, dz, skip, skipped,
            N, V, H, c0, c1, hidden.stride(0), lw.stride(0), dz.stride(0), n_vblk, s1, s2,
            int(ignore_index), *split64(eps), *split64(zl),
            *split64(float(softcap) if softcap is not None else 1.0),
            *split64(1.0 / float(temperature)), *split64(float(filter_eps) if filt else 0.0),
            HAS_BIAS=bias is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTH=eps > 0.0,
            HAS_ZLOSS=zl != 0.0, HAS_SOFTCAP=softcap is not None, HAS_TEMP=float(temperature) != 1.0,
            FILTER=filt, IEEE=ieee, UPCAST=_upcast(hidden), IS_F64=is64, BM=BM, BN=BN, BK=BK, num_warps=warps)
        _lce_dw_kernel[(triton.cdiv(width, BN), triton.cdiv(H, BH))](
            dz, hidden, dw, db32 if db32 is not None else dummy, skip, N, H, width, c0,
            dz.stride(0), hidden.stride(0), dw.stride(0), n_vblk,
            HAS_BIAS=bias is not None, FILTER=filt, IEEE=ieee, UPCAST=_upcast(hidden), IS_F64=is64,
            BN=BN, BH=BH, BM=BM,
            num_warps=warps)
        _lce_dh_kernel[(triton.cdiv(N, BM), triton.cdiv(H, BH))](
            dz, lw, dh_acc, skip, N, H, width, c0, dz.stride(0), lw.stride(0),
            dh_acc.stride(0), n_vblk, FIRST=i == 0,
            FILTER=filt, IEEE=ieee, UPCAST=_upcast(hidden), IS_F64=is64, BM=BM, BH=BH, BN=BN, num_warps=warps)
    del dz, skip  # free the chunk before the output exists: peak = dW + dh_acc + max(chunk, dh)
    dh = dh_acc if hidden.dtype == acc else dh_acc.to(hidden.dtype)
    db = db32.to(bias.dtype) if bias is not None else None
    return dh, dw, db, skipped
