r"""The fused LM head: every per-token output of ``z = hidden @ linear_weight.T + linear_bias`` from
one chunked pass, without ever holding the ``(N, V)`` logits.

Per token (row) ``i``, with ``x`` the raw logits, ``z = softcap(x) / T_i`` (``T_i`` one
temperature per token or one for all), ``lse = logsumexp(z)``, ``ls = z - lse``, ``p = exp(ls)``:

* ``ce``: the cross-entropy terms of :func:`logitkit.core.cross_entropy.ce_forward` (weights,
  smoothing; the z-loss is added by the reduction, from ``lse``);
* ``logprobs = ls[y]``, ``lse``, ``entropy = -Σ_c p_c ls_c``, ``argmax`` of ``x``;
* ``kl``, the divergence against a teacher with log-probabilities ``lt`` (temperature
  ``teacher_temperature``, probabilities ``q``):
  ``"kl"``: :math:`\sum_c q_c (lt_c - ls_c)`; ``"reverse_kl"``: :math:`\sum_c p_c (ls_c - lt_c)`;
  ``"jsd"`` (generalized, weight β, as TRL's GKD and Liger-Kernel's JSD): with
  :math:`M = \beta q + (1-\beta) p`,
  :math:`\beta \sum_c q_c (lt_c - \log M_c) + (1-\beta) \sum_c p_c (ls_c - \log M_c)`,
  β = 0 being the forward and β = 1 the reverse KL.
* teacher top-k (indices ``I``, log-probabilities ``a``, k per token): the teacher is
  :math:`q_j = \mathrm{softmax}_j(a / \tau)` over its k classes and 0 elsewhere; the student is
  the k probabilities :math:`s_j = p_{I_j}` plus one bucket :math:`s_0 = 1 - \sum_j s_j` for the
  rest. ``"kl"`` = :math:`\sum_j q_j (\log q_j - \log s_j)`; ``"jsd"`` = the formula above on
  those k + 1 bins, where the bucket adds :math:`-(1-\beta)\,s_0 \log(1-\beta)`. The reverse KL is
  infinite there (the student's bucket against the teacher's 0) and is refused.

Gradients: for row cotangents ``g_ce, g_lse, g_lp, g_ent, g_kl`` the gradient with respect to the
transformed logits is assembled in one expression per chunk (:func:`chunk_backward`):
``g_ce·dce + (g_lse − g_lp)·p + g_lp·onehot(y) − g_ent·p(ls + H) + g_kl·dkl``, with
``dkl = p − q`` (kl), ``p(ls − lt − K)`` (reverse_kl), ``(1−β)p(ls − log M − D)`` with
``D = Σ p (ls − log M)`` (jsd); then it is chained through the softcap and the temperature.
No gradient reaches the teacher.

Accuracy of the divergences (float32, issue 15: within 1e-6 of float64, or one ulp where that is
larger): ``ls − lt`` is never a difference of two rounded float32 log-softmaxes (2-4 ulp at a KL of
~20) but ``(zs − zt) − ((ms + rs) − (mt + rt))`` in float64 (:func:`_dlogp`), with each ``r``
corrected by ``log Σ p`` of its own rounded probabilities (:func:`_refine`), and the KL is the
``p``-weighted mean ``Σ p d / Σ p`` in float64 (:func:`_wmean`). The JSD's ``lt − log M`` and
``ls − log M`` are formed from ``ls − lt`` alone (:func:`_jsd_logs`). Where the library has no
float64 (JAX without x64) the float32 differences stay.

:class:`HeadRun` drives the chunks for libraries with in-place updates (NumPy, torch) through the
``ops`` objects of :mod:`logitkit.core.linear_cross_entropy`; JAX runs :func:`chunk_forward` and
:func:`chunk_backward` inside ``lax.scan`` (:mod:`logitkit.jax.linear`). Only whole rows of the
vocabulary make a chunk (every output needs its row's final statistics); the rows per chunk are
chosen so that the chunk workspace stays within :data:`DEFAULT_WORKSPACE`.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from .._namespace import acc_dtype, dtype_name
from .cross_entropy import ce_backward, ce_forward
from .linear_cross_entropy import _chunk_selections, _host_bool, _itemsize
from .logsumexp import quiet, row_stats, transform, transform_grad_factor

__all__ = ["HeadOutput", "HeadSpec", "OUTPUTS", "DIFFERENTIABLE", "DIVERGENCES", "chunk_forward",
           "chunk_backward", "HeadRun", "plan_rows", "DEFAULT_WORKSPACE", "KERNEL_WORKSPACE", "row_names"]

OUTPUTS = ("loss", "logprobs", "entropy", "lse", "argmax", "kl")
DIFFERENTIABLE = ("loss", "logprobs", "entropy", "lse", "kl")
DIVERGENCES = ("kl", "reverse_kl", "jsd")
# Chunk workspace per call (see logitkit.core.linear_cross_entropy.DEFAULT_WORKSPACE): the issue
# bounds the peak beyond inputs and gradients at 32 MB.
DEFAULT_WORKSPACE = 24 << 20
# Accumulation-dtype temporaries per logit that the whole-array stages below hold at once
# (tracemalloc on NumPy, V = 32000, chunk buffer included: 14.3 for the student with every output,
# 5 more for a dense teacher; tests/test_linear_head.py holds the peak to 32 MB).
STUDENT_TEMPS = 15
TEACHER_TEMPS = 5
# Workspace of the numba row pass, which needs the chunk's logits alone (and the teacher's): 30 MiB
# (31.5 MB) of float32 logits are 245 tokens of a 32k vocabulary, 122 with a teacher head. The
# products of a chunk re-read the whole weight, so fewer, larger chunks cost less (the linear
# cross-entropy driver measured 192 -> 256 rows at -2.6%); the issue bounds the workspace at 32 MB.
KERNEL_WORKSPACE = 30 << 20


class HeadOutput(NamedTuple):
    """What :func:`logitkit.linear_head` returns; the fields not requested are ``None``."""

    loss: Any = None
    logprobs: Any = None
    entropy: Any = None
    lse: Any = None
    argmax: Any = None
    kl: Any = None


class HeadSpec(NamedTuple):
    """Static (hashable) configuration of one head call."""

    outputs: tuple          # requested names, in OUTPUTS order
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    temperature: float      # the scalar temperature (1.0 when it is given per token)
    has_labels: bool
    teacher: str            # "none", "dense" (a teacher head or its logits) or "topk"
    divergence: str         # effective: a "jsd" with beta 0 / 1 is "kl" / "reverse_kl"
    beta: float
    teacher_temperature: float
    need_lse: bool          # the loss needs lse (z-loss)


def row_names(spec: HeadSpec) -> tuple:
    """Per-row values :func:`chunk_forward` returns for ``spec`` (``m, r`` always)."""
    names = ["m", "r"]
    if "loss" in spec.outputs:
        names.append("ce")
    if "logprobs" in spec.outputs:
        names.append("lp")
    if "entropy" in spec.outputs:
        names.append("ent")
    if "kl" in spec.outputs:
        names += ["kl", "aux"]
    if "argmax" in spec.outputs:
        names.append("am")
    return tuple(names)


def _is_torch(xp: Any) -> bool:
    return hasattr(xp, "_t")


def _transformed(xp: Any, x: Any, spec: HeadSpec, temp: Any) -> Any:
    acc = acc_dtype(xp, x.dtype)
    z = transform(xp, xp.astype(x, acc), spec.softcap, spec.temperature)
    if temp is not None:
        z = z / xp.expand_dims(xp.astype(temp, acc), -1)
    return z


def _logsoftmax(xp: Any, z: Any, m: Any, r: Any) -> tuple[Any, Any]:
    """``(ls, p)`` from the row statistics (kept dims).

    No per-element masking is needed: a fully masked row has ``z = -inf`` (so ``p = 0``), and a
    row with NaN or ``+inf`` has a NaN ``r`` (so NaN everywhere).
    """
    ls = (z - xp.where(xp.isfinite(m), m, 0.0)) - r
    return ls, xp.exp(ls)


def _plogq(xp: Any, p: Any, d: Any) -> Any:
    """``Σ_c p_c d_c`` where terms with ``p_c = 0`` count 0 (``d`` may be infinite there).

    A NaN ``p`` counts 0 here too: the callers add ``r - r`` (NaN exactly on such rows) instead.
    """
    return xp.sum(xp.where(p > 0, p * d, 0.0), axis=-1)


def _nan_rows(xp: Any, r: Any) -> Any:
    """0 per row, NaN where the row statistic ``r`` ``(n, 1)`` is NaN (rows holding NaN or +inf)."""
    return xp.squeeze(r - r, axis=-1)


def _logaddexp(xp: Any, a: Any, b: Any) -> Any:
    mx = xp.maximum(a, b)
    return xp.where(mx == -math.inf, -math.inf, mx + xp.log1p(xp.exp(-xp.abs(a - b))))


def _wide(xp: Any, like: Any) -> Any:
    """float64 where the library has it for ``like``'s device (``None``: JAX without x64, MPS)."""
    if getattr(xp, "__name__", "") == "jax.numpy":
        import jax

        return xp.float64 if jax.config.jax_enable_x64 else None
    if _is_torch(xp):
        dev = getattr(like, "device", None)
        if dev is not None and dev.type == "mps":
            return None
    return xp.float64


