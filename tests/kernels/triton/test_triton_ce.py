"""Cross-entropy Triton kernels in the interpreter against float64 / mpmath references."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from logitkit.kernels import triton as tk
from _tk_ref import ce_stage, f64

# NaN / inf rows make NumPy (the interpreter's engine) warn; those values are what the tests check.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (tolerance on ce/m/r relative to the row's scale, on gradients relative to max |grad|)
TOL = {torch.float32: (2e-6, 2e-6), torch.float64: (1e-12, 1e-12),
       torch.bfloat16: (2e-6, 2**-7), torch.float16: (2e-6, 2**-10)}


@pytest.fixture(params=["single", "blocks"])
def blocking(request, monkeypatch):
    """Run each test with the whole row in one block, and with 64-wide blocks (multi-block rows)."""
    if request.param == "blocks":
        monkeypatch.setenv("LOGITKIT_TRITON_BLOCK", "64")
    else:
        monkeypatch.delenv("LOGITKIT_TRITON_BLOCK", raising=False)
    return request.param


def _logits(N, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(N, V, seed=1, ignore=(1,)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        y[i] = -100
    return y


def _close(got, want, rtol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = max(float(np.nanmax(np.abs(want))), 1e-30) if want.size else 1.0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern")
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(np.isinf(got[ok]), np.isinf(want[ok]), err_msg=f"{what}: inf pattern")
    fin = ok & np.isfinite(want)
    err = np.abs(got[fin] - want[fin])
    assert err.size == 0 or err.max() <= rtol * scale, \
        f"{what}: max error {err.max():.3g} > {rtol:.1g} * {scale:.3g}"


OPTIONS = [
    {},
    {"weight": True},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.2, "weight": True},
    {"z_loss": 1e-2},
    {"softcap": 5.0},
    {"temperature": 0.7},
    {"softcap": 4.0, "temperature": 1.5, "label_smoothing": 0.05, "z_loss": 1e-3, "weight": True},
    {"label_smoothing": 1.0},
    {"ignore_index": 3},
]


def _opts(o, V, dtype):
    o = dict(o)
    if o.pop("weight", False):
        g = torch.Generator().manual_seed(7)
        o["weight"] = torch.rand(V, generator=g, dtype=torch.float64).to(torch.float32) + 0.5
    return o


def _ref_opts(o):
    return {k: (f64(v) if isinstance(v, torch.Tensor) else v) for k, v in o.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [37, 300])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_forward_backward_matches_float64(blocking, dtype, V, opt):
    N = 5
    x = _logits(N, V, dtype, seed=V)
    y = _labels(N, V)
    if opt.get("ignore_index") == 3:
        y[y == -100] = 3
        y[2] = 3
    o = _opts(opt, V, dtype)
    g_ce = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.25])
    g_z = torch.tensor([1.0, 0.0, 3.0, 0.5, 2.0])
    ce, m, r, dx = tk.ce_forward_backward(x, y, g_ce, g_z, **o)
    ce_w, m_w, r_w, dx_w = ce_stage(f64(x), y.numpy(), f64(g_ce), f64(g_z), **_ref_opts(o))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert ce.dtype == m.dtype == r.dtype == acc and dx.dtype == dtype and dx.shape == x.shape
    tol_s, tol_g = TOL[dtype]
    _close(f64(ce), ce_w, tol_s, "ce")
    _close(f64(m), m_w, tol_s, "m")
    _close(f64(r), r_w, tol_s, "r")
    _close(f64(dx), dx_w, tol_g, "grad")
    # the separate stages agree with the fused one
    zl = o.pop("z_loss", 0.0)
    ce2, m2, r2 = tk.ce_forward(x, y, **o)
    torch.testing.assert_close(ce2, ce, rtol=0, atol=0)
    dx2 = tk.ce_backward(x, y, m2, r2, g_ce, g_z, z_loss=zl, **o)
    torch.testing.assert_close(f64(dx2), f64(dx), rtol=0, atol=float(tol_g * np.abs(dx_w).max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_and_out(blocking, dtype):
    x = _logits(6, 300, dtype, seed=3)
    y = _labels(6, 300, ignore=(0, 4))
    g = torch.full((6,), 0.25)
    _, _, _, want = ce_stage(f64(x), y.numpy(), 0.25, 0.25, label_smoothing=0.1)
    buf = torch.empty_like(x)
    _, _, _, got = tk.ce_forward_backward(x, y, g, g, label_smoothing=0.1, out=buf)
    assert got is buf
    xi = x.clone()
    _, _, _, got_in = tk.ce_forward_backward(xi, y, g, g, label_smoothing=0.1, out=xi)
    assert got_in is xi
    torch.testing.assert_close(xi, buf, rtol=0, atol=0)
    _close(f64(xi), want, TOL[dtype][1], "in-place grad")
    assert torch.all(xi[0] == 0) and torch.all(xi[4] == 0)  # ignored rows: exact zeros


def test_scalar_row_scales_broadcast(blocking):
    x = _logits(5, 37, torch.float32)
    y = _labels(5, 37)
    _, _, _, a = tk.ce_forward_backward(x, y, 0.5, 2.0, z_loss=0.1)
    _, _, _, b = tk.ce_forward_backward(x, y, torch.full((5,), 0.5), torch.full((5,), 2.0), z_loss=0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_minus_inf_masking_and_special_rows(blocking):
    V = 300
    x = _logits(7, V, torch.float32, seed=11)
    x[0, ::3] = -math.inf                  # masked entries
    x[1, :] = -math.inf                    # fully masked, ignored
    x[2, :] = -math.inf                    # fully masked, not ignored: loss inf, no NaN grad
    x[3, 5] = math.nan                     # NaN: that row only
    x[4, 7] = math.inf                     # +inf: NaN for that row only
    x[5, :] = 2.0                          # all ties
    x[6] += 1e4                            # large common offset
    x = x.to(torch.float32)
    y = torch.tensor([1, -100, 4, 2, 3, 9, 10])
    g = torch.ones(7)
    ce, m, r, dx = tk.ce_forward_backward(x, y, g, g)
    ce_w, m_w, r_w, dx_w = ce_stage(f64(x), y.numpy(), 1.0, 1.0)
    assert ce[0].isfinite() and torch.isfinite(dx[0]).all()
    assert (dx[0, ::3] == 0).all()
    assert ce[1] == 0 and (dx[1] == 0).all() and m[1] == -math.inf and r[1] == 0
    assert ce[2] == math.inf and not dx[2].isnan().any()
    assert ce[3].isnan() and dx[3].isnan().all()
    assert ce[4].isnan() and dx[4].isnan().all()
    for i in (0, 2, 5, 6):
        _close(f64(ce[i:i + 1]), ce_w[i:i + 1], 2e-6, f"ce row {i}")
        _close(f64(dx[i]), dx_w[i], 2e-6, f"grad row {i}")
    assert abs(float(r[5]) - math.log(V)) <= 2e-6 * math.log(V)
    # offset row: the loss keeps its relative accuracy (no 1e4 rounded into lse)
    assert abs(float(ce[6]) - ce_w[6]) <= 2**-21 * ce_w[6] * 4


def test_ignored_nan_row_is_zero(blocking):
    x = _logits(3, 37, torch.float32)
    x[1, 3] = math.nan
    y = torch.tensor([0, -100, 2])
    ce, _, _, dx = tk.ce_forward_backward(x, y, torch.ones(3), torch.ones(3))
    assert ce[1] == 0 and (dx[1] == 0).all()


@pytest.mark.parametrize("block", [None, "256"])
def test_confident_row_against_mpmath(monkeypatch, block):
    """Label logit 40, others N(0, 1): loss ~ 1e-14 keeps full relative accuracy."""
    if block:
        monkeypatch.setenv("LOGITKIT_TRITON_BLOCK", block)
    else:
        monkeypatch.delenv("LOGITKIT_TRITON_BLOCK", raising=False)
    V = 3001
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, V, generator=g, dtype=torch.float32)
    x[0, 17] = 40.0
    x[1, 2000] = 40.0
    x[1, 2001] = 40.0  # a tie at the max
    y = torch.tensor([17, 2000])
    ce, m, r, dx = tk.ce_forward_backward(x, y, torch.ones(2), torch.zeros(2))
    for i in range(2):
        row = f64(x[i])
        with mpmath.workdps(50):
            terms = [mpmath.exp(mpmath.mpf(v) - 40) for v in row]
            s = mpmath.fsum(terms)
            loss = float(mpmath.log(s))
            p_label_minus_1 = float(mpmath.exp(-mpmath.log(s)) - 1)
        assert abs(float(ce[i]) - loss) <= 2**-21 * abs(loss), (float(ce[i]), loss)
        assert abs(float(dx[i, int(y[i])]) - p_label_minus_1) <= 2**-20 * abs(p_label_minus_1)
    assert 1e-15 < float(ce[0]) < 1e-12


def test_bad_labels_flag(blocking):
    x = _logits(5, 37, torch.float32)
    y = torch.tensor([0, 37, -100, -5, 3])
    flag = tk.label_flag(x.device)
    tk.reset_flag(flag)
    ce, m, r, dx = tk.ce_forward_backward(x, y, torch.ones(5), torch.ones(5))
    assert ce[1].isnan() and ce[3].isnan() and dx[1].isnan().all() and dx[3].isnan().all()
    assert ce[0].isfinite() and ce[2] == 0 and ce[4].isfinite() and dx[4].isfinite().all()
    with pytest.raises(ValueError, match=r"labels: 2 row\(s\).*\[0, 37\).*first at row 1 \(value 37\)"):
        tk.check_flag(flag, y)
    tk.check_flag(flag)  # cleared by the raise
    tk.ce_forward(x, torch.tensor([0, 1, 2, 3, 4]))
    tk.check_flag(flag)  # good labels leave it clear


def test_argument_errors():
    x = _logits(3, 5, torch.float32)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        tk.ce_forward(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight"):
        tk.ce_forward(x, y, weight=torch.ones(4))
    with pytest.raises(TypeError, match="labels"):
        tk.ce_forward(x, y.float())
    with pytest.raises(ValueError, match="labels"):
        tk.ce_forward(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="x"):
        tk.ce_forward(x.long(), y)
    with pytest.raises(ValueError, match="out"):
        tk.ce_backward(x, y, torch.zeros(3), torch.zeros(3), 1.0, 1.0, out=torch.empty(3, 4))
    with pytest.raises(ValueError, match="g_ce"):
        tk.ce_forward_backward(x, y, torch.ones(2), 1.0)


def test_empty_batch():
    x = torch.empty(0, 11)
    ce, m, r, dx = tk.ce_forward_backward(x, torch.empty(0, dtype=torch.long), torch.ones(0), torch.ones(0))
    assert ce.shape == m.shape == r.shape == (0,) and dx.shape == (0, 11)


def test_strided_rows(blocking):
    base = _logits(5, 80, torch.float32)
    x = base[:, :37]  # row stride 80
    y = _labels(5, 37)
    ce, m, r, dx = tk.ce_forward_backward(x, y, torch.ones(5), torch.ones(5))
    ce_w, _, _, dx_w = ce_stage(f64(x), y.numpy(), 1.0, 1.0)
    _close(f64(ce), ce_w, 2e-6, "ce")
    _close(f64(dx), dx_w, 2e-6, "grad")


@pytest.mark.parametrize("opt", [{}, {"label_smoothing": 0.1, "softcap": 5.0, "temperature": 0.8}],
                         ids=["plain", "options"])
def test_agrees_with_logitkit_reference(blocking, opt):
    """The package's own float64 oracle (``logitkit.reference``) agrees too (reduction="none")."""
    reference = pytest.importorskip("logitkit.reference")
    x = _logits(6, 300, torch.float32, seed=21)
    y = _labels(6, 300, ignore=(2,))
    w = torch.linspace(0.5, 2.0, 300)
    ce, _, _, dx = tk.ce_forward_backward(x, y, torch.ones(6), torch.ones(6), weight=w, **opt)
    want = reference.cross_entropy64(f64(x), y.numpy(), weight=f64(w), reduction="none", **opt)
    grad = reference.cross_entropy_grad64(f64(x), y.numpy(), weight=f64(w), reduction="none", **opt)
    _close(f64(ce), want, 2e-6, "ce")
    _close(f64(dx), grad, 2e-6, "grad")


