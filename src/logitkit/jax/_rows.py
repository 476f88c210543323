r"""Per-row cross-entropy, softmax and log-softmax with ``jax.custom_jvp`` rules (class axis last).

The maths is the kernel stage contract of :mod:`logitkit.kernels` (``ce_forward`` /
``ce_backward`` / ``prob_*`` / softmax stages), written for XLA:

* the forward keeps only per-row statistics as residuals (the row's raw maximum and
  ``r = log Σ exp(z - m)``, plus the inputs, which exist anyway), never an ``N×V`` softmax;
* the backward rebuilds ``p = exp((z - m) - r)`` and the whole gradient in one elementwise
  expression, e.g. for class indices ``dz = p·a - [c = y]·b - c₀·w``, with per-row ``a, b, c₀``.

Each function is a ``jax.custom_jvp`` whose tangent is one :func:`._linear.linear` call: forward
mode (``jax.jvp``, ``jax.jacfwd``) evaluates the tangent, reverse mode transposes it into the
backward above (so ``jax.grad`` keeps only the residuals named), and higher orders differentiate
plain JAX code.

Two facts about XLA on CPU shape the code:

1. A row reduction (max, Σ exp) runs as one vectorized loop only when its body is arithmetic; a
   ``select`` or a comparison inside it makes XLA write the whole ``N×V`` operand to memory first
   (5-7× slower). So the log1p-of-the-sum-without-one-term trick that keeps confident rows exact
   uses arithmetic masks:

   * class indices: leave the *label* term out, ``t = Σ_c e_c · min(1, |c - y|)``, then
     ``r = log1p(expm1(z_y - m) + t)`` (exact for ``y = argmax``, where the loss is ``r`` itself);
   * probabilities: ``u = Σ_c e_c · min(1, |x_max - x_c|·2^126)`` leaves every maximal term out;
     ``s = Σ_c e_c < 2`` means there is exactly one, so ``r = log1p(u)``, else ``r = log s``.

2. XLA evaluates the transform (``x / T``, softcap) again inside every fusion that uses it, and
   may contract ``m - x·(1/T)`` into a fused multiply-add in one fusion and not in another, so a
   transformed maximum need not equal the transformed logit it came from. Maxima and ties are
   therefore found on the *raw* logits (the transform is increasing), and ``z - m`` is computed
   as ``(x - x_max)·(1/T)`` (softcap: ``c·(tanh(x/c) - tanh(x_max/c))/T``, set to exactly 0 at
   raw ties), which is exactly 0 for the maximal terms in every fusion.

Two routes compute the cross-entropies. On the CPU, without a class mask, :func:`index_rows`
(which takes a per-row mask as ignored rows) and :func:`prob_rows` (no mask) call the numba
kernels as XLA custom calls (:mod:`._ffi`): one forward call
(``ce``, ``m``, ``r`` per row) and one backward call that writes the gradient; their tangents for
higher-order derivatives come from the XLA code below. Everything else (masks, other platforms,
``LOGITKIT_KERNELS=core``) runs the XLA code itself.

``mask`` (optax's ``where``) hides classes from the statistics; for class indices the label logit
is still read from the unmasked logits, as optax does. Rows that are ignored (label equal to
``ignore_index``, or every class masked) give 0 and a zero gradient. With ``softcap`` a ``-inf``
logit becomes ``-c``, as in the core (the cap is part of the model); masks and softcap are not
combined by any caller.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._namespace import acc_dtype
from . import _ffi, _linear

__all__ = ["Options", "index_rows", "prob_rows", "softmax", "log_softmax", "row_stats"]

# |x_max - x| below 2^-126 counts as a tie with the maximum (its exp is exactly 1).
_TIE = 2.0 ** 126
# Float iota is exact up to 2^24 classes in float32; beyond that the (slower) integer compare.
_FLOAT_IOTA_MAX = 2 ** 24


class Options(NamedTuple):
    """Static options of one call (hashable: they are ``nondiff_argnums`` of the custom JVPs)."""

    ignore_index: int | None = None
    label_smoothing: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0


def _is_zero(g: Any) -> bool:
    return g is None or isinstance(g, SymbolicZero)


def _tangent(t: Any) -> Any:
    """A tangent, or ``None`` for a symbolic zero (``symbolic_zeros=True``)."""
    return None if _is_zero(t) else t


def _full_mask(mask: Any, x: Any) -> Any:
    """A mask with the logits' number of axes (what :mod:`._linear` expects of ``"x"`` operands)."""
    if mask is None or mask.ndim == x.ndim:
        return mask
    return jnp.broadcast_to(mask, x.shape)


# ----------------------------------------------------------------------------------------------
# the transform, expressed relative to the row maximum


def _raw(x: Any, mask: Any, opts: Options) -> Any:
    """Logits in the accumulation dtype, ready for the max: masked -> -inf; with softcap,
    clipped to the finite range (tanh maps ±inf and ±max-float to the same ±c)."""
    xa = x.astype(acc_dtype(jnp, x.dtype))
    if opts.softcap is not None:
        if mask is not None:
            raise ValueError("mask and softcap cannot be combined")
        big = float(jnp.finfo(xa.dtype).max)
        xa = jnp.clip(xa, -big, big)
    if mask is not None:
        xa = jnp.where(mask, xa, -jnp.inf)
    return xa


def _transform(xa: Any, opts: Options) -> Any:
    """``softcap·tanh(x/softcap) / T`` of (per-row) values."""
    if opts.softcap is not None:
        xa = jnp.tanh(xa * (1.0 / opts.softcap)) * opts.softcap
    if opts.temperature != 1.0:
        xa = xa * (1.0 / opts.temperature)
    return xa