def _precise(xp: Any, ls: Any, acc: Any, zs: Any) -> Any:
    """The dtype (float64) in which the divergences form differences of log-probabilities
    (:func:`_dlogp`), or ``None`` where ``ls − lt`` is used as it is: float64 inputs (exact
    enough already), no ``zs``, or no float64 in the library (JAX without x64)."""
    if zs is None or dtype_name(acc) == "float64":
        return None
    return _wide(xp, ls)


def _const(xp: Any, m: Any, r: Any, W: Any) -> Any:
    """``m + r`` (kept dims) in ``W``, a masked row's ``m = -inf`` taken as 0 (as :func:`_logsoftmax`)."""
    return xp.astype(xp.where(xp.isfinite(m), m, 0.0), W) + xp.astype(r, W)


def _dlogp(xp: Any, a: tuple, b: tuple, W: Any, k: Any = None) -> Any:
    """``la − lb`` in ``W`` (float64) for two log-softmaxes given as ``(z, m, r)`` (``l = z − m − r``,
    kept dims), formed as ``(za − zb) − ((ma + ra) − (mb + rb))``.

    Two separately rounded float32 log-softmaxes of values ~ -20 differ by up to ~2 ulp of the
    difference, and a divergence of ~20 is an average of such differences (issue 15: 3.3 ulp).
    float32 logits are exact in float64 and so, to 2^-29 relative, is their difference; ``m``
    (float32) plus ``r`` is exact in float64 too, so offsets like 1e4 cancel exactly. ``k``: a
    row constant (kept dims) subtracted as well, in the same pass."""
    za, ma, ra = a
    zb, mb, rb = b
    c = _const(xp, ma, ra, W) - _const(xp, mb, rb, W)
    if k is not None:
        c = c + xp.astype(k, W)
    if xp is np:
        d = np.subtract(za, zb, dtype=np.float64)
        d -= c
        return d
    return (xp.astype(za, W) - xp.astype(zb, W)) - c


