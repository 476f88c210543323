"""Cross-entropy stages on the GPU: a Triton program per row, online softmax over ``V`` in blocks.

Implements ``ce_forward``, ``ce_backward`` and ``ce_forward_backward`` of the stage contract in
:mod:`logitkit.kernels` exactly (transform, ``(m, r)`` with ``r = log1p`` of the sum without one
maximal term, weights, ``ignore_index``, label smoothing, z-loss through ``g_z``, softcap,
temperature, ``out`` that may be ``x``).

Memory traffic of the fused kernel: a row that fits one block is read once into registers. A wider
row is streamed twice: pass 1 (``evict_last``) computes per-lane ``(max, sum without the max)``
states with the next block's load in flight, pass 2 re-reads the row *in reverse block order*
(the most recently read blocks first, the likeliest L2 hits) and writes the gradient once. Wide
rows run on a persistent grid of one or two programs per SM (:func:`_grid`), so only that many
rows per SM sit between their two passes: 132 x 256 KB per program for bf16 V = 128256 on an
H100, well inside its 50 MB L2.
All tunables (block, warps, persistence, prefetch, hints) come from the recorded sweep in
``configs.json`` (:mod:`._configs`) and have ``LOGITKIT_TRITON_*`` overrides that
``benchmarks/gpu.py --sweep`` runs through.

Bad labels (outside ``[0, V)`` and not ``ignore_index``) give NaN for that row's loss and gradient
and set a device-side flag that :mod:`._labels` turns into a ``ValueError`` at a later call without
a host synchronisation (or at once, synchronizing, in :func:`check_labels`); nothing in this
module synchronizes.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from . import _configs, _labels
from ._labels import check_flag, label_flag, reset_flag
from ._math import (_div, _exp_minus, _expm1, _finish_r, _lane_update, _merge_lanes, _scalar,
                    _transform, _exp, split64)

__all__ = ["ce_forward", "ce_backward", "ce_forward_backward", "label_flag", "check_flag",
           "reset_flag"]

# ----------------------------------------------------------------------------------------------
# launch configuration


# Wide rows (more than one block): BLOCK, num_warps, programs per SM, prefetch and L2 hints per
# (kind, dtype, V bucket) come from the recorded sweep in configs.json (see _configs; the V = 128256
# entries for float32 / bfloat16 CE and softmax forward are the H100 winners of
# benchmarks/results/gpu-h100-2026-11-28.md, 66-72% -> 69-86% of copy bandwidth). Narrow rows
# (one block) keep the rule below: they were never the bottleneck.


def _wide(itemsize: int, kind: str, V: int = 128256, dtype: Any = None) -> tuple[int, int, int]:
    """``(BLOCK, num_warps, programs per SM)`` for rows wider than one block (``configs.json``)."""
    e = _configs.wide(kind, dtype if dtype is not None else itemsize, V)
    return int(e["block"]), int(e["warps"]), int(e["per_sm"])


def _config(V: int, itemsize: int, kind: str = "ce", dtype: Any = None) -> tuple[int, int, bool]:
    """``(BLOCK, num_warps, single)``: a row that fits one block is held in registers.

    Wider rows are streamed in blocks with the next block's load in flight (:func:`_prefetch`);
    block and warps per ``kind`` (``"ce"``, ``"softmax"`` forward, ``"softmax_bwd"``), dtype
    (element size when ``dtype`` is not given) and V bucket come from the recorded sweep
    (``configs.json``).  At one or two programs per SM (:func:`_grid`) the rows between the two
    passes (132 x 256 KB for bf16 V = 128256) stay in L2.
    ``LOGITKIT_TRITON_BLOCK`` / ``LOGITKIT_TRITON_WARPS`` override (for tuning runs).
    """
    env_block = os.environ.get("LOGITKIT_TRITON_BLOCK")
    env_warps = os.environ.get("LOGITKIT_TRITON_WARPS")
    vp = triton.next_power_of_2(max(int(V), 1))
    single_max = 16384 if itemsize <= 2 else 8192
    wide_block, wide_warps, _ = _wide(itemsize, kind, V, dtype)
    if env_block:
        block = int(env_block)
    elif vp <= single_max:
        block = max(vp, 16)
    else:
        block = wide_block
    single = block >= vp
    if env_warps:
        warps = int(env_warps)
    elif not single and block == wide_block:
        warps = wide_warps
    elif block <= 1024:
        warps = 4
    elif block <= 4096 and single:
        warps = 8
    else:
        warps = 16
    return block, warps, single


def _grid(N: int, single: bool, device: torch.device, itemsize: int = 2, kind: str = "ce",
          V: int = 128256, dtype: Any = None) -> int:
    """Programs to launch: one per row for rows that fit a block; for wider rows a persistent
    grid of the table's programs per SM (``LOGITKIT_TRITON_PERSIST`` overrides; 0: one per row)
    walks the rows, so that only that many rows per SM are between their two passes (their L2
    footprint)."""
    env = os.environ.get("LOGITKIT_TRITON_PERSIST")
    per_sm = int(env) if env else _wide(itemsize, kind, V, dtype)[2]
    if single or per_sm <= 0:
        return N
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(N, per_sm * sms))


def _entry(kind: str, V: Optional[int], dtype: Any) -> Optional[dict]:
    return None if V is None or dtype is None else _configs.wide(kind, dtype, V)


def _hints(kind: str = "ce", V: Optional[int] = None, dtype: Any = None) -> dict:
    """L2 eviction hints: pass 1 loads ``evict_last`` (the row is read again by pass 2), pass 2
    loads and all stores ``evict_first``; on unless the table entry for ``(kind, dtype, V)`` says
    not. ``LOGITKIT_TRITON_HINTS=0`` / ``1`` overrides (tuning)."""
    env = os.environ.get("LOGITKIT_TRITON_HINTS")
    e = _entry(kind, V, dtype)
    on = env != "0" if env is not None else (e is None or bool(e.get("hints", True)))
    if not on:
        return dict(EV_KEEP="", EV_DROP="")
    return dict(EV_KEEP="evict_last", EV_DROP="evict_first")


def _prefetch(kind: str = "ce", V: Optional[int] = None, dtype: Any = None) -> bool:
    """Software-pipeline multi-block loops: on unless the table entry says not;
    ``LOGITKIT_TRITON_PREFETCH=0`` / ``1`` overrides."""
    env = os.environ.get("LOGITKIT_TRITON_PREFETCH")
    if env is not None:
        return env != "0"
    e = _entry(kind, V, dtype)
    return e is None or bool(e.get("prefetch", True))


# ----------------------------------------------------------------------------------------------
# the kernel


@triton.jit
def _flag_bad(FLAG, bad, row, lab, V):
    """Record a bad label in the int64 flag ``[count, first row, V, min, max]`` (see ``_labels``)."""
    tl.atomic_add(FLAG, 1, mask=bad)
    tl.atomic_min(FLAG + 1, row, mask=bad)
    tl.atomic_xchg(FLAG + 2, tl.cast(V, tl.int64), mask=bad)
    tl.atomic_min(FLAG + 3, lab, mask=bad)
    tl.atomic_max(FLAG + 4, lab, mask=bad)


@triton.jit
def _ce_kernel(X, OUT, LABELS, WEIGHT, WSUM, GCE, GZ, M_IO, R_IO, CE, FLAG,
               stride_x, stride_o, stride_gce, stride_gz, N, V, ignore_index,
               eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, it_hi, it_lo,
               HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
               FORWARD: tl.constexpr, BACKWARD: tl.constexpr, IS_F64: tl.constexpr,
               SINGLE: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
               EV_KEEP: tl.constexpr, EV_DROP: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    if IS_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    eps = _scalar(eps_hi, eps_lo, IS_F64)
    z_loss = _scalar(zl_hi, zl_lo, IS_F64)
    softcap = _scalar(cap_hi, cap_lo, IS_F64)
    inv_temp = _scalar(it_hi, it_lo, IS_F64)
    pid = tl.program_id(0)
    # persistent: a grid smaller than N (one program per SM for wide rows) walks the rows
    for row32 in range(pid, N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)  # int64 offsets: N * V may exceed 2**31
        x_row = X + row * stride_x
        cols = tl.arange(0, BLOCK)

        lab = tl.load(LABELS + row).to(tl.int64)
        ignored = lab == ignore_index
        bad = (lab < 0) | (lab >= V)
        bad = bad & (ignored == 0)
        valid = (ignored == 0) & (bad == 0)
        y = tl.where(valid, lab, 0)
        zy, _fy = _transform(tl.load(x_row + y).to(ACC), softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
        if HAS_WEIGHT:
            wy = tl.load(WEIGHT + y).to(ACC)
        else:
            wy = 1.0
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                W = tl.load(WSUM).to(ACC)
            else:
                W = V * 1.0
        # Smoothing sums w_c (m - z_c) = W (m - ref) - sum w_c (z_c - ref); with ref = z[y] the
        # common offset of a row (say 1e4) cancels before summing instead of after.
        finite_y = (zy == zy) & (tl.abs(zy) < float("inf"))
        ref = tl.where(valid & finite_y, zy, 0.0)

        if FORWARD:
            if SINGLE:
                mask = cols < V
                xs = tl.load(x_row + cols, mask=mask, other=NEG).to(ACC)
                z, fac = _transform(xs, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
                z = tl.where(mask, z, NEG)
                M = tl.max(tl.where(z == z, z, NEG), axis=0)  # NaN never becomes the max
                Ms = tl.where(M == NEG, 0.0, M)
                e = _exp(z - Ms, IS_F64)
                is_max = (z == M) & (z > NEG)  # (block & scalar bools trip the interpreter)
                cnt = tl.sum(is_max.to(tl.int32), axis=0)
                T = tl.sum(tl.where(is_max, 0.0, e), axis=0) + tl.maximum(cnt - 1, 0).to(ACC)
                if HAS_SMOOTH:
                    d = tl.where(mask, z - ref, 0.0)
                    if HAS_WEIGHT:
                        d = d * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(ACC)
                    S = tl.sum(d, axis=0)
            else:
                mv = tl.full([BLOCK], NEG, ACC)
                tv = tl.zeros([BLOCK], ACC)
                sv = tl.zeros([BLOCK], ACC)
                if PREFETCH:
                    xn = tl.load(x_row + cols, mask=cols < V, other=NEG, eviction_policy=EV_KEEP)
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    mask = offs < V
                    if PREFETCH:
                        # issue the next block's load before this block's arithmetic
                        xb = xn
                        nxt = offs + BLOCK
                        xn = tl.load(x_row + nxt, mask=nxt < V, other=NEG, eviction_policy=EV_KEEP)
                    else:
                        xb = tl.load(x_row + offs, mask=mask, other=NEG, eviction_policy=EV_KEEP)
                    xb = xb.to(ACC)
                    z, fac = _transform(xb, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
                    if HAS_SOFTCAP:
                        z = tl.where(mask, z, NEG)
                    mv, tv = _lane_update(mv, tv, z, IS_F64)
                    if HAS_SMOOTH:
                        d = tl.where(mask, z - ref, 0.0)
                        if HAS_WEIGHT:
                            d = d * tl.load(WEIGHT + offs, mask=mask, other=0.0).to(ACC)
                        sv += d
                M, T = _merge_lanes(mv, tv, IS_F64)
                if HAS_SMOOTH:
                    S = tl.sum(sv, axis=0)
            r = _finish_r(M, T, IS_F64)
            nll = tl.where(M == NEG, float("inf"), (M - zy) + r)
            ce = tl.where(eps == 1.0, 0.0, ((1.0 - eps) * wy) * nll)
            if HAS_SMOOTH:
                smooth = (W * (M - ref) - S) + W * r
                smooth = tl.where(M == NEG, float("inf"), smooth)
                ce = ce + (eps / V) * smooth
            ce = tl.where(valid, ce, 0.0)
            ce = tl.where(bad, float("nan"), ce)
            tl.store(CE + row, ce)
            tl.store(M_IO + row, M)
            tl.store(R_IO + row, r)
        else:
            M = tl.load(M_IO + row).to(ACC)
            r = tl.load(R_IO + row).to(ACC)

        if BACKWARD:
            o_row = OUT + row * stride_o
            if ignored:
                zero = tl.zeros([BLOCK], ACC).to(OUT.dtype.element_ty)
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    tl.store(o_row + offs, zero, mask=offs < V, eviction_policy=EV_DROP)
            else:
                gce = tl.load(GCE + row * stride_gce).to(ACC)
                # dz = B (p - [c == y]) + D p - C w_c   (B, C, D per row; see the contract)
                B = gce * ((1.0 - eps) * wy)
                B = tl.where(bad, float("nan"), B)
                D = gce * 0.0
                if HAS_SMOOTH:
                    C = gce * (eps / V)
                    D = C * W
                if HAS_ZLOSS:
                    gz = tl.load(GZ + row * stride_gz).to(ACC)
                    # p * lse -> 0 on an all -inf row (p = 0) instead of 0 * -inf
                    D = D + tl.where(M == NEG, 0.0, gz * (2.0 * z_loss) * (M + r))
                Ms = tl.where(M == NEG, 0.0, M)
                # p_y - 1 = expm1((z_y - m) - r) keeps full accuracy for confident rows (p_y ~ 1)
                qy = _expm1((zy - Ms) - r, IS_F64)
                if FORWARD and SINGLE:
                    # the row is still in registers: p = exp(z - m) / (1 + T)
                    scale = tl.where(M == float("inf"), float("nan"), _div(1.0 + 0.0 * T, 1.0 + T, IS_F64))
                    p = e * scale
                    q = tl.where(cols == y, qy, p)
                    dz = B * q
                    if HAS_SMOOTH or HAS_ZLOSS:
                        dz += D * p
                    if HAS_SMOOTH:
                        if HAS_WEIGHT:
                            dz -= C * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(ACC)
                        else:
                            dz -= C
                    if HAS_SOFTCAP or HAS_TEMP:
                        dz = dz * fac
                    tl.store(o_row + cols, dz.to(OUT.dtype.element_ty), mask=mask)
                else:
                    nb = tl.cdiv(V, BLOCK)
                    if PREFETCH:
                        last = (nb - 1) * BLOCK + cols
                        xn = tl.load(x_row + last, mask=last < V, other=0.0, eviction_policy=EV_DROP)
                    for k in range(0, nb):
                        # reverse order: the blocks read last in pass 1 are the likeliest L2 hits
                        offs = (nb - 1 - k) * BLOCK + cols
                        mask = offs < V
                        if PREFETCH:
                            xb = xn
                            prv = offs - BLOCK
                            xn = tl.load(x_row + prv, mask=prv >= 0, other=0.0, eviction_policy=EV_DROP)
                        else:
                            xb = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy=EV_DROP)
                        xb = xb.to(ACC)
                        z, fac = _transform(xb, softcap, inv_temp, HAS_SOFTCAP, HAS_TEMP, IS_F64)
                        p = _exp_minus(z - Ms, r, IS_F64)
                        q = tl.where(offs == y, qy, p)
                        dz = B * q
                        if HAS_SMOOTH or HAS_ZLOSS:
                            dz += D * p
                        if HAS_SMOOTH:
                            if HAS_WEIGHT:
                                dz -= C * tl.load(WEIGHT + offs, mask=mask, other=0.0).to(ACC)
                            else:
                                dz -= C
                        if HAS_SOFTCAP or HAS_TEMP:
                            dz = dz * fac
                        tl.store(o_row + offs, dz.to(OUT.dtype.element_ty), mask=mask,
                                 eviction_policy=EV_DROP)

        if FORWARD:  # a backward-only launch sees the labels its forward already counted
            _flag_bad(FLAG, bad, row, lab, V)


# ----------------------------------------------------------------------------------------------
# wrappers


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_x(x: Any, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, V) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {x.dtype}")


def _rows(x: torch.Tensor, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` with unit class stride (copied only if needed) and the checked ``out``."""
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
            raise ValueError(f"out: expected a tensor of shape {tuple(x.shape)} and dtype {x.dtype}")
        if out.device != x.device:
            raise ValueError(f"out: expected device {x.device}, got {out.device}")
        if x.shape[1] > 1 and out.stride(1) != 1:
            raise ValueError("out: the class axis must be contiguous (stride 1)")
    if x.shape[1] > 1 and x.stride(1) != 1:
        if out is x:
            raise ValueError("x: in-place needs a contiguous class axis")
        x = x.contiguous()
    return x, out


