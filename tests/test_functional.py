"""The public functions on NumPy, torch and JAX inputs, against float64 oracles and torch.nn.functional.

Reference values come from :mod:`logitkit.reference` (plain float64 NumPy), scipy, or torch's own
``F.cross_entropy`` in float64, never from the code under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import logitkit as lk
from logitkit import reference as R
from lk_helpers import LIBS, dtype_name, lib_of, need, rows, to_lib, to_np

# NumPy must not warn on masked, empty or non-finite rows: the core discards those values.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

N, C = 6, 5


def _labels(rng, n, v, ignore=None, frac=0.34):
    y = rng.integers(0, v, n)
    if ignore is not None:
        y[rng.random(n) < frac] = ignore
        y[0] = ignore  # at least one ignored row
        y[-1] = 0      # and at least one kept
    return y


# ----------------------------------------------------------------------------------------------
# kind, device and dtype of the results


def _devices():
    out = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
    except ImportError:
        pass
    return out


ALL_CALLS = {
    "logsumexp": lambda x, y, p: lk.logsumexp(x),
    "softmax": lambda x, y, p: lk.softmax(x),
    "log_softmax": lambda x, y, p: lk.log_softmax(x),
    "cross_entropy": lambda x, y, p: lk.cross_entropy(x, y),
    "cross_entropy_none": lambda x, y, p: lk.cross_entropy(x, y, reduction="none"),
    "cross_entropy_prob": lambda x, y, p: lk.cross_entropy(x, p),
    "cross_entropy_with_grad": lambda x, y, p: lk.cross_entropy_with_grad(x, y),
    "softmax_cross_entropy_with_logits": lambda x, y, p: lk.softmax_cross_entropy_with_logits(
        labels=p, logits=x),
    "sparse_softmax_cross_entropy_with_logits": lambda x, y, p: lk.sparse_softmax_cross_entropy_with_logits(
        labels=y, logits=x),
    "token_logprobs": lambda x, y, p: lk.token_logprobs(x, y),
    "entropy": lambda x, y, p: lk.entropy(x),
    "kl_divergence": lambda x, y, p: lk.kl_divergence(x, x * 0.5),
}
SHAPES = {"logsumexp": (N,), "softmax": (N, C), "log_softmax": (N, C), "cross_entropy": (),
          "cross_entropy_none": (N,), "cross_entropy_prob": (), "softmax_cross_entropy_with_logits": (N,),
          "sparse_softmax_cross_entropy_with_logits": (N,), "token_logprobs": (N,), "entropy": (N,),
          "kl_divergence": (N,)}


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(ALL_CALLS))
def test_returns_input_kind_dtype_device(lib, dtype, name, rng):
    x64 = rows(rng, N, C, dtype=np.float64)
    y = rng.integers(0, C, N)
    p = R.softmax64(rows(rng, N, C, dtype=np.float64))
    for device in (_devices() if lib == "torch" else ["cpu"]):
        x, yl, pl = to_lib(lib, x64, dtype), to_lib(lib, y), to_lib(lib, p, dtype)
        if device != "cpu":
            x, yl, pl = x.to(device), yl.to(device), pl.to(device)
        res = ALL_CALLS[name](x, yl, pl)
        outs = res if isinstance(res, tuple) else (res,)
        for r in outs:
            assert lib_of(r) == lib, (name, type(r))
            assert dtype_name(r) == dtype
            if lib == "torch":
                assert r.device == x.device
        if name == "cross_entropy_with_grad":
            assert tuple(outs[0].shape) == () and tuple(outs[1].shape) == (N, C)
        else:
            assert tuple(outs[0].shape) == SHAPES[name]
        assert np.isfinite(to_np(outs[0])).all()


# ----------------------------------------------------------------------------------------------
# cross_entropy: every option alone and combined, against the float64 reference

OPTION_SETS = [
    {},
    {"weight": True},
    {"ignore_index": -100},
    {"ignore_index": 2},  # an ignore_index that is also a valid class, as torch allows
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"weight": True, "label_smoothing": 0.2},
    {"ignore_index": -100, "label_smoothing": 0.3},
    {"weight": True, "ignore_index": -100, "label_smoothing": 0.15},
    {"z_loss": 1e-2},
    {"z_loss": 1e-2, "weight": True, "ignore_index": -100},
    {"softcap": 2.5},
    {"temperature": 0.7},
    {"softcap": 4.0, "temperature": 1.7, "z_loss": 3e-3, "label_smoothing": 0.05, "weight": True,
     "ignore_index": -100},
]


def _opt_id(o):
    return "-".join(f"{k}={v}" for k, v in o.items()) or "plain"


def _materialize(opts, rng, v):
    """Option dict for reference64 (NumPy weight) and the label array."""
    o = dict(opts)
    if o.pop("weight", False):
        o["weight"] = rng.uniform(0.2, 2.0, v)
    return o


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=_opt_id)
def test_cross_entropy_numpy_vs_reference(opts, reduction, rng, kernels):
    o = _materialize(opts, rng, C)
    y = _labels(rng, N, C, o.get("ignore_index"))
    for dtype, rtol in (("float64", 1e-12), ("float32", 2e-6)):
        x = rows(rng, N, C, dtype=np.dtype(dtype))
        w = o.get("weight")
        oo = dict(o, weight=None if w is None else w.astype(dtype))
        want = R.cross_entropy64(x, y, reduction=reduction, **oo)
        want_g = R.cross_entropy_grad64(x, y, reduction=reduction, **oo)
        got = lk.cross_entropy(x, y, reduction=reduction, **oo)
        loss, g = lk.cross_entropy_with_grad(x, y, reduction=reduction, **oo)
        assert got.dtype == x.dtype and g.dtype == x.dtype
        np.testing.assert_allclose(to_np(got), want, rtol=rtol, atol=rtol * 1e-3)
        np.testing.assert_allclose(to_np(loss), want, rtol=rtol, atol=rtol * 1e-3)
        np.testing.assert_allclose(to_np(g), want_g, rtol=rtol * 4, atol=rtol * np.abs(want_g).max())


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=_opt_id)
def test_cross_entropy_framework_autograd_vs_reference(lib, opts, rng):
    """Torch and JAX inputs: loss and the gradient from their own autograd."""
    o = _materialize(opts, rng, C)
    y = _labels(rng, N, C, o.get("ignore_index"))
    x = rows(rng, N, C, dtype=np.float32)
    w = o.pop("weight", None)
    wl = None if w is None else to_lib(lib, w, "float32")
    want = R.cross_entropy64(x, y, weight=w, **o)
    want_g = R.cross_entropy_grad64(x, y, weight=w, **o)
    if lib == "torch":
        tx = to_lib(lib, x, requires_grad=True)
        loss = lk.cross_entropy(tx, to_lib(lib, y), weight=wl, **o)
        loss.backward()
        g = tx.grad
    else:
        import jax

        loss, g = jax.value_and_grad(lambda a: lk.cross_entropy(a, to_lib(lib, y), weight=wl, **o))(
            to_lib(lib, x))
    np.testing.assert_allclose(to_np(loss), want, rtol=2e-6)
    np.testing.assert_allclose(to_np(g), want_g, rtol=1e-5, atol=1e-7)
    # cross_entropy_with_grad on the same inputs gives the same pair without autograd.
    loss2, g2 = lk.cross_entropy_with_grad(to_lib(lib, x), to_lib(lib, y), weight=wl, **o)
    np.testing.assert_allclose(to_np(loss2), want, rtol=2e-6)
    np.testing.assert_allclose(to_np(g2), want_g, rtol=1e-5, atol=1e-7)


def test_cross_entropy_jax_jit_matches_eager(rng):
    jax = pytest.importorskip("jax")
    x = rows(rng, N, C)
    y = _labels(rng, N, C, -100)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    jx, jy, jw = to_lib("jax", x), to_lib("jax", y), to_lib("jax", w)
    f = lambda a, b, c: lk.cross_entropy(a, b, weight=c, label_smoothing=0.1, z_loss=1e-3)
    got = jax.jit(jax.value_and_grad(f))(jx, jy, jw)
    want = (R.cross_entropy64(x, y, weight=w, label_smoothing=0.1, z_loss=1e-3),
            R.cross_entropy_grad64(x, y, weight=w, label_smoothing=0.1, z_loss=1e-3))
    np.testing.assert_allclose(to_np(got[0]), want[0], rtol=2e-6)
    np.testing.assert_allclose(to_np(got[1]), want[1], rtol=1e-5, atol=1e-7)


def test_cross_entropy_jax_jit_bad_labels_give_nan_rows(rng):
    """Traced labels cannot be checked on the host: a bad row is NaN (and so is the mean)."""
    jax = pytest.importorskip("jax")
    x = rows(rng, N, C)
    y = rng.integers(0, C, N)
    y[1], y[2], y[4] = -1, C, -100
    f = jax.jit(lambda a, b: lk.cross_entropy(a, b, reduction="none"))
    got = to_np(f(to_lib("jax", x), to_lib("jax", y)))
    assert np.isnan(got[[1, 2]]).all() and got[4] == 0
    keep = [0, 3, 5]
    np.testing.assert_allclose(got[keep], R.cross_entropy64(x[keep], y[keep], reduction="none"), rtol=2e-6)
    mean = jax.jit(lambda a, b: lk.cross_entropy(a, b))(to_lib("jax", x), to_lib("jax", y))
    assert np.isnan(to_np(mean))
    g = jax.jit(jax.grad(lambda a, b: lk.cross_entropy(a, b, reduction="sum")))(to_lib("jax", x), to_lib("jax", y))
    g = to_np(g)
    assert np.isnan(g[[1, 2]]).all() and np.isfinite(g[keep]).all() and not g[4].any()


PROB_OPTIONS = [{}, {"weight": True}, {"label_smoothing": 0.2, "weight": True}, {"z_loss": 1e-2},
                {"softcap": 3.0, "temperature": 0.6, "z_loss": 1e-3, "label_smoothing": 0.1}]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", PROB_OPTIONS, ids=_opt_id)
def test_cross_entropy_probability_labels_options(lib, reduction, opts, rng):
    """Probability labels with every option: the mean divides by the number of rows, z-loss too."""
    o = _materialize(opts, rng, C)
    x = rows(rng, N, C)
    p = R.softmax64(rows(rng, N, C, dtype=np.float64)).astype(np.float32)
    w = o.pop("weight", None)
    kw = dict(o, weight=None if w is None else to_lib(lib, w, "float32"), reduction=reduction)
    want = R.cross_entropy64(x, p, weight=w, reduction=reduction, **o)
    want_g = R.cross_entropy_grad64(x, p, weight=w, reduction=reduction, **o)
    loss, g = lk.cross_entropy_with_grad(to_lib(lib, x), to_lib(lib, p), **kw)
    np.testing.assert_allclose(to_np(lk.cross_entropy(to_lib(lib, x), to_lib(lib, p), **kw)), want, rtol=2e-6)
    np.testing.assert_allclose(to_np(loss), want, rtol=2e-6)
    np.testing.assert_allclose(to_np(g), want_g, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# parity with torch.nn.functional.cross_entropy (float64), every option of it

def _torch_ce(x, y, **kw):
    """torch's own loss and gradient (of the sum for reduction='none'), float64."""
    torch = need("torch")
    import torch.nn.functional as F

    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ty = torch.tensor(y) if np.issubdtype(np.asarray(y).dtype, np.integer) else torch.tensor(y, dtype=torch.float64)
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(kw["weight"], dtype=torch.float64)
    loss = F.cross_entropy(tx, ty, **kw)
    loss.sum().backward()
    return loss.detach().numpy(), tx.grad.numpy()