def _shift(xa: Any, mx0: Any, opts: Options) -> Any:
    """``z - m`` of logits ``xa`` against the finite raw row maximum ``mx0``; exactly 0 where
    ``xa == mx0`` in every fusion (see the module notes)."""
    inv_t = 1.0 / opts.temperature
    if opts.softcap is None:
        d = xa - mx0
        return d if inv_t == 1.0 else d * inv_t
    k = 1.0 / opts.softcap
    d = _tanh_diff(xa * k, mx0 * k, (xa - mx0) * k) * (opts.softcap * inv_t)
    return d * _not_tie(xa, mx0)


def _tanh_diff(a: Any, b: Any, a_b: Any) -> Any:
    """``tanh(a) - tanh(b)`` to a few ulps of the difference, not of ``tanh`` (with a common
    offset, e.g. logits near 1e4 under a cap of 2e4, the plain difference cancels); ``a_b`` is
    ``a - b`` computed from the raw logits (``(x - x_max)/c``: exact, unlike ``x/c - x_max/c``).

    Of one sign ``s``: ``s·2(e_b - e_a)/((1+e_a)(1+e_b))`` with ``e = exp(-2|·|)``, and
    ``e_b - e_a = sign(δ)·exp(-2·min(|a|,|b|))·(-expm1(-2|δ|))``, ``δ = |a| - |b| = s·(a - b)``.
    Of opposite signs nothing cancels.
    """
    ea, eb = jnp.exp(-2.0 * jnp.abs(a)), jnp.exp(-2.0 * jnp.abs(b))
    s = jnp.where(a < 0.0, -1.0, 1.0)
    delta = s * a_b
    lo = jnp.minimum(jnp.abs(a), jnp.abs(b))
    gap = jnp.sign(delta) * jnp.exp(-2.0 * lo) * -jnp.expm1(-2.0 * jnp.abs(delta))
    same = s * 2.0 * gap / ((1.0 + ea) * (1.0 + eb))
    return jnp.where((a < 0.0) == (b < 0.0), same, jnp.tanh(a) - jnp.tanh(b))


def _per_class(eps: float, V: int) -> float:
    """``eps / V``, the smoothing mass per class; 0 for an empty class axis (nothing to spread)."""
    return eps / V if V else 0.0


def _not_tie(xa: Any, mx0: Any) -> Any:
    """1 for logits below the maximum, 0 for ties with it; arithmetic, so reductions fuse.

    Piecewise constant, so no gradient: autodiff would see a slope of ±2^126 at ties, whose
    cancelling halves swallow every other term of a second derivative.
    """
    return jax.lax.stop_gradient(jnp.minimum(1.0, jnp.abs(mx0 - xa) * _TIE))


def _row_max(xa: Any, axis: int) -> Any:
    if xa.shape[axis] == 0:  # the max of nothing is -inf: an empty row behaves as fully masked
        shape = list(xa.shape)
        shape[axis] = 1
        return jnp.full(tuple(shape), -jnp.inf, xa.dtype)
    return jnp.max(xa, axis=axis, keepdims=True)


def _finite0(mx: Any) -> Any:
    return jnp.where(jnp.isfinite(mx), mx, 0.0)


def _finish_r(mx: Any, r: Any) -> Any:
    """Contract values for the special rows: all ``-inf`` -> ``r = 0``; ``+inf`` -> NaN."""
    return jnp.where(mx == -jnp.inf, 0.0, jnp.where(mx == jnp.inf, jnp.nan, r))


def row_stats(xa: Any, opts: Options, axis: int = -1) -> tuple[Any, Any, Any]:
    """``(mx, d, r)``: raw row maximum, ``d = z - m`` and ``r = log Σ exp(d)`` (exact for confident
    rows). ``mx`` and ``r`` keep ``axis`` with size 1; ``xa`` comes from :func:`_raw`.

    ``s = Σ e`` and ``u = Σ e·[not a tie]`` share one ``exp``; ``s < 2`` means a single maximal
    term, so ``r = log1p(u)``, otherwise ``r ≥ log 2`` and ``log s`` is accurate.
    """
    mx = _row_max(xa, axis)
    mx0 = _finite0(mx)
    d = _shift(xa, mx0, opts)
    e = jnp.exp(d)
    s = jnp.sum(e, axis=axis, keepdims=True)
    u = jnp.sum(e * _not_tie(xa, mx0), axis=axis, keepdims=True)
    r = jnp.where(s < 2.0, jnp.log1p(u), jnp.log(s))
    return mx, d, _finish_r(mx, r)


def _recompute_d(x: Any, mask: Any, mx: Any, opts: Options) -> Any:
    return _shift(_raw(x, mask, opts), _finite0(mx), opts)


def _softmax_from(d: Any, mx: Any, r: Any) -> Any:
    """``exp(d - r)``: 0 on fully masked rows, NaN on rows with NaN or ``+inf``."""
    return jnp.where(mx == jnp.inf, jnp.nan, jnp.exp(d - r))


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


def _label_shift(x: Any, lab: Any, mx: Any, mask: Any, opts: Options) -> tuple[Any, Any]:
    """``(z_y - m unmasked, z_y - m masked)`` per row (size-1 last axis), exactly 0 for a label
    that is the row maximum. optax reads the label logit unmasked; the normalizer is masked."""
    xy = _raw(_gather_last(x, lab), None, opts)
    mx0 = _finite0(mx)
    dy = jnp.where(xy == mx, 0.0, _shift(xy, mx0, opts))
    if mask is None:
        return dy, dy
    shown = _gather_last(jnp.broadcast_to(mask, x.shape), lab)
    return dy, jnp.where(shown, dy, -jnp.inf)


