r"""Core cross-entropy stages (class axis last), the reference every kernel must match.

The stages and their formulas are fixed in :mod:`logitkit.kernels`; in short, with ``z`` the
transformed logits of one row, ``lse = m + r`` its log-sum-exp, ``y`` the label, ``eps`` the label
smoothing and ``w`` the class weights::

    ce = (1 - eps) * w[y] * (lse - z[y]) + eps / V * Σ_c w[c] * (lse - z[c])

computed as ``(m - z[y]) + r`` so that confident rows and rows with a large common offset keep full
relative accuracy. Probability labels use ``ce = Σ_c w[c] y_c (lse - z[c])`` with
``y <- (1 - eps) y + eps / V``.
"""

from __future__ import annotations

import math
from typing import Any

from .._namespace import acc_dtype
from .logsumexp import quiet, row_stats, shifted, transform_grad_factor

__all__ = [
    "ce_forward", "ce_backward", "ce_forward_backward",
    "prob_forward", "prob_backward", "prob_forward_backward",
]


def _iota(xp: Any, n: int, like: Any) -> Any:
    if hasattr(xp, "_t"):  # torch shim: keep the device
        return xp.arange(n, like=like)
    return xp.arange(n)


def _class_weights(xp: Any, weight: Any, acc: Any, V: int) -> tuple[Any, Any]:
    """``(w, W)``: weights in the accumulation dtype (or ``None``) and their sum (or ``V``)."""
    if weight is None:
        return None, float(V)
    w = xp.astype(weight, acc)
    return w, xp.sum(w)


def out_of_range(labels: Any, ignore_index: int, V: int) -> Any:
    """Rows whose class index is neither in ``[0, V)`` nor ``ignore_index``.

    Host arrays are validated before any stage runs, so this only ever fires for labels that
    could not be read first (traced JAX arrays, CUDA tensors): those rows get NaN, never a
    silently wrong loss.
    """
    return ((labels < 0) | (labels >= V)) & (labels != ignore_index)


