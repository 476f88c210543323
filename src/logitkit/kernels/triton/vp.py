"""Vocabulary-parallel cross-entropy on one rank's shard: the two local stages as Triton kernels.

:func:`vp_partials` is :func:`logitkit.distributed.stages.local_partials` (the statistics of the
local ``(N, n)`` slice) and :func:`vp_grad` is :func:`logitkit.distributed.stages.local_grad` with
``max_before_temperature=True`` (the gradient of the slice from the global ``m, r``), each one
kernel launch instead of a series of torch ops over the slice. The collectives between them stay
in :mod:`logitkit.distributed._torch` (``_VocabParallelCE``), unchanged.

Forward, per row (one program per row; a persistent grid for rows wider than one block):

* ``u = softcap·tanh(x/softcap)`` (or ``x``), ``m = max u`` (NaN when the row holds a NaN, as
  ``torch.max``), ``d = (m − u)/T`` in the accumulation dtype with its rounding error carried
  (TwoSum for ``m − u``, the division's residual by an fma, the float32 rounding of ``T``), ``t =
  Σ exp(−d − lo)`` over every entry but one maximal one, with the rounding of ``exp2``'s argument
  carried too (:func:`_exp_neg`: a confident row's ~1e-17 loss within the float32 contract) (ties stay in as exact ones), ``s = Σ w·d`` with smoothing, and the
  label's ``u_y`` where the label falls in ``[start, start + n)`` (0 elsewhere). ``t`` and ``s``
  are summed in float32 (float64 for float64 logits) and returned in float64, as the stage does.
* A row that fits one block (``n ≤ 16384`` for 16-bit, ``8192`` for 32-bit inputs) is read from
  DRAM once into registers. A wider row is read twice: pass 1 (``evict_last``) the max, pass 2 the
  sums, in reverse block order so that it is served from L2 (a persistent grid keeps only one or
  two rows per SM between the passes).

Backward, per row, one read of the slice and one write of the gradient::

    dz_c = B·(p_c − [c = y]) + D·p_c − C·w_c,     p_c = exp((u_c − m)/T − r)
    B = g_ce (1−ε) w_y,   C = g_ce ε/V,   D = C·W + g_z·2ζ·(m/T + r)

chained through the softcap and temperature; ``p_y − 1`` is ``expm1`` (a confident row keeps its
relative accuracy); ignored rows get exact zeros; ``out`` may be ``x`` (in place).

Memory traffic per element of the slice (``b`` bytes an input element; O(1) per row besides):
forward ``b`` from DRAM (plus ``b`` from L2 for wide rows), backward ``b`` read + ``b`` written;
``3b`` in all, the floor for a separate forward and backward with a fresh gradient. Eager
``F.cross_entropy`` moves ``6b``: forward reads ``x`` and writes ``log_softmax``; backward writes
``nll_loss``'s dense ``(N, n)`` gradient, reads it and ``log_softmax``, writes the gradient.

Bad labels: nothing here checks the range. A label outside every shard only contributes its
softmax terms; in device mode the header check (:func:`logitkit.distributed.stages.header_ok`)
makes that row's loss NaN, without a host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._math import _div, _exp, _exp_minus, _expm1, _scalar, _tanh_sech2, split64
from .ce import _config, _grid, _hints, _prefetch

__all__ = ["vp_partials", "vp_grad"]


# ----------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _u_of(xb, softcap, HAS_SOFTCAP: tl.constexpr, IS_F64: tl.constexpr):
    """The softcapped logits (no temperature: the max is taken before it)."""
    if HAS_SOFTCAP:
        th, _s = _tanh_sech2(xb / softcap, IS_F64)
        return softcap * th
    else:
        return xb


@triton.jit
def _exp_neg(d, lo):
    """``exp(−(d + lo))`` in float32 to about an ulp for ``d`` up to ~87: the product
    ``−d·log2 e`` is rounded once (half an ulp of a ~80 argument is 3e-6 relative in the result,
    six times the contract on a confident row's loss) and its error, recovered by an fma, rides
    in the same first-order factor as ``lo``. One ``exp2`` per element, as before."""
    a = -d * 1.4426950216293335
    a_lo = tl.fma(-d, 1.4426950216293335, -a) + (-d) * 1.925963033500011e-08
    return tl.exp2(a) * (1.0 + (a_lo * 0.6931471805599453 - lo))


@triton.jit
def _terms(u, mask, M, Ms, w, temp, inv_temp, trel, HAS_TEMP: tl.constexpr, IS_F64: tl.constexpr):
    """Per element: ``(e, is_max, w·d)`` with ``d = (Ms − u)/T`` and ``e = exp(−d − lo)``, ``lo``
    the rounding error of ``d`` (that of ``Ms − u``, of the division and of ``T`` in float32; 0 in
    float64, like the stage); ``e = 0`` at a maximal entry."""
    d = Ms - u
    if IS_F64:
        if HAS_TEMP:
            d = d / temp
        e = _exp(-d, IS_F64)
    else:
        # TwoSum: Ms − u = d + lo exactly (stages.local_partials' two_diff)
        bb = d - Ms
        lo = (Ms - (d - bb)) + (-u - bb)
        if HAS_TEMP:
            q = _div(d, temp, IS_F64)
            res = tl.fma(-q, temp, d)          # d − q·T, exact
            # T itself is float32 here: trel = (T − fl(T))/fl(T) corrects the quotient to first order
            lo = (res + lo) * inv_temp - q * trel
            d = q
        fin = (d == d) & (tl.abs(d) < float("inf")) & (lo == lo) & (tl.abs(lo) < float("inf"))
        lo = tl.where(fin, lo, 0.0)
        e = tl.where(d == float("inf"), 0.0, _exp_neg(d, lo))
    is_max = (u == M) & (u > float("-inf")) & mask
    e = tl.where(is_max | (mask == 0), 0.0, e)
    d = tl.where(mask, d, 0.0)
    return e, is_max, d * w


@triton.jit
def _vp_fwd_kernel(X, LABELS, WEIGHT, M_OUT, T_OUT, ZY_OUT, S_OUT,
                   stride_x, N, n, start, ignore_index,
                   cap_hi, cap_lo, t_hi, t_lo, it_hi, it_lo, trel,
                   HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_TEMP: tl.constexpr, IS_F64: tl.constexpr, SINGLE: tl.constexpr,
                   BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EV_KEEP: tl.constexpr,
                   EV_DROP: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    softcap = _scalar(cap_hi, cap_lo, IS_F64)
    temp = _scalar(t_hi, t_lo, IS_F64)
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    for row32 in range(pid, N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        x_row = X + row * stride_x
        lab = tl.load(LABELS + row).to(tl.int64)
        loc = lab - start
        own = (lab != ignore_index) & (loc >= 0) & (loc < n)
        uy = _u_of(tl.load(x_row + tl.where(own, loc, 0)).to(ACC), softcap, HAS_SOFTCAP, IS_F64)
        tl.store(ZY_OUT + row, tl.where(own, uy, 0.0))
        if SINGLE:
            mask = cols < n
            xb = tl.load(x_row + cols, mask=mask, other=NEG).to(ACC)
            u = tl.where(mask, _u_of(xb, softcap, HAS_SOFTCAP, IS_F64), NEG)
            isnan = u != u
            M = tl.max(tl.where(isnan, NEG, u), axis=0)
            has_nan = tl.sum(isnan.to(tl.int32), axis=0) > 0
            Ms = tl.where((M == M) & (tl.abs(M) < float("inf")), M, 0.0)
            Ms = tl.where(has_nan, 0.0, Ms)
            if HAS_SMOOTH:
                if HAS_WEIGHT:
                    w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(ACC)
                else:
                    w = 1.0
            else:
                w = 1.0
            e, is_max, wd = _terms(u, mask, M, Ms, w, temp, inv_temp, trel, HAS_TEMP, IS_F64)
            T = tl.sum(e, axis=0)
            cnt = tl.sum(is_max.to(tl.int32), axis=0)
            if HAS_SMOOTH:
                S = tl.sum(wd, axis=0)
        else:
            mv = tl.full([BLOCK], NEG, ACC)
            nv = tl.zeros([BLOCK], tl.int32)
            if PREFETCH:
                xn = tl.load(x_row + cols, mask=cols < n, other=NEG, eviction_policy=EV_KEEP)
            for b0 in range(0, n, BLOCK):
                offs = b0 + cols
                mask = offs < n
                if PREFETCH:
                    # issue the next block's load before this block's arithmetic
                    xb = xn
                    nxt = offs + BLOCK
                    xn = tl.load(x_row + nxt, mask=nxt < n, other=NEG, eviction_policy=EV_KEEP)
                else:
                    xb = tl.load(x_row + offs, mask=mask, other=NEG, eviction_policy=EV_KEEP)
                xb = xb.to(ACC)
                u = tl.where(mask, _u_of(xb, softcap, HAS_SOFTCAP, IS_F64), NEG)
                isnan = u != u
                nv += isnan.to(tl.int32)
                mv = tl.maximum(mv, tl.where(isnan, NEG, u))
            M = tl.max(mv, axis=0)
            has_nan = tl.sum(nv, axis=0) > 0
            Ms = tl.where((M == M) & (tl.abs(M) < float("inf")), M, 0.0)
            Ms = tl.where(has_nan, 0.0, Ms)
            tv = tl.zeros([BLOCK], ACC)
            cv = tl.zeros([BLOCK], tl.int32)
            sv = tl.zeros([BLOCK], ACC)
            nb = tl.cdiv(n, BLOCK)
            if PREFETCH:
                last = (nb - 1) * BLOCK + cols
                xn = tl.load(x_row + last, mask=last < n, other=NEG, eviction_policy=EV_DROP)
            for k in range(0, nb):
                # reverse order: the blocks read last in pass 1 are the likeliest L2 hits
                offs = (nb - 1 - k) * BLOCK + cols
                mask = offs < n
                if PREFETCH:
                    xb = xn
                    prv = offs - BLOCK
                    xn = tl.load(x_row + prv, mask=(prv >= 0) & (prv < n), other=NEG, eviction_policy=EV_DROP)
                else:
                    xb = tl.load(x_row + offs, mask=mask, other=NEG, eviction_policy=EV_DROP)
                xb = xb.to(ACC)
                u = tl.where(mask, _u_of(xb, softcap, HAS_SOFTCAP, IS_F64), NEG)
                if HAS_SMOOTH:
                    if HAS_WEIGHT:
                        w = tl.load(WEIGHT + offs, mask=mask, other=0.0).to(ACC)
                    else:
                        w = 1.0
                else:
                    w = 1.0
                e, is_max, wd = _terms(u, mask, M, Ms, w, temp, inv_temp, trel, HAS_TEMP, IS_F64)
                tv += e
                cv += is_max.to(tl.int32)
                if HAS_SMOOTH:
                    sv += wd
            T = tl.sum(tv, axis=0)
            cnt = tl.sum(cv, axis=0)
            if HAS_SMOOTH:
                S = tl.sum(sv, axis=0)
        T = T + tl.maximum(cnt - 1, 0).to(ACC)
        tl.store(M_OUT + row, tl.where(has_nan, float("nan"), M))
        tl.store(T_OUT + row, T.to(tl.float64))
        if HAS_SMOOTH:
            tl.store(S_OUT + row, S.to(tl.float64))


@triton.jit
def _vp_bwd_kernel(X, OUT, LABELS, WEIGHT, M_IN, R_IN, GCE, GZ, WY, VALIDF, SC,
                   stride_x, stride_o, N, n, start,
                   eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, it_hi, it_lo,
                   HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, IS_F64: tl.constexpr,
                   BLOCK: tl.constexpr, EV_DROP: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    eps = _scalar(eps_hi, eps_lo, IS_F64)
    z_loss = _scalar(zl_hi, zl_lo, IS_F64)
    softcap = _scalar(cap_hi, cap_lo, IS_F64)
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    row = tl.cast(tl.program_id(0), tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = X + row * stride_x
    o_row = OUT + row * stride_o
    valid = tl.load(VALIDF + row) > 0
    if valid == 0:
        zero = tl.zeros([BLOCK], ACC).to(OUT.dtype.element_ty)
        for b0 in range(0, n, BLOCK):
            offs = b0 + cols
            tl.store(o_row + offs, zero, mask=offs < n, eviction_policy=EV_DROP)
    else:
        lab = tl.load(LABELS + row).to(tl.int64)
        loc = lab - start
        own = (loc >= 0) & (loc < n)
        y = tl.where(own, loc, -1)
        M = tl.load(M_IN + row).to(ACC)
        r = tl.load(R_IN + row).to(ACC)
        gce = tl.load(GCE + row).to(ACC)
        wy = tl.load(WY + row).to(ACC)
        Ms = tl.where((M == M) & (tl.abs(M) < float("inf")), M, 0.0)
        B = gce * ((1.0 - eps) * wy)
        D = gce * 0.0
        if HAS_SMOOTH:
            C = gce * (eps / tl.load(SC).to(ACC))
            D = C * tl.load(SC + 1).to(ACC)
        if HAS_ZLOSS:
            gz = tl.load(GZ + row).to(ACC)
            if HAS_TEMP:
                lse = M * inv_temp + r
            else:
                lse = M + r
            D = D + tl.where(M == NEG, 0.0, gz * (2.0 * z_loss) * lse)
        # p_y − 1 = expm1((u_y − m)/T − r): a confident row keeps its relative accuracy
        uy = _u_of(tl.load(x_row + tl.where(own, loc, 0)).to(ACC), softcap, HAS_SOFTCAP, IS_F64)
        if HAS_TEMP:
            qy = _expm1((uy - Ms) * inv_temp - r, IS_F64)
        else:
            qy = _expm1((uy - Ms) - r, IS_F64)
        for b0 in range(0, n, BLOCK):
            offs = b0 + cols
            mask = offs < n
            xb = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy=EV_DROP).to(ACC)
            if HAS_SOFTCAP:
                th, fac = _tanh_sech2(xb / softcap, IS_F64)
                u = softcap * th
                if HAS_TEMP:
                    fac = fac * inv_temp
            else:
                u = xb
            if HAS_TEMP:
                p = _exp_minus((u - Ms) * inv_temp, r, IS_F64)
            else:
                p = _exp_minus(u - Ms, r, IS_F64)
            q = tl.where(offs == y, qy, p)
            dz = B * q
            if HAS_SMOOTH or HAS_ZLOSS:
                dz += D * p
            if HAS_SMOOTH:
                if HAS_WEIGHT:
                    dz -= C * tl.load(WEIGHT + offs, mask=mask, other=0.0).to(ACC)
                else:
                    dz -= C
            if HAS_SOFTCAP:
                dz = dz * fac
            else:
                if HAS_TEMP:
                    dz = dz * inv_temp
            tl.store(o_row + offs, dz.to(OUT.dtype.element_ty), mask=mask, eviction_policy=EV_DROP)


# ----------------------------------------------------------------------------------------------
# wrappers


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prep(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"x: expected a 2-D (N, n) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    labels = labels.reshape(-1).to(device=x.device).contiguous()
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected {x.shape[0]} class indices, got shape {tuple(labels.shape)}")
    return x, labels


def _weight(weight_local: Any, n: int, acc: torch.dtype, like: torch.Tensor) -> Any:
    if weight_local is None:
        return None
    w = weight_local.reshape(-1).to(device=like.device, dtype=acc).contiguous()
    if w.shape[0] != n:
        raise ValueError(f"weight_local: expected {n} class weights, got shape {tuple(weight_local.shape)}")
    return w


def _check_options(softcap: Any, temperature: float) -> None:
    if softcap is not None and not 0.0 < float(softcap) < float("inf"):
        raise ValueError(f"softcap: expected a positive number or None, got {softcap}")
    if not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature: expected a positive number, got {temperature}")


def vp_partials(x: torch.Tensor, labels: torch.Tensor, *, start: int, ignore_index: int,
                label_smoothing: float = 0.0, weight_local: Any = None, softcap: Any = None,
                temperature: float = 1.0) -> Any:
    """:func:`logitkit.distributed.stages.local_partials` of ``transform(x, softcap)`` in one kernel.

    ``x``: this rank's ``(N, n)`` logits (any floating dtype, read as is); ``labels``: ``(N,)``
    global class indices; ``start``: global index of local column 0 (an int); ``weight_local``:
    ``(n,)`` class weights of the local columns or ``None``. Returns a
    :class:`~logitkit.distributed.stages.Partials` like the stage's with ``stat_dtype=float64``:
    ``m, zy`` ``(N, 1)`` in the accumulation dtype, ``t, c`` (and ``s``) ``(N, 1)`` float64,
    ``own`` ``(N, 1)`` bool, ``wsum`` a 0-d float64 (with smoothing).
    """
    from ...distributed.stages import Partials

    _check_options(softcap, temperature)
    x, labels = _prep(x, labels)
    N, n = x.shape
    dev, acc = x.device, _acc(x.dtype)
    start = int(start)
    eps = float(label_smoothing)
    smooth = eps > 0.0
    T = float(temperature)
    w = _weight(weight_local, n, acc, x) if smooth else None
    m = torch.empty(N, dtype=acc, device=dev)
    zy = torch.empty(N, dtype=acc, device=dev)
    t = torch.empty(N, dtype=torch.float64, device=dev)
    s = torch.empty(N, dtype=torch.float64, device=dev) if smooth else None
    valid = labels != ignore_index
    loc = labels - start
    own = (valid & (loc >= 0) & (loc < n)).reshape(N, 1)
    if n == 0 or N == 0:
        m.fill_(float("-inf"))
        zy.zero_()
        t.zero_()
        if s is not None:
            s.zero_()
    else:
        its, dt = x.element_size(), x.dtype
        block, warps, single = _config(n, its, "ce", dt)
        dummy = t
        _vp_fwd_kernel[(_grid(N, single, dev, its, "ce", n, dt),)](
            x, labels, w if w is not None else dummy, m, t, zy, s if s is not None else dummy,
            x.stride(0), N, n, start, int(ignore_index),
            *split64(float(softcap) if softcap is not None else 1.0), *split64(T), *split64(1.0 / T),
            split64(T)[1] / split64(T)[0],
            HAS_WEIGHT=w is not None, HAS_SMOOTH=smooth, HAS_SOFTCAP=softcap is not None,
            HAS_TEMP=T != 1.0, IS_F64=x.dtype == torch.float64, SINGLE=single, BLOCK=block,
            PREFETCH=_prefetch("ce", n, dt), **_hints("ce", n, dt), num_warps=warps,
        )
    m = m.reshape(N, 1)
    c = torch.where(m == float("-inf"), 0.0, 1.0).to(torch.float64)
    wsum = None
    if smooth:
        wsum = (torch.zeros((), dtype=torch.float64, device=dev) + n if w is None
                else w.to(torch.float64).sum())
    return Partials(m, t.reshape(N, 1), c, zy.reshape(N, 1), own, None if s is None else s.reshape(N, 1), wsum)


def _dev_scalar(v: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=like.device, dtype=torch.float64).reshape(())
    return torch.full((), float(v), dtype=torch.float64, device=like.device)


def vp_grad(x: torch.Tensor, labels: torch.Tensor, m: Any, r: Any, g_ce: Any, g_z: Any, *, start: int,
            vocab_size: Any, wtotal: Any, wy: Any, validf: Any, weight_local: Any = None,
            label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Any = None,
            temperature: float = 1.0, out: Any = None) -> torch.Tensor:
    """:func:`logitkit.distributed.stages.local_grad` (``max_before_temperature=True``) in one kernel.

    Same arguments: ``m, r`` the global row statistics ``(N,)`` (``m`` before the temperature),
    ``g_ce, g_z, wy, validf`` ``(N,)``, ``vocab_size`` and ``wtotal`` numbers or 0-d tensors (read
    on the device: no synchronisation). Returns ``d loss / d x`` in ``x``'s dtype, into ``out``
    when given (``out=x`` overwrites the logits).
    """
    _check_options(softcap, temperature)
    x, labels = _prep(x, labels)
    N, n = x.shape
    dev, acc = x.device, _acc(x.dtype)
    eps, zl, T = float(label_smoothing), float(z_loss), float(temperature)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif (not isinstance(out, torch.Tensor) or tuple(out.shape) != (N, n) or out.dtype != x.dtype
          or out.device != x.device or (n > 1 and out.stride(1) != 1)):
        raise ValueError(f"out: expected a ({N}, {n}) {x.dtype} tensor on {x.device} with a contiguous class axis")
    if N == 0 or n == 0:
        return out

    def rowvec(v: Any, name: str) -> torch.Tensor:
        v = v.reshape(-1) if isinstance(v, torch.Tensor) else torch.full((N,), float(v), device=dev)
        if v.shape[0] != N:
            raise ValueError(f"{name}: expected {N} per-row values, got shape {tuple(v.shape)}")
        return v.to(device=dev).contiguous()

    mv, rv, gce, wyv, vf = (rowvec(v, k) for v, k in ((m, "m"), (r, "r"), (g_ce, "g_ce"), (wy, "wy"),
                                                      (validf, "validf")))
    gz = rowvec(g_z, "g_z") if zl != 0.0 else gce
    w = _weight(weight_local, n, acc, x) if eps > 0.0 else None
    sc = torch.stack([_dev_scalar(vocab_size, x), _dev_scalar(wtotal, x)]) if eps > 0.0 else mv
    its, dt = x.element_size(), x.dtype
    block, warps, _single = _config(n, its, "ce", dt)
    _vp_bwd_kernel[(N,)](
        x, out, labels, w if w is not None else mv, mv, rv, gce, gz, wyv, vf, sc,
        x.stride(0), out.stride(0), N, n, int(start),
        *split64(eps), *split64(zl), *split64(float(softcap) if softcap is not None else 1.0),
        *split64(1.0 / T),
        HAS_WEIGHT=w is not None, HAS_SMOOTH=eps > 0.0, HAS_ZLOSS=zl != 0.0,
        HAS_SOFTCAP=softcap is not None, HAS_TEMP=T != 1.0, IS_F64=x.dtype == torch.float64,
        BLOCK=block, EV_DROP=_hints("ce", n, dt)["EV_DROP"], num_warps=warps,
    )
    return out