def _mass(xp: Any, p: Any, W: Any) -> Any:
    """``Σ p`` per row (kept dims) in ``W`` (``p ≥ 0``; NaN only on rows that are NaN anyway)."""
    return xp.sum(p, axis=-1, keepdims=True, dtype=W)


def _refine(xp: Any, zmr: tuple, S: Any, W: Any) -> tuple:
    """``(z, m, r + log S)`` with ``r`` in ``W``, ``S = Σ exp(z − m − r)`` from the float32 ``r``.

    ``S`` is ``exp(r_exact − r)`` up to the float32 rounding of the probabilities, which averages
    out in the sum: the corrected ``r`` is exact to ~1e-8 where the float32 one is off by up to
    half an ulp of ``log V`` (5e-7 at V = 32000), the whole error of a small divergence."""
    z, m, r = zmr
    corr = xp.where(S > 0, xp.log(xp.where(S > 0, S, 1.0)), 0.0)
    return z, m, xp.astype(r, W) + corr


def _wmean(xp: Any, p: Any, d: Any, W: Any, den: Any) -> Any:
    """``Σ_c p_c d_c / Σ_c p_c`` per row in ``W`` (``den``: ``Σ p``, kept dims), terms with
    ``p_c = 0`` counting 0 (``d`` may be infinite there); ``d`` in ``W`` or in ``p``'s dtype.

    The division by the computed ``Σ p`` (1 up to the float32 rounding of ``p``) takes that
    rounding out: a row with ``p ≈ 1`` on one class has ``p`` off by ~6e-8 relative, which times
    a divergence of ~20 is most of an ulp. NumPy: the product in place over ``d`` and its sum without the
    mask, and the mask only on the rows where that is not finite."""
    den = xp.squeeze(den, axis=-1)
    if xp is np:
        # in place over d (a fresh temporary of the caller's); 0·inf gives NaN where p = 0, and
        # those terms are set to 0 on the rows (rare) that are not finite
        np.multiply(d, p, out=d)
        num = d.sum(-1, dtype=np.float64)
        bad = ~np.isfinite(num)
        if bad.any():
            rows = d[bad]
            rows[~(p[bad] > 0)] = 0.0
            num[bad] = rows.sum(-1, dtype=np.float64)
    elif d.dtype == p.dtype:
        num = xp.sum(xp.where(p > 0, p * d, 0.0), axis=-1, dtype=W)
    else:
        num = xp.sum(xp.where(p > 0, xp.astype(p, W) * d, 0.0), axis=-1)
    return num / xp.where(den > 0, den, 1.0)


def _log1p(xp: Any, e: Any) -> Any:
    """``log(1 + e)`` for ``0 ≤ e ≤ 1``. NumPy's ``log1p`` is scalar libm code (16 ms on a
    9 × 32000 float32 chunk, ``log`` 0.6 ms): there Goldberg's ``log(w)·e/(w − 1)``, ``w = 1 + e``,
    within ~1 ulp of ``log1p``."""
    if xp is not np:
        return xp.log1p(e)
    w = 1.0 + e
    r = np.log(w)
    r *= e
    w -= 1.0
    with np.errstate(all="ignore"):
        r /= w
    np.copyto(r, e, where=w == 0.0)  # (np.where is 8x np.maximum's time on such arrays)
    return r


def _jsd_logs(xp: Any, dd: Any, b: float) -> tuple[Any, Any]:
    """``(lt − log M, ls − log M)`` for ``M = β q + (1−β) p`` from ``dd = ls − lt`` alone: with
    ``u = dd + log((1−β)/β)`` and ``l = log(1 + e^−|u|)``, ``lt − log M = −log β − max(u, 0) − l``
    and ``ls − log M = −log(1−β) − max(−u, 0) − l`` (no difference of two rounded logarithms)."""
    u = dd + (math.log1p(-b) - math.log(b))
    l1p = _log1p(xp, xp.exp(-xp.abs(u)))
    if xp is np:
        return (-math.log(b) - l1p) - np.maximum(u, 0.0), (-math.log1p(-b) - l1p) + np.minimum(u, 0.0)
    return (-math.log(b) - l1p) - xp.where(u > 0, u, 0.0), (-math.log1p(-b) - l1p) + xp.where(u < 0, u, 0.0)


