"""Oracles: float64 NumPy and mpmath references, independent of the code under test.

Used by the tests, ``logitkit check`` and ``logitkit bench``. They are deliberately plain:
float64 with the textbook max-shift, and mpmath at 50 digits for rows where float64 itself is
not enough (confident predictions).
"""

from __future__ import annotations

import numpy as np

__all__ = ["logsumexp64", "log_softmax64", "softmax64", "cross_entropy64", "cross_entropy_grad64",
           "row_loss_mp", "row_lse_mp", "row_log_softmax_mp"]


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def logsumexp64(x, axis=-1):
    x = _f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m, axis=axis)


def log_softmax64(x, axis=-1):
    x = _f64(x)
    return x - np.expand_dims(logsumexp64(x, axis), axis)


def softmax64(x, axis=-1):
    return np.exp(log_softmax64(x, axis))


def _transform64(x, softcap=None, temperature=1.0):
    x = _f64(x)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    return x / temperature


def cross_entropy64(logits, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                    reduction="mean", z_loss=0.0, softcap=None, temperature=1.0):
    """Plain float64 cross-entropy, class axis last; torch semantics; empty mean = 0."""
    z = _transform64(logits, softcap, temperature)
    V = z.shape[-1]
    logp = log_softmax64(z)
    lse = logsumexp64(z)
    w = np.ones(V) if weight is None else _f64(weight)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        valid = labels != ignore_index
        lab = np.where(valid, labels, 0)
        wy = w[lab] * valid
        nll = -np.take_along_axis(logp, lab[..., None], -1)[..., 0]
        smooth = -(logp * w).sum(-1)
        ce = np.where(valid, (1 - label_smoothing) * wy * nll + label_smoothing / V * smooth, 0.0)
        denom_ce, denom_z = wy.sum(), valid.sum()
    else:
        y = _f64(labels) * (1 - label_smoothing) + label_smoothing / V
        ce = -(np.where(y * w == 0, 0.0, y * w * logp)).sum(-1)
        valid = np.ones(ce.shape, bool)
        denom_ce = denom_z = ce.size
    zt = np.where(valid, z_loss * lse ** 2, 0.0) if z_loss else 0.0 * ce
    if reduction == "none":
        return ce + zt
    if reduction == "sum":
        return ce.sum() + zt.sum()
    return (ce.sum() / denom_ce if denom_ce else 0.0) + (zt.sum() / denom_z if denom_z else 0.0)


def cross_entropy_grad64(logits, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", z_loss=0.0, softcap=None, temperature=1.0):
    """Gradient of :func:`cross_entropy64` (of the summed loss for ``reduction="none"``), float64.

    Plain ``p - onehot``: on a confident row the label entry p_y − 1 (~1e-13) keeps only ~1e-3
    relative accuracy here, so tests take that entry from mpmath instead.
    """
    x = _f64(logits)
    z = _transform64(x, softcap, temperature)
    V = z.shape[-1]
    p = softmax64(z)
    lse = logsumexp64(z)[..., None]
    w = np.ones(V) if weight is None else _f64(weight)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        valid = labels != ignore_index
        lab = np.where(valid, labels, 0)
        wy = (w[lab] * valid)[..., None]
        onehot = np.arange(V) == lab[..., None]
        dz = (1 - label_smoothing) * wy * (p - onehot) + label_smoothing / V * (w.sum() * p - w)
        dz = dz * valid[..., None]
        denom_ce, denom_z = wy.sum(), valid.sum()
    else:
        y = (_f64(labels) * (1 - label_smoothing) + label_smoothing / V) * w
        dz = p * y.sum(-1, keepdims=True) - y
        valid = np.ones(z.shape[:-1], bool)
        denom_ce = denom_z = valid.size
    dzz = 2 * z_loss * lse * p * valid[..., None]
    if reduction == "mean":
        dz = dz / denom_ce if denom_ce else 0 * dz
        dzz = dzz / denom_z if denom_z else 0 * dzz
    g = dz + dzz
    if softcap is not None:
        t = np.exp(-2 * np.abs(x / softcap))
        g = g * (4 * t / (1 + t) ** 2)  # sech² without the cancellation of 1 - tanh²
    return g / temperature


def row_lse_mp(row, dps: int = 50):
    """log Σ exp(row) with mpmath at ``dps`` digits (row: 1-D)."""
    import mpmath

    with mpmath.workdps(dps):
        return mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in np.asarray(row).ravel()))


def row_loss_mp(row, label: int, dps: int = 50) -> float:
    """Exact (to float64 rounding) ``lse(row) - row[label]`` via mpmath."""
    import mpmath

    with mpmath.workdps(dps):
        return float(row_lse_mp(row, dps) - mpmath.mpf(float(np.asarray(row).ravel()[label])))


def row_log_softmax_mp(row, dps: int = 50, *, softcap=None, temperature=1.0) -> np.ndarray:
    """Exact (to float64 rounding) log-softmax of ``z = softcap·tanh(row/softcap) / T`` via mpmath.

    Each element of the float row is taken exactly, so a common offset of 1e4 with ``T != 1``
    costs the oracle nothing. ``softcap=None`` skips the cap.

    >>> row_log_softmax_mp(np.array([0.0, np.log(3.0)])).round(12).tolist()
    [-1.38629436112, -0.287682072452]
    """
    import mpmath

    with mpmath.workdps(dps):
        z = [mpmath.mpf(float(v)) for v in np.asarray(row).ravel()]
        if softcap is not None:
            c = mpmath.mpf(float(softcap))
            z = [c * mpmath.tanh(v / c) for v in z]
        t = mpmath.mpf(float(temperature))
        z = [v / t for v in z]
        # lse - max z as log1p of the other terms: a loss of 1e-35 keeps all its digits
        top = max(range(len(z)), key=lambda j: z[j])
        rest = mpmath.fsum(mpmath.exp(v - z[top]) for j, v in enumerate(z) if j != top)
        r = mpmath.log1p(rest)  # lse - max z, never rounded into lse itself
        return np.array([float((v - z[top]) - r) for v in z])