def _index_forward(opts: Options, x: Any, labels: Any, weight: Any, mask: Any):
    acc = acc_dtype(jnp, x.dtype)
    V = x.shape[-1]
    eps = opts.label_smoothing
    mask_any = None if mask is None else jnp.broadcast_to(jnp.any(mask, axis=-1), labels.shape)
    valid, bad, lab = _index_parts(labels, mask_any, V, opts.ignore_index)
    xa = _raw(x, mask, opts)
    mx = _row_max(xa, -1)
    mx0 = _finite0(mx)
    d = _shift(xa, mx0, opts)
    dy, dys = _label_shift(x, lab, mx, mask, opts)
    # r with the label's term left out of the sum (exact when the label is the maximum)
    e = jnp.exp(d)
    if V <= _FLOAT_IOTA_MAX:
        iota = jax.lax.broadcasted_iota(acc, x.shape, x.ndim - 1)
        t = jnp.sum(e * jnp.minimum(1.0, jnp.abs(iota - lab[..., None].astype(acc))), axis=-1, keepdims=True)
    else:
        iota = jax.lax.broadcasted_iota(lab.dtype, x.shape, x.ndim - 1)
        t = jnp.sum(jnp.where(iota == lab[..., None], 0.0, e), axis=-1, keepdims=True)
    r = _finish_r(mx, jnp.log1p(jnp.expm1(dys) + t))
    w, W = _class_weights(weight, acc, V)
    wy = 1.0 if w is None else jnp.take(w, lab)[..., None]
    all_masked = mx == -jnp.inf
    nll = jnp.where(all_masked, jnp.inf, r - dy)
    ce = (1.0 - eps) * wy * nll if eps != 1.0 else jnp.zeros_like(nll)
    if eps > 0.0:
        smooth = -jnp.sum(d if w is None else w * d, axis=-1, keepdims=True) + W * r
        ce = ce + _per_class(eps, V) * jnp.where(all_masked, jnp.inf, smooth)
    ce = jnp.where(bad, jnp.nan, jnp.where(valid, ce[..., 0], 0.0))
    lse = jnp.where(valid, (_transform(mx, opts) + r)[..., 0], 0.0)
    return (ce, lse), (mx, r, nll, valid, bad, lab)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _index_rows(opts: Options, x: Any, labels: Any, weight: Any, mask: Any) -> tuple[Any, Any]:
    return _index_forward(opts, x, labels, weight, mask)[0]


def _index_rows_jvp(opts, primals, tangents):
    x, labels, weight, mask = primals
    mask = _full_mask(mask, x)
    out, (mx, r, nll, valid, bad, lab) = _index_forward(opts, x, labels, weight, mask)
    tx, tw = _tangent(tangents[0]), _tangent(tangents[2])
    if tx is None and tw is None:
        return out, tuple(jnp.zeros_like(o) for o in out)
    # Residuals: the inputs (alive anyway) and per-row numbers; see _linear.
    res = (x, labels, weight, mask, mx, r, nll, valid, bad, lab)
    return out, _linear.linear("index_xla", opts, res, (tx, tw), "xrwxxxxrrrxw")


_index_rows.defjvp(_index_rows_jvp, symbolic_zeros=True)


def _index_xla_fwd(opts, x, labels, weight, mask, mx, r, nll, valid, bad, lab, tx, tw):
    tx = jnp.zeros_like(x) if tx is None else tx
    if weight is None:
        return jax.jvp(lambda a: _index_forward(opts, a, labels, None, mask)[0], (x,), (tx,))[1]
    tw = jnp.zeros_like(weight) if tw is None else tw
    return jax.jvp(lambda a, w: _index_forward(opts, a, labels, w, mask)[0], (x, weight), (tx, tw))[1]


def _index_xla_bwd(opts, need, x, labels, weight, mask, mx, r, nll, valid, bad, lab, g_ce, g_lse):
    res = (x, weight, mask, mx, r, valid, bad, lab, nll if need[1] else None)
    dx, _, dw, _ = _index_bwd(opts, res, (g_ce, g_lse))
    return (dx if need[0] else None), dw


def _grad_factor(x: Any, acc: Any, opts: Options) -> Any:
    """d z / d x of the transform, or ``None`` where it is the constant 1."""
    factor = None
    if opts.softcap is not None:
        # sech²(u) = 4t/(1+t)² with t = exp(-2|u|): 1 - tanh²(u) would cancel for |u| > ~3.
        t = jnp.exp(jnp.abs(x.astype(acc)) * (-2.0 / opts.softcap))
        factor = 4.0 * t / ((1.0 + t) * (1.0 + t))
    if opts.temperature != 1.0:
        inv_t = 1.0 / opts.temperature
        factor = inv_t if factor is None else factor * inv_t
    return factor


