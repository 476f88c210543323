"""float64 NumPy oracles for the CPU kernel tests (written from the stage contract, not the kernels)."""
from __future__ import annotations

import numpy as np


def transform(x, softcap=None, temperature=1.0):
    z = np.asarray(x).astype(np.float64)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    return z / temperature


def stats(z):
    """m = max z; r = log1p(sum of exp(z - m) without one maximal term), exact tie count."""
    with np.errstate(invalid="ignore"):
        m = z.max(axis=1) if z.shape[1] else np.full(z.shape[0], -np.inf)
        finite = np.isfinite(m)
        d = np.where(finite[:, None], z - np.where(finite, m, 0.0)[:, None], np.nan)
        e = np.exp(d)
        ties = (d == 0).sum(axis=1)
        s = np.where(d == 0, 0.0, e).sum(axis=1)
        r = np.log1p(s + (ties - 1))
    r = np.where(m == -np.inf, 0.0, r)
    r = np.where(np.isnan(m) | (m == np.inf), np.nan, r)
    return m, r


def log_softmax(z):
    m, r = stats(z)
    with np.errstate(invalid="ignore"):
        out = (z - m[:, None]) - r[:, None]
    out[m == -np.inf] = -np.inf
    return out


def ce(x, labels, weight=None, ignore_index=-100, label_smoothing=0.0, softcap=None,
       temperature=1.0):
    z = transform(x, softcap, temperature)
    n, v = z.shape
    w = np.ones(v) if weight is None else np.asarray(weight, np.float64)
    lp = log_softmax(z)
    out = np.zeros(n)
    for i in range(n):
        y = labels[i]
        if y == ignore_index:
            continue
        t = 0.0
        if (1 - label_smoothing) * w[y] != 0:
            t += -(1 - label_smoothing) * w[y] * lp[i, y]
        if label_smoothing:
            nz = w != 0
            t += -label_smoothing / v * np.sum(w[nz] * lp[i, nz])
        out[i] = t
    return out


def ce_grad(x, labels, g_ce, g_z, weight=None, ignore_index=-100, label_smoothing=0.0,
            z_loss=0.0, softcap=None, temperature=1.0):
    z = transform(x, softcap, temperature)
    n, v = z.shape
    w = np.ones(v) if weight is None else np.asarray(weight, np.float64)
    m, r = stats(z)
    p = np.exp(log_softmax(z))
    g_ce = np.broadcast_to(np.asarray(g_ce, np.float64), (n,))
    g_z = np.broadcast_to(np.asarray(0.0 if g_z is None else g_z, np.float64), (n,))
    eps = label_smoothing
    out = np.zeros((n, v))
    for i in range(n):
        y = labels[i]
        if y == ignore_index:
            continue
        oh = np.zeros(v)
        oh[y] = 1
        dz = g_ce[i] * ((1 - eps) * w[y] * (p[i] - oh) + eps / v * (w.sum() * p[i] - w))
        if z_loss and np.isfinite(m[i]):
            dz = dz + g_z[i] * 2 * z_loss * (m[i] + r[i]) * p[i]
        dx = dz / temperature
        if softcap is not None:
            # sech^2 (1 - tanh^2 cancels for |x / softcap| > ~3, even in float64)
            with np.errstate(over="ignore"):  # cosh(inf) = inf: factor 0
                dx = dx / np.cosh(np.asarray(x[i], np.float64) / softcap) ** 2
        out[i] = dx
    return out