PARITY = [dict(weight=w, ignore_index=ii, label_smoothing=ls)
          for w, ii, ls in itertools.product([False, True], [-100, 1], [0.0, 0.25, 1.0])]


def _pid(o):
    return f"w{int(o['weight'])}-ii{o['ignore_index']}-ls{o['label_smoothing']}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", PARITY, ids=_pid)
def test_parity_torch_class_indices(opts, reduction, rng, kernels):
    o = _materialize(opts, rng, C)
    o.setdefault("weight", None)
    # Logits (N, C, d) with the class axis 1, labels (N, d): torch's extra-dimension layout.
    x = rng.standard_normal((4, C, 3)) * 2
    y = rng.integers(0, C, (4, 3))
    y[0, 0] = y[2, 1] = o["ignore_index"]
    want, want_g = _torch_ce(x, y, reduction=reduction, **o)
    got, g = lk.cross_entropy_with_grad(x, y, axis=1, reduction=reduction, **o)
    np.testing.assert_allclose(lk.cross_entropy(x, y, axis=1, reduction=reduction, **o), want,
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g, want_g, rtol=1e-10, atol=1e-15)
    # The same call on torch tensors, through logitkit, differentiated by torch's autograd.
    torch = need("torch")
    tx = torch.tensor(x, requires_grad=True)
    tw = None if o["weight"] is None else torch.tensor(o["weight"])
    tl = lk.cross_entropy(tx, torch.tensor(y), axis=1, reduction=reduction,
                          **dict(o, weight=tw))
    tl.sum().backward()
    np.testing.assert_allclose(to_np(tl), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(to_np(tx.grad), want_g, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_parity_torch_probability_labels(reduction, weight, label_smoothing, rng, kernels):
    x = rng.standard_normal((4, C, 3)) * 2
    p = R.softmax64(rng.standard_normal((4, C, 3)) * 2, axis=1)
    w = rng.uniform(0.2, 2.0, C) if weight else None
    want, want_g = _torch_ce(x, p, reduction=reduction, weight=w, label_smoothing=label_smoothing)
    got, g = lk.cross_entropy_with_grad(x, p, axis=1, reduction=reduction, weight=w,
                                        label_smoothing=label_smoothing)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g, want_g, rtol=1e-10, atol=1e-15)
    torch = need("torch")
    tx = torch.tensor(x, requires_grad=True)
    tl = lk.cross_entropy(tx, torch.tensor(p), axis=1, reduction=reduction,
                          weight=None if w is None else torch.tensor(w), label_smoothing=label_smoothing)
    tl.sum().backward()
    np.testing.assert_allclose(to_np(tl), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(to_np(tx.grad), want_g, rtol=1e-10, atol=1e-15)


def test_parity_torch_extra_dims_axis_last_equals_axis_one(rng):
    """Moving the class axis is purely a layout change."""
    x = rng.standard_normal((2, 3, C, 4))
    y = rng.integers(0, C, (2, 3, 4))
    a = lk.cross_entropy_with_grad(x, y, axis=2, label_smoothing=0.1)
    b = lk.cross_entropy_with_grad(np.moveaxis(x, 2, -1), y, label_smoothing=0.1)
    c = lk.cross_entropy_with_grad(np.ascontiguousarray(np.moveaxis(x, 2, -1)), y, axis=-1,
                                   label_smoothing=0.1)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
    np.testing.assert_allclose(a[1], np.moveaxis(b[1], -1, 2), rtol=1e-14)
    np.testing.assert_allclose(b[1], c[1], rtol=1e-14)
    want, want_g = _torch_ce(np.moveaxis(x, 2, 1), y, label_smoothing=0.1)
    np.testing.assert_allclose(a[0], want, rtol=1e-12)
    np.testing.assert_allclose(a[1], np.moveaxis(want_g, 1, 2), rtol=1e-10, atol=1e-16)


def test_parity_optax(rng):
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    x = rows(rng, N, C)
    y = rng.integers(0, C, N)
    p = R.softmax64(rows(rng, N, C, dtype=np.float64)).astype(np.float32)
    jx = to_lib("jax", x)
    np.testing.assert_allclose(
        to_np(lk.cross_entropy(jx, to_lib("jax", y), reduction="none")),
        to_np(optax.softmax_cross_entropy_with_integer_labels(jx, to_lib("jax", y))), rtol=2e-6)
    np.testing.assert_allclose(
        to_np(lk.softmax_cross_entropy_with_logits(labels=to_lib("jax", p), logits=jx)),
        to_np(optax.softmax_cross_entropy(jx, to_lib("jax", p))), rtol=2e-6)
    # Label smoothing is optax.smooth_labels on one-hot targets.
    import jax

    onehot = jax.nn.one_hot(to_lib("jax", y), C)
    np.testing.assert_allclose(
        to_np(lk.cross_entropy(jx, to_lib("jax", y), label_smoothing=0.2, reduction="none")),
        to_np(optax.softmax_cross_entropy(jx, optax.smooth_labels(onehot, 0.2))), rtol=2e-6)
    # Gradients agree too.
    g_lk = jax.grad(lambda a: lk.cross_entropy(a, to_lib("jax", y), reduction="sum"))(jx)
    g_ox = jax.grad(lambda a: optax.softmax_cross_entropy_with_integer_labels(a, to_lib("jax", y)).sum())(jx)
    np.testing.assert_allclose(to_np(g_lk), to_np(g_ox), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# rules of DESIGN.md "Semantics that the options share", each checked from first principles


def _lse64(z):
    from scipy.special import logsumexp

    return logsumexp(np.asarray(z, np.float64), axis=-1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_rule(reduction, rng, kernels):
    """z·lse² per row not ignored, never class-weighted; the mean divides it by the kept rows."""
    pytest.importorskip("scipy")
    x = rows(rng, N, C, dtype=np.float64)
    y = _labels(rng, N, C, -100)
    w = rng.uniform(0.2, 2.0, C)
    zl = 0.05
    base, _ = _torch_ce(x, y, weight=w, reduction=reduction)
    keep = y != -100
    zt = np.where(keep, zl * _lse64(x) ** 2, 0.0)
    want = {"none": base + zt, "sum": base + zt.sum(), "mean": base + zt.sum() / keep.sum()}[reduction]
    got = lk.cross_entropy(x, y, weight=w, reduction=reduction, z_loss=zl)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # Its gradient is 2·z·lse·softmax on kept rows (same denominator as the loss).
    _, g0 = lk.cross_entropy_with_grad(x, y, weight=w, reduction=reduction)
    _, g1 = lk.cross_entropy_with_grad(x, y, weight=w, reduction=reduction, z_loss=zl)
    dz = 2 * zl * _lse64(x)[:, None] * R.softmax64(x) * keep[:, None]
    if reduction == "mean":
        dz = dz / keep.sum()
    np.testing.assert_allclose(g1 - g0, dz, rtol=1e-9, atol=1e-15)


def test_transform_order_softcap_then_temperature(rng, kernels):
    """softcap first (c·tanh(x/c)), then /T; gradient through both (torch autograd as oracle)."""
    torch = need("torch")
    import torch.nn.functional as F

    x = rows(rng, N, C, scale=6.0, dtype=np.float64)
    y = _labels(rng, N, C, -100)
    c, T = 3.0, 1.9
    tx = torch.tensor(x, requires_grad=True)
    ref = F.cross_entropy(c * torch.tanh(tx / c) / T, torch.tensor(y), label_smoothing=0.1)
    ref.backward()
    loss, g = lk.cross_entropy_with_grad(x, y, softcap=c, temperature=T, label_smoothing=0.1)
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-12)
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-10, atol=1e-16)
    # The other order is a different function: the test above can tell them apart.
    other = F.cross_entropy(c * torch.tanh(torch.tensor(x) / T / c), torch.tensor(y), label_smoothing=0.1)
    assert abs(other.item() - float(loss)) > 1e-3
    # softmax / log_softmax / kl use the same temperature rule.
    np.testing.assert_allclose(lk.softmax(x, temperature=T), R.softmax64(x / T), rtol=1e-12)
    np.testing.assert_allclose(lk.log_softmax(x, temperature=T), R.log_softmax64(x / T), rtol=1e-12)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_empty_mean_is_zero_with_zero_gradient(lib, kind, rng):
    """Every row ignored, or no rows at all: mean = 0 and gradient 0 (torch would give NaN)."""
    x = rows(rng, 4, C)
    cases = [(np.zeros((0, C), np.float32), np.zeros(0, np.int64) if kind == "index" else np.zeros((0, C)))]
    if kind == "index":
        cases.append((x, np.full(4, -100)))
    for xs, ys in cases:
        yl = to_lib(lib, ys) if kind == "index" else to_lib(lib, ys, "float32")
        for z_loss in (0.0, 1e-2):
            loss, g = lk.cross_entropy_with_grad(to_lib(lib, xs), yl, z_loss=z_loss, weight=None)
            assert float(to_np(loss)) == 0.0
            assert tuple(g.shape) == xs.shape and not np.any(to_np(g))
            assert float(to_np(lk.cross_entropy(to_lib(lib, xs), yl, z_loss=z_loss))) == 0.0
        if lib == "torch" and xs.size:
            tx = to_lib(lib, xs, requires_grad=True)
            lk.cross_entropy(tx, yl, z_loss=1e-2).backward()
            assert not np.any(to_np(tx.grad))
        if lib == "jax" and xs.size:
            import jax

            g = jax.grad(lambda a: lk.cross_entropy(a, yl, z_loss=1e-2))(to_lib(lib, xs))
            assert not np.any(to_np(g))
    # All rows weighted 0 is also a mean over nothing.
    w = np.zeros(C, np.float32)
    loss, g = lk.cross_entropy_with_grad(x, rng.integers(0, C, 4), weight=w)
    assert float(loss) == 0.0 and not g.any()


@pytest.mark.parametrize("lib", LIBS)
def test_single_class(lib):
    """V = 1: probability 1, loss 0, gradient 0 (and logsumexp = the logit)."""
    x = np.array([[3.0], [-2.0], [0.5]], np.float32)
    y = np.zeros(3, np.int64)
    loss, g = lk.cross_entropy_with_grad(to_lib(lib, x), to_lib(lib, y), reduction="none")
    assert np.all(to_np(loss) == 0) and np.all(to_np(g) == 0)
    np.testing.assert_array_equal(to_np(lk.softmax(to_lib(lib, x))), 1.0)
    np.testing.assert_array_equal(to_np(lk.logsumexp(to_lib(lib, x))), x[:, 0])


def test_unnormalised_probability_labels_gradient(rng, kernels):
    """Loss −Σ y·log p and exact gradient p·Σy − y for labels that do not sum to 1."""
    x = rows(rng, N, C, dtype=np.float64)
    y = rng.uniform(0, 1, (N, C)) * rng.uniform(0.1, 3, (N, 1))
    loss, g = lk.cross_entropy_with_grad(x, y, reduction="none")
    lp = R.log_softmax64(x)
    np.testing.assert_allclose(loss, -(y * lp).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(g, np.exp(lp) * y.sum(-1, keepdims=True) - y, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# cross_entropy_with_grad: out= and in place


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_with_grad_out_and_in_place_with_axis(lib, dtype, rng, kernels):
    x = (rng.standard_normal((3, C, 4)) * 3).astype(dtype)  # class axis 1
    y = rng.integers(0, C, (3, 4))
    y[1, 2] = -100
    w = rng.uniform(0.5, 2, C).astype(dtype)
    kw = dict(axis=1, label_smoothing=0.1, z_loss=1e-3, weight=to_lib(lib, w))
    ref_kw = dict(label_smoothing=0.1, z_loss=1e-3, weight=w)
    want = R.cross_entropy64(np.moveaxis(x, 1, -1), y, **ref_kw)
    want_g = np.moveaxis(R.cross_entropy_grad64(np.moveaxis(x, 1, -1), y, **ref_kw), -1, 1)
    rtol = 1e-12 if dtype == "float64" else 2e-6

    buf = to_lib(lib, np.full_like(x, np.nan))
    xl = to_lib(lib, x)
    loss, g = lk.cross_entropy_with_grad(xl, to_lib(lib, y), out=buf, **kw)
    assert g is buf
    np.testing.assert_array_equal(to_np(xl), x)  # logits untouched
    np.testing.assert_allclose(to_np(loss), want, rtol=rtol)
    np.testing.assert_allclose(to_np(g), want_g, rtol=rtol * 10, atol=rtol * 1e-2)

    xl = to_lib(lib, x.copy())
    loss, g = lk.cross_entropy_with_grad(xl, to_lib(lib, y), out=xl, **kw)
    assert g is xl
    np.testing.assert_allclose(to_np(loss), want, rtol=rtol)
    np.testing.assert_allclose(to_np(xl), want_g, rtol=rtol * 10, atol=rtol * 1e-2)


@pytest.mark.parametrize("labels_kind", ["index", "prob"])
def test_with_grad_out_non_contiguous_view(labels_kind, rng, kernels):
    """``out`` may be a strided view; the gradient lands in it and nowhere else."""
    x = rows(rng, N, C, dtype=np.float64)
    y = rng.integers(0, C, N) if labels_kind == "index" else R.softmax64(rows(rng, N, C, dtype=np.float64))
    big = np.zeros((N, 2 * C))
    out = big[:, ::2]
    _, g = lk.cross_entropy_with_grad(x, y, out=out)
    assert g is out
    np.testing.assert_allclose(big[:, ::2], R.cross_entropy_grad64(x, y), rtol=1e-12, atol=1e-16)
    assert not big[:, 1::2].any()


def test_in_place_allocates_no_logits_sized_array(rng):
    """With a fused kernel, ``out=logits`` computes the gradient without a new N×V array."""
    import tracemalloc

    from logitkit.kernels import registry

    x = rows(rng, 256, 4000)
    if registry.select("ce_forward_backward", "numpy", x)[0] == "core":
        pytest.skip("no fused CPU kernel here: the core fallback works on temporaries")
    y = rng.integers(0, 4000, 256)
    # compile (or load) the kernels this size uses outside the trace: the parallel ones too
    lk.cross_entropy_with_grad(x.copy(), y, out=None)
    tracemalloc.start()
    try:
        lk.cross_entropy_with_grad(x, y, out=x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 4, f"peak {peak} bytes for logits of {x.nbytes} bytes"


# ----------------------------------------------------------------------------------------------
# TensorFlow-named functions


@pytest.mark.parametrize("lib", LIBS)
def test_softmax_cross_entropy_with_logits_tf_semantics(lib, rng):
    x = rows(rng, N, C)
    y = rng.uniform(0, 1, (N, C)).astype(np.float32)
    y[:3] /= y[:3].sum(-1, keepdims=True)  # the first rows sum to 1, the others do not
    want = -(y * R.log_softmax64(x)).sum(-1)
    xl, yl = to_lib(lib, x), to_lib(lib, y)
    got_kw = lk.softmax_cross_entropy_with_logits(labels=yl, logits=xl)
    got_kw2 = lk.softmax_cross_entropy_with_logits(logits=xl, labels=yl)
    got_pos = lk.softmax_cross_entropy_with_logits(yl, xl)  # TF's positional order: labels, logits
    for got in (got_kw, got_kw2, got_pos):
        assert tuple(got.shape) == (N,)
        np.testing.assert_allclose(to_np(got), want, rtol=2e-6)
    # axis: the class axis first
    got_ax = lk.softmax_cross_entropy_with_logits(labels=to_lib(lib, y.T.copy()),
                                                  logits=to_lib(lib, x.T.copy()), axis=0)
    np.testing.assert_allclose(to_np(got_ax), want, rtol=2e-6)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_softmax_cross_entropy_with_logits_differentiable_in_labels(lib, rng):
    x = rows(rng, N, C)
    y = rng.uniform(0, 1, (N, C)).astype(np.float32)
    lp = R.log_softmax64(x)
    want_dy = -lp                                        # d/dy of −Σ y·log p
    want_dx = np.exp(lp) * y.sum(-1, keepdims=True) - y  # p·Σy − y
    if lib == "torch":
        tx, ty = to_lib(lib, x, requires_grad=True), to_lib(lib, y, requires_grad=True)
        lk.softmax_cross_entropy_with_logits(labels=ty, logits=tx).sum().backward()
        gx, gy = tx.grad, ty.grad
    else:
        import jax

        f = lambda a, b: lk.softmax_cross_entropy_with_logits(labels=b, logits=a).sum()
        gx, gy = jax.grad(f, argnums=(0, 1))(to_lib(lib, x), to_lib(lib, y))
    np.testing.assert_allclose(to_np(gy), want_dy, rtol=2e-6)
    np.testing.assert_allclose(to_np(gx), want_dx, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lib", LIBS)
def test_sparse_softmax_cross_entropy_with_logits(lib, rng):
    x = (rng.standard_normal((2, 3, C)) * 3).astype(np.float32)
    y = rng.integers(0, C, (2, 3))
    want = -np.take_along_axis(R.log_softmax64(x), y[..., None], -1)[..., 0]
    got = lk.sparse_softmax_cross_entropy_with_logits(labels=to_lib(lib, y), logits=to_lib(lib, x))
    assert tuple(got.shape) == (2, 3)
    np.testing.assert_allclose(to_np(got), want, rtol=2e-6)
    got_pos = lk.sparse_softmax_cross_entropy_with_logits(to_lib(lib, y), to_lib(lib, x))
    np.testing.assert_allclose(to_np(got_pos), want, rtol=2e-6)
    # No ignore index: -100 (or -1) is out of range like any other bad class index.
    for bad in (-100, -1, C):
        yb = y.copy()
        yb[1, 2] = bad
        with pytest.raises(ValueError, match="labels"):
            lk.sparse_softmax_cross_entropy_with_logits(labels=to_lib(lib, yb), logits=to_lib(lib, x))


def test_sparse_jit_bad_label_gives_nan_row_only(rng):
    jax = pytest.importorskip("jax")
    x = rows(rng, N, C)
    y = rng.integers(0, C, N)
    y[1], y[3] = -1, C
    f = jax.jit(lambda a, b: lk.sparse_softmax_cross_entropy_with_logits(labels=b, logits=a))
    got = to_np(f(to_lib("jax", x), to_lib("jax", y)))
    bad = np.isin(np.arange(N), [1, 3])
    assert np.isnan(got[bad]).all()
    want = -np.take_along_axis(R.log_softmax64(x), np.where(bad, 0, y)[:, None], -1)[:, 0]
    np.testing.assert_allclose(got[~bad], want[~bad], rtol=2e-6)


# ----------------------------------------------------------------------------------------------
# per-position helpers


@pytest.mark.parametrize("lib", LIBS)
def test_token_logprobs(lib, rng):
    x = (rng.standard_normal((2, C, 3)) * 3).astype(np.float32)  # class axis 1
    lp = R.log_softmax64(np.moveaxis(x, 1, -1))

    def want(y, ignore_index):
        picked = np.take_along_axis(lp, np.where(y == ignore_index, 0, y)[..., None], -1)[..., 0]
        return np.where(y == ignore_index, 0.0, picked)

    y = rng.integers(0, C, (2, 3))
    y[0, 1] = -100
    got = lk.token_logprobs(to_lib(lib, x), to_lib(lib, y), axis=1)
    assert tuple(got.shape) == (2, 3)
    np.testing.assert_allclose(to_np(got), want(y, -100), rtol=2e-6)
    assert to_np(got)[0, 1] == 0.0
    y[0, 1] = 3  # a valid class used as the ignore index
    got3 = lk.token_logprobs(to_lib(lib, x), to_lib(lib, y), axis=1, ignore_index=3)
    np.testing.assert_allclose(to_np(got3), want(y, 3), rtol=2e-6)


def test_token_logprobs_confident_is_exact():
    """log p(label) ≈ −2.2e-13 on the confident row, not 0 (mpmath oracle)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(32000).astype(np.float32)
    x[5] = 40.0
    want = -R.row_loss_mp(x, 5)
    got = float(lk.token_logprobs(x[None], np.array([5]))[0])
    assert got < 0 and abs(got - want) <= 2.0 ** -21 * abs(want)


@pytest.mark.parametrize("lib", LIBS)
def test_entropy(lib, rng):
    x = rows(rng, N, C)
    x[1, 2] = -np.inf  # a masked class contributes nothing
    p = R.softmax64(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    np.testing.assert_allclose(to_np(lk.entropy(to_lib(lib, x))), want, rtol=2e-6)
    np.testing.assert_allclose(to_np(lk.entropy(to_lib(lib, x.T.copy()), axis=0)), want, rtol=2e-6)


def test_entropy_confident_row_relative_accuracy():
    import mpmath

    x = np.zeros(1000, np.float32)
    x[0] = 40.0
    with mpmath.workdps(50):
        lse = R.row_lse_mp(x)
        want = float(lse - mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - lse) * mpmath.mpf(float(v)) for v in x))
    got = float(lk.entropy(x))
    assert abs(got - want) <= 2.0 ** -21 * want


@pytest.mark.parametrize("lib", LIBS)
def test_kl_divergence(lib, rng):
    p = rows(rng, N, C)
    q = rows(rng, N, C)
    for T in (1.0, 2.5):
        lp, lq = R.log_softmax64(p / T), R.log_softmax64(q / T)
        want = (np.exp(lp) * (lp - lq)).sum(-1)
        got = lk.kl_divergence(to_lib(lib, p), to_lib(lib, q), temperature=T)
        np.testing.assert_allclose(to_np(got), want, rtol=1e-5, atol=1e-7)
    # A large common offset does not leak into the difference of log-probabilities.
    off = lk.kl_divergence(to_lib(lib, p + 1e4), to_lib(lib, q - 1e4))
    base = lk.kl_divergence(to_lib(lib, (p + 1e4) - 1e4), to_lib(lib, (q - 1e4) + 1e4))
    np.testing.assert_allclose(to_np(off), to_np(base), rtol=1e-3, atol=1e-6)
    # Masked teacher classes contribute 0; a masked student class under teacher mass is +inf.
    pm, qm = p.copy(), q.copy()
    pm[0, 1] = -np.inf
    qm[1, 3] = -np.inf
    got = to_np(lk.kl_divergence(to_lib(lib, pm), to_lib(lib, qm)))
    assert got[1] == np.inf and np.isfinite(np.delete(got, 1)).all()
    assert np.all(to_np(lk.kl_divergence(to_lib(lib, p), to_lib(lib, p))) == 0) or \
        np.allclose(to_np(lk.kl_divergence(to_lib(lib, p), to_lib(lib, p))), 0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# logsumexp / softmax / log_softmax


@pytest.mark.parametrize("lib", LIBS)
def test_logsumexp_vs_scipy(lib, rng):
    sp = pytest.importorskip("scipy.special")
    x = (rng.standard_normal((3, 4, 5)) * 5).astype(np.float32)
    for axis in (0, 1, -1):
        for keepdims in (False, True):
            got = lk.logsumexp(to_lib(lib, x), axis=axis, keepdims=keepdims)
            # lse = m + r in float32 may cancel (lse near 0): an ulp of the max term is the bound.
            np.testing.assert_allclose(to_np(got), sp.logsumexp(x.astype(np.float64), axis=axis,
                                                                keepdims=keepdims),
                                       rtol=2 ** -23, atol=2 ** -23 * np.abs(x).max())
    special = np.array([[0, -np.inf, 1], [-np.inf] * 3, [np.inf, 0, 1], [np.nan, 0, 1], [np.inf, np.nan, 0]],
                       np.float32)
    got = to_np(lk.logsumexp(to_lib(lib, special)))
    np.testing.assert_allclose(got[0], np.log(1 + np.e), rtol=2e-7)
    assert got[1] == -np.inf and got[2] == np.inf and np.isnan(got[3]) and np.isnan(got[4])
    empty = to_np(lk.logsumexp(to_lib(lib, np.zeros((2, 0), np.float32))))
    np.testing.assert_array_equal(empty, [-np.inf, -np.inf])


@pytest.mark.parametrize("lib", LIBS)
def test_softmax_and_log_softmax_vs_reference(lib, rng):
    x = (rng.standard_normal((3, 4, 5)) * 5).astype(np.float32)
    for axis in (0, 1, -1):
        np.testing.assert_allclose(to_np(lk.softmax(to_lib(lib, x), axis=axis)), R.softmax64(x, axis),
                                   rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(to_np(lk.log_softmax(to_lib(lib, x), axis=axis)),
                                   R.log_softmax64(x, axis), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lib", LIBS)
def test_where_masks(lib, rng):
    """Masked entries take no part: softmax 0, log_softmax -inf; all-masked row: zeros / -inf."""
    x = rows(rng, 3, C)
    mask = rng.random((3, C)) < 0.6
    mask[0] = False
    mask[1] = True
    xl, ml = to_lib(lib, x), to_lib(lib, mask)
    sm = to_np(lk.softmax(xl, where=ml))
    lsm = to_np(lk.log_softmax(xl, where=ml))
    lse = to_np(lk.logsumexp(xl, where=ml))
    assert np.all(sm[~mask] == 0) and np.all(lsm[~mask] == -np.inf)
    assert np.all(sm[0] == 0) and lse[0] == -np.inf
    for i in (1, 2):
        xi = x[i][mask[i]].astype(np.float64)
        np.testing.assert_allclose(sm[i][mask[i]], R.softmax64(xi), rtol=1e-6)
        np.testing.assert_allclose(lsm[i][mask[i]], R.log_softmax64(xi), rtol=1e-6)
        np.testing.assert_allclose(lse[i], R.logsumexp64(xi), rtol=1e-6)
    # A 1-D mask broadcasts over rows.
    m1 = mask[2]
    got = to_np(lk.softmax(xl, where=to_lib(lib, m1)))
    np.testing.assert_allclose(got[:, m1], R.softmax64(x[:, m1]), rtol=1e-6)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_where_gradients_are_finite_and_zero_on_masked(lib, rng):
    x = rows(rng, 3, C)
    x[2, 0] = -np.inf
    mask = np.ones((3, C), bool)
    mask[0] = False
    mask[1, ::2] = False
    fns = [lambda a, m: lk.softmax(a, where=m)[:, 1].sum(), lambda a, m: lk.log_softmax(a, where=m)[1:, 1].sum(),
           lambda a, m: lk.logsumexp(a, where=m).sum()]
    for f in fns:
        if lib == "torch":
            tx = to_lib(lib, x, requires_grad=True)
            f(tx, to_lib(lib, mask)).backward()
            g = to_np(tx.grad)
        else:
            import jax

            g = to_np(jax.grad(f)(to_lib(lib, x), to_lib(lib, mask)))
        assert np.isfinite(g).all()
        assert np.all(g[~mask] == 0)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_entropy_and_kl_autograd(lib, rng):
    """dH/dx = −p·(log p + H); dKL(p‖q)/dq = softmax(q) − p; dKL/dp = p·(d − Σ p·d), d = log p − log q."""
    p_l = rows(rng, N, C)
    q_l = rows(rng, N, C)
    lp, lq = R.log_softmax64(p_l), R.log_softmax64(q_l)
    pp = np.exp(lp)
    H = -(pp * lp).sum(-1, keepdims=True)
    d = lp - lq
    want = {
        "entropy": -pp * (lp + H),
        "kl_q": np.exp(lq) - pp,
        "kl_p": pp * (d - (pp * d).sum(-1, keepdims=True)),
    }
    fns = {
        "entropy": (lambda a, b: lk.entropy(a).sum(), 0),
        "kl_q": (lambda a, b: lk.kl_divergence(a, b).sum(), 1),
        "kl_p": (lambda a, b: lk.kl_divergence(a, b).sum(), 0),
    }
    for name, (f, arg) in fns.items():
        if lib == "torch":
            a, b = to_lib(lib, p_l, requires_grad=True), to_lib(lib, q_l, requires_grad=True)
            f(a, b).backward()
            g = to_np((a, b)[arg].grad)
        else:
            import jax

            g = to_np(jax.grad(f, argnums=arg)(to_lib(lib, p_l), to_lib(lib, q_l)))
        np.testing.assert_allclose(g, want[name], rtol=1e-4, atol=1e-6, err_msg=name)