def _index_bwd(opts, res, g):
    x, w_in, mask, mx, r, valid, bad, lab, nll = res
    g_ce, g_lse = g
    acc = acc_dtype(jnp, x.dtype)
    V = x.shape[-1]
    eps = opts.label_smoothing
    g_ce = jnp.zeros(mx.shape[:-1], acc) if _is_zero(g_ce) else g_ce.astype(acc)
    g_ce = jnp.where(valid, g_ce, 0.0)
    w, W = _class_weights(w_in, acc, V)
    wy = 1.0 if w is None else jnp.take(w, lab)
    # dz = p·a - [c = y]·b - c0·w, every coefficient per row.
    b = g_ce * ((1.0 - eps) * wy)
    a = b + g_ce * (_per_class(eps, V) * W)
    if not _is_zero(g_lse):
        a = a + jnp.where(valid, g_lse.astype(acc), 0.0)
    d = _recompute_d(x, mask, mx, opts)
    p = _softmax_from(d, mx, r)
    onehot = jax.lax.broadcasted_iota(lab.dtype, x.shape, x.ndim - 1) == lab[..., None]
    # At the label, p_y·a - b = b·(p_y - 1) + p_y·(a - b), with p_y - 1 = expm1(z_y - m - r):
    # on a confident row p_y rounds to 1 and p_y - 1 (~1e-13) would be lost. A masked label
    # (optax's where) has z_y - m = -inf there, so p_y - 1 = -1.
    _, dys = _label_shift(x, lab, mx, mask, opts)
    py_m1 = jnp.where(mx == jnp.inf, jnp.nan, jnp.expm1(dys - r))
    a_, b_ = a[..., None], b[..., None]
    dz = jnp.where(onehot, b_ * py_m1 + p * (a_ - b_), p * a_)
    if eps > 0.0:
        c0 = (g_ce * _per_class(eps, V))[..., None]
        dz = dz - (c0 if w is None else c0 * w)
    dz = jnp.where(valid[..., None], dz, 0.0)
    dz = jnp.where(bad[..., None], jnp.nan, dz)
    factor = _grad_factor(x, acc, opts)
    if factor is not None:
        dz = dz * factor
    dx = dz.astype(x.dtype)
    dw = None
    if nll is not None:
        # d ce / d w_c = (1-eps)·[c = y]·nll + eps/V·(r - d_c), summed over valid rows.
        term = jnp.where(valid, (1.0 - eps) * g_ce * nll[..., 0], 0.0)
        dw = jnp.zeros((V,), acc).at[lab.reshape(-1)].add(term.reshape(-1))
        if eps > 0.0:
            lz = jnp.where(valid[..., None], r - d, 0.0)
            dw = dw + _per_class(eps, V) * jnp.einsum("...,...c->c", g_ce, lz)
        dw = dw.astype(w_in.dtype)
    return dx, None, dw, None


_linear.RULES["index_xla"] = _linear.Rule(_index_xla_fwd, _index_xla_bwd)


def index_rows(x: Any, labels: Any, weight: Any = None, mask: Any = None, *,
               opts: Options = Options()) -> tuple[Any, Any]:
    """Per-row ``(ce, lse)`` for class indices, in the accumulation dtype; class axis last.

    ``ce = (1-eps)·w_y·(lse - z_y) + eps/V·Σ_c w_c·(lse - z_c)`` on valid rows, 0 on ignored rows
    (label ``== opts.ignore_index``, or every class masked), NaN where the index is out of range
    (only possible for traced labels). ``lse`` is 0 on ignored rows. Differentiable in ``x`` and
    ``weight``; ``mask`` (broadcastable to ``x``) hides classes from the normalizer only.

    Without a class mask, on the CPU, the numba kernels run both passes (see :mod:`._ffi`); a
    per-row mask (size 1 on the class axis, optax's batch-shaped ``where``) becomes ignored rows.
    """
    if (mask is None or mask.shape[-1] == 1) and _ffi.usable(x, "ce"):
        lab = _k_labels(labels, x.shape[-1], opts.ignore_index)
        if mask is not None:
            # a masked row is an ignored row (0, zero gradient); a bad label stays NaN, as below
            keep = jnp.broadcast_to(mask[..., 0], lab.shape)
            lab = jnp.where(keep | (lab == -2), lab, -1)
        return _index_rows_k(opts, x, lab, weight)
    return _index_rows(opts, x, labels, weight, mask)


# ----------------------------------------------------------------------------------------------
# class indices through the numba kernels (XLA FFI)
#
# The custom JVP below calls two kernels: ``_k_forward`` (ce, lse and the row statistics m, r)
# and ``_k_dx`` (the gradient). Each is a ``custom_jvp`` whose tangent is the JVP of the XLA code
# above, so second-order reverse mode (and the Hessian) works as it does on the XLA route.
# ``lax.platform_dependent`` keeps an XLA fallback for arrays on other platforms.


def _k_labels(labels: Any, V: int, ignore_index: int | None) -> Any:
    """int32 labels for the kernels: -1 ignored, -2 out of range and not ignored (a NaN row)."""
    lab = jnp.where((labels >= 0) & (labels < V), labels, -2)
    if ignore_index is not None:
        lab = jnp.where(labels == ignore_index, -1, lab)
    return lab.astype(jnp.int32)


def _k_opts(opts: Options) -> Options:
    return opts._replace(ignore_index=-1)


def _xla_forward(opts: Options, x: Any, lab: Any, weight: Any) -> tuple[Any, Any, Any, Any]:
    (ce, lse), (mx, r, *_rest) = _index_forward(_k_opts(opts), x, lab, weight, None)
    return ce, lse, _transform(mx, opts)[..., 0], r[..., 0]


def _ffi_forward(opts: Options, x: Any, lab: Any, weight: Any) -> tuple[Any, Any, Any, Any]:
    ce, m, r = _ffi.ce_forward(opts, x, lab, weight)
    return ce, jnp.where(lab == -1, 0.0, m + r), m, r


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _k_forward(opts: Options, x: Any, lab: Any, weight: Any) -> tuple[Any, Any, Any, Any]:
    return jax.lax.platform_dependent(x, lab, weight, cpu=functools.partial(_ffi_forward, opts),
                                      default=functools.partial(_xla_forward, opts))