@pytest.mark.parametrize("opt", [{"temperature": 3.0}, {"temperature": 0.7}, {"softcap": 2e4, "temperature": 3.0},
                                 {"softcap": 1e4}])
def test_issue13_item2_offset_rows_with_temperature_and_softcap(opt):
    """A 1e4 common offset with T != 1 or a softcap: loss within 2^-21 of mpmath, softmax too."""
    pytest.importorskip("mpmath")
    from logitkit import reference as R

    rng = np.random.default_rng(132)
    x = np.stack([np.array([10000.346, 10000.821] + [-np.inf] * 62, np.float32),
                  (1e4 + rng.standard_normal(64)).astype(np.float32)])
    y = np.array([1, 9])
    exact = [-R.row_log_softmax_mp(row[np.isfinite(row)], 40, **opt)[lab] for row, lab in zip(x, y)]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ce, m, r = tk.ce_forward(xt, yt, **opt)
    ce2, _, _, _ = tk.ce_forward_backward(xt, yt, torch.ones(2), torch.zeros(2), **opt)
    for got in (ce, ce2):
        err = np.abs(got.double().numpy() - exact) / np.array(exact)
        assert err.max() <= 2.0 ** -21, err
    if "softcap" not in opt:
        logp = R.row_log_softmax_mp(x[1], 40, temperature=opt["temperature"])
        got = tk.log_softmax_forward(xt, temperature=opt["temperature"])[1].double().numpy()
        assert np.max(np.abs(got - logp) / np.abs(logp)) <= 2.0 ** -21
