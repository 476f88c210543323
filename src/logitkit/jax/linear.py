r"""Fused linear + cross-entropy for JAX: ``custom_vjp`` with the chunks inside ``lax.scan``.

The shapes are static under ``jit``, so the rows that are not ignored are first moved to the front
(a stable argsort of the ignore mask) and every chunk after the last valid row is skipped with
``lax.cond``: ignored rows never reach a matrix product. Whole-row chunks run the core
cross-entropy stages; vocabulary tiles (padded to a multiple of the tile, the padding masked
out) run :mod:`logitkit.distributed.stages` merged with
:func:`logitkit.core.linear_cross_entropy.merge_partials`. Logits and gradient products accumulate
in float32 for float16/bfloat16 inputs (``preferred_element_type``).

Gradients (see :func:`logitkit.core.linear_cross_entropy.choose_strategy`): under
differentiation, ``mean``/``sum`` losses with whole rows compute them in the forward pass (three
products) and backward scales them by the cotangent; otherwise backward recomputes the logits.

>>> import jax, jax.numpy as jnp, logitkit
>>> h = jnp.ones((4, 8)); W = jnp.zeros((16, 8)); y = jnp.arange(4)
>>> float(logitkit.linear_cross_entropy(h, W, y))  # log 16  # doctest: +ELLIPSIS
2.772588...
"""

from __future__ import annotations


import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .. import linear as _public
from ..core import cross_entropy as core_ce
from ..core import linear_cross_entropy as core
from ..core import linear_head as core_head
from ..core.logsumexp import transform
from ..core.reduction import reduce_loss, row_scales, row_weights
from ..distributed import stages as vp

__all__ = ["linear_cross_entropy", "linear_token_logprobs", "linear_entropy", "linear_head"]