@_k_forward.defjvp
def _k_forward_jvp(opts, primals, tangents):
    x, lab, weight = primals
    tx, _, tw = tangents
    out = _k_forward(opts, x, lab, weight)
    _, t = jax.jvp(lambda a, w: _xla_forward(opts, a, lab, w), (x, weight), (tx, tw))
    return out, t


def _xla_dx(opts: Options, x: Any, lab: Any, weight: Any, g_ce: Any, g_lse: Any) -> Any:
    ko = _k_opts(opts)
    _, (mx, r, _, valid, bad, lab0) = _index_forward(ko, x, lab, weight, None)
    return _index_bwd(ko, (x, weight, None, mx, r, valid, bad, lab0, None), (g_ce, g_lse))[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _k_dx(opts: Options, x: Any, lab: Any, m: Any, r: Any, weight: Any, g_ce: Any, g_lse: Any) -> Any:
    return jax.lax.platform_dependent(
        x, lab, m, r, weight, g_ce, g_lse,
        cpu=functools.partial(_ffi.ce_backward, opts),
        default=lambda x, lab, m, r, w, gc, gl: _xla_dx(opts, x, lab, w, gc, gl))


@_k_dx.defjvp
def _k_dx_jvp(opts, primals, tangents):
    x, lab, m, r, weight, g_ce, g_lse = primals
    tx, _, _, _, tw, tgc, tgl = tangents
    out = _k_dx(opts, *primals)
    _, t = jax.jvp(lambda a, w, gc, gl: _xla_dx(opts, a, lab, w, gc, gl),
                   (x, weight, g_ce, g_lse), (tx, tw, tgc, tgl))
    return out, t


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _index_rows_k(opts: Options, x: Any, lab: Any, weight: Any) -> tuple[Any, Any]:
    """``index_rows`` on the kernels, for labels coded by :func:`_k_labels`."""
    return _k_forward(opts, x, lab, weight)[:2]


def _index_k_jvp(opts, primals, tangents):
    x, lab, weight = primals
    ce, lse, m, r = _k_forward(opts, x, lab, weight)
    tx, tw = _tangent(tangents[0]), _tangent(tangents[2])
    if tx is None and tw is None:
        return (ce, lse), (jnp.zeros_like(ce), jnp.zeros_like(lse))
    return (ce, lse), _linear.linear("index_k", opts, (x, lab, weight, m, r), (tx, tw), "xrwrrxw")


_index_rows_k.defjvp(_index_k_jvp, symbolic_zeros=True)


def _index_k_fwd(opts, x, lab, weight, m, r, tx, tw):
    tx = jnp.zeros_like(x) if tx is None else tx
    if weight is None:
        return jax.jvp(lambda a: _xla_forward(opts, a, lab, None)[:2], (x,), (tx,))[1]
    tw = jnp.zeros_like(weight) if tw is None else tw
    return jax.jvp(lambda a, w: _xla_forward(opts, a, lab, w)[:2], (x, weight), (tx, tw))[1]


def _index_k_bwd(opts, need, x, lab, w_in, m, r, g_ce, g_lse):
    acc = acc_dtype(jnp, x.dtype)
    g_ce, g_lse = g_ce.astype(acc), g_lse.astype(acc)
    dx = _k_dx(opts, x, lab, m, r, w_in, g_ce, g_lse) if need[0] else None
    dw = None
    if need[1]:
        # d ce / d w_c = (1-eps)·[c = y]·(lse - z_y) + eps/V·(lse - z_c), over valid rows, with
        # lse - z_c = r - (z_c - m) and z_c - m from the raw logits (exact for large offsets)
        V, eps = x.shape[-1], opts.label_smoothing
        valid = (lab >= 0)[..., None]
        lab0 = jnp.where(valid[..., 0], lab, 0)
        rr = r[..., None]
        mx = _row_max(_raw(x, None, opts), -1)
        dy, _ = _label_shift(x, lab0, mx, None, opts)
        term = jnp.where(valid, (1.0 - eps) * g_ce[..., None] * (rr - dy), 0.0)
        dw = jnp.zeros((V,), acc).at[lab0.reshape(-1)].add(term.reshape(-1))
        if eps > 0.0:
            lz = jnp.where(valid, rr - _recompute_d(x, None, mx, opts), 0.0)
            dw = dw + _per_class(eps, V) * jnp.einsum("...,...c->c", g_ce, lz)
        dw = dw.astype(w_in.dtype)
    return dx, dw


_linear.RULES["index_k"] = _linear.Rule(_index_k_fwd, _index_k_bwd)


# ----------------------------------------------------------------------------------------------
# probability labels


def _targets(y: Any, weight: Any, mask: Any, acc: Any, eps: float) -> Any:
    V = y.shape[-1]
    t = y.astype(acc)
    if eps > 0.0:
        t = t * (1.0 - eps) + _per_class(eps, V)
    if weight is not None:
        t = t * weight.astype(acc)
    if mask is not None:
        t = jnp.where(mask, t, 0.0)
    return t


def _prob_forward(opts: Options, x: Any, y: Any, weight: Any, mask: Any):
    acc = acc_dtype(jnp, x.dtype)
    mx, d, r = row_stats(_raw(x, mask, opts), opts, -1)
    wy = _targets(y, weight, mask, acc, opts.label_smoothing)
    # Classes with w·y = 0 take no part (0·log 0 = 0), so a -inf logit with zero target is fine.
    terms = jnp.where(wy == 0.0, 0.0, wy * d)
    mass = jnp.sum(wy, axis=-1, keepdims=True)
    ce = mass * r - jnp.sum(terms, axis=-1, keepdims=True)
    ce = jnp.where(mx == -jnp.inf, jnp.where(mass == 0.0, 0.0, jnp.inf), ce)
    return (ce[..., 0], (_transform(mx, opts) + r)[..., 0]), (mx, r, mass)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _prob_rows(opts: Options, x: Any, y: Any, weight: Any, mask: Any) -> tuple[Any, Any]:
    return _prob_forward(opts, x, y, weight, mask)[0]


def _prob_rows_jvp(opts, primals, tangents):
    x, y, weight, mask = primals
    mask = _full_mask(mask, x)
    y = jnp.broadcast_to(y, x.shape)
    out, (mx, r, mass) = _prob_forward(opts, x, y, weight, mask)
    tx, ty, tw = (_tangent(t) for t in tangents[:3])
    if tx is None and ty is None and tw is None:
        return out, tuple(jnp.zeros_like(o) for o in out)
    if ty is not None:
        ty = jnp.broadcast_to(ty, x.shape)
    res = (x, y, weight, mask, mx, r, mass)
    return out, _linear.linear("prob_xla", opts, res, (tx, ty, tw), "xxwxxxxxxw")


_prob_rows.defjvp(_prob_rows_jvp, symbolic_zeros=True)


def _prob_label_tangent(opts: Options, x: Any, y: Any, weight: Any, mask: Any, mx: Any, r: Any,
                        ty: Any, tw: Any) -> Any:
    """The tangent of ``ce`` along label and weight tangents ``ty, tw`` (``None``: zero).

    ``d ce/d y_c = (1-eps)·w_c·(lse - z_c)`` and ``d ce/d w_c = t_c·(lse - z_c)``; a direction
    that does not move a class contributes 0 for it even where ``lse - z_c = +inf``.
    """
    acc = acc_dtype(jnp, x.dtype)
    eps = opts.label_smoothing
    lz = jnp.where(mx == -jnp.inf, jnp.inf, r - _recompute_d(x, mask, mx, opts))
    tce = jnp.zeros(x.shape[:-1], acc)
    if ty is not None:
        a = (1.0 - eps) * (1.0 if weight is None else weight.astype(acc)) * lz
        if mask is not None:
            a = jnp.where(mask, a, 0.0)
        t = ty.astype(acc)
        tce = tce + jnp.sum(jnp.where(t == 0.0, 0.0, a * t), axis=-1)
    if tw is not None:
        t = _targets(y, None, mask, acc, eps)
        twa = jnp.broadcast_to(tw.astype(acc), t.shape)
        tce = tce + jnp.sum(jnp.where((t == 0.0) | (twa == 0.0), 0.0, t * lz * twa), axis=-1)
    return tce


def _prob_xla_fwd(opts, x, y, weight, mask, mx, r, mass, tx, ty, tw):
    tx = jnp.zeros_like(x) if tx is None else tx
    tce, tlse = jax.jvp(lambda a: _prob_forward(opts, a, y, weight, mask)[0], (x,), (tx,))[1]
    return tce + _prob_label_tangent(opts, x, y, weight, mask, mx, r, ty, tw), tlse


def _prob_xla_bwd(opts, need, x, y, weight, mask, mx, r, mass, g_ce, g_lse):
    flags = tuple(jnp.zeros((0,), bool) if n else None for n in need[1:])
    dx, dy, dw, _ = _prob_bwd(opts, (x, y, weight, mask, mx, r, mass, flags), (g_ce, g_lse))
    return (dx if need[0] else None), dy, dw


def _prob_bwd(opts, res, g):
    x, y, w_in, mask, mx, r, mass, (need_y, need_w) = res
    g_ce, g_lse = g
    acc = acc_dtype(jnp, x.dtype)
    eps = opts.label_smoothing
    g_ce = jnp.zeros(mx.shape[:-1], acc) if _is_zero(g_ce) else g_ce.astype(acc)
    gc = g_ce[..., None]
    a = gc * mass
    if not _is_zero(g_lse):
        a = a + g_lse.astype(acc)[..., None]
    d = _recompute_d(x, mask, mx, opts)
    p = _softmax_from(d, mx, r)
    wy = _targets(y, w_in, mask, acc, eps)
    dz = p * a - gc * wy
    factor = _grad_factor(x, acc, opts)
    if factor is not None:
        dz = dz * factor
    dx = dz.astype(x.dtype)
    dy = dw = None
    if need_y is not None or need_w is not None:
        # lse - z_c = r - d_c (+inf for a -inf logit; also for a fully -inf row)
        lz = jnp.where(mx == -jnp.inf, jnp.inf, r - d)
    if need_y is not None:
        w = 1.0 if w_in is None else w_in.astype(acc)
        # masked before the product: a masked class's +inf would make 0·inf = NaN in the
        # derivative of this gradient
        lzy = lz if mask is None else jnp.where(mask, lz, 0.0)
        dy = (gc * ((1.0 - eps) * w) * lzy).astype(y.dtype)
    if need_w is not None:
        t = _targets(y, None, mask, acc, eps)
        contrib = jnp.where(t == 0.0, 0.0, gc * t * lz)
        dw = jnp.sum(contrib.reshape(-1, x.shape[-1]), axis=0).astype(w_in.dtype)
    return dx, dy, dw, None


_linear.RULES["prob_xla"] = _linear.Rule(_prob_xla_fwd, _prob_xla_bwd)


def prob_rows(x: Any, y: Any, weight: Any = None, mask: Any = None, *,
              opts: Options = Options()) -> tuple[Any, Any]:
    """Per-row ``(ce, lse)`` for probability labels ``y`` (``x``'s shape); class axis last.

    ``ce = Σ_c w_c·ỹ_c·(lse - z_c)`` with ``ỹ = (1-eps)·y + eps/V`` over classes not masked;
    differentiable in ``x``, ``y`` (``d/dy_c = (1-eps)·w_c·(lse - z_c)``) and ``weight``.
    Without a mask, on the CPU, the numba kernels run both passes (see :mod:`._ffi`).
    """
    if mask is None and y.shape == x.shape and _ffi.usable(x, "prob"):
        return _prob_rows_k(opts, x, y, weight)
    return _prob_rows(opts, x, y, weight, mask)


# probability labels through the numba kernels: the same construction as for class indices


def _xla_prob_forward(opts: Options, x: Any, y: Any, weight: Any) -> tuple[Any, ...]:
    (ce, lse), (mx, r, mass) = _prob_forward(opts, x, y, weight, None)
    return ce, lse, _transform(mx, opts)[..., 0], r[..., 0], mass[..., 0]


def _ffi_prob_forward(opts: Options, x: Any, y: Any, weight: Any) -> tuple[Any, ...]:
    ce, m, r, mass = _ffi.prob_forward(opts, x, y, weight)
    return ce, m + r, m, r, mass


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kp_forward(opts: Options, x: Any, y: Any, weight: Any) -> tuple[Any, ...]:
    return jax.lax.platform_dependent(x, y, weight, cpu=functools.partial(_ffi_prob_forward, opts),
                                      default=functools.partial(_xla_prob_forward, opts))


@_kp_forward.defjvp
def _kp_forward_jvp(opts, primals, tangents):
    out = _kp_forward(opts, *primals)
    _, t = jax.jvp(lambda *a: _xla_prob_forward(opts, *a), primals, tangents)
    return out, t


def _xla_prob_dx(opts: Options, x: Any, y: Any, weight: Any, g_ce: Any, g_lse: Any) -> Any:
    _, (mx, r, mass) = _prob_forward(opts, x, y, weight, None)
    return _prob_bwd(opts, (x, y, weight, None, mx, r, mass, (None, None)), (g_ce, g_lse))[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kp_dx(opts: Options, x: Any, y: Any, m: Any, r: Any, mass: Any, weight: Any, g_ce: Any,
           g_lse: Any) -> Any:
    return jax.lax.platform_dependent(
        x, y, m, r, mass, weight, g_ce, g_lse,
        cpu=functools.partial(_ffi.prob_backward, opts),
        default=lambda x, y, m, r, s, w, gc, gl: _xla_prob_dx(opts, x, y, w, gc, gl))


@_kp_dx.defjvp
def _kp_dx_jvp(opts, primals, tangents):
    x, y, m, r, mass, weight, g_ce, g_lse = primals
    tx, ty, _, _, _, tw, tgc, tgl = tangents
    out = _kp_dx(opts, *primals)
    _, t = jax.jvp(lambda *a: _xla_prob_dx(opts, *a), (x, y, weight, g_ce, g_lse),
                   (tx, ty, tw, tgc, tgl))
    return out, t


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _prob_rows_k(opts: Options, x: Any, y: Any, weight: Any) -> tuple[Any, Any]:
    return _kp_forward(opts, x, y, weight)[:2]


def _prob_k_jvp(opts, primals, tangents):
    x, y, weight = primals
    ce, lse, m, r, mass = _kp_forward(opts, x, y, weight)
    tx, ty, tw = (_tangent(t) for t in tangents)
    if tx is None and ty is None and tw is None:
        return (ce, lse), (jnp.zeros_like(ce), jnp.zeros_like(lse))
    res = (x, y, weight, m, r, mass)
    return (ce, lse), _linear.linear("prob_k", opts, res, (tx, ty, tw), "xxwrrrxxw")


_prob_rows_k.defjvp(_prob_k_jvp, symbolic_zeros=True)


def _prob_k_fwd(opts, x, y, weight, m, r, mass, tx, ty, tw):
    tx = jnp.zeros_like(x) if tx is None else tx
    tce, tlse = jax.jvp(lambda a: _xla_prob_forward(opts, a, y, weight)[:2], (x,), (tx,))[1]
    if ty is not None or tw is not None:
        mx = _row_max(_raw(x, None, opts), -1)
        tce = tce + _prob_label_tangent(opts, x, y, weight, None, mx, r[..., None], ty, tw)
    return tce, tlse


def _prob_k_bwd(opts, need, x, y, w_in, m, r, mass, g_ce, g_lse):
    acc = acc_dtype(jnp, x.dtype)
    g_ce, g_lse = g_ce.astype(acc), g_lse.astype(acc)
    dx = _kp_dx(opts, x, y, m, r, mass, w_in, g_ce, g_lse) if need[0] else None
    dy = dw = None
    if need[1] or need[2]:
        # label / weight gradients on the XLA route (its dx is computed but unused: XLA drops it)
        flags = tuple(jnp.zeros((0,), bool) if n else None for n in need[1:])
        mx = _row_max(_raw(x, None, opts), -1)
        _, dy, dw, _ = _prob_bwd(opts, (x, y, w_in, None, mx, r[..., None], mass[..., None], flags),
                                 (g_ce, g_lse))
    return dx, dy, dw


_linear.RULES["prob_k"] = _linear.Rule(_prob_k_fwd, _prob_k_bwd)


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax (any axis)


def _softmax_forward(x: Any, axis: int, mask: Any, temperature: float, log: bool) -> Any:
    mx, d, r = row_stats(_raw(x, mask, Options(temperature=temperature)), Options(temperature=temperature), axis)
    if log:
        out = jnp.where(mx == -jnp.inf, -jnp.inf, d - r)
    else:
        out = _softmax_from(d, mx, r)
    return out.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 4))
