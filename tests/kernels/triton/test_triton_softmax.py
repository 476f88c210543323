"""Softmax / log_softmax / logsumexp Triton kernels in the interpreter against float64 NumPy."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from logitkit.kernels import triton as tk
from _tk_ref import f64, row_stats

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# relative tolerance of an output element (rounded to the dtype) against float64
OUT_TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2**-8, torch.float16: 2**-10}


@pytest.fixture(params=["single", "blocks"])
def blocking(request, monkeypatch):
    if request.param == "blocks":
        monkeypatch.setenv("LOGITKIT_TRITON_BLOCK", "64")
    else:
        monkeypatch.delenv("LOGITKIT_TRITON_BLOCK", raising=False)
    return request.param


def _logits(N, V, dtype, seed=0, offset=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 4
    if offset:  # a common offset must not round into the results
        x[-1] += 1e4 if dtype in (torch.float32, torch.float64) else 100.0
    return x.to(dtype)


def _softmax64(z):
    m, r = row_stats(z)
    ms = np.where(np.isfinite(m), m, 0.0)[:, None]
    with np.errstate(invalid="ignore"):
        p = np.where((m == -np.inf)[:, None], 0.0, np.exp((z - ms) - r[:, None]))
        logp = np.where((m == -np.inf)[:, None], -np.inf, (z - ms) - r[:, None])
    return p, logp, m + r


def _check(got, want, rtol, what, atol=1e-30):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)], err_msg=what)
    err = np.abs(got[fin] - want[fin])
    bound = rtol * np.abs(want[fin]) + atol
    worst = np.max(err / np.maximum(np.abs(want[fin]), 1e-300)) if err.size else 0.0
    assert (err <= bound).all(), f"{what}: worst relative error {worst:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [37, 300])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_forward_matches_float64(blocking, dtype, V, temperature):
    # x / temperature of an offset row is ill-conditioned (one ulp of 1.7e4 moves softmax 1e-3):
    # the offset row is checked at temperature 1 only
    x = _logits(5, V, dtype, seed=V, offset=temperature == 1.0)
    z = f64(x) / temperature
    p_w, logp_w, lse_w = _softmax64(z)
    p = tk.softmax_forward(x, temperature=temperature)
    logp = tk.log_softmax_forward(x, temperature=temperature)
    assert p.dtype == logp.dtype == dtype
    # float16 outputs below 2**-14 are subnormal: an absolute floor of one subnormal step
    atol = 2.0**-24 if dtype == torch.float16 else 1e-30
    if temperature == 1.0:
        _check(f64(p), p_w, OUT_TOL[dtype] * 2, "softmax", atol=atol)
    else:
        # (x - max x) / T rounds once in the accumulation dtype, and exp turns that into
        # |log p| * 2^-24 relative error on small entries (as in tests/test_contract.py)
        arg_tol = (2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23) * np.abs(logp_w)
        err = np.abs(f64(p) - p_w)
        assert (err <= (OUT_TOL[dtype] * 2 + arg_tol) * p_w + atol).all(), "softmax"
    # log_softmax: the error is relative to the row's scale of (z - m), not to tiny entries
    err = np.abs(f64(logp) - logp_w).max()
    assert err <= OUT_TOL[dtype] * 2 * max(np.abs(logp_w).max(), 1.0), err
    if temperature == 1.0:
        lse = tk.logsumexp_forward(x)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _check(f64(lse), lse_w, 1e-12 if dtype == torch.float64 else 2e-7, "logsumexp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_and_out(blocking, dtype):
    x = _logits(4, 300, dtype)
    want = tk.softmax_forward(x)
    buf = torch.empty_like(x)
    assert tk.softmax_forward(x, out=buf) is buf
    xi = x.clone()
    assert tk.softmax_forward(xi, out=xi) is xi
    torch.testing.assert_close(xi, want, rtol=0, atol=0)
    torch.testing.assert_close(buf, want, rtol=0, atol=0)
    xi = x.clone()
    want = tk.log_softmax_forward(x)
    tk.log_softmax_forward(xi, out=xi)
    torch.testing.assert_close(xi, want, rtol=0, atol=0)


def test_special_rows(blocking):
    V = 300
    x = _logits(6, V, torch.float32, seed=2)
    x[0, ::2] = -math.inf
    x[1, :] = -math.inf
    x[2, 3] = math.nan
    x[3, 4] = math.inf
    x[4, :] = 1.5  # ties
    x[5, 7] = x[5, 9] = math.inf
    p = tk.softmax_forward(x)
    logp = tk.log_softmax_forward(x)
    lse = tk.logsumexp_forward(x)
    assert (p[0, ::2] == 0).all() and torch.isfinite(p[0]).all()
    assert logp[0, ::2].eq(-math.inf).all() and not logp[0].isnan().any()
    assert (p[1] == 0).all() and logp[1].eq(-math.inf).all() and lse[1] == -math.inf
    assert p[2].isnan().all() and logp[2].isnan().all() and lse[2].isnan()
    assert p[3].isnan().all() and lse[3] == math.inf and lse[5] == math.inf
    torch.testing.assert_close(p[4], torch.full((V,), 1.0 / V), rtol=2e-7, atol=0)
    assert abs(float(lse[4]) - (1.5 + math.log(V))) < 1e-6
    p_w, _, lse_w = _softmax64(f64(x[:1]))
    _check(f64(p[:1]), p_w, 4e-6, "masked row")


def test_empty_rows_logsumexp():
    assert tk.logsumexp_forward(torch.empty(3, 0)).eq(-math.inf).all()
    assert tk.softmax_forward(torch.empty(0, 5)).shape == (0, 5)


@pytest.mark.parametrize("block", [None, "256"])
def test_confident_row_logsumexp_and_log_softmax(monkeypatch, block):
    if block:
        monkeypatch.setenv("LOGITKIT_TRITON_BLOCK", block)
    else:
        monkeypatch.delenv("LOGITKIT_TRITON_BLOCK", raising=False)
    V = 3001
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, V, generator=g, dtype=torch.float32)
    x[0, 100] = 40.0
    logp = tk.log_softmax_forward(x)
    with mpmath.workdps(50):
        lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in f64(x[0])))
        want = float(40 - lse)  # log p of the confident class, ~ -2e-14
    # float32 rounds the output: compare to its representable neighbourhood
    assert abs(float(logp[0, 100]) - want) <= 2**-21 * abs(want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [37, 300])
def test_backward_matches_float64(blocking, dtype, V):
    g = torch.Generator().manual_seed(V + 1)
    x = _logits(5, V, torch.float64, seed=V)
    p = torch.softmax(x, -1).to(dtype)
    logp = torch.log_softmax(x, -1).to(dtype)
    dy = torch.randn(5, V, generator=g, dtype=torch.float64).to(dtype)
    P, L, D = f64(p), f64(logp), f64(dy)
    want_s = P * (D - (P * D).sum(-1, keepdims=True))
    want_l = D - np.exp(L) * D.sum(-1, keepdims=True)
    got_s = tk.softmax_backward(p, dy)
    got_l = tk.log_softmax_backward(logp, dy)
    tol = 1e-12 if dtype == torch.float64 else (2e-6 if dtype == torch.float32 else OUT_TOL[dtype] * 4)
    # relative to each row's scale (entries cancel: dy - sum term)
    for got, want in ((got_s, want_s), (got_l, want_l)):
        assert got.dtype == dtype
        scale = np.abs(want).max(-1, keepdims=True) + np.abs(D).max(-1, keepdims=True)
        assert (np.abs(f64(got) - want) <= tol * scale).all()
    # in place into dy and into y
    d2 = dy.clone()
    assert tk.softmax_backward(p, d2, out=d2) is d2
    torch.testing.assert_close(d2, got_s, rtol=0, atol=0)
    l2 = logp.clone()
    tk.log_softmax_backward(l2, dy, out=l2)
    torch.testing.assert_close(l2, got_l, rtol=0, atol=0)


def test_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="temperature"):
        tk.softmax_forward(x, temperature=0.0)
    with pytest.raises(ValueError, match="x"):
        tk.softmax_forward(torch.randn(3))
    with pytest.raises(ValueError, match="dy"):
        tk.softmax_backward(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="out"):
        tk.log_softmax_forward(x, out=torch.empty(3, 4, dtype=torch.float64))