class _Static(NamedTuple):
    """Hashable, static configuration of one call."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    temperature: float
    reduction: str
    rows: int
    cols: int
    full_rows: bool
    has_bias: bool
    has_weight: bool


def _acc(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _plan(N: int, V: int, dtype: Any, chunk_size: Any, kernels: bool = True) -> core.Plan:
    acc_size = jnp.dtype(_acc(dtype)).itemsize
    # XLA fuses the elementwise stage into a few passes; count three accumulation-dtype copies.
    return core.plan_chunks(N, V, bytes_per_logit=(3 if kernels else core.CORE_TEMPS) * acc_size,
                            chunk_size=chunk_size)


def _mm(a: Any, b: Any, acc: Any) -> Any:
    """``a @ b`` accumulated (and returned) in ``acc``; low-precision operands stay low precision."""
    if a.dtype != b.dtype:
        a = a.astype(b.dtype)
    return jnp.matmul(a, b, preferred_element_type=acc)


# ----------------------------------------------------------------------------------------------
# chunking


def _compact(h2: Any, lab: Any, st: _Static) -> tuple:
    """Valid rows first, padded to whole chunks: ``(order, n_valid, hs, ls)``."""
    N, H = h2.shape
    valid = lab != st.ignore_index
    order = jnp.argsort(jnp.logical_not(valid), stable=True)
    n_valid = jnp.sum(valid.astype(jnp.int32))
    nch = max(1, -(-N // st.rows))
    pad = nch * st.rows - N
    hs = jnp.pad(h2[order], ((0, pad), (0, 0))).reshape(nch, st.rows, H)
    ls = jnp.pad(lab[order], (0, pad), constant_values=st.ignore_index).reshape(nch, st.rows)
    return order, n_valid, hs, ls


def _rows_of(x: Any, order: Any, st: _Static, fill: float = 0.0) -> Any:
    """Per-row ``(N,)`` array in chunk layout ``(nch, rows)`` (padding = ``fill``)."""
    N = x.shape[0]
    nch = max(1, -(-N // st.rows))
    return jnp.pad(x[order], (0, nch * st.rows - N), constant_values=fill).reshape(nch, st.rows)


def _unchunk(x: Any, order: Any, N: int) -> Any:
    """Inverse of :func:`_rows_of` for per-row results (any trailing shape)."""
    flat = x.reshape((-1,) + x.shape[2:])[:N]
    return jnp.zeros_like(flat).at[order].set(flat)


def _padded_vocab(W: Any, b: Any, w: Any, st: _Static) -> tuple:
    """Weight, bias and class weights padded to a whole number of tiles, and the tile count."""
    V = W.shape[0]
    nt = -(-V // st.cols)
    pad = nt * st.cols - V
    Wp = jnp.pad(W, ((0, pad), (0, 0)))
    bp = None if b is None else jnp.pad(b, (0, pad))
    wp = None if w is None else jnp.pad(w, (0, pad))
    return Wp, bp, wp, nt


def _tile(Wp: Any, bp: Any, wp: Any, t: Any, st: _Static, V: int) -> tuple:
    c0 = t * st.cols
    W_t = lax.dynamic_slice_in_dim(Wp, c0, st.cols, 0)
    b_t = None if bp is None else lax.dynamic_slice_in_dim(bp, c0, st.cols, 0)
    w_t = None if wp is None else lax.dynamic_slice_in_dim(wp, c0, st.cols, 0)
    mask = (c0 + jnp.arange(st.cols)) < V
    return c0, W_t, b_t, w_t, mask


def _logits(h_c: Any, W: Any, b: Any, acc: Any) -> Any:
    z = _mm(h_c, W.T, acc)
    return z if b is None else z + b.astype(acc)


def _opts(st: _Static, weight: Any) -> dict:
    return dict(weight=weight, ignore_index=st.ignore_index, label_smoothing=st.label_smoothing,
                softcap=st.softcap, temperature=st.temperature)


# ----------------------------------------------------------------------------------------------
# forward: statistics (and, fused, the gradients)


def _forward(h2, W, b, lab, weight, st: _Static, scales=None):
    """``(ce, m, r)`` ``(N,)``; with ``scales = (g_ce, g_z)`` also ``(dh, dw, db)`` (fused)."""
    N, H = h2.shape
    V = W.shape[0]
    acc = _acc(h2.dtype)
    order, n_valid, hs, ls = _compact(h2, lab, st)
    nch = hs.shape[0]
    zeros_rows = jnp.zeros((st.rows,), acc)
    if not st.full_rows:
        return _tiled_forward(h2, W, b, lab, weight, st, order, n_valid, hs, ls)
    opts = _opts(st, weight)
    if scales is None:
        def body(carry, xs):
            k, h_c, l_c = xs

            def run(_):
                return core_ce.ce_forward(jnp, _logits(h_c, W, b, acc), l_c, **opts)

            out = lax.cond(k * st.rows < n_valid, run, lambda _: (zeros_rows,) * 3, None)
            return carry, out

        _, (ce, m, r) = lax.scan(body, None, (jnp.arange(nch), hs, ls))
        return tuple(_unchunk(a, order, N) for a in (ce, m, r))
    gs, gz = (_rows_of(g, order, st) for g in scales)
    dw0 = jnp.zeros(W.shape, _acc(W.dtype))
    db0 = None if b is None else jnp.zeros((V,), _acc(W.dtype))

    def body_f(carry, xs):
        dw, db = carry
        k, h_c, l_c, g1, g2 = xs

        def run(_):
            z = _logits(h_c, W, b, acc)
            ce, m, r, dz = core_ce.ce_forward_backward(jnp, z, l_c, g1, g2, z_loss=st.z_loss, **opts)
            dz = dz.astype(h2.dtype) if h2.dtype != acc else dz
            dh = _mm(dz, W, acc).astype(h2.dtype)
            dw2 = dw + _mm(dz.T, h_c, dw.dtype)
            db2 = None if db is None else db + jnp.sum(dz.astype(db.dtype), axis=0)
            return (dw2, db2), (ce, m, r, dh)

        def skip(_):
            return (dw, db), (zeros_rows, zeros_rows, zeros_rows, jnp.zeros((st.rows, H), h2.dtype))

        return lax.cond(k * st.rows < n_valid, run, skip, None)

    (dw, db), (ce, m, r, dh) = lax.scan(body_f, (dw0, db0), (jnp.arange(nch), hs, ls, gs, gz))
    stats = tuple(_unchunk(a, order, N) for a in (ce, m, r))
    return stats + (_unchunk(dh, order, N), dw.astype(W.dtype), None if db is None else db.astype(b.dtype))


def _empty_partials(n: int, acc: Any, smooth: bool) -> vp.Partials:
    z = jnp.zeros((n, 1), acc)
    s = z if smooth else None
    w = jnp.zeros((), acc) if smooth else None
    return vp.Partials(z - jnp.inf, z, z, z, jnp.zeros((n, 1), bool), s, w)


def _tiled_forward(h2, W, b, lab, weight, st, order, n_valid, hs, ls):
    N = h2.shape[0]
    V = W.shape[0]
    acc = _acc(h2.dtype)
    nch = hs.shape[0]
    Wp, bp, wp, nt = _padded_vocab(W, b, None if weight is None else weight.astype(acc), st)
    zeros_rows = jnp.zeros((st.rows,), acc)
    smooth = st.label_smoothing > 0.0

    def chunk(carry, xs):
        k, h_c, l_c = xs

        def run(_):
            def tile(p, t):
                c0, W_t, b_t, w_t, mask = _tile(Wp, bp, wp, t, st, V)
                z = transform(jnp, _logits(h_c, W_t, b_t, acc), st.softcap, st.temperature)
                q = vp.local_partials(jnp, z, l_c, start=c0, ignore_index=st.ignore_index,
                                      label_smoothing=st.label_smoothing, weight_local=w_t, col_mask=mask)
                return core.merge_partials(jnp, p, q), None

            p, _ = lax.scan(tile, _empty_partials(st.rows, acc, smooth), jnp.arange(nt))
            return core.finish_partials(jnp, p, l_c, V=V, weight=weight, ignore_index=st.ignore_index,
                                        label_smoothing=st.label_smoothing, acc=acc)

        return carry, lax.cond(k * st.rows < n_valid, run, lambda _: (zeros_rows,) * 3, None)

    _, (ce, m, r) = lax.scan(chunk, None, (jnp.arange(nch), hs, ls))
    return tuple(_unchunk(a, order, N) for a in (ce, m, r))


# ----------------------------------------------------------------------------------------------
# backward by recomputation


def _backward(h2, W, b, lab, weight, m, r, g_ce, g_z, st: _Static):
    """``(dh, dw, db)`` of ``Σ g_ce·ce + g_z·z_loss·lse²`` recomputing the logits."""
    N, H = h2.shape
    V = W.shape[0]
    acc = _acc(h2.dtype)
    wacc = _acc(W.dtype)
    order, n_valid, hs, ls = _compact(h2, lab, st)
    nch = hs.shape[0]
    ms, rs, g1s, g2s = (_rows_of(a, order, st) for a in (m, r, g_ce, g_z))
    validf, wy = row_weights(jnp, lab, weight, st.ignore_index, acc)
    vfs, wys = _rows_of(validf, order, st), _rows_of(wy, order, st)
    zero_dh = jnp.zeros((st.rows, H), h2.dtype)
    if st.full_rows:
        opts = dict(_opts(st, weight), z_loss=st.z_loss)
        Wp, bp, nt = W, b, 1
    else:
        Wp, bp, wp, nt = _padded_vocab(W, b, None if weight is None else weight.astype(acc), st)
        wtotal = float(V) if weight is None else jnp.sum(weight.astype(acc))
    dw0 = jnp.zeros(Wp.shape, wacc)
    db0 = None if b is None else jnp.zeros((Wp.shape[0],), wacc)

    def chunk(carry, xs):
        dw, db = carry
        k, h_c, l_c, m_c, r_c, g1, g2, vf, wyc = xs

        def run(_):
            if st.full_rows:
                z = _logits(h_c, W, b, acc)
                dz = core_ce.ce_backward(jnp, z, l_c, m_c, r_c, g1, g2, **opts)
                dz = dz.astype(h2.dtype) if h2.dtype != acc else dz
                dw2 = dw + _mm(dz.T, h_c, wacc)
                db2 = None if db is None else db + jnp.sum(dz.astype(wacc), axis=0)
                return (dw2, db2), _mm(dz, W, acc).astype(h2.dtype)

            def tile(c, t):
                dh_acc, dw_, db_ = c
                c0, W_t, b_t, w_t, mask = _tile(Wp, bp, wp, t, st, V)
                z = _logits(h_c, W_t, b_t, acc)
                dz = vp.local_grad(jnp, z, l_c, m_c, r_c, g1, g2, start=c0, vocab_size=V, wtotal=wtotal,
                                   wy=wyc, validf=vf, weight_local=w_t, label_smoothing=st.label_smoothing,
                                   z_loss=st.z_loss, softcap=st.softcap, temperature=st.temperature,
                                   col_mask=mask)
                dz = dz.astype(h2.dtype) if h2.dtype != acc else dz
                dh_acc = dh_acc + _mm(dz, W_t, acc)
                upd = lax.dynamic_slice_in_dim(dw_, c0, st.cols, 0) + _mm(dz.T, h_c, wacc)
                dw_ = lax.dynamic_update_slice_in_dim(dw_, upd, c0, 0)
                if db_ is not None:
                    updb = lax.dynamic_slice_in_dim(db_, c0, st.cols, 0) + jnp.sum(dz.astype(wacc), axis=0)
                    db_ = lax.dynamic_update_slice_in_dim(db_, updb, c0, 0)
                return (dh_acc, dw_, db_), None

            (dh_acc, dw2, db2), _ = lax.scan(tile, (jnp.zeros((st.rows, H), acc), dw, db), jnp.arange(nt))
            return (dw2, db2), dh_acc.astype(h2.dtype)

        return lax.cond(k * st.rows < n_valid, run, lambda _: ((dw, db), zero_dh), None)

    xs = (jnp.arange(nch), hs, ls, ms, rs, g1s, g2s, vfs, wys)
    (dw, db), dh = lax.scan(chunk, (dw0, db0), xs)
    dw = dw[:V].astype(W.dtype)
    db = None if db is None else db[:V].astype(b.dtype)
    return _unchunk(dh, order, N), dw, db


# ----------------------------------------------------------------------------------------------
# custom_vjp


def _loss(ce, m, r, lab, weight, st: _Static):
    acc = ce.dtype
    validf, wy = row_weights(jnp, lab, weight, st.ignore_index, acc)
    return reduce_loss(jnp, ce, m + r, validf, wy, st.reduction, st.z_loss)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lce(h2, W, b, lab, weight, st: _Static):
    ce, m, r = _forward(h2, W, b, lab, weight, st)
    return _loss(ce, m, r, lab, weight, st)


def _fused(st: _Static) -> bool:
    return core.choose_strategy(st.reduction, core.Plan(st.rows, st.cols, st.full_rows), False) == "fused"


def _lce_fwd(h2, W, b, lab, weight, st: _Static):
    acc = _acc(h2.dtype)
    if _fused(st):
        validf, wy = row_weights(jnp, lab, weight, st.ignore_index, acc)
        scales = row_scales(jnp, validf, wy, st.reduction)
        ce, m, r, dh, dw, db = _forward(h2, W, b, lab, weight, st, scales)
        return _loss(ce, m, r, lab, weight, st), (dh, dw, db, lab, weight)
    ce, m, r = _forward(h2, W, b, lab, weight, st)
    return _loss(ce, m, r, lab, weight, st), (h2, W, b, lab, weight, m, r)


def _lce_bwd(st: _Static, res, g):
    if _fused(st):
        dh, dw, db, lab, weight = res
        dh = (dh * g.astype(dh.dtype)).astype(dh.dtype)
        dw = (dw * g.astype(dw.dtype)).astype(dw.dtype)
        db = None if db is None else (db * g.astype(db.dtype)).astype(db.dtype)
    else:
        h2, W, b, lab, weight, m, r = res
        acc = _acc(h2.dtype)
        validf, wy = row_weights(jnp, lab, weight, st.ignore_index, acc)
        g_ce, g_z = row_scales(jnp, validf, wy, st.reduction, g.astype(acc))
        g_ce = jnp.broadcast_to(g_ce, validf.shape)
        g_z = jnp.broadcast_to(g_z, validf.shape)
        dh, dw, db = _backward(h2, W, b, lab, weight, m, r, g_ce, g_z, st)
    return dh, dw, db, None, None if weight is None else jnp.zeros_like(weight)


_lce.defvjp(_lce_fwd, _lce_bwd)


def _static(opts: dict, reduction: str, plan: core.Plan, b: Any, weight: Any) -> _Static:
    return _Static(opts["ignore_index"], opts["label_smoothing"], opts["z_loss"], opts["softcap"],
                   opts["temperature"], reduction, plan.rows, plan.cols, plan.full_rows, b is not None,
                   weight is not None)


def _pad_empty_hidden(hidden, linear_weight):
    """Hidden size 0: one zero column on both sides gives the same logits (the bias, or 0) and,
    through ``jnp.pad``, gradients of the original (empty) shapes; the chunked code needs H > 0."""
    if hidden.shape[-1] != 0:
        return hidden, linear_weight
    return (jnp.pad(hidden, [(0, 0)] * (hidden.ndim - 1) + [(0, 1)]),
            jnp.pad(linear_weight, [(0, 0), (0, 1)]))


def fused_linear_cross_entropy(hidden, linear_weight, labels, linear_bias, opts: dict, reduction: str,
                               chunk_size: Any):
    """Adapter of :func:`logitkit.linear_cross_entropy` for validated JAX arrays (differentiable)."""
    hidden, linear_weight = _pad_empty_hidden(hidden, linear_weight)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    lab = labels.reshape(-1).astype(jnp.int32)
    N, V = h2.shape[0], linear_weight.shape[0]
    weight = opts["weight"]
    if N == 0 or V == 0:
        ce = jnp.zeros((N,), _acc(hidden.dtype))
        loss = _loss(ce, ce, ce, lab, weight, _static(opts, reduction, core.Plan(1, 1, True), None, weight))
        loss = loss + 0.0 * (jnp.sum(hidden) + jnp.sum(linear_weight))
        return (loss.reshape(labels.shape) if reduction == "none" else loss).astype(hidden.dtype)
    plan = _plan(N, V, hidden.dtype, chunk_size)
    st = _static(opts, reduction, plan, linear_bias, weight)
    loss = _lce(h2, linear_weight, linear_bias, lab, weight, st)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return loss.astype(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# entropy


def _entropy_fwd_impl(h2, W, b, st: _Static):
    N, H = h2.shape
    V = W.shape[0]
    acc = _acc(h2.dtype)
    nch = max(1, -(-N // st.rows))
    pad = nch * st.rows - N
    hs = jnp.pad(h2, ((0, pad), (0, 0))).reshape(nch, st.rows, H)
    Wp, bp, _, nt = _padded_vocab(W, b, None, st)

    def chunk(carry, h_c):
        def tile(p, t):
            c0, W_t, b_t, _, mask = _tile(Wp, bp, None, t, st, V)
            z = transform(jnp, _logits(h_c, W_t, b_t, acc), st.softcap, st.temperature)
            z = jnp.where(mask, z, -jnp.inf)
            return core.merge_entropy(jnp, p, core.tile_entropy(jnp, z)), None

        zero = jnp.zeros((st.rows, 1), acc)
        p, _ = lax.scan(tile, (zero - jnp.inf, zero, zero, zero), jnp.arange(nt))
        ent = core.entropy_finish(jnp, p)
        m = p[0].reshape(-1)
        r = jnp.where(m == -jnp.inf, 0.0, jnp.log1p(p[1] + (p[2] - 1.0)).reshape(-1))
        return carry, (ent, m, r)

    _, (ent, m, r) = lax.scan(chunk, None, hs)
    return tuple(a.reshape(-1)[:N] for a in (ent, m, r))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lent(h2, W, b, st: _Static):
    return _entropy_fwd_impl(h2, W, b, st)[0]


def _lent_fwd(h2, W, b, st):
    ent, m, r = _entropy_fwd_impl(h2, W, b, st)
    return ent, (h2, W, b, ent, m, r)


def _lent_bwd(st: _Static, res, g):
    h2, W, b, ent, m, r = res
    N, H = h2.shape
    V = W.shape[0]
    acc = _acc(h2.dtype)
    wacc = _acc(W.dtype)
    nch = max(1, -(-N // st.rows))
    pad = nch * st.rows - N

    def rows(a):
        return jnp.pad(a, (0, pad)).reshape(nch, st.rows)

    hs = jnp.pad(h2, ((0, pad), (0, 0))).reshape(nch, st.rows, H)
    Wp, bp, _, nt = _padded_vocab(W, b, None, st)

    def chunk(carry, xs):
        h_c, e_c, m_c, r_c, g_c = xs

        def tile(c, t):
            dh_acc, dw_, db_ = c
            c0, W_t, b_t, _, mask = _tile(Wp, bp, None, t, st, V)
            z = _logits(h_c, W_t, b_t, acc)
            dz = core.entropy_grad(jnp, z, m_c, r_c, e_c, g_c, st.softcap, st.temperature)
            dz = jnp.where(mask, dz, 0.0)
            dz = dz.astype(h2.dtype) if h2.dtype != acc else dz
            dh_acc = dh_acc + _mm(dz, W_t, acc)
            upd = lax.dynamic_slice_in_dim(dw_, c0, st.cols, 0) + _mm(dz.T, h_c, wacc)
            dw_ = lax.dynamic_update_slice_in_dim(dw_, upd, c0, 0)
            if db_ is not None:
                updb = lax.dynamic_slice_in_dim(db_, c0, st.cols, 0) + jnp.sum(dz.astype(wacc), axis=0)
                db_ = lax.dynamic_update_slice_in_dim(db_, updb, c0, 0)
            return (dh_acc, dw_, db_), None

        dw, db = carry
        (dh_acc, dw, db), _ = lax.scan(tile, (jnp.zeros((st.rows, H), acc), dw, db), jnp.arange(nt))
        return (dw, db), dh_acc.astype(h2.dtype)

    dw0 = jnp.zeros(Wp.shape, wacc)
    db0 = None if b is None else jnp.zeros((Wp.shape[0],), wacc)
    xs = (hs, rows(ent), rows(m), rows(r), rows(g.astype(acc)))
    (dw, db), dh = lax.scan(chunk, (dw0, db0), xs)
    dh = dh.reshape(-1, H)[:N]
    return dh, dw[:V].astype(W.dtype), None if db is None else db[:V].astype(b.dtype)


_lent.defvjp(_lent_fwd, _lent_bwd)


def fused_linear_entropy(hidden, linear_weight, linear_bias, opts: dict, chunk_size: Any):
    """Adapter of :func:`logitkit.linear_entropy` for JAX arrays (differentiable)."""
    hidden, linear_weight = _pad_empty_hidden(hidden, linear_weight)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    N, V = h2.shape[0], linear_weight.shape[0]
    if N == 0 or V == 0:
        return jnp.zeros(hidden.shape[:-1], hidden.dtype) + 0.0 * jnp.sum(linear_weight).astype(hidden.dtype)
    plan = _plan(N, V, hidden.dtype, chunk_size, kernels=False)
    st = _static(opts, "none", plan, linear_bias, None)
    return _lent(h2, linear_weight, linear_bias, st).reshape(hidden.shape[:-1]).astype(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# public names (the same functions as logitkit's top level, JAX arrays only)


def linear_cross_entropy(hidden, linear_weight, labels, *, linear_bias=None, weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None, temperature=1.0,
                         chunk_size=None):
    """:func:`logitkit.linear_cross_entropy` for JAX arrays (``jit``/``grad`` friendly)."""
    return _public.linear_cross_entropy(hidden, linear_weight, labels, linear_bias=linear_bias, weight=weight,
                                        ignore_index=ignore_index, label_smoothing=label_smoothing,
                                        reduction=reduction, z_loss=z_loss, softcap=softcap,
                                        temperature=temperature, chunk_size=chunk_size)


def _tiles(chunk_size, linear_weight) -> bool:
    return (isinstance(chunk_size, (tuple, list)) and len(chunk_size) == 2 and hasattr(linear_weight, "shape")
            and len(linear_weight.shape) == 2 and int(chunk_size[1]) < int(linear_weight.shape[0]))


def linear_token_logprobs(hidden, linear_weight, labels, *, linear_bias=None, ignore_index=-100, softcap=None,
                          temperature=1.0, chunk_size=None):
    """:func:`logitkit.linear_token_logprobs` for JAX arrays: ``linear_head(..., outputs=("logprobs",))``.

    >>> import jax.numpy as jnp, logitkit.jax as lj
    >>> lj.linear_token_logprobs(jnp.ones((1, 2)), jnp.zeros((4, 2)), jnp.array([3]))  # log 1/4
    Array([-1.3862944], dtype=float32)
    """
    if _tiles(chunk_size, linear_weight):
        # Vocabulary tiles: the tiled linear cross-entropy driver (linear_head takes whole rows).
        return _public.linear_token_logprobs(hidden, linear_weight, labels, linear_bias=linear_bias,
                                             ignore_index=ignore_index, softcap=softcap, temperature=temperature,
                                             chunk_size=chunk_size)
    return linear_head(hidden, linear_weight, labels, linear_bias=linear_bias, ignore_index=ignore_index,
                       softcap=softcap, temperature=temperature, chunk_size=chunk_size,
                       outputs=("logprobs",)).logprobs


def linear_entropy(hidden, linear_weight, *, linear_bias=None, softcap=None, temperature=1.0, chunk_size=None):
    """:func:`logitkit.linear_entropy` for JAX arrays: ``linear_head(..., outputs=("entropy",))``.

    >>> import jax.numpy as jnp, logitkit.jax as lj
    >>> lj.linear_entropy(jnp.ones((1, 2)), jnp.zeros((4, 2)))  # log 4
    Array([1.3862944], dtype=float32)
    """
    if _tiles(chunk_size, linear_weight):
        return _public.linear_entropy(hidden, linear_weight, linear_bias=linear_bias, softcap=softcap,
                                      temperature=temperature, chunk_size=chunk_size)
    return linear_head(hidden, linear_weight, None, linear_bias=linear_bias, softcap=softcap,
                       temperature=temperature, chunk_size=chunk_size, outputs=("entropy",)).entropy


# ----------------------------------------------------------------------------------------------
# the fused head (logitkit.linear_head): every output, one custom_vjp


class _HeadStatic(NamedTuple):
    spec: Any            # logitkit.core.linear_head.HeadSpec
    keys: tuple          # per-row outputs of the custom_vjp, in order (argmax last, as floats)
    rows: int
    teacher: str         # "none", "head", "logits" or "topk"


def _head_keys(spec) -> tuple:
    o = spec.outputs
    keys = [k for k, want in (("ce", "loss" in o), ("lse", "lse" in o or spec.need_lse), ("lp", "logprobs" in o),
                              ("ent", "entropy" in o), ("kl", "kl" in o)) if want]
    return tuple(keys) + (("am",) if "argmax" in o else ())


def _head_layout(lab, st: _HeadStatic, N: int):
    """``(order, n_valid, nch)``: rows not ignored first (stable), so skipped chunks are all padding."""
    if st.spec.has_labels:
        valid = lab != st.spec.ignore_index
        order = jnp.argsort(jnp.logical_not(valid), stable=True)
        n_valid = jnp.sum(valid.astype(jnp.int32))
    else:
        order = jnp.arange(N)
        n_valid = jnp.asarray(N, jnp.int32)
    return order, n_valid, max(1, -(-N // st.rows))


def _chunked(x, order, st: _HeadStatic, nch: int, fill=0):
    """``x[order]`` (rows first) padded and cut into ``(nch, rows, ...)``."""
    if x is None:
        return None
    N = x.shape[0]
    pad = [(0, nch * st.rows - N)] + [(0, 0)] * (x.ndim - 1)
    xs = jnp.pad(x[order], pad, constant_values=fill)
    return xs.reshape((nch, st.rows) + x.shape[1:])


def _head_inputs(h2, lab, temp, t1, t2, st, order, nch):
    spec = st.spec
    xs = dict(h=_chunked(h2, order, st, nch),
              lab=_chunked(lab, order, st, nch, spec.ignore_index if spec.has_labels else 0),
              temp=_chunked(temp, order, st, nch, 1.0))
    if st.teacher in ("head", "logits"):
        xs["t1"] = _chunked(t1, order, st, nch)
    elif st.teacher == "topk":
        xs["t1"] = _chunked(t1, order, st, nch)
        xs["t2"] = _chunked(t2, order, st, nch)
    return {k: v for k, v in xs.items() if v is not None}


def _teach(c, tW, tb, st: _HeadStatic, acc):
    if st.teacher == "head":
        return _logits(c["t1"], tW, tb, _acc(c["t1"].dtype))
    if st.teacher == "logits":
        return c["t1"]
    if st.teacher == "topk":
        return (c["t1"], c["t2"])
    return None


def _head_forward(h2, W, b, lab, temp, weight, t1, t2, t3, st: _HeadStatic):
    """Per-row values ``(N,)`` (``core.linear_head.row_names``), argmax as a float."""
    N = h2.shape[0]
    acc = _acc(h2.dtype)
    spec = st.spec
    order, n_valid, nch = _head_layout(lab, st, N)
    xs = _head_inputs(h2, lab, temp, t1, t2, st, order, nch)
    names = core_head.row_names(spec)
    tW, tb = (t2, t3) if st.teacher == "head" else (None, None)

    def body(carry, c):
        k = c.pop("k")

        def run(_):
            x = _logits(c["h"], W, b, acc)
            vals = core_head.chunk_forward(jnp, x, c["lab"], c.get("temp"), _teach(c, tW, tb, st, acc), weight, spec)
            return tuple(vals[n].astype(acc) for n in names)

        zeros = tuple(jnp.zeros((st.rows,), acc) for _ in names)
        return carry, lax.cond(k * st.rows < n_valid, run, lambda _: zeros, None)

    _, out = lax.scan(body, None, dict(xs, k=jnp.arange(nch)))
    return {n: _unchunk(v, order, N) for n, v in zip(names, out)}


def _head_outputs(rows, lab, st: _HeadStatic):
    spec = st.spec
    res = []
    for k in st.keys:
        if k == "lse":
            lse = rows["m"] + rows["r"]
            res.append(jnp.where(lab != spec.ignore_index, lse, 0.0) if spec.has_labels else lse)
        else:
            res.append(rows[k])
    return tuple(res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _lhead(h2, W, b, lab, temp, weight, t1, t2, t3, st: _HeadStatic):
    return _head_outputs(_head_forward(h2, W, b, lab, temp, weight, t1, t2, t3, st), lab, st)


def _lhead_fwd(h2, W, b, lab, temp, weight, t1, t2, t3, st: _HeadStatic):
    rows = _head_forward(h2, W, b, lab, temp, weight, t1, t2, t3, st)
    saved = {k: rows[k] for k in ("m", "r", "ent", "aux") if k in rows}
    return _head_outputs(rows, lab, st), (h2, W, b, lab, temp, weight, t1, t2, t3, saved)


def _lhead_bwd(st: _HeadStatic, res, cts):
    h2, W, b, lab, temp, weight, t1, t2, t3, saved = res
    N, H = h2.shape
    acc, wacc = _acc(h2.dtype), _acc(W.dtype)
    spec = st.spec
    order, n_valid, nch = _head_layout(lab, st, N)
    xs = _head_inputs(h2, lab, temp, t1, t2, st, order, nch)
    for k, v in saved.items():
        xs["row_" + k] = _chunked(v, order, st, nch)
    for k, g in zip(st.keys, cts):
        if k != "am":
            xs["g_" + k] = _chunked(jnp.broadcast_to(g, (N,)).astype(acc), order, st, nch)
    tW, tb = (t2, t3) if st.teacher == "head" else (None, None)

    def body(carry, c):
        dw, db = carry
        k = c.pop("k")

        def run(_):
            x = _logits(c["h"], W, b, acc)
            rows = {n[4:]: v for n, v in c.items() if n.startswith("row_")}
            cots = {n: v for n, v in c.items() if n.startswith("g_")}
            dz = core_head.chunk_backward(jnp, x, c["lab"], c.get("temp"), _teach(c, tW, tb, st, acc), weight,
                                          spec, rows, cots)
            dz = dz.astype(h2.dtype) if h2.dtype != acc else dz
            dw2 = dw + _mm(dz.T, c["h"], wacc)
            db2 = None if db is None else db + jnp.sum(dz.astype(wacc), axis=0)
            return (dw2, db2), _mm(dz, W, acc).astype(h2.dtype)

        skip = ((dw, db), jnp.zeros((st.rows, H), h2.dtype))
        return lax.cond(k * st.rows < n_valid, run, lambda _: skip, None)

    dw0 = jnp.zeros(W.shape, wacc)
    db0 = None if b is None else jnp.zeros(b.shape, wacc)
    (dw, db), dh = lax.scan(body, (dw0, db0), dict(xs, k=jnp.arange(nch)))
    dh = _unchunk(dh, order, N)
    db = None if db is None else db.astype(b.dtype)
    return dh, dw.astype(W.dtype), db, None, None, None, None, None, None


_lhead.defvjp(_lhead_fwd, _lhead_bwd)
# Eager calls would retrace the scans every time (their bodies are fresh closures): compile once
# per static configuration and shapes instead; under an outer jit this is inlined.
_lhead_jit = jax.jit(_lhead, static_argnums=(9,))


def fused_linear_head(a):
    """Validated :class:`logitkit.linear.HeadArgs` of JAX arrays in, :class:`HeadOutput` out."""
    spec = a.spec
    if a.hidden.shape[-1] == 0:
        hp, wp = _pad_empty_hidden(a.hidden, a.W)
        a = type(a)(**dict(a.__dict__, hidden=hp, W=wp))
    H = a.hidden.shape[-1]
    h2 = a.hidden.reshape(-1, H)
    N, V = h2.shape[0], a.W.shape[0]
    acc = _acc(a.hidden.dtype)
    if "argmax" in spec.outputs and V > 2 ** 24 and acc == jnp.float32:
        raise ValueError(f"linear_weight: argmax travels as float32 inside the head, exact up to 2**24 "
                         f"classes; got V = {V} (enable jax_enable_x64 or drop 'argmax')")
    lab = jnp.zeros((N,), jnp.int32) if a.labels is None else a.labels.reshape(-1).astype(jnp.int32)
    temp = None if a.temp is None else a.temp.reshape(-1).astype(acc)
    t1 = t2 = t3 = None
    kind = "none" if a.teacher is None else a.teacher[0]
    if kind == "head":
        t1 = a.teacher[1].reshape(N, -1)
        t2, t3 = a.teacher[2], a.teacher[3]
    elif kind == "logits":
        t1 = lax.stop_gradient(a.teacher[1].reshape(N, -1))
    elif kind == "topk":
        k = a.teacher[1].shape[-1]
        t1 = a.teacher[1].reshape(N, k).astype(jnp.int32)
        t2 = lax.stop_gradient(a.teacher[2].reshape(N, k))
    if kind == "head":
        t1, t2 = lax.stop_gradient(t1), lax.stop_gradient(t2)
        t3 = None if t3 is None else lax.stop_gradient(t3)
    keys = _head_keys(spec)
    if N == 0 or V == 0:
        zero = jnp.zeros((N,), acc) + 0.0 * (jnp.sum(a.hidden) + jnp.sum(a.W)).astype(acc)
        vals = {k: zero for k in keys}
    else:
        rows = core_head.plan_rows(N, V, jnp.dtype(acc).itemsize, spec.teacher, a.chunk_size)
        st = _HeadStatic(spec, keys, rows, kind)
        weight = None if a.weight is None else lax.stop_gradient(a.weight)
        vals = dict(zip(keys, _lhead_jit(h2, a.W, a.bias, lab, temp, weight, t1, t2, t3, st)))
    if "am" in vals:
        vals["am"] = lax.stop_gradient(vals["am"]).astype(jnp.int32 if acc == jnp.float32 else jnp.int64)
    return _public.assemble_outputs(jnp, a, vals, lab)


def linear_head(hidden, linear_weight, labels=None, **kwargs):
    """:func:`logitkit.linear_head` for JAX arrays (``jit``, ``grad`` and ``vmap`` friendly)."""
    return _public.linear_head(hidden, linear_weight, labels, **kwargs)