def _softmax(axis: int, temperature: float, x: Any, mask: Any, log: bool) -> Any:
    return _softmax_forward(x, axis, mask, temperature, log)


def _softmax_jvp(axis, temperature, log, primals, tangents):
    x, mask = primals
    mask = _full_mask(mask, x)
    out = _softmax_forward(x, axis, mask, temperature, log)
    tx = _tangent(tangents[0])
    if tx is None:
        return out, jnp.zeros_like(out)
    # only the output is kept for reverse mode
    return out, _linear.linear("sm_xla", (axis, temperature, log), (out, mask), (tx,), "xxx")[0]


_softmax.defjvp(_softmax_jvp, symbolic_zeros=True)


def _sm_fwd(opts, out, mask, tx):
    """``softmax: y·(t - Σ y·t)``, ``log_softmax: t - Σ softmax·t`` with ``t = tx/T`` where not
    masked (masked outputs are constants)."""
    axis, temperature, log = opts
    acc = acc_dtype(jnp, out.dtype)
    ya, t = out.astype(acc), tx.astype(acc)
    if mask is not None:
        t = jnp.where(mask, t, 0.0)
    if temperature != 1.0:
        t = t * (1.0 / temperature)
    if log:
        dt = t - jnp.sum(jnp.exp(ya) * t, axis=axis, keepdims=True)
        if mask is not None:
            dt = jnp.where(mask, dt, 0.0)
    else:
        dt = ya * (t - jnp.sum(ya * t, axis=axis, keepdims=True))
    return (dt.astype(out.dtype),)