def _teacher_dense(xp: Any, tx: Any, spec: HeadSpec, acc: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(lt, q, rt, zt, mt)``: the teacher's log-softmax and its pieces (kept dims)."""
    zt = xp.astype(tx, acc)
    if spec.teacher_temperature != 1.0:
        zt = zt / spec.teacher_temperature
    mt, rt, _ = row_stats(xp, zt, -1)
    return _logsoftmax(xp, zt, mt, rt) + (rt, zt, mt)


def _teacher_topk(xp: Any, lpk: Any, spec: HeadSpec, acc: Any) -> tuple[Any, Any, Any]:
    a = xp.astype(lpk, acc)
    if spec.teacher_temperature != 1.0:
        a = a / spec.teacher_temperature
    ma, ra, _ = row_stats(xp, a, -1)
    return _logsoftmax(xp, a, ma, ra) + (ra,)


def _gather(xp: Any, x: Any, idx: Any) -> Any:
    return xp.take_along_axis(x, idx, axis=-1)


def _scatter_add(xp: Any, dz: Any, idx: Any, vals: Any) -> Any:
    """``dz[i, idx[i, j]] += vals[i, j]`` (distinct indices per row)."""
    if xp is np:
        rows = np.arange(dz.shape[0])[:, None]
        np.add.at(dz, (rows, idx), vals)
        return dz
    if _is_torch(xp):
        return dz.scatter_add(-1, idx, vals.to(dz.dtype))
    rows = xp.arange(dz.shape[0])[:, None]
    return dz.at[rows, idx].add(vals)


def _kl_terms(xp: Any, ls: Any, p: Any, teach: Any, spec: HeadSpec, acc: Any, zs: Any = None) -> tuple[Any, Any]:
    """``(kl, aux)`` per row; ``aux`` is what the gradient needs besides the logits (see module).

    ``zs``: the student's ``(z, m, r)`` (kept dims) behind ``ls``, from which float32 rows form
    their differences of log-probabilities in float64 (:func:`_dlogp`); without it (the
    vocabulary-parallel top-k stage passes ``lsk`` alone) ``ls`` is taken as given."""
    k, aux, rt = _kl_terms_raw(xp, ls, p, teach, spec, acc, zs)
    nan = xp.astype(_nan_rows(xp, rt), acc)  # a teacher row with NaN gives NaN
    return k + nan, aux + nan


def _dense_diffs(xp: Any, ls: Any, p: Any, lt: Any, q: Any, zt: Any, mt: Any, rt: Any, acc: Any,
                 zs: Any, forward: bool) -> tuple:
    """``(dd, Sp, Sq, W)``: ``dd = lt − ls`` (``forward``) or ``ls − lt``, in float64 from the
    logits (:func:`_dlogp`, with ``r`` refined by the probability masses ``Sp = Σ p``,
    ``Sq = Σ q``) where :func:`_precise` allows; else ``(lt − ls or ls − lt, None, None, None)``."""
    W = _precise(xp, ls, acc, zs)
    if W is None:
        return (lt - ls if forward else ls - lt), None, None, None
    Sp, Sq = _mass(xp, p, W), _mass(xp, q, W)
    s3, t3 = _refine(xp, zs, Sp, W), _refine(xp, (zt, mt, rt), Sq, W)
    return (_dlogp(xp, t3, s3, W) if forward else _dlogp(xp, s3, t3, W)), Sp, Sq, W


def _topk_logs(xp: Any, ls: Any, p: Any, teach: Any, spec: HeadSpec, acc: Any, zs: Any) -> tuple:
    """``(lq, q, rq, lsk)`` for a top-k teacher, in float64 where :func:`_precise` allows (these
    are ``(n, k)`` arrays), with the student's log-probabilities at the k classes from the logits
    (``r`` refined by ``Σ p`` when ``p`` is given) in the same dtype."""
    W = _precise(xp, ls, acc, zs)
    if W is None:
        lq, q, rq = _teacher_topk(xp, teach[1], spec, acc)
        return lq, q, rq, _gather(xp, ls, teach[0])
    lq, q, rq = _teacher_topk(xp, teach[1], spec, W)
    if p is not None:
        zs = _refine(xp, zs, _mass(xp, p, W), W)
    z, m, r = zs
    return lq, q, rq, xp.astype(_gather(xp, z, teach[0]), W) - _const(xp, m, r, W)


def _kl_terms_raw(xp: Any, ls: Any, p: Any, teach: Any, spec: HeadSpec, acc: Any,
                  zs: Any = None) -> tuple[Any, Any, Any]:
    b = spec.beta
    if spec.teacher == "dense":
        lt, q, rt, zt, mt = _teacher_dense(xp, teach, spec, acc)
        dd, Sp, Sq, W = _dense_diffs(xp, ls, p, lt, q, zt, mt, rt, acc, zs, spec.divergence == "kl")
        if spec.divergence == "kl":
            k = _plogq(xp, q, dd) if W is None else xp.astype(_wmean(xp, q, dd, W, Sq), acc)
            return k, k, rt
        if spec.divergence == "reverse_kl":
            k = _plogq(xp, p, dd) if W is None else xp.astype(_wmean(xp, p, dd, W, Sp), acc)
            return k, k, rt
        if W is None:
            et, es = _jsd_logs(xp, dd, b)
            d = _plogq(xp, p, es)
            return b * _plogq(xp, q, et) + (1.0 - b) * d, d, rt
        # the JSD is bounded (by log 1/β): dd rounded once to float32 keeps it within ~1e-7
        et, es = _jsd_logs(xp, xp.astype(dd, acc), b)
        d = _wmean(xp, p, es, W, Sp)
        return xp.astype(b * _wmean(xp, q, et, W, Sq) + (1.0 - b) * d, acc), xp.astype(d, acc), rt
    lq, q, rq, lsk = _topk_logs(xp, ls, p, teach, spec, acc, zs)
    if spec.divergence == "kl":
        k = xp.astype(_plogq(xp, q, lq - lsk), acc)
        return k, k, rq
    # jsd on the k bins plus the student's bucket of the rest
    s = xp.exp(lsk)
    et, es = _jsd_logs(xp, lsk - lq, b)
    rest = 1.0 - xp.sum(s, axis=-1)
    rest = xp.where(rest > 0, rest, 0.0)  # rounding can take Σ s_j just past 1
    j = b * _plogq(xp, q, et) + (1.0 - b) * (_plogq(xp, s, es) - math.log1p(-b) * rest)
    j = xp.astype(j, acc)
    return j, j, rq


@quiet
def chunk_forward(xp: Any, x: Any, labels: Any, temp: Any, teach: Any, weight: Any, spec: HeadSpec) -> dict:
    """Per-row values (``(n,)`` each, accumulation dtype; see :func:`row_names`) of one chunk.

    ``x`` ``(n, V)`` raw logits, ``labels`` ``(n,)`` (any ints when ``spec.has_labels`` is False),
    ``temp`` ``(n,)`` per-token temperatures or ``None``, ``teach`` the teacher's raw logits
    ``(n, V)`` or ``(indices, logprobs)`` ``(n, k)`` each, or ``None``.
    """
    acc = acc_dtype(xp, x.dtype)
    z = _transformed(xp, x, spec, temp)
    m, r, _ = row_stats(xp, z, -1)
    out = {"m": xp.squeeze(m, axis=-1), "r": xp.squeeze(r, axis=-1)}
    o = spec.outputs
    if spec.has_labels:
        valid = labels != spec.ignore_index
    if "loss" in o:
        out["ce"] = ce_forward(xp, z, labels, weight=weight, ignore_index=spec.ignore_index,
                               label_smoothing=spec.label_smoothing)[0]
    if "logprobs" in o:
        if "loss" in o and weight is None and spec.label_smoothing == 0.0:
            out["lp"] = -out["ce"]
        else:
            out["lp"] = -ce_forward(xp, z, labels, ignore_index=spec.ignore_index)[0]
    if "entropy" in o or "kl" in o:
        ls, p = _logsoftmax(xp, z, m, r)
        if "entropy" in o:
            # H = r + Σ p (m − z): every term ≥ 0, so a confident row keeps its tiny entropy.
            mf = xp.where(xp.isfinite(m), m, 0.0)
            ent = xp.squeeze(r, axis=-1) + _plogq(xp, p, mf - z)
            out["ent"] = xp.where(xp.squeeze(m, axis=-1) == -math.inf, 0.0, ent)  # r is NaN on NaN rows
        if "kl" in o:
            k, aux = _kl_terms(xp, ls, p, teach, spec, acc, zs=(z, m, r))
            nan = _nan_rows(xp, r)
            out["kl"], out["aux"] = k + nan, aux + nan
    if "argmax" in o:
        out["am"] = x.argmax(-1)
    if spec.has_labels:
        for k in ("ent", "kl", "aux"):
            if k in out:
                out[k] = xp.where(valid, out[k], 0.0)
        if "am" in out:
            out["am"] = xp.where(valid, out["am"], 0)
    return out


@quiet
def chunk_backward(xp: Any, x: Any, labels: Any, temp: Any, teach: Any, weight: Any, spec: HeadSpec,
                   rows: dict, cots: dict) -> Any:
    """Gradient with respect to the raw logits ``x`` of ``Σ_i Σ_k cots[k]_i · value_k,i``.

    ``rows``: the chunk's ``m, r`` and, as needed, ``ent`` and ``aux`` from :func:`chunk_forward`;
    ``cots``: any of ``g_ce, g_lse, g_lp, g_ent, g_kl`` ``(n,)``. Returns the accumulation dtype.
    """
    acc = acc_dtype(xp, x.dtype)
    xa = xp.astype(x, acc)
    z = transform(xp, xa, spec.softcap, spec.temperature)
    if temp is not None:
        z = z / xp.expand_dims(xp.astype(temp, acc), -1)
    m, r = rows["m"], rows["r"]
    me, re = xp.expand_dims(m, -1), xp.expand_dims(r, -1)
    ls, p = _logsoftmax(xp, z, me, re)
    col = lambda k: xp.expand_dims(xp.astype(cots[k], acc), -1)  # noqa: E731
    dz = None
    if cots.get("g_ce") is not None:
        zeros = xp.zeros_like(m)
        dz = ce_backward(xp, z, labels, m, r, cots["g_ce"], zeros, weight=weight,
                         ignore_index=spec.ignore_index, label_smoothing=spec.label_smoothing)
    coef = None
    if cots.get("g_lse") is not None:
        coef = col("g_lse")
    if cots.get("g_lp") is not None:
        g = col("g_lp")
        coef = -g if coef is None else coef - g
        lab = xp.where(labels != spec.ignore_index, labels, 0)
        onehot = _iota(xp, z.shape[-1], z) == xp.expand_dims(lab, -1)
        term = xp.where(onehot, g, 0.0)
        dz = term if dz is None else dz + term
    if coef is not None:
        dz = coef * p if dz is None else dz + coef * p
    if cots.get("g_ent") is not None:
        ent = xp.expand_dims(rows["ent"], -1)
        term = col("g_ent") * xp.where(p > 0, -p * (ls + ent), 0.0)
        dz = term if dz is None else dz + term
    if cots.get("g_kl") is not None:
        term = _kl_grad(xp, ls, p, teach, spec, acc, rows["aux"], zs=(z, me, re)) * col("g_kl")
        dz = term if dz is None else dz + term
    if dz is None:
        dz = xp.zeros_like(z)
    elif cots.get("g_ent") is not None or cots.get("g_kl") is not None:
        dz = dz + (re - re)  # NaN rows (dropped by the masks above) get NaN gradients
    factor = transform_grad_factor(xp, xa, spec.softcap, spec.temperature)
    if factor is not None:
        dz = dz * factor
    if temp is not None:
        dz = dz / xp.expand_dims(xp.astype(temp, acc), -1)
    if spec.has_labels:
        dz = xp.where(xp.expand_dims(labels != spec.ignore_index, -1), dz, 0.0)
    return dz


def _kl_grad(xp: Any, ls: Any, p: Any, teach: Any, spec: HeadSpec, acc: Any, aux: Any, zs: Any = None) -> Any:
    b = spec.beta
    a = xp.expand_dims(aux, -1)
    if spec.teacher == "dense":
        lt, q, rt, zt, mt = _teacher_dense(xp, teach, spec, acc)
        if spec.divergence == "kl":
            return p - q
        W = _precise(xp, ls, acc, zs)
        if W is None:
            dd = ls - lt
            if spec.divergence == "reverse_kl":
                return xp.where(p > 0, p * (dd - a), 0.0)
            _, es = _jsd_logs(xp, dd, b)
            return (1.0 - b) * xp.where(p > 0, p * (es - a), 0.0)
        # p (d − Σ p d / Σ p) with d and its p-mean in float64, the mean taken here rather than the
        # forward's float32 aux: at a KL of ~20 the two agree to 1e-6 where the gradient is ~1e-7.
        # (The reverse KL's d − mean does not depend on a constant in d: no refinement of r.)
        Sp = _mass(xp, p, W)
        if spec.divergence == "reverse_kl":
            d = _dlogp(xp, zs, (zt, mt, rt), W)
        else:
            Sq = _mass(xp, q, W)
            dd = _dlogp(xp, _refine(xp, zs, Sp, W), _refine(xp, (zt, mt, rt), Sq, W), W)
            d = _jsd_logs(xp, xp.astype(dd, acc), b)[1]
        K = xp.expand_dims(_wmean(xp, p, d.copy() if xp is np else d, W, Sp), -1)
        g = xp.where(p > 0, p * xp.astype(d - K, acc), 0.0)
        return g if spec.divergence == "reverse_kl" else (1.0 - b) * g
    idx = teach[0]
    lq, q, _, lsk = _topk_logs(xp, ls, p, teach, spec, acc, zs)
    if spec.divergence == "kl":
        # d/dz_c of −Σ_j q_j ls_{I_j} = p_c Σ_j q_j − q at c
        q = xp.astype(q, acc)
        sq = xp.expand_dims(xp.sum(q, axis=-1), -1)
        return _scatter_add(xp, p * sq, idx, -q)
    s = xp.exp(lsk)
    _, es = _jsd_logs(xp, lsk - lq, b)
    # dJ/ds_j with s_0 = 1 − Σ s_j: (1−β)(log s_j − log M_j + log(1−β)); ds_j/dz_c = s_j(δ − p_c)
    w = xp.astype((1.0 - b) * xp.where(s > 0, s * (es + math.log1p(-b)), 0.0), acc)
    return _scatter_add(xp, -p * xp.expand_dims(xp.sum(w, axis=-1), -1), idx, w)


def _iota(xp: Any, n: int, like: Any) -> Any:
    if _is_torch(xp):
        return xp.arange(n, like=like)
    return xp.arange(n)


# ----------------------------------------------------------------------------------------------
# the chunk driver for NumPy and torch


def plan_rows(n_rows: int, V: int, acc_bytes: int, teacher: str, chunk_size: Any = None,
              workspace: int = DEFAULT_WORKSPACE, temps: Any = None) -> int:
    """Tokens per chunk: ``chunk_size`` when given, else as many as ``workspace`` holds.

    ``temps``: logit-sized temporaries per row (default: those of the whole-array core stages;
    the numba row pass needs only the chunk's logits, and the teacher's).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, (tuple, list)):
            rows, cols = int(chunk_size[0]), int(chunk_size[1])
            if cols < V:
                raise ValueError(f"chunk_size: vocabulary tiles ({cols} < V = {V} classes) serve only "
                                 "outputs=('loss',) with a scalar temperature; every other output needs "
                                 "whole rows: pass an int (tokens per chunk)")
        else:
            rows = int(chunk_size)
        return max(1, min(rows, max(n_rows, 1)))
    if temps is None:
        temps = STUDENT_TEMPS + (TEACHER_TEMPS if teacher == "dense" else 0)
    per_row = max(1, V * acc_bytes * temps)
    return max(1, min(workspace // per_row, max(n_rows, 1)))


class HeadRun:
    """One head problem on an in-place library, chunk by chunk over the rows not ignored.

    ``ops`` (and ``teacher_ops`` for a teacher head) are the ``NumpyOps`` / ``TorchOps`` of the
    linear cross-entropy driver. ``teacher``: ``None``, ``("head", th2)``, ``("logits", tl2)`` or
    ``("topk", idx2, lp2)``, rows aligned with ``h2``.

    CPU chunks of float32 / float64 logits without softcap (no teacher, or a dense teacher with
    any divergence) run the numba row pass of :mod:`logitkit.kernels.cpu.head`: every statistic in
    one pass over the chunk's logits and, with cotangents, their gradient written over them, so a
    chunk's workspace is its logits alone (and the teacher's) and chunks hold ~10x more tokens
    than on the array-level stages (:func:`chunk_forward` / :func:`chunk_backward`, which serve
    everything else and the kernel's special rows: non-finite maxima, NaN).
    """

    def __init__(self, ops: Any, h2: Any, W: Any, labels: Any, temp: Any, weight: Any, spec: HeadSpec,
                 teacher: Any = None, teacher_ops: Any = None, chunk_size: Any = None,
                 workspace: Any = None) -> None:
        self.ops, self.xp = ops, ops.xp
        self.h, self.W, self.labels, self.temp, self.weight = h2, W, labels, temp, weight
        self.spec, self.teacher, self.tops = spec, teacher, teacher_ops
        self.N, self.H = h2.shape
        self.V = W.shape[0]
        self.acc = acc_dtype(self.xp, h2.dtype)
        if spec.has_labels:
            valid = _host_bool(labels != spec.ignore_index)
        else:
            valid = np.ones(self.N, bool)
        idx = np.flatnonzero(valid)
        self.n_valid = int(idx.size)
        self.fast = _fast_ok(ops, spec, teacher, teacher_ops)
        temps = None
        if workspace is None:
            workspace = KERNEL_WORKSPACE if self.fast else DEFAULT_WORKSPACE
        if self.fast:
            temps = 1 + (1 if spec.teacher == "dense" else 0)
            self._w_np = None if weight is None else _np(weight).astype(_np_dtype(ops.logit_dtype))
        self.rows = plan_rows(self.n_valid, self.V, _itemsize(ops.logit_dtype if self.fast else self.acc),
                              spec.teacher, chunk_size, workspace, temps)
        self.chunks = [(s if isinstance(s, slice) else ops.index(s), n)
                       for s, n in _chunk_selections(idx, self.N, self.rows)]

    def _chunk(self, sel: Any, n: int, buf: Any, tbuf: Any) -> tuple:
        ops = self.ops
        h_c = ops.rows(self.h, sel)
        x = ops.logits(h_c, 0, self.V, buf[:n])
        lab = self.labels[sel] if self.spec.has_labels else None
        temp = None if self.temp is None else self.temp[sel]
        t = self.teacher
        teach = None
        if t is not None:
            if t[0] == "head":
                teach = self.tops.logits(self.tops.rows(t[1], sel), 0, self.V, tbuf[:n])
            elif t[0] == "logits":
                teach = t[1][sel]
            else:
                teach = (t[1][sel], t[2][sel])
        return h_c, x, lab, temp, teach

    def _buffers(self) -> tuple[Any, Any]:
        ops = self.ops
        buf = ops.empty((self.rows, self.V), ops.logit_dtype)
        tbuf = None
        if self.teacher is not None and self.teacher[0] == "head":
            tbuf = self.tops.empty((self.rows, self.V), self.tops.logit_dtype)
        return buf, tbuf

    # -- the numba row pass on one chunk
    def _kernel(self, x: Any, lab: Any, temp: Any, teach: Any, cots: Any) -> tuple[dict, np.ndarray]:
        """Per-row values of the chunk (NumPy, accumulation dtype) and the rows left to the core."""
        from ..kernels.cpu.head import head_rows

        spec = self.spec
        xn = _np(x)
        n = xn.shape[0]
        temps = (np.full(n, spec.temperature, np.float64) if temp is None
                 else _np(temp).astype(np.float64).reshape(n))
        o = spec.outputs
        c = None if cots is None else {k: (None if v is None else _np(v)) for k, v in cots.items()}
        st, special = head_rows(xn, None if lab is None else _np(lab), ignore_index=spec.ignore_index,
                                weight=self._w_np, label_smoothing=spec.label_smoothing, temps=temps,
                                teacher=None if teach is None else _np(teach),
                                teacher_temperature=spec.teacher_temperature,
                                want_ent="entropy" in o, want_am="argmax" in o, cots=c,
                                divergence=spec.divergence, beta=spec.beta)
        acc = _np_dtype(self.acc)
        vals = {"m": st[0].astype(acc), "r": st[1].astype(acc)}
        for name, key, row in (("loss", "ce", 2), ("logprobs", "lp", 3), ("entropy", "ent", 4)):
            if name in o:
                vals[key] = st[row].astype(acc)
        if "kl" in o:
            vals["kl"], vals["aux"] = st[5].astype(acc), st[7].astype(acc)
        if "argmax" in o:
            vals["am"] = st[6].astype(np.int64)
        return vals, special

    def _special(self, special: np.ndarray, x: Any, lab: Any, temp: Any, teach: Any) -> tuple:
        """The chunk's rows the kernel left (index, and each argument restricted to them)."""
        ops = self.ops
        sp = np.flatnonzero(special)
        ix = ops.index(sp)
        sub = lambda a: None if a is None else a[ix]  # noqa: E731
        return ix, x[ix], sub(lab), sub(temp), sub(teach)

    def _lib(self, vals: dict) -> dict:
        if self.ops.xp is np:
            return vals
        import torch

        dev = self.ops.device
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in vals.items()}

    def _chunk_forward(self, x: Any, lab: Any, temp: Any, teach: Any) -> dict:
        if not self.fast:
            return chunk_forward(self.xp, x, lab, temp, teach, self.weight, self.spec)
        vals, special = self._kernel(x, lab, temp, teach, None)
        vals = self._lib(vals)
        if special.any():
            ix, xs, ls, ts, tt = self._special(special, x, lab, temp, teach)
            sv = chunk_forward(self.xp, xs, ls, ts, tt, self.weight, self.spec)
            for k, v in sv.items():
                self.ops.put_rows(vals[k], ix, v)
        return vals

    def _chunk_grad(self, x: Any, lab: Any, temp: Any, teach: Any, rows: Any, cots: dict) -> tuple[Any, Any]:
        """``(dz, vals)``: the gradient of the chunk's logits (in place over ``x`` on the kernel's
        path) and, on that path, the chunk's per-row values (``None`` otherwise)."""
        if not self.fast:
            dz = chunk_backward(self.xp, x, lab, temp, teach, self.weight, self.spec, rows, cots)
            return self.ops.to_out(dz, self.ops.logit_dtype), None
        vals, special = self._kernel(x, lab, temp, teach, cots)
        vals = self._lib(vals)
        if special.any():
            ix, xs, ls, ts, tt = self._special(special, x, lab, temp, teach)
            sv = chunk_forward(self.xp, xs, ls, ts, tt, self.weight, self.spec)
            for k, v in sv.items():
                self.ops.put_rows(vals[k], ix, v)
            r_s = {k: sv[k] for k in ("m", "r", "ent", "aux") if k in sv}
            c_s = {k: (None if v is None else v[ix]) for k, v in cots.items() if k != "g_sq"}
            if cots.get("g_sq") is not None:  # z-loss: d(g·lse²) = 2 g lse · d lse
                extra = 2.0 * cots["g_sq"][ix] * (sv["m"] + sv["r"])
                c_s["g_lse"] = extra if c_s.get("g_lse") is None else c_s["g_lse"] + extra
            dz = chunk_backward(self.xp, xs, ls, ts, tt, self.weight, self.spec, r_s, c_s)
            self.ops.put_rows(x, ix, self.ops.to_out(dz, self.ops.logit_dtype))
        return x, vals

    def _grads(self, dz: Any, h_c: Any, sel: Any, dh: Any, dw: Any, db: Any) -> None:
        ops = self.ops
        if dh is not None:
            if isinstance(sel, slice):
                ops.dh(dz, 0, self.V, out=dh[sel])
            else:
                ops.put_rows(dh, sel, ops.to_out(ops.dh(dz, 0, self.V), dh.dtype))
        if dw is not None:
            ops.add_dw(dw, dz, h_c, 0, self.V)
        if db is not None:
            ops.add_db(db, dz, 0, self.V)

    def _out_rows(self) -> dict:
        ops = self.ops
        names = row_names(self.spec)
        out = {k: ops.zeros((self.N,), self.acc) for k in names if k != "am"}
        if "am" in names:
            out["am"] = ops.zeros((self.N,), _int64(self.xp))
        return out

    def _grad_buffers(self, need: tuple, has_bias: bool) -> tuple:
        ops = self.ops
        dh = ops.zeros((self.N, self.H), self.h.dtype) if need[0] else None
        wacc = acc_dtype(self.xp, self.W.dtype)
        dw = ops.zeros((self.V, self.H), wacc) if need[1] else None
        db = ops.zeros((self.V,), wacc) if need[2] and has_bias else None
        return dh, dw, db

    def forward(self) -> dict:
        """Per-row values ``(N,)`` (rows not processed, i.e. ignored, hold 0)."""
        out = self._out_rows()
        if not self.n_valid or not self.V:
            return out
        buf, tbuf = self._buffers()
        for sel, n in self.chunks:
            _, x, lab, temp, teach = self._chunk(sel, n, buf, tbuf)
            for k, v in self._chunk_forward(x, lab, temp, teach).items():
                self.ops.put_rows(out[k], sel, v)
        return out

    def backward(self, rows: dict, cots: dict, need: tuple = (True, True, True), has_bias: bool = False):
        """``(dh, dW, db)`` of ``Σ cots · values``, recomputing the logits (``None`` where not needed)."""
        dh, dw, db = self._grad_buffers(need, has_bias)
        if self.n_valid and self.V:
            buf, tbuf = self._buffers()
            for sel, n in self.chunks:
                h_c, x, lab, temp, teach = self._chunk(sel, n, buf, tbuf)
                r_c = {k: v[sel] for k, v in rows.items() if k in ("m", "r", "ent", "aux")}
                c_c = {k: (None if v is None else v[sel]) for k, v in cots.items()}
                dz, _ = self._chunk_grad(x, lab, temp, teach, r_c, c_c)
                self._grads(dz, h_c, sel, dh, dw, db)
        return dh, dw, db

    def forward_backward(self, cots: dict, need: tuple = (True, True, True), has_bias: bool = False):
        """Per-row values and ``(dh, dW, db)`` of ``Σ cots · values`` from one pass (three matrix
        products, four with a teacher head) when the cotangents are known before the logits:
        ``cots`` as in :meth:`backward`, plus ``g_sq`` ``(N,)``, the cotangent of ``lse²`` (the
        z-loss). Needs the kernel's path (:attr:`fast`)."""
        if not self.fast:
            raise ValueError("forward_backward: needs the CPU row kernel (float32/float64, no softcap, "
                             "no teacher or a dense teacher)")
        out = self._out_rows()
        dh, dw, db = self._grad_buffers(need, has_bias)
        if self.n_valid and self.V:
            buf, tbuf = self._buffers()
            for sel, n in self.chunks:
                h_c, x, lab, temp, teach = self._chunk(sel, n, buf, tbuf)
                c_c = {k: (None if v is None else v[sel]) for k, v in cots.items()}
                dz, vals = self._chunk_grad(x, lab, temp, teach, None, c_c)
                for k, v in vals.items():
                    self.ops.put_rows(out[k], sel, v)
                self._grads(dz, h_c, sel, dh, dw, db)
        return out, (dh, dw, db)


