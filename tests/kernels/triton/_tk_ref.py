"""Float64 NumPy references for the kernel stage contract (written from the formulas in
:mod:`logitkit.kernels`, independent of the code under test)."""

from __future__ import annotations

import numpy as np
import torch


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def transform(x, softcap=None, temperature=1.0):
    z = np.asarray(x, np.float64)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    return z / temperature


def transform_factor(x, softcap=None, temperature=1.0):
    f = np.ones_like(np.asarray(x, np.float64))
    if softcap is not None:
        f = 1.0 - np.tanh(np.asarray(x, np.float64) / softcap) ** 2
    return f / temperature


def row_stats(z):
    """``(m, r)`` with ``lse = m + r``; all ``-inf`` rows give ``(-inf, 0)``."""
    with np.errstate(invalid="ignore", over="ignore"):
        zc = np.where(np.isnan(z), -np.inf, z)
        m = zc.max(-1)
        ms = np.where(np.isfinite(m), m, 0.0)
        s = np.exp(z - ms[:, None]).sum(-1)
        r = np.log(s)
        r = np.where(m == -np.inf, np.where(np.isnan(s), np.nan, 0.0), r)
        r = np.where(m == np.inf, np.nan, r)
    return m, r


def softmax_from(z, m, r):
    with np.errstate(invalid="ignore"):
        ms = np.where(m == -np.inf, 0.0, m)
        p = np.exp((z - ms[:, None]) - r[:, None])
        return np.where((m == -np.inf)[:, None], 0.0, p)


def ce_stage(x, labels, g_ce=None, g_z=None, *, weight=None, ignore_index=-100, label_smoothing=0.0,
             z_loss=0.0, softcap=None, temperature=1.0):
    """``(ce, m, r, grad)`` of the contract in float64 (``grad`` None without ``g_ce``)."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    N, V = x.shape
    eps = label_smoothing
    z = transform(x, softcap, temperature)
    m, r = row_stats(z)
    w = np.ones(V) if weight is None else np.asarray(weight, np.float64)
    W = w.sum()
    valid = labels != ignore_index
    y = np.where(valid, labels, 0)
    zy = z[np.arange(N), y]
    wy = w[y]
    with np.errstate(invalid="ignore"):
        nll = np.where(m == -np.inf, np.inf, (m - zy) + r)
        ce = (1 - eps) * wy * nll if eps != 1.0 else np.zeros(N)
        if eps > 0:
            smooth = (w * (m[:, None] - z)).sum(-1) + W * r
            smooth = np.where(m == -np.inf, np.inf, smooth)
            ce = ce + eps / V * smooth
    ce = np.where(valid, ce, 0.0)
    if g_ce is None:
        return ce, m, r, None
    g_ce = np.broadcast_to(np.asarray(g_ce, np.float64), (N,))[:, None]
    g_z = np.broadcast_to(np.asarray(g_z, np.float64), (N,))[:, None]
    p = softmax_from(z, m, r)
    onehot = np.arange(V)[None, :] == y[:, None]
    dz = g_ce * (1 - eps) * wy[:, None] * (p - onehot)
    if eps > 0:
        dz = dz + g_ce * eps / V * (W * p - w[None, :])
    if z_loss:
        lse = np.where(m == -np.inf, 0.0, m + r)[:, None]
        dz = dz + g_z * 2 * z_loss * lse * p
    dx = dz * transform_factor(x, softcap, temperature)
    dx = np.where(valid[:, None], dx, 0.0)
    return ce, m, r, dx