def _sm_xla_bwd(opts, need, out, mask, g):
    axis, temperature, log = opts
    return (_softmax_bwd(axis, temperature, log, (out, mask), g)[0],)


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
        dz = dz * (1.0 / temperature)
    return dz.astype(out.dtype), None


_linear.RULES["sm_xla"] = _linear.Rule(_sm_fwd, _sm_xla_bwd)


def _on_kernels(x: Any, axis: int, where: Any) -> bool:
    return where is None and x.ndim >= 1 and axis in (-1, x.ndim - 1) and _ffi.usable(x, "softmax")


def softmax(x: Any, axis: int = -1, *, where: Any = None, temperature: float = 1.0) -> Any:
    """``exp(z - lse)`` with ``z = x / T`` along ``axis``; masked entries and fully masked rows 0.

    Saves only its output for the backward (``y·(g - Σ y·g) / T``). Over the last axis without a
    mask, on the CPU, forward and backward run the numba kernels.
    """
    if _on_kernels(x, axis, where):
        return _softmax_k(float(temperature), False, x)
    return _softmax(axis, float(temperature), x, where, False)


def log_softmax(x: Any, axis: int = -1, *, where: Any = None, temperature: float = 1.0) -> Any:
    """``(z - m) - r`` along ``axis``; masked entries and fully masked rows ``-inf``.

    Backward ``(g - softmax·Σ g) / T`` over entries not masked (masked entries get 0). Over the
    last axis without a mask, on the CPU, forward and backward run the numba kernels.
    """
    if _on_kernels(x, axis, where):
        return _softmax_k(float(temperature), True, x)
    return _softmax(axis, float(temperature), x, where, True)


