r"""Per-row cross-entropy, softmax and log-softmax with ``jax.custom_vjp`` rules (class axis last).

The maths is the kernel stage contract of :mod:`logitkit.kernels` (``ce_forward`` /
``ce_backward`` / ``prob_*`` / softmax stages), written for XLA:

* the forward keeps only per-row statistics ``m = max z`` and ``r = log Σ exp(z - m)`` as
  residuals (plus the inputs, which exist anyway), never an ``N×V`` softmax;
* the backward rebuilds ``p = exp((z - m) - r)`` and the whole gradient in one elementwise
  expression, e.g. for class indices ``dz = p·a - [c = y]·b - c₀·w``, with per-row ``a, b, c₀``.

Why the row statistics are written the way they are: XLA on CPU fuses a row reduction (max,
Σ exp) into one vectorized loop only when its body is plain arithmetic; a ``select`` or a
comparison inside it makes XLA write the whole ``N×V`` operand to memory first (5-7× slower).
The log1p-of-the-sum-without-one-term trick that keeps confident rows accurate therefore uses
arithmetic masks:

* class indices: leave the *label* term out, ``t = Σ_c e_c · min(1, |c - y|)``, then
  ``r = log1p(expm1(z_y - m) + t)`` (exact for ``y = argmax``, where the loss is ``r`` itself);
* probabilities (no label to leave out): ``u = Σ_c e_c · min(1, (m - z_c)·2^126)`` leaves every
  maximal term out; if ``s = Σ_c e_c < 2`` there is exactly one, so ``r = log1p(u)``, else
  ``r = log s`` (see :func:`row_stats`).

``mask`` (optax's ``where``) hides classes from the statistics; for class indices the label logit
is still read from the unmasked logits, as optax does. Rows that are ignored (label equal to
``ignore_index``, or every class masked) give 0 and a zero gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._namespace import acc_dtype
from ..core.logsumexp import transform, transform_grad_factor

__all__ = ["Options", "index_rows", "prob_rows", "softmax", "log_softmax", "row_stats"]

# Differences m - z below 2^-126 count as maximal terms (their exp is exactly 1).
_TIE = 2.0 ** 126
# Float iota is exact up to 2^24 classes in float32; beyond that the (slower) integer compare.
_FLOAT_IOTA_MAX = 2 ** 24


class Options(NamedTuple):
    """Static options of one call (hashable: they are ``nondiff_argnums`` of the custom VJPs)."""

    ignore_index: int | None = None
    label_smoothing: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0


def _is_zero(g: Any) -> bool:
    return g is None or isinstance(g, SymbolicZero)


def _value(p: Any) -> Any:
    """The value of a ``CustomVJPPrimal`` (``symbolic_zeros=True``) or the argument itself."""
    return getattr(p, "value", p)


def _perturbed(p: Any) -> bool:
    return p is not None and bool(getattr(p, "perturbed", True))


def _z(x: Any, opts: Options) -> Any:
    return transform(jnp, x.astype(acc_dtype(jnp, x.dtype)), opts.softcap, opts.temperature)


def _masked(z: Any, mask: Any) -> Any:
    return z if mask is None else jnp.where(mask, z, -jnp.inf)


def _row_max(zs: Any, axis: int) -> Any:
    if zs.shape[axis] == 0:  # the max of nothing is -inf: an empty row behaves as fully masked
        return jnp.full(zs.shape[:axis % zs.ndim] + (1,) + zs.shape[axis % zs.ndim + 1:], -jnp.inf, zs.dtype)
    return jnp.max(zs, axis=axis, keepdims=True)


def _finish_r(m: Any, r: Any) -> Any:
    """Contract values for the special rows: all ``-inf`` -> ``r = 0``; ``m = +inf`` -> NaN."""
    return jnp.where(m == -jnp.inf, 0.0, jnp.where(m == jnp.inf, jnp.nan, r))


def row_stats(zs: Any, axis: int = -1) -> tuple[Any, Any]:
    """``(m, r)`` along ``axis`` (kept with size 1), ``r`` exact for confident rows.

    With ``e = exp(z - m)``: ``s = Σ e`` and ``u = Σ e·min(1, (m - z)·2^126)``, the sum without
    the maximal terms. ``s < 2`` means exactly one maximal term, so ``r = log1p(u)``; otherwise
    ``r ≥ log 2`` and ``log s`` is accurate. (A term with ``0 < m - z < 2^-126`` has ``e = 1``, so
    it pushes ``s`` to 2 and takes the second branch.) Both sums share one ``exp`` and no select.
    """
    m = _row_max(zs, axis)
    m0 = jnp.where(jnp.isfinite(m), m, 0.0)
    d = m0 - zs
    e = jnp.exp(-d)
    s = jnp.sum(e, axis=axis, keepdims=True)
    u = jnp.sum(e * jnp.minimum(1.0, d * _TIE), axis=axis, keepdims=True)
    r = jnp.where(s < 2.0, jnp.log1p(u), jnp.log(s))
    return m, _finish_r(m, r)


def _label_stats(zs: Any, zys: Any, lab: Any) -> tuple[Any, Any]:
    """``(m, r)`` (size-1 last axis) for rows whose label ``lab`` is known: the label term is
    left out of the sum and added back with ``expm1``, exact for confident rows."""
    m = _row_max(zs, -1)
    m0 = jnp.where(jnp.isfinite(m), m, 0.0)
    V = zs.shape[-1]
    e = jnp.exp(zs - m0)
    if V <= _FLOAT_IOTA_MAX:
        iota = jax.lax.broadcasted_iota(zs.dtype, zs.shape, zs.ndim - 1)
        not_label = jnp.minimum(1.0, jnp.abs(iota - lab.astype(zs.dtype)))
        t = jnp.sum(e * not_label, axis=-1, keepdims=True)
    else:
        iota = jax.lax.broadcasted_iota(lab.dtype, zs.shape, zs.ndim - 1)
        t = jnp.sum(jnp.where(iota == lab, 0.0, e), axis=-1, keepdims=True)
    r = jnp.log1p(jnp.expm1(zys - m0) + t)
    return m, _finish_r(m, r)


def _softmax_from(zs: Any, m: Any, r: Any) -> Any:
    """``exp((z - m) - r)``: 0 on fully masked rows, NaN on rows with NaN or ``+inf``."""
    m0 = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp((zs - m0) - r)
    return jnp.where(m == jnp.inf, jnp.nan, p)


# ----------------------------------------------------------------------------------------------
# class indices


def _index_parts(labels: Any, mask_any: Any, V: int, ignore_index: int | None) -> tuple[Any, Any, Any]:
    """``(valid, bad, safe_labels)`` per row: ``bad`` is an index neither in range nor ignored."""
    in_range = (labels >= 0) & (labels < V)
    valid = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    bad = valid & ~in_range
    if mask_any is not None:
        valid = valid & mask_any
    lab = jnp.where(valid & in_range, labels, 0)
    return valid, bad, lab


def _gather_last(a: Any, lab: Any) -> Any:
    return jnp.take_along_axis(a, lab[..., None], axis=-1)


def _class_weights(weight: Any, acc: Any, V: int) -> tuple[Any, Any]:
    if weight is None:
        return None, float(V)
    w = weight.astype(acc)
    return w, jnp.sum(w)


def _index_forward(opts: Options, x: Any, labels: Any, weight: Any, mask: Any):
    acc = acc_dtype(jnp, x.dtype)
    V = x.shape[-1]
    eps = opts.label_smoothing
    mask_any = None if mask is None else jnp.broadcast_to(jnp.any(mask, axis=-1), labels.shape)
    valid, bad, lab = _index_parts(labels, mask_any, V, opts.ignore_index)
    z = _z(x, opts)
    zs = _masked(z, mask)
    # The label logit is gathered from x and transformed alone, so z is never materialized.
    zy = _z(_gather_last(x, lab), opts)
    zys = zy if mask is None else jnp.where(_gather_last(jnp.broadcast_to(mask, x.shape), lab), zy, -jnp.inf)
    m, r = _label_stats(zs, zys, lab[..., None])
    w, W = _class_weights(weight, acc, V)
    wy = 1.0 if w is None else jnp.take(w, lab)[..., None]
    all_masked = m == -jnp.inf
    nll = jnp.where(all_masked, jnp.inf, (m - zy) + r)
    ce = (1.0 - eps) * wy * nll if eps != 1.0 else jnp.zeros_like(nll)
    if eps > 0.0:
        shifted = m - zs if w is None else w * (m - zs)
        smooth = jnp.sum(shifted, axis=-1, keepdims=True) + W * r
        ce = ce + (eps / V) * jnp.where(all_masked, jnp.inf, smooth)
    ce = jnp.where(bad, jnp.nan, jnp.where(valid, ce[..., 0], 0.0))
    lse = jnp.where(valid, (m + r)[..., 0], 0.0)
    return (ce, lse), (m, r, nll, valid, bad, lab)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _index_rows(opts: Options, x: Any, labels: Any, weight: Any, mask: Any) -> tuple[Any, Any]:
    return _index_forward(opts, x, labels, weight, mask)[0]


def _index_fwd(opts, x, labels, weight, mask):
    xv, lv, wv, mv = _value(x), _value(labels), _value(weight), _value(mask)
    out, (m, r, nll, valid, bad, lab) = _index_forward(opts, xv, lv, wv, mv)
    # Residuals: the inputs (alive anyway) and per-row numbers; a weight that is not being
    # differentiated leaves its gradient terms out (``nll`` is only needed for them).
    res = (xv, wv, mv, m, r, valid, bad, lab, nll if _perturbed(weight) else None)
    return out, res


def _index_bwd(opts, res, g):
    x, w_in, mask, m, r, valid, bad, lab, nll = res
    g_ce, g_lse = g
    acc = acc_dtype(jnp, x.dtype)
    V = x.shape[-1]
    eps = opts.label_smoothing
    g_ce = jnp.zeros(m.shape[:-1], acc) if _is_zero(g_ce) else g_ce.astype(acc)
    g_ce = jnp.where(valid, g_ce, 0.0)
    w, W = _class_weights(w_in, acc, V)
    wy = 1.0 if w is None else jnp.take(w, lab)
    # dz = p·a - [c = y]·b - c0·w, every coefficient per row.
    b = g_ce * ((1.0 - eps) * wy)
    a = b + g_ce * (eps / V * W)
    if not _is_zero(g_lse):
        a = a + jnp.where(valid, g_lse.astype(acc), 0.0)
    z = _z(x, opts)
    p = _softmax_from(_masked(z, mask), m, r)
    onehot = jax.lax.broadcasted_iota(lab.dtype, x.shape, x.ndim - 1) == lab[..., None]
    dz = p * a[..., None] - jnp.where(onehot, b[..., None], 0.0)
    if eps > 0.0:
        c0 = (g_ce * (eps / V))[..., None]
        dz = dz - (c0 if w is None else c0 * w)
    dz = jnp.where(valid[..., None], dz, 0.0)
    dz = jnp.where(bad[..., None], jnp.nan, dz)
    factor = transform_grad_factor(jnp, x.astype(acc), opts.softcap, opts.temperature)
    if factor is not None:
        dz = dz * factor
    dx = dz.astype(x.dtype)
    dw = None
    if nll is not None:
        # d ce / d w_c = (1-eps)·[c = y]·nll + eps/V·((m - z_c) + r), summed over valid rows.
        gv = jnp.where(valid, g_ce, 0.0)
        term = jnp.where(valid, (1.0 - eps) * gv * nll[..., 0], 0.0)
        dw = jnp.zeros((V,), acc).at[lab.reshape(-1)].add(term.reshape(-1))
        if eps > 0.0:
            shifted = jnp.where(valid[..., None], (m - z) + r, 0.0)
            dw = dw + (eps / V) * jnp.einsum("...,...c->c", gv, shifted)
        dw = dw.astype(w_in.dtype)
    return dx, None, dw, None


_index_rows.defvjp(_index_fwd, _index_bwd, symbolic_zeros=True)


def index_rows(x: Any, labels: Any, weight: Any = None, mask: Any = None, *,
               opts: Options = Options()) -> tuple[Any, Any]:
    """Per-row ``(ce, lse)`` for class indices, in the accumulation dtype; class axis last.

    ``ce = (1-eps)·w_y·(lse - z_y) + eps/V·Σ_c w_c·(lse - z_c)`` on valid rows, 0 on ignored rows
    (label ``== opts.ignore_index``, or every class masked), NaN where the index is out of range
    (only possible for traced labels). ``lse`` is 0 on ignored rows. Differentiable in ``x`` and
    ``weight``; ``mask`` (broadcastable to ``x``) hides classes from the normalizer only.
    """
    return _index_rows(opts, x, labels, weight, mask)


# ----------------------------------------------------------------------------------------------
# probability labels


def _targets(y: Any, weight: Any, mask: Any, acc: Any, eps: float) -> Any:
    V = y.shape[-1]
    t = y.astype(acc)
    if eps > 0.0:
        t = t * (1.0 - eps) + eps / V
    if weight is not None:
        t = t * weight.astype(acc)
    if mask is not None:
        t = jnp.where(mask, t, 0.0)
    return t


def _prob_forward(opts: Options, x: Any, y: Any, weight: Any, mask: Any):
    acc = acc_dtype(jnp, x.dtype)
    zs = _masked(_z(x, opts), mask)
    m, r = row_stats(zs, -1)
    wy = _targets(y, weight, mask, acc, opts.label_smoothing)
    # Classes with w·y = 0 take no part (0·log 0 = 0), so a -inf logit with zero target is fine.
    terms = jnp.where(wy == 0.0, 0.0, wy * (m - zs))
    mass = jnp.sum(wy, axis=-1, keepdims=True)
    ce = jnp.sum(terms, axis=-1, keepdims=True) + mass * r
    ce = jnp.where(m == -jnp.inf, jnp.where(mass == 0.0, 0.0, jnp.inf), ce)
    return (ce[..., 0], (m + r)[..., 0]), (m, r, mass)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _prob_rows(opts: Options, x: Any, y: Any, weight: Any, mask: Any) -> tuple[Any, Any]:
    return _prob_forward(opts, x, y, weight, mask)[0]


def _prob_fwd(opts, x, y, weight, mask):
    xv, yv, wv, mv = _value(x), _value(y), _value(weight), _value(mask)
    out, (m, r, mass) = _prob_forward(opts, xv, yv, wv, mv)
    # Markers (an empty array, or None) say which of labels / weight are being differentiated:
    # the label gradient is a whole N×V array, not worth building when nobody asked for it.
    flags = tuple(jnp.zeros((0,), bool) if _perturbed(a) else None for a in (y, weight))
    return out, (xv, yv, wv, mv, m, r, mass, flags)


def _log_term(z: Any, m: Any, r: Any, wy: Any) -> Any:
    """``lse - z_c = (m - z_c) + r`` where the target is nonzero; +inf for a ``-inf`` logit."""
    lz = (m - z) + r
    return jnp.where(m == -jnp.inf, jnp.inf, lz)


def _prob_bwd(opts, res, g):
    x, y, w_in, mask, m, r, mass, (need_y, need_w) = res
    g_ce, g_lse = g
    acc = acc_dtype(jnp, x.dtype)
    eps = opts.label_smoothing
    g_ce = jnp.zeros(m.shape[:-1], acc) if _is_zero(g_ce) else g_ce.astype(acc)
    gc = g_ce[..., None]
    a = gc * mass
    if not _is_zero(g_lse):
        a = a + g_lse.astype(acc)[..., None]
    zs = _masked(_z(x, opts), mask)
    p = _softmax_from(zs, m, r)
    wy = _targets(y, w_in, mask, acc, eps)
    dz = p * a - gc * wy
    factor = transform_grad_factor(jnp, x.astype(acc), opts.softcap, opts.temperature)
    if factor is not None:
        dz = dz * factor
    dx = dz.astype(x.dtype)
    dy = dw = None
    if need_y is not None or need_w is not None:
        lz = _log_term(zs, m, r, wy)
    if need_y is not None:
        w = 1.0 if w_in is None else w_in.astype(acc)
        dyv = gc * ((1.0 - eps) * w) * lz
        if mask is not None:
            dyv = jnp.where(mask, dyv, 0.0)
        dy = dyv.astype(y.dtype)
    if need_w is not None:
        t = _targets(y, None, mask, acc, eps)
        contrib = jnp.where(t == 0.0, 0.0, gc * t * lz)
        dw = jnp.sum(contrib.reshape(-1, x.shape[-1]), axis=0).astype(w_in.dtype)
    return dx, dy, dw, None


_prob_rows.defvjp(_prob_fwd, _prob_bwd, symbolic_zeros=True)


def prob_rows(x: Any, y: Any, weight: Any = None, mask: Any = None, *,
              opts: Options = Options()) -> tuple[Any, Any]:
    """Per-row ``(ce, lse)`` for probability labels ``y`` (``x``'s shape); class axis last.

    ``ce = Σ_c w_c·ỹ_c·(lse - z_c)`` with ``ỹ = (1-eps)·y + eps/V`` over classes not masked;
    differentiable in ``x``, ``y`` (``d/dy_c = (1-eps)·w_c·(lse - z_c)``) and ``weight``.
    """
    return _prob_rows(opts, x, y, weight, mask)


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax (any axis)


def _softmax_forward(x: Any, axis: int, mask: Any, temperature: float, log: bool) -> Any:
    zs = _masked(_z(x, Options(temperature=temperature)), mask)
    m, r = row_stats(zs, axis)
    if log:
        out = jnp.where(m == -jnp.inf, -jnp.inf, (zs - m) - r)
    else:
        out = _softmax_from(zs, m, r)
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 4))
def _softmax(axis: int, temperature: float, x: Any, mask: Any, log: bool) -> Any:
    return _softmax_forward(x, axis, mask, temperature, log)


def _softmax_fwd(axis, temperature, x, mask, log):
    out = _softmax_forward(x, axis, mask, temperature, log)
    return out, (out, mask)


def _softmax_bwd(axis, temperature, log, res, g):
    out, mask = res
    acc = acc_dtype(jnp, out.dtype)
    ya, ga = out.astype(acc), g.astype(acc)
    if mask is not None:
        ga = jnp.where(mask, ga, 0.0)  # masked outputs are constants: their cotangents take no part
    if log:
        dz = ga - jnp.exp(ya) * jnp.sum(ga, axis=axis, keepdims=True)
    else:
        dz = ya * (ga - jnp.sum(ya * ga, axis=axis, keepdims=True))
    if mask is not None:
        dz = jnp.where(mask, dz, 0.0)
    if temperature != 1.0:
        dz = dz / temperature
    return dz.astype(out.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x: Any, axis: int = -1, *, where: Any = None, temperature: float = 1.0) -> Any:
    """``exp(z - lse)`` with ``z = x / T`` along ``axis``; masked entries and fully masked rows 0.

    Saves only its output for the backward (``y·(g - Σ y·g) / T``).
    """
    return _softmax(axis, float(temperature), x, where, False)


def log_softmax(x: Any, axis: int = -1, *, where: Any = None, temperature: float = 1.0) -> Any:
    """``(z - m) - r`` along ``axis``; masked entries and fully masked rows ``-inf``.

    Backward ``(g - softmax·Σ g) / T`` over entries not masked (masked entries get 0).
    """
    return _softmax(axis, float(temperature), x, where, True)

