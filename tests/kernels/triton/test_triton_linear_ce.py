"""Linear cross-entropy Triton kernels in the interpreter against float64 NumPy / mpmath."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from logitkit.kernels import triton as tk
from _tk_ref import ce_stage, f64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # 16-wide tiles and 32-class chunks: several tiles, vocabulary slices and backward chunks
    monkeypatch.setenv("LOGITKIT_LCE_TILES", "16,16,16,16")
    monkeypatch.setenv("LOGITKIT_LCE_CHUNK", "32")


def _problem(N, H, V, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100
    return h, W, b, y


# float32 accumulation of H products: errors relative to the scale of each quantity
TOL = {torch.float32: 3e-6, torch.bfloat16: 3e-6, torch.float16: 3e-6, torch.float64: 1e-12}
# gradients are rounded to the input dtype; the interpreter converts float32 -> bfloat16 by
# truncation (the GPU rounds to nearest), so bfloat16 allows one spacing (2**-7) per rounding
GTOL = {torch.float32: 3e-6, torch.bfloat16: 2**-6, torch.float16: 2**-10, torch.float64: 1e-12}

OPTIONS = [
    {},
    {"bias": True},
    {"label_smoothing": 0.1, "weight": True},
    {"softcap": 3.0, "temperature": 0.8, "z_loss": 0.01, "bias": True},
    {"label_smoothing": 0.05, "z_loss": 1e-3, "temperature": 1.3, "weight": True},
]


def _rel(got, want):
    return float(np.abs(f64(got) - want).max() / max(np.abs(want).max(), 1e-300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_matches_float64(dtype, opt):
    N, H, V = 21, 24, 70  # odd sizes: partial tiles everywhere
    opt = dict(opt)
    h, W, b, y = _problem(N, H, V, dtype, bias=opt.pop("bias", False))
    if opt.pop("weight", False):
        opt["weight"] = torch.linspace(0.5, 1.5, V)
    ref_opt = {k: (f64(v) if isinstance(v, torch.Tensor) else v) for k, v in opt.items()}
    fwd_opt = {k: v for k, v in opt.items() if k != "z_loss"}
    g_ce = torch.linspace(0.5, 1.5, N)
    g_z = torch.linspace(2.0, 1.0, N)
    ce, m, r = tk.linear_ce_forward(h, W, y, b, **fwd_opt)
    x = f64(h) @ f64(W).T + (f64(b) if b is not None else 0.0)
    ce_w, m_w, r_w, dx_w = ce_stage(x, y.numpy(), f64(g_ce), f64(g_z), **ref_opt)
    tol = TOL[dtype]
    assert np.abs(f64(ce) - ce_w).max() <= tol * np.abs(ce_w).max()
    assert np.abs((f64(m) + f64(r)) - (m_w + r_w)).max() <= tol * np.abs(m_w + r_w).max()
    assert ce[1] == 0
    dh, dW, db, skipped = tk.linear_ce_backward(h, W, y, m, r, g_ce, g_z, b, **opt)
    assert dh.dtype == h.dtype and dW.dtype == W.dtype and int(skipped) == 0
    # dz is rounded to the input dtype before the two products (as in any bf16 backward), so
    # the bound is elementwise: GTOL * (|dz| @ |W|), which also covers rounding the output
    aw, ah, ad = np.abs(f64(W)), np.abs(f64(h)), np.abs(dx_w)
    assert (np.abs(f64(dh) - dx_w @ f64(W)) <= GTOL[dtype] * (ad @ aw) + 1e-30).all()
    assert (np.abs(f64(dW) - dx_w.T @ f64(h)) <= GTOL[dtype] * (ad.T @ ah) + 1e-30).all()
    if b is not None:
        assert db.dtype == b.dtype
        assert (np.abs(f64(db) - dx_w.sum(0)) <= GTOL[dtype] * ad.sum(0) + 1e-30).all()
    else:
        assert db is None


def test_single_chunk_and_big_tiles_agree(monkeypatch):
    h, W, b, y = _problem(9, 16, 40, torch.float32, seed=3, bias=True)
    g = torch.ones(9)
    ce1, m1, r1 = tk.linear_ce_forward(h, W, y, b)
    out1 = tk.linear_ce_backward(h, W, y, m1, r1, g, g, b)
    monkeypatch.setenv("LOGITKIT_LCE_TILES", "32,64,16,32")
    monkeypatch.setenv("LOGITKIT_LCE_CHUNK", "4096")
    ce2, m2, r2 = tk.linear_ce_forward(h, W, y, b)
    out2 = tk.linear_ce_backward(h, W, y, m2, r2, g, g, b)
    torch.testing.assert_close(ce1, ce2, rtol=2e-6, atol=1e-7)
    for a, c in zip(out1[:3], out2[:3]):  # other summation orders: float32 rounding apart
        torch.testing.assert_close(a, c, rtol=0, atol=2e-6 * float(a.abs().max()))


def test_confident_row_exact_logits():
    """Inputs whose products and sums are exact in float32, so the logits are exact: the label
    logit is 40 and the loss (~1e-10) must keep its relative accuracy against mpmath."""
    N, H, V = 3, 16, 50
    g = torch.Generator().manual_seed(4)
    h = torch.zeros(N, H)
    h[:, 0] = 8.0
    h[:, 1:] = torch.randint(-4, 5, (N, H - 1), generator=g) / 16
    W = torch.randint(-8, 9, (V, H), generator=g) / 16
    W[7, 0] = 5.0
    W[7, 1:] = 0.0
    y = torch.tensor([7, 7, 7])
    ce, m, r = tk.linear_ce_forward(h, W, y)
    dh, dW, _, _ = tk.linear_ce_backward(h, W, y, m, r, torch.ones(N), torch.zeros(N))
    z = f64(h) @ f64(W).T
    for i in range(N):
        with mpmath.workdps(50):
            s = mpmath.fsum(mpmath.exp(mpmath.mpf(v) - mpmath.mpf(z[i, 7])) for v in z[i])
            loss = float(mpmath.log(s))
        assert 0 < loss < 1e-6
        assert abs(float(ce[i]) - loss) <= 2**-21 * loss


def test_filter_eps_skips_and_stays_close():
    # rows 0-15 put their mass on classes 0-15, rows 16-31 on classes 16-31; every other
    # (16-row, 16-class) tile has softmax values near exp(-30): 10 of the 12 tiles can be skipped
    N, H, V = 32, 16, 96
    g = torch.Generator().manual_seed(5)
    h = torch.randn(N, H, generator=g) * 0.01
    h[:16, 0] += 10.0
    h[16:, 1] += 10.0
    W = torch.randn(V, H, generator=g) * 0.01
    W[:16, 0] += 3.0
    W[16:32, 1] += 3.0
    W[32:, :2] -= 1.0
    y = torch.arange(N)
    g = torch.full((N,), 1.0 / N)
    ce, m, r = tk.linear_ce_forward(h, W, y)
    exact = tk.linear_ce_backward(h, W, y, m, r, g, g)
    filt = tk.linear_ce_backward(h, W, y, m, r, g, g, filter_eps=1e-6)
    assert int(exact[3]) == 0
    assert int(filt[3]) == 10
    # everything skipped is below eps in probability: the gradients move by less than that
    for a, c in zip(exact[:2], filt[:2]):
        assert float((a - c).abs().max()) <= 1e-6 * 16 * float(h.abs().max() + W.abs().max())
    with pytest.raises(ValueError, match="filter_eps"):
        tk.linear_ce_backward(h, W, y, m, r, g, g, label_smoothing=0.1, filter_eps=1e-6)


def test_bad_label_and_errors():
    h, W, _, y = _problem(5, 16, 20, torch.float32)
    y[2] = 20
    flag = tk.label_flag(h.device)
    tk.reset_flag(flag)
    ce, m, r = tk.linear_ce_forward(h, W, y)
    assert ce[2].isnan() and ce[0].isfinite()
    dh, dW, _, _ = tk.linear_ce_backward(h, W, y, m, r, torch.ones(5), torch.ones(5))
    assert dh[2].isnan().all() and dh[0].isfinite().all()
    with pytest.raises(ValueError, match="first at row 2"):
        tk.check_flag(flag)
    with pytest.raises(ValueError, match="linear_weight"):
        tk.linear_ce_forward(h, W[:, :5], y)
    with pytest.raises(TypeError, match="linear_weight"):
        tk.linear_ce_forward(h, W.double(), y)
    with pytest.raises(ValueError, match="linear_bias"):
        tk.linear_ce_forward(h, W, y, torch.zeros(3))