def _row_scale(g: Any, N: int, device: torch.device, name: str) -> tuple[torch.Tensor, int]:
    """A per-row multiplier as ``(tensor, stride)``; a scalar or 1-element tensor broadcasts."""
    if not isinstance(g, torch.Tensor):
        g = torch.full((1,), float(g), dtype=torch.float32, device=device)
    if g.device != device:
        raise ValueError(f"{name}: expected device {device}, got {g.device}")
    g = g.reshape(-1)
    if g.numel() == 1:
        return g, 0
    if g.numel() != N:
        raise ValueError(f"{name}: expected {N} per-row values, got shape {tuple(g.shape)}")
    return g, g.stride(0)


def _ce_launch(x, labels, g_ce, g_z, m_in, r_in, *, weight, ignore_index, label_smoothing,
               z_loss, softcap, temperature, out, forward, backward):
    _check_x(x)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels: expected integer class indices, got {labels.dtype}")
    N, V = x.shape
    if labels.reshape(-1).shape[0] != N:
        raise ValueError(f"labels: expected {N} class indices, got shape {tuple(labels.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap: expected a positive number or None, got {softcap}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    x, out = _rows(x, out)
    dev = x.device
    acc = _acc(x.dtype)
    labels = labels.reshape(-1).to(device=dev).contiguous()
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            weight = torch.as_tensor(weight, device=dev)
        if weight.reshape(-1).shape[0] != V:
            raise ValueError(f"weight: expected {V} class weights, got shape {tuple(weight.shape)}")
        weight = weight.reshape(-1).to(device=dev, dtype=acc).contiguous()
        wsum = weight.sum().reshape(1)  # on the device: no sync
    else:
        wsum = None
    eps = float(label_smoothing)
    zl = float(z_loss)
    if forward:
        ce = torch.empty(N, dtype=acc, device=dev)
        m = torch.empty(N, dtype=acc, device=dev)
        r = torch.empty(N, dtype=acc, device=dev)
    else:
        ce = None
        m = m_in.reshape(-1)
        r = r_in.reshape(-1)
        if m.numel() != N or r.numel() != N:
            raise ValueError(f"m, r: expected {N} row statistics each, got {m.numel()} and {r.numel()}")
        m = m.to(device=dev, dtype=acc).contiguous()
        r = r.to(device=dev, dtype=acc).contiguous()
    if backward:
        g1, s1 = _row_scale(g_ce, N, dev, "g_ce")
        g2, s2 = _row_scale(g_z, N, dev, "g_z") if zl != 0.0 else (g1, 0)
        if out is None:
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        g1 = g2 = None
        s1 = s2 = 0
    if forward:
        _labels.poll(dev)  # raise a bad label an earlier call saw, before launching this one
    flag = label_flag(dev)
    if N > 0:
        its, dt = x.element_size(), x.dtype
        block, warps, single = _config(V, its, "ce", dt)
        dummy = x  # never read: constexpr flags turn off every use
        _ce_kernel[(_grid(N, single, dev, its, "ce", V, dt),)](
            x, out if out is not None else dummy, labels,
            weight if weight is not None else dummy, wsum if wsum is not None else dummy,
            g1 if g1 is not None else dummy, g2 if g2 is not None else dummy,
            m, r, ce if ce is not None else dummy, flag,
            x.stride(0), out.stride(0) if out is not None else 0, s1, s2, N, V, int(ignore_index),
            *split64(eps), *split64(zl), *split64(float(softcap) if softcap is not None else 1.0),
            *split64(1.0 / float(temperature)),
            HAS_WEIGHT=weight is not None, HAS_SMOOTH=eps > 0.0, HAS_ZLOSS=zl != 0.0,
            HAS_SOFTCAP=softcap is not None, HAS_TEMP=float(temperature) != 1.0,
            FORWARD=forward, BACKWARD=backward, IS_F64=x.dtype == torch.float64,
            SINGLE=single, BLOCK=block, PREFETCH=_prefetch("ce", V, dt), **_hints("ce", V, dt),
            num_warps=warps,
        )
        if forward:
            _labels.after_launch(dev)
    return ce, m, r, out


def ce_forward(x, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0, softcap=None,
               temperature=1.0):
    """Per-row cross-entropy and row statistics ``(ce, m, r)``, each ``(N,)`` float32 (float64
    for float64 ``x``); see :mod:`logitkit.kernels` for the formula.

    ``x``: ``(N, V)`` CUDA tensor, class axis contiguous; ``labels``: ``(N,)`` integers.
    Ignored rows give ``ce = 0``; a bad label gives NaN and sets :func:`label_flag` (raised by a
    later call, see :mod:`._labels`).

    >>> ce, m, r = ce_forward(x, labels, label_smoothing=0.1)   # doctest: +SKIP
    """
    ce, m, r, _ = _ce_launch(x, labels, None, None, None, None, weight=weight,
                             ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=0.0,
                             softcap=softcap, temperature=temperature, out=None, forward=True,
                             backward=False)
    return ce, m, r


def ce_backward(x, labels, m, r, g_ce, g_z, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                z_loss=0.0, softcap=None, temperature=1.0, out=None):
    """Gradient of ``sum_i g_ce[i] ce[i] + g_z[i] z_loss lse[i]**2`` with respect to ``x``.

    ``m, r``: the row statistics from :func:`ce_forward`; ``g_ce, g_z``: ``(N,)`` per-row
    multipliers (or scalars). Returns ``out`` (new if ``None``; may be ``x`` for in place), ``x``'s
    dtype; ignored rows get exact zeros.

    >>> dx = ce_backward(x, labels, m, r, g, g, out=x)   # doctest: +SKIP
    """
    return _ce_launch(x, labels, g_ce, g_z, m, r, weight=weight, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                      temperature=temperature, out=out, forward=False, backward=True)[3]


def ce_forward_backward(x, labels, g_ce, g_z, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                        z_loss=0.0, softcap=None, temperature=1.0, out=None):
    """:func:`ce_forward` and :func:`ce_backward` in one kernel: ``(ce, m, r, out)``.

    One read of each row from HBM (a second from L2 for rows wider than one block) and one
    write of the gradient; ``out=x`` overwrites the logits with their gradient.

    >>> ce, m, r, dx = ce_forward_backward(x, labels, g, g, out=x)   # doctest: +SKIP
    """
    return _ce_launch(x, labels, g_ce, g_z, None, None, weight=weight, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                      temperature=temperature, out=out, forward=True, backward=True)
