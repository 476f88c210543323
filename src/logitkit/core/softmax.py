"""Core softmax / log_softmax and their backward rules, against the namespace ``xp``."""

from __future__ import annotations

import math
from typing import Any

from .._namespace import acc_dtype
from .logsumexp import quiet, row_stats, shifted

__all__ = ["softmax", "log_softmax", "softmax_backward", "log_softmax_backward", "entropy",
           "kl_divergence"]


@quiet
def softmax(xp: Any, x: Any, axis: int = -1, where: Any = None, temperature: float = 1.0) -> Any:
    """``exp(z - m) / Σ exp(z - m)`` with ``z - m = (x - max x) / temperature``; masked entries and all-masked rows give 0."""
    z, _, _, lo = shifted(xp, xp.astype(x, acc_dtype(xp, x.dtype)), None, temperature, axis, where, with_lo=True)
    _, r, e = row_stats(xp, z, axis, where, lo)
    return xp.astype(e / xp.exp(r), x.dtype)


@quiet
def log_softmax(xp: Any, x: Any, axis: int = -1, where: Any = None, temperature: float = 1.0) -> Any:
    """``(z - m) - r``; masked entries and all-masked rows give ``-inf``."""
    z, _, _, lo = shifted(xp, xp.astype(x, acc_dtype(xp, x.dtype)), None, temperature, axis, where, with_lo=True)
    m, r, _ = row_stats(xp, z, axis, where, lo)
    out = xp.where(m == -math.inf, -math.inf, (z - m) - r)
    if where is not None:
        out = xp.where(where, out, -math.inf)
    return xp.astype(out, x.dtype)


@quiet
def softmax_backward(xp: Any, y: Any, dy: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of softmax: ``y * (dy - Σ y·dy)`` (``y`` the forward output)."""
    acc = acc_dtype(xp, y.dtype)
    ya, dya = xp.astype(y, acc), xp.astype(dy, acc)
    return xp.astype(ya * (dya - xp.sum(ya * dya, axis=axis, keepdims=True)), y.dtype)


@quiet
def log_softmax_backward(xp: Any, y: Any, dy: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of log_softmax: ``dy - exp(y) * Σ dy`` (``y`` the forward output)."""
    acc = acc_dtype(xp, y.dtype)
    ya, dya = xp.astype(y, acc), xp.astype(dy, acc)
    return xp.astype(dya - xp.exp(ya) * xp.sum(dya, axis=axis, keepdims=True), y.dtype)


@quiet
def entropy(xp: Any, x: Any, temperature: float = 1.0) -> Any:
    """Entropy of ``softmax(x / T)`` along the last axis, as ``r + Σ_c p_c (m - z_c)``.

    Every term is >= 0, so confident rows (H ~ 1e-13) keep their relative accuracy. Classes with
    ``p_c = 0`` (``-inf`` logits) contribute 0, and so does their gradient.
    """
    acc = acc_dtype(xp, x.dtype)
    z, _, _, lo = shifted(xp, xp.astype(x, acc), None, temperature, with_lo=True)
    m, r, e = row_stats(xp, z, -1, lo=lo)
    p = e / xp.exp(r)
    live = p > 0
    # Replace dead entries *before* the product: 0·inf would poison autograd through ``where``.
    gap = xp.where(live, m - xp.where(live, z, 0.0), 0.0)
    h = xp.squeeze(r, axis=-1) + xp.sum(p * gap, axis=-1)
    return xp.astype(h, x.dtype)


@quiet
def kl_divergence(xp: Any, p_logits: Any, q_logits: Any, temperature: float = 1.0) -> Any:
    """``Σ_c p_c (log p_c - log q_c)`` along the last axis, ``p = softmax(p_logits/T)``, ``q`` likewise.

    ``log p - log q`` is formed as ``(zp - mp) - (zq - mq) - (rp - rq)`` so a large common offset
    never enters a rounded log-sum-exp. Classes with ``p_c = 0`` contribute 0; a class with
    ``p_c > 0`` and ``q_c = 0`` makes the divergence ``+inf``.
    """
    acc = acc_dtype(xp, p_logits.dtype)
    # Rows shifted by their own max before dividing by T: no large offset is ever rounded.
    zp, _, _ = shifted(xp, xp.astype(p_logits, acc), None, temperature)
    zq, _, _ = shifted(xp, xp.astype(q_logits, acc), None, temperature)
    mp, rp, ep = row_stats(xp, zp, -1)
    mq, rq, _ = row_stats(xp, zq, -1)
    p = ep / xp.exp(rp)
    q_dead = mq == -math.inf
    # Entries that take no part are replaced *before* the arithmetic, so that no inf - inf
    # reaches autograd through the discarded branch of a ``where``.
    live = (p > 0) & ~q_dead
    zp_s = xp.where(live, zp, 0.0)
    zq_s = xp.where(live, zq, 0.0)
    mp_s = xp.where(live, mp, 0.0)
    mq_s = xp.where(live, mq, 0.0)
    diff = (zp_s - mp_s) - (zq_s - mq_s) - (rp - rq)
    kl = xp.sum(p * xp.where(live, diff, 0.0), axis=-1)
    # A fully masked q: any teacher mass there is infinitely far.
    p_mass = xp.squeeze(mp, axis=-1) > -math.inf
    kl = xp.where(xp.squeeze(q_dead, axis=-1) & p_mass, math.inf, kl)
    return xp.astype(kl, p_logits.dtype)