# softmax / log_softmax over the last axis through the numba kernels (XLA FFI); tangents for
# higher orders from the XLA code above, as for the losses


def _xla_sm(temperature: float, log: bool, x: Any) -> Any:
    return _softmax_forward(x, -1, None, temperature, log)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _k_sm(temperature: float, log: bool, x: Any) -> Any:
    return jax.lax.platform_dependent(
        x, cpu=lambda a: _ffi.softmax_forward(a, log, temperature),
        default=functools.partial(_xla_sm, temperature, log))


@_k_sm.defjvp
def _k_sm_jvp(temperature, log, primals, tangents):
    out = _k_sm(temperature, log, *primals)
    _, t = jax.jvp(functools.partial(_xla_sm, temperature, log), primals, tangents)
    return out, t


def _xla_smb(log: bool, y: Any, g: Any) -> Any:
    return _softmax_bwd(-1, 1.0, log, (y, None), g)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _k_smb(log: bool, y: Any, g: Any) -> Any:
    return jax.lax.platform_dependent(
        y, g, cpu=lambda a, b: _ffi.softmax_backward(a, b, log),
        default=functools.partial(_xla_smb, log))


@_k_smb.defjvp
def _k_smb_jvp(log, primals, tangents):
    out = _k_smb(log, *primals)
    _, t = jax.jvp(functools.partial(_xla_smb, log), primals, tangents)
    return out, t


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _softmax_k(temperature: float, log: bool, x: Any) -> Any:
    return _k_sm(temperature, log, x)


def _softmax_k_jvp(temperature, log, primals, tangents):
    out = _k_sm(temperature, log, *primals)
    tx = _tangent(tangents[0])
    if tx is None:
        return out, jnp.zeros_like(out)
    return out, _linear.linear("sm_k", (-1, temperature, log), (out, None), (tx,), "xxx")[0]


_softmax_k.defjvp(_softmax_k_jvp, symbolic_zeros=True)


def _sm_k_bwd(opts, need, out, mask, g):
    _, temperature, log = opts
    if temperature == 1.0:
        return (_k_smb(log, out, g),)
    # the kernel has no 1/T factor: the XLA expression, one fused pass
    return (_softmax_bwd(-1, temperature, log, (out, None), g)[0],)


_linear.RULES["sm_k"] = _linear.Rule(_sm_fwd, _sm_k_bwd)
