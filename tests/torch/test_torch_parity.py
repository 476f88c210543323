"""Parity of logitkit.torch with torch.nn.functional: values and gradients over a grid of shapes,
dtypes and options, on the fused kernels and on the core."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import logitkit.torch as lt  # noqa: E402
from logitkit.kernels import registry  # noqa: E402

from _torch_ref import assert_close, ref_cross_entropy  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
C = 9

# shape name -> (input shape, target shape); class dim 1 (or 0 for 1-D input)
SHAPES = {
    "2d": ((6, C), (6,)),
    "kdim": ((3, C, 4), (3, 4)),
    "k2": ((2, C, 2, 3), (2, 2, 3)),
    "1d": ((C,), ()),
    "empty": ((0, C), (0,)),
}

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": True},
    "ignore_index=3": {"ignore_index": 3},
    "smooth": {"label_smoothing": 0.15},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "z_loss": {"z_loss": 0.02},
    "softcap": {"softcap": 2.5},
    "temperature": {"temperature": 0.6},
    "all-mean": {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 3.0,
                 "temperature": 1.7},
    "all-sum": {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 3.0,
                "temperature": 0.8, "reduction": "sum"},
    "all-none": {"weight": True, "ignore": True, "label_smoothing": 0.3, "z_loss": 0.05, "softcap": 1.5,
                 "reduction": "none"},
}


@pytest.fixture(params=["kernels", "core"])
def backend(request):
    """Each test once on the registry's kernels (numba on CPU when installed) and once on the core."""
    if request.param == "core":
        with registry.use_core():
            yield "core"
    else:
        yield "kernels"