def _np(a: Any) -> np.ndarray:
    """A NumPy view (no copy where possible) of a NumPy array or a CPU tensor."""
    if hasattr(a, "detach"):
        a = a.detach()
        if a.is_floating_point() and a.element_size() < 4:
            a = a.float()  # a bfloat16 / float16 teacher: NumPy has no such type
        return (a if a.is_contiguous() else a.contiguous()).numpy()
    return np.asarray(a)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype)
    return np.dtype(str(dtype).replace("torch.", ""))


def _fast_ok(ops: Any, spec: HeadSpec, teacher: Any, tops: Any) -> bool:
    """Whether the chunks can run the numba row pass (see :class:`HeadRun`)."""
    from ..kernels import registry
    from ..kernels.cpu import available

    if registry._forced_core[0] or not available() or spec.softcap is not None:
        return False
    if os.environ.get("LOGITKIT_HEAD_KERNEL", "").lower() in ("0", "off", "core"):
        return False  # the array-level stages only (benchmarks/linear_bench.py measures both)
    if spec.teacher == "topk":
        return False
    if dtype_name(ops.logit_dtype) not in ("float32", "float64"):
        return False
    if ops.xp is not np and getattr(ops, "device", None) is not None and ops.device.type != "cpu":
        return False
    if teacher is not None and teacher[0] == "head" and dtype_name(tops.logit_dtype) not in ("float32", "float64"):
        return False
    return True


def _int64(xp: Any) -> Any:
    return xp.int64 if hasattr(xp, "int64") else np.int64
