"""Linear-head outputs (lse, logprobs, entropy) on Triton, in the interpreter, against float64."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from logitkit.kernels import triton as tk
from logitkit.kernels.triton import linear_head as LH
from _tk_ref import f64

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
    y[6] = -100
    return h, W, b, y


def _reference(h, W, b, y, g_lse, g_lp, g_ent, softcap=None, temperature=1.0, ignore_index=-100):
    """float64 torch autograd of sum g_lse lse + g_lp logprobs + g_ent entropy (ignored rows 0)."""
    h64 = h.detach().double().requires_grad_(True)
    W64 = W.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    z = h64 @ W64.T + (b64 if b64 is not None else 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    ls = torch.log_softmax(z, -1)
    keep = torch.ones(h.shape[0], dtype=torch.bool) if y is None else y != ignore_index
    lse = torch.where(keep, torch.logsumexp(z, -1), 0.0)
    ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
    lp = None
    obj = (g_lse * lse).sum() + (g_ent * ent).sum()
    if y is not None:
        lp = torch.where(keep, ls.gather(1, torch.where(keep, y, 0)[:, None])[:, 0], 0.0)
        obj = obj + (g_lp * lp).sum()
    grads = torch.autograd.grad(obj, [t for t in (h64, W64, b64) if t is not None])
    return lse.detach(), (lp.detach() if lp is not None else None), ent.detach(), grads


def _rel(got, want):
    got, want = f64(got), want.detach().numpy()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


TOL = {torch.float32: 3e-6, torch.bfloat16: 3e-6, torch.float64: 1e-12}
# gradients are rounded to the input dtype (the interpreter truncates float32 -> bfloat16)
GTOL = {torch.float32: 3e-6, torch.bfloat16: 2**-6, torch.float64: 1e-12}
OPTIONS = [{}, {"bias": True}, {"softcap": 3.0, "temperature": 0.8, "bias": True}, {"temperature": 1.7},
           {"no_labels": True}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_forward_and_backward_match_float64(dtype, opt):
    N, H, V = 21, 24, 70  # odd sizes: partial tiles everywhere
    opt = dict(opt)
    h, W, b, y = _problem(N, H, V, dtype, bias=opt.pop("bias", False))
    if opt.pop("no_labels", False):
        y = None
    g = torch.Generator().manual_seed(9)
    g_lse, g_lp, g_ent = (torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3))
    lse, lp, ent, m, r = tk_forward(h, W, y, b, **opt)
    lse_w, lp_w, ent_w, grads_w = _reference(h, W, b, y, g_lse, g_lp if y is not None else 0.0, g_ent, **opt)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.dtype == ent.dtype == m.dtype == r.dtype == acc
    assert _rel(lse, lse_w) <= TOL[dtype] and _rel(ent, ent_w) <= TOL[dtype]
    if y is None:
        assert lp is None
    else:
        assert _rel(lp, lp_w) <= TOL[dtype]
        assert lp[1] == 0 and ent[1] == 0 and lse[1] == 0  # ignored row
    torch.testing.assert_close(f64(m + r)[np.asarray(y != -100) if y is not None else slice(None)],
                               torch.logsumexp(_logits64(h, W, b, **opt), -1).numpy()[
                                   np.asarray(y != -100) if y is not None else slice(None)],
                               rtol=TOL[dtype], atol=0)
    dh, dW, db = LH.linear_head_backward(h, W, y, m, r, ent, g_lse.to(acc), g_lp.to(acc) if y is not None else None,
                                         g_ent.to(acc), b, **opt)
    assert dh.dtype == dtype and dW.dtype == dtype and dh.shape == h.shape and dW.shape == W.shape
    assert _rel(dh, grads_w[0]) <= GTOL[dtype]
    assert _rel(dW, grads_w[1]) <= GTOL[dtype]
    if b is not None:
        assert db.dtype == dtype and _rel(db, grads_w[2]) <= GTOL[dtype]
    else:
        assert db is None
    if y is not None:
        assert (dh[1] == 0).all() and (dh[6] == 0).all()  # ignored rows: no gradient
    tk.check_labels()


def tk_forward(h, W, y, b, **opt):
    return LH.linear_head_forward(h, W, y, b, **opt)


def _logits64(h, W, b, softcap=None, temperature=1.0):
    z = h.double() @ W.double().T + (b.double() if b is not None else 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@pytest.mark.parametrize("which", ["lse", "logprobs", "entropy"])
def test_each_output_alone_and_scalar_cotangents(which):
    h, W, b, y = _problem(10, 16, 50, torch.float32, seed=3)
    lse, lp, ent, m, r = LH.linear_head_forward(h, W, y)
    g = {"lse": (0.5, None, None), "logprobs": (None, 0.5, None), "entropy": (None, None, 0.5)}[which]
    dh, dW, _ = LH.linear_head_backward(h, W, y, m, r, ent, *g)
    ref = _reference(h, W, None, y, *(0.0 if v is None else v for v in g))[3]
    assert _rel(dh, ref[0]) <= 3e-6 and _rel(dW, ref[1]) <= 3e-6
    # no cotangent at all: zero gradients
    dh0, dW0, _ = LH.linear_head_backward(h, W, y, m, r, ent, None, None, None)
    assert (dh0 == 0).all() and (dW0 == 0).all()


def test_confident_row_keeps_relative_accuracy():
    """A label logit 40 above the others: logprob ~ -1e-16 and entropy ~ 1e-15, against mpmath."""
    H, V = 8, 40
    g = torch.Generator().manual_seed(5)
    h = torch.zeros(2, H)
    h[:, 0] = 1.0
    W = torch.randn(V, H, generator=g) * 0.1
    W[7, 0] = 40.0
    W[:, 1:] = 0.0
    y = torch.tensor([7, 7])
    lse, lp, ent, m, r = LH.linear_head_forward(h, W, y)
    z = [float(v) for v in (h[0].double() @ W.double().T)]
    with mpmath.workdps(50):
        e = [mpmath.exp(mpmath.mpf(v) - 40) for v in z]
        s = mpmath.fsum(e)
        ls = [mpmath.mpf(v) - 40 - mpmath.log(s) for v in z]
        want_lp = float(ls[7])
        want_ent = float(-mpmath.fsum(mpmath.exp(v) * v for v in ls))
    assert want_lp < -1e-18 and 1e-17 < want_ent < 1e-12
    assert abs(float(lp[0]) - want_lp) <= 2**-20 * abs(want_lp)
    assert abs(float(ent[0]) - want_ent) <= 2**-18 * want_ent


def test_bad_label_is_nan_and_raised_later():
    h, W, _, y = _problem(8, 16, 20, torch.float32)
    y[3] = 25
    lse, lp, ent, m, r = LH.linear_head_forward(h, W, y)
    assert lp[3].isnan() and lp[0].isfinite() and ent.isfinite().all()
    dh, _, _ = LH.linear_head_backward(h, W, y, m, r, ent, None, torch.ones(8), None)
    assert dh[3].isnan().all() and dh[0].isfinite().all()
    with pytest.raises(ValueError, match=r"first at row 3 \(value 25\)"):
        LH.linear_head_forward(h, W, torch.zeros(8, dtype=torch.long))


def test_argument_errors_and_empty_batch():
    h, W, _, y = _problem(8, 8, 10, torch.float32)
    lse, lp, ent, m, r = LH.linear_head_forward(h, W, y)
    with pytest.raises(ValueError, match="g_logprobs"):
        LH.linear_head_backward(h, W, None, m, r, ent, None, 1.0, None)
    with pytest.raises(ValueError, match="entropy"):
        LH.linear_head_backward(h, W, y, m, r, None, None, None, 1.0)
    with pytest.raises(ValueError, match="m"):
        LH.linear_head_backward(h, W, y, m[:2], r, ent, 1.0, None, None)
    with pytest.raises(ValueError, match="linear_weight"):
        LH.linear_head_forward(h, W[:, :3], y)
    e_lse, e_lp, e_ent, _, _ = LH.linear_head_forward(h[:0], W, y[:0])
    assert e_lse.shape == e_lp.shape == e_ent.shape == (0,)
    _, no_lp, _, _, _ = LH.linear_head_forward(h, W)  # no labels: no logprobs, nothing ignored
    assert no_lp is None


@pytest.mark.parametrize("weighted", [False, True])
def test_smoothing_cotangent_gives_the_cross_entropy_gradient(weighted):
    """g_smooth (of -sum_c w_c z_c) with g_lp and g_lse: the gradient of weighted, smoothed CE."""
    N, H, V, eps = 9, 16, 40, 0.2
    h, W, b, y = _problem(N, H, V, torch.float32, seed=4, bias=True)
    g = torch.Generator().manual_seed(8)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    gce = torch.randn(N, generator=g, dtype=torch.float64)
    opt = dict(softcap=4.0, temperature=0.9)
    lse, lp, ent, m, r = LH.linear_head_forward(h, W, y, b, **opt)
    keep = y != -100
    wy = (w[torch.where(keep, y, 0)] if weighted else torch.ones(N, dtype=torch.float64)) * keep
    wsum = float(w.sum()) if weighted else float(V)
    f = lambda t: t.to(torch.float32)  # noqa: E731
    dh, dW, db = LH.linear_head_backward(h, W, y, m, r, None, f(gce * (eps / V) * wsum), f(-gce * (1 - eps) * wy),
                                         None, b, g_smooth=f(gce * (eps / V)), weight=w, **opt)
    h64, W64, b64 = (t.detach().double().requires_grad_(True) for t in (h, W, b))
    z = _logits64(h64, W64, b64, **opt)
    ce = torch.nn.functional.cross_entropy(z, y, weight=w, label_smoothing=eps, reduction="none")
    want = torch.autograd.grad((gce * ce).sum(), (h64, W64, b64))
    assert _rel(dh, want[0]) <= 3e-6 and _rel(dW, want[1]) <= 3e-6 and _rel(db, want[2]) <= 3e-6
    assert (dh[1] == 0).all() and (dh[6] == 0).all()