def _label_parts(xp: Any, z: Any, labels: Any, ignore_index: int,
                 w: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(valid, bad, safe_labels, z_y, w_y)``, each with a trailing size-1 axis (``w_y`` may be 1.0)."""
    V = z.shape[-1]
    valid = labels != ignore_index
    bad = out_of_range(labels, ignore_index, V)
    # Gathering at a bad index would wrap (JAX), clamp or fault (CUDA): gather class 0 instead.
    lab = xp.where(valid & ~bad, labels, 0)
    lab = xp.expand_dims(lab, -1)
    if V == 0:
        # No class to gather: every row is ignored or bad (NaN below). The sum over the empty
        # axis is a 0 of the right shape that keeps autograd's graph (an empty gradient).
        zy = xp.sum(z, axis=-1, keepdims=True)
        return xp.expand_dims(valid, -1), xp.expand_dims(bad, -1), lab, zy, zy
    zy = xp.take_along_axis(z, lab, axis=-1)
    # xp.reshape, not the method: a tf.Tensor has none.
    wy = 1.0 if w is None else xp.reshape(xp.take_along_axis(w, xp.reshape(lab, (-1,)), axis=0), lab.shape)
    return xp.expand_dims(valid, -1), xp.expand_dims(bad, -1), lab, zy, wy


@quiet
def ce_forward(xp: Any, x: Any, labels: Any, *, weight: Any = None, ignore_index: int = -100,
               label_smoothing: float = 0.0, softcap: float | None = None,
               temperature: float = 1.0) -> tuple[Any, Any, Any]:
    """Per-row weighted, smoothed cross-entropy and the row statistics ``(ce, m, r)``.

    ``x``: ``(..., V)`` floating; ``labels``: ``(...)`` integer. Results are ``(...)`` in the
    accumulation dtype; ignored rows give ``ce = 0``.
    """
    acc = acc_dtype(xp, x.dtype)
    V = x.shape[-1]
    # z - max z from x itself (see shifted): m here is 0 (or -inf / NaN for special rows)
    z, m_z, delta, lo = shifted(xp, xp.astype(x, acc), softcap, temperature, with_lo=True)
    m, r, _ = row_stats(xp, z, -1, lo=lo)
    w, W = _class_weights(xp, weight, acc, V)
    valid, bad, _, zy, wy = _label_parts(xp, z, labels, ignore_index, w)
    all_masked = m == -math.inf
    nll = xp.where(all_masked, math.inf, (m - zy) + r)
    ce = (1.0 - label_smoothing) * wy * nll if label_smoothing != 1.0 else xp.zeros_like(nll)
    if label_smoothing > 0.0 and V > 0:
        gaps = m - z if w is None else w * (m - z)
        smooth = xp.sum(gaps, axis=-1, keepdims=True) + W * r
        smooth = xp.where(all_masked, math.inf, smooth)
        ce = ce + (label_smoothing / V) * smooth
    ce = xp.where(bad, math.nan, xp.where(valid, ce, 0.0))
    return xp.squeeze(ce, axis=-1), xp.squeeze(m_z, axis=-1), xp.squeeze(r, axis=-1)


def _shift_from_stats(xp: Any, x: Any, m: Any, r: Any, softcap: float | None,
                      temperature: float) -> tuple[Any, Any]:
    """``(d, c)`` with ``z - m - r = d + c`` for the given row statistics, ``lse = m + r``.

    ``d = z - max z`` is recomputed from ``x`` (:func:`shifted`) and ``c = (max z - m) - r`` is
    formed per row, so that neither a large common offset nor statistics from elsewhere (a
    vocabulary shard's global max) ever round into ``z``. The forward stages store ``m`` as max z
    rounded and ``r`` relative to the exact max (a confident row's r ~ 1e-13 keeps its digits),
    so where ``m`` is this row's own rounded max, ``max z - m`` is taken as 0.
    """
    # with_lo: the same m (and d) as the forward pass formed them (softcap in float64)
    d, m_x, delta, _ = shifted(xp, x, softcap, temperature, with_lo=True)
    m = xp.expand_dims(m, -1)
    r = xp.expand_dims(r, -1)
    finite = xp.isfinite(m) & xp.isfinite(m_x)
    gap = xp.where(finite & (m_x != m), (xp.where(finite, m_x, 0.0) - xp.where(finite, m, 0.0)) + delta, 0.0)
    return d, gap - r


def _softmax_from_stats(xp: Any, d: Any, c: Any, m: Any) -> Any:
    m = xp.expand_dims(m, -1)
    finite = xp.isfinite(m)
    p = xp.exp(d + xp.where(finite, c, 0.0))
    return xp.where(m == -math.inf, 0.0, xp.where(finite, p, math.nan))


def _finish_grad(xp: Any, x: Any, dz: Any, softcap: float | None, temperature: float,
                 valid: Any, out: Any) -> Any:
    factor = transform_grad_factor(xp, xp.astype(x, dz.dtype), softcap, temperature)
    if factor is not None:
        dz = dz * factor
    if valid is not None:
        dz = xp.where(valid, dz, 0.0)
    return write_out(xp, out, xp.astype(dz, x.dtype))


def write_out(xp: Any, out: Any, value: Any) -> Any:
    """Store ``value`` into ``out`` (``None``: return ``value``); ``out`` may alias an input."""
    if out is None:
        return value
    if hasattr(out, "copy_"):
        out.copy_(value)
    else:
        out[...] = value
    return out


@quiet
def ce_backward(xp: Any, x: Any, labels: Any, m: Any, r: Any, g_ce: Any, g_z: Any, *,
                weight: Any = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0,
                out: Any = None) -> Any:
    """Gradient of ``Σ_i g_ce[i]·ce[i] + g_z[i]·z_loss·lse[i]²`` with respect to ``x``."""
    acc = acc_dtype(xp, x.dtype)
    V = x.shape[-1]
    d, c = _shift_from_stats(xp, xp.astype(x, acc), m, r, softcap, temperature)
    p = _softmax_from_stats(xp, d, c, m)
    w, W = _class_weights(xp, weight, acc, V)
    valid, bad, lab, dy, wy = _label_parts(xp, d, labels, ignore_index, w)
    onehot = _iota(xp, V, x) == lab
    # p_y - 1 as expm1(z_y - m - r): on a confident row p_y rounds to 1 and the difference
    # (~1e-13) would be lost; this keeps it to full relative accuracy. A fully masked row has
    # p = 0, so its label entry is -1.
    me = xp.expand_dims(m, -1)
    py_m1 = xp.where(me == -math.inf, -1.0, xp.expm1(dy + xp.where(me == -math.inf, 0.0, c)))
    gce = xp.expand_dims(xp.astype(g_ce, acc), -1)
    dz = gce * ((1.0 - label_smoothing) * wy) * xp.where(onehot, py_m1, p)
    if label_smoothing > 0.0 and V > 0:
        dz = dz + gce * (label_smoothing / V) * (W * p - (1.0 if w is None else w))
    if z_loss != 0.0:
        lse = xp.expand_dims(m + r, -1)
        dz = dz + xp.expand_dims(xp.astype(g_z, acc), -1) * (2.0 * z_loss) * lse * p
    dz = xp.where(bad, math.nan, dz)
    return _finish_grad(xp, x, dz, softcap, temperature, valid, out)


def ce_forward_backward(xp: Any, x: Any, labels: Any, g_ce: Any, g_z: Any, *, weight: Any = None,
                        ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                        softcap: float | None = None, temperature: float = 1.0,
                        out: Any = None) -> tuple[Any, Any, Any, Any]:
    """:func:`ce_forward` then :func:`ce_backward` (kernels fuse them into one pass)."""
    opts = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                softcap=softcap, temperature=temperature)
    ce, m, r = ce_forward(xp, x, labels, **opts)
    grad = ce_backward(xp, x, labels, m, r, g_ce, g_z, z_loss=z_loss, out=out, **opts)
    return ce, m, r, grad


def _smoothed_targets(xp: Any, y: Any, acc: Any, weight: Any, label_smoothing: float) -> Any:
    V = y.shape[-1]
    y = xp.astype(y, acc)
    if label_smoothing > 0.0 and V > 0:
        y = y * (1.0 - label_smoothing) + label_smoothing / V
    if weight is not None:
        y = y * xp.astype(weight, acc)
    return y


@quiet
def prob_forward(xp: Any, x: Any, y: Any, *, weight: Any = None, label_smoothing: float = 0.0,
                 softcap: float | None = None, temperature: float = 1.0) -> tuple[Any, Any, Any]:
    """Per-row ``Σ_c w_c y_c (lse - z_c)`` for probability labels ``y`` of ``x``'s shape.

    Classes with ``w_c y_c = 0`` take no part, so a ``-inf`` logit with zero target gives no NaN.
    """
    acc = acc_dtype(xp, x.dtype)
    z, m_z, delta, lo = shifted(xp, xp.astype(x, acc), softcap, temperature, with_lo=True)
    m, r, _ = row_stats(xp, z, -1, lo=lo)
    wy = _smoothed_targets(xp, y, acc, weight, label_smoothing)
    terms = xp.where(wy == 0.0, 0.0, wy * (m - z))
    mass = xp.sum(wy, axis=-1, keepdims=True)
    ce = xp.sum(terms, axis=-1, keepdims=True) + mass * r
    all_masked = m == -math.inf
    ce = xp.where(all_masked, xp.where(mass == 0.0, 0.0, math.inf), ce)
    return xp.squeeze(ce, axis=-1), xp.squeeze(m_z, axis=-1), xp.squeeze(r, axis=-1)


@quiet
def prob_backward(xp: Any, x: Any, y: Any, m: Any, r: Any, g_ce: Any, g_z: Any, *,
                  weight: Any = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, temperature: float = 1.0, out: Any = None) -> Any:
    """Gradient ``g_ce·(p·Σ_c w_c y_c − w·y) + g_z·2·z_loss·lse·p``, chained through the transform."""
    acc = acc_dtype(xp, x.dtype)
    d, c = _shift_from_stats(xp, xp.astype(x, acc), m, r, softcap, temperature)
    p = _softmax_from_stats(xp, d, c, m)
    wy = _smoothed_targets(xp, y, acc, weight, label_smoothing)
    dz = xp.expand_dims(xp.astype(g_ce, acc), -1) * (p * xp.sum(wy, axis=-1, keepdims=True) - wy)
    if z_loss != 0.0:
        lse = xp.expand_dims(m + r, -1)
        dz = dz + xp.expand_dims(xp.astype(g_z, acc), -1) * (2.0 * z_loss) * lse * p
    return _finish_grad(xp, x, dz, softcap, temperature, None, out)


def prob_forward_backward(xp: Any, x: Any, y: Any, g_ce: Any, g_z: Any, *, weight: Any = None,
                          label_smoothing: float = 0.0, z_loss: float = 0.0,
                          softcap: float | None = None, temperature: float = 1.0,
                          out: Any = None) -> tuple[Any, Any, Any, Any]:
    opts = dict(weight=weight, label_smoothing=label_smoothing, softcap=softcap, temperature=temperature)
    ce, m, r = prob_forward(xp, x, y, **opts)
    grad = prob_backward(xp, x, y, m, r, g_ce, g_z, z_loss=z_loss, out=out, **opts)
    return ce, m, r, grad
