"""Rows for the float32 contract of the vocabulary-parallel loss (issue 21), and their mpmath reference.

Logits lie on a grid (multiples of 2^-10 below 2^13 in magnitude, times a power-of-two
temperature), so every difference ``x − max`` is exact in float32 and what the tests measure is
what splitting the vocabulary adds: the rescaling, the collectives, the final log1p.
"""

from __future__ import annotations

import numpy as np


def _grid(a, step=1024.0):
    return np.round(np.asarray(a) * step) / step


def contract_rows(rng, bounds, temperature=1.0):
    """``(x float32 (R, V), y (R,), names)``: confident rows with the maximum on the first, last and a
    middle rank, mass on another rank than the maximum, ties of the maximum across and within
    shards, 1e4 offsets (confident and not), and plain rows. ``temperature`` (a power of two)
    scales every row's spread so that ``(x − max)/T`` is the same as at ``T = 1``."""
    V = bounds[-1][1]
    nz = [b for b in bounds if b[1] > b[0]]
    first, last, mid = nz[0][0], nz[-1][1] - 1, (nz[len(nz) // 2][0] + nz[len(nz) // 2][1]) // 2
    other = nz[0][0] if mid >= nz[0][1] else nz[-1][0]
    T = float(temperature)
    rows, ys, names = [], [], []

    def add(name, base, y, offset=0.0):
        rows.append(offset + T * base)
        ys.append(y)
        names.append(name)

    noise = lambda s=1.0: _grid(rng.normal(size=V) * s)  # noqa: E731
    b = noise() - 30.0; b[first] = 0.0
    add("confident, max on the first rank", b, first)
    b = noise() - 30.0; b[last] = 0.0
    add("confident, max on the last rank", b, last)
    b = noise() - 40.0; b[mid] = 0.0; b[other] = -27.5
    add("confident, most mass on another rank", b, mid)
    b = noise() - 30.0; b[first] = b[last] = 0.0
    add("max tied across the first and last rank", b, last)
    b = noise() - 30.0; b[mid] = 0.0
    add("confident, max in the middle, 1e4 offset", b, mid, offset=1e4)
    b = noise(2.0)
    add("1e4 offset", b, int(rng.integers(V)), offset=1e4)
    b = noise(3.0)
    add("plain", b, int(rng.integers(V)))
    b = noise(3.0); b[first] = b[mid] = b[last] = b.max() + 1.0
    add("max tied on three ranks", b, int(rng.integers(V)))
    # The maximum has low-order bits and is alone on its rank; the mass lies on the others: the
    # rescale exp(m_loc − m) of those ranks is where a float32 difference rounds (issue 21).
    b = noise() - 30.0
    b[nz[0][0]:nz[0][1]] = -200.0
    b[first] = 2.0 ** -20 * (1 - 2.0 ** -10)  # just under half an ulp of the ~30 it is subtracted from
    add("confident, max alone on its rank, with low-order bits", b, first)
    return np.stack(rows).astype(np.float32), np.array(ys), names


def off_grid_rows(rng, V, R=8):
    """Confident rows whose differences are inexact in float32 (no grid): every logit and the
    maximum carry low-order bits, so a float32 ``x − max`` rounds in every term, on every shard."""
    x = (rng.normal(size=(R, V)) - 30.0).astype(np.float32)
    y = rng.integers(0, V, R)
    x[np.arange(R), y] = rng.normal(size=R).astype(np.float32)
    return x, y, ["confident, off the grid"] * R


def offset_rows(rng, V, temperature=3.0, R=4):
    """Rows of loss ~1 with a 1e4 offset: ``x/T − m/T`` would round away the low bits (T = 3)."""
    x = (1e4 + temperature * _grid(rng.normal(size=(R, V)) * 2)).astype(np.float32)
    return x, rng.integers(0, V, R), ["1e4 offset, T = %g" % temperature] * R


def row_ce_mp(row, label, *, label_smoothing=0.0, temperature=1.0, softcap=None, dps=50):
    """The exact per-row loss (mpmath) of the float32 row: softcap, temperature, label smoothing."""
    import mpmath

    with mpmath.workdps(dps):
        x = [mpmath.mpf(float(v)) for v in np.asarray(row, dtype=np.float64)]
        if softcap is not None:
            c = mpmath.mpf(softcap)
            x = [c * mpmath.tanh(v / c) for v in x]
        z = [v / mpmath.mpf(temperature) for v in x]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in z))
        eps = mpmath.mpf(label_smoothing)
        V = len(z)
        ce = (1 - eps) * (lse - z[label]) + eps / V * mpmath.fsum(lse - v for v in z)
        return float(ce)


CONTRACT_OPTIONS = [{}, {"label_smoothing": 0.1}, {"temperature": 0.5}, {"temperature": 2.0, "label_smoothing": 0.2}]


def contract_cases(rng, bounds):
    """``[(x, y, names, opts)]``: the contract rows under each of ``CONTRACT_OPTIONS``, 1e4-offset
    rows at ``T = 3``, and softcapped plain rows (a float32 tanh rounds the logits themselves, so only rows of loss ~1 keep 2^-21)."""
    out = []
    for o in CONTRACT_OPTIONS:
        x, y, names = contract_rows(rng, bounds, o.get("temperature", 1.0))
        out.append((x, y, names, {**o, "reduction": "none"}))
    V = bounds[-1][1]
    x, y, names = offset_rows(rng, V)
    out.append((x, y, names, {"temperature": 3.0, "reduction": "none"}))
    x = _grid(rng.normal(size=(4, V)) * 3).astype(np.float32)
    out.append((x, rng.integers(0, V, 4), ["softcapped"] * 4, {"softcap": 20.0, "temperature": 2.0,
                                                                "label_smoothing": 0.1, "reduction": "none"}))
    return out


def contract_errors(loss, x, y, opts):
    """Relative error of each row's loss against mpmath."""
    o = {k: v for k, v in opts.items() if k in ("label_smoothing", "temperature", "softcap")}
    ref = np.array([row_ce_mp(x[i], int(y[i]), **o) for i in range(len(y))])
    return np.abs(np.asarray(loss, np.float64) - ref) / np.abs(ref), ref