def _make(shape_name, dtype, opts, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ts = SHAPES[shape_name]
    x = (torch.randn(xs, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, C, ts, generator=g)
    kw = {k: v for k, v in opts.items() if k not in ("weight", "ignore")}
    if opts.get("weight"):
        kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    if opts.get("ignore") and y.numel():
        y.view(-1)[::3] = -100
    return x, y, kw


def _grad_output(loss, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_cross_entropy_index_parity(backend, opt, shape, dtype):
    x, y, kw = _make(shape, dtype, OPTIONS[opt])
    x.requires_grad_(True)
    loss = lt.cross_entropy(x, y, **kw)
    assert loss.dtype == dtype
    x64 = x.detach().double().requires_grad_(True)
    kw64 = dict(kw, weight=None if kw.get("weight") is None else kw["weight"].double())
    ref = ref_cross_entropy(x64, y, **kw64)
    assert loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss")
    go = _grad_output(ref)
    (gx,) = torch.autograd.grad(loss, x, go.to(loss.dtype))
    (gref,) = torch.autograd.grad(ref, x64, go)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert_close(gx, gref, dtype, "grad")


def test_v1_and_unweighted_torch_agree(backend):
    # V = 1: the loss is 0 and so is the gradient, exactly as torch (float64).
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(5, dtype=torch.long)
    for red in ("mean", "sum", "none"):
        ours, ref = lt.cross_entropy(x, y, reduction=red), F.cross_entropy(x, y, reduction=red)
        torch.testing.assert_close(ours, ref)
        (g1,) = torch.autograd.grad(ours.sum(), x)
        (g2,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["2d", "kdim", "1d", "empty"])
@pytest.mark.parametrize("opt", ["plain", "weight", "smooth", "sum", "none", "z_loss", "softcap", "all-mean",
                                 "all-none"])
def test_cross_entropy_prob_parity(backend, opt, shape, dtype):
    x, _, kw = _make(shape, dtype, {k: v for k, v in OPTIONS[opt].items() if k != "ignore"})
    g = torch.Generator().manual_seed(5)
    t = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), dim=0 if x.ndim == 1 else 1)
    if t.numel():
        t.view(-1)[::4] = 0.0  # zero targets take no part (no 0·inf)
    t = t.to(dtype)
    x.requires_grad_(True)
    loss = lt.cross_entropy(x, t, **kw)
    x64 = x.detach().double().requires_grad_(True)
    kw64 = dict(kw, weight=None if kw.get("weight") is None else kw["weight"].double())
    ref = ref_cross_entropy(x64, t.double(), **kw64)
    assert_close(loss, ref, dtype, "loss")
    go = _grad_output(ref)
    (gx,) = torch.autograd.grad(loss, x, go.to(loss.dtype))
    (gref,) = torch.autograd.grad(ref, x64, go)
    assert_close(gx, gref, dtype, "grad")


def test_prob_targets_gradients_in_target_and_weight():
    # torch's probability-target loss is differentiable in target and weight: so is ours.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(4, 6, 3, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    kw = dict(label_smoothing=0.2)
    ours = torch.autograd.grad(lt.cross_entropy(x, t, weight=w, **kw), (x, t, w))
    ref = torch.autograd.grad(F.cross_entropy(x, t, weight=w, **kw), (x, t, w))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_weight_requiring_grad_with_class_indices_is_refused():
    x = torch.randn(3, 4)
    w = torch.rand(4, requires_grad=True)
    with pytest.raises(ValueError, match="weight"):
        lt.cross_entropy(x, torch.tensor([0, 1, 2]), weight=w)


# ----------------------------------------------------------------------------------------------
# special rows


def test_all_ignored_mean_is_zero_with_zero_gradient(backend):
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.full((4,), -100)
    loss = lt.cross_entropy(x, y, z_loss=0.1)
    assert loss.item() == 0.0
    assert torch.isnan(F.cross_entropy(x.detach(), y))  # torch's NaN: the documented difference
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.equal(gx, torch.zeros_like(x))


def test_empty_batch_mean_is_zero(backend):
    x = torch.randn(0, 5, requires_grad=True)
    loss = lt.cross_entropy(x, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.shape == (0, 5)


def test_masked_logits_never_nan(backend):
    x = torch.randn(4, 6, dtype=torch.float64)
    x[0, 2:] = -torch.inf           # partially masked row
    x[3, :] = -torch.inf            # fully masked row, ignored
    y = torch.tensor([1, 0, 5, -100])
    x.requires_grad_(True)
    loss = lt.cross_entropy(x, y, label_smoothing=0.0)
    ref = F.cross_entropy(x[:3], y[:3], reduction="sum") / 3
    torch.testing.assert_close(loss, ref)
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gx).all() and torch.equal(gx[3], torch.zeros(6, dtype=torch.float64))
    (gref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(gx[:3], gref[:3])


def test_large_offset_and_confident_rows_float32(backend):
    pytest.importorskip("mpmath")
    from logitkit.reference import row_loss_mp

    rows = torch.tensor([[1e4 + 0.5, 1e4, 1e4 - 1.0], [40.0, 0.0, 0.0], [30.0, 29.0, -5.0]],
                        dtype=torch.float32)
    y = torch.tensor([0, 0, 1])
    ours = lt.cross_entropy(rows, y, reduction="none")
    for i in range(3):
        exact = row_loss_mp(rows[i].double().numpy(), int(y[i]))
        assert abs(float(ours[i]) - exact) <= 2.0 ** -21 * abs(exact), (i, float(ours[i]), exact)


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax

SOFTMAX_CASES = [((6, C), 1), ((6, C), 0), ((6, C), -1), ((3, 4, 5), 0), ((3, 4, 5), 1), ((3, 4, 5), 2),
                 ((7,), 0), ((), 0), ((0, 5), 1), ((4, 1), 1)]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{c[0]}-dim{c[1]}")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softmax_parity(backend, log, dtype, case, temperature):
    shape, dim = case
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_(True)
    ours = (lt.log_softmax if log else lt.softmax)(x, dim, temperature=temperature)
    x64 = x.detach().double().requires_grad_(True)
    ref = (F.log_softmax if log else F.softmax)(x64 / temperature, dim)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert_close(ours, ref, dtype, "value")
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(ours, x, go.to(dtype))
    (gref,) = torch.autograd.grad(ref, x64, go)
    # The VJP subtracts Σ y·dy from dy: its rounding error scales with |dy|, not with the result.
    scale = float(go.abs().max()) / temperature if go.numel() else 0.0
    assert_close(gx, gref, dtype, "grad", scale=scale)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_dtype_argument_and_layout(log):
    x = torch.randn(2, 3, 5, dtype=torch.float32)
    fn, ref_fn = (lt.log_softmax, F.log_softmax) if log else (lt.softmax, F.softmax)
    ours, ref = fn(x, 1, dtype=torch.float64), ref_fn(x, 1, dtype=torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref)
    assert ours.is_contiguous() == ref.is_contiguous()


@pytest.mark.parametrize("log", [False, True])
def test_softmax_implicit_dim_warns_like_torch(log):
    fn, ref_fn = (lt.log_softmax, F.log_softmax) if log else (lt.softmax, F.softmax)
    for shape in [(5,), (2, 5), (2, 3, 5), (2, 3, 4, 5)]:
        x = torch.randn(shape)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            ours = fn(x)
        with pytest.warns(UserWarning):
            ref = ref_fn(x)
        torch.testing.assert_close(ours, ref)
