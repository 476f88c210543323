"""Regressions for issue 13 (core numerics and validation), one test per item, named after it.

References come from torch.nn.functional, float64 NumPy or mpmath, never from logitkit.
"""

from __future__ import annotations

import numpy as np
import pytest

import logitkit
from lk_helpers import need, to_lib, to_np

# ----------------------------------------------------------------------------------------------
# item 1: a negative Σ w[y] divides the weighted mean as torch does (only exactly 0 gives 0)

_X1 = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
_Y1 = np.array([0, 2])
_W1 = np.array([-4.0, 2.0, 1.0])


def _torch_ce_and_grad(x, y, w):
    torch = need("torch")
    import torch.nn.functional as F

    xt = torch.tensor(x, requires_grad=True)
    loss = F.cross_entropy(xt, torch.tensor(y), weight=torch.tensor(w))
    loss.backward()
    return loss.item(), xt.grad.numpy()


def test_issue13_item1_negative_weight_sum_follows_torch():
    want, want_grad = _torch_ce_and_grad(_X1, _Y1, _W1)
    assert abs(want - 3.1297041870) < 1e-9  # the issue's value, from torch
    torch = need("torch")
    import logitkit.torch as lt

    # NumPy: loss and fused gradient
    assert float(logitkit.cross_entropy(_X1, _Y1, weight=_W1)) == pytest.approx(want, rel=1e-12)
    loss, grad = logitkit.cross_entropy_with_grad(_X1, _Y1, weight=_W1)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
    # torch: the top-level function and the drop-in, with autograd
    for fn in (logitkit.cross_entropy, None):
        xt = torch.tensor(_X1, requires_grad=True)
        if fn is None:
            out = lt.cross_entropy(xt, torch.tensor(_Y1), weight=torch.tensor(_W1))
        else:
            out = fn(xt, torch.tensor(_Y1), weight=torch.tensor(_W1))
        out.backward()
        assert out.item() == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(xt.grad.numpy(), want_grad, rtol=1e-12, atol=1e-15)
    # JAX (float32): value and gradient
    jnp = need("jax")
    import jax

    xj, yj, wj = (to_lib("jax", a, "float32") for a in (_X1, _Y1, _W1))
    yj = to_lib("jax", _Y1)
    val, g = jax.value_and_grad(lambda a: logitkit.cross_entropy(a, yj, weight=wj))(xj)
    assert float(val) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(g), want_grad, rtol=1e-5, atol=1e-6)
    # linear head: hidden @ I = the same logits
    eye = np.eye(3)
    got = logitkit.linear_cross_entropy(_X1, eye, _Y1, weight=_W1)
    assert float(got) == pytest.approx(want, rel=1e-12)
    got_t = logitkit.linear_cross_entropy(torch.tensor(_X1), torch.tensor(eye), torch.tensor(_Y1),
                                          weight=torch.tensor(_W1))
    assert float(got_t) == pytest.approx(want, rel=1e-12)


def test_issue13_item1_exactly_zero_weight_sum_is_zero():
    # Σ w[y] = -1 + 1 = 0 exactly: the documented 0 with a zero gradient (torch gives nan here)
    w = np.array([-1.0, 2.0, 1.0])
    loss, grad = logitkit.cross_entropy_with_grad(_X1, _Y1, weight=w)
    assert float(loss) == 0.0
    assert not np.any(grad)


# ----------------------------------------------------------------------------------------------
# item 13: options of a wrong type raise TypeError/ValueError naming the argument

_BAD_SCALARS = [
    ("temperature", None), ("temperature", "0.1"), ("temperature", np.array([2.0, 3.0])),
    ("temperature", np.array(2.0)), ("temperature", 2 + 0j), ("temperature", True),
    ("label_smoothing", "0.1"), ("label_smoothing", None), ("label_smoothing", True),
    ("z_loss", "1e-4"), ("z_loss", None), ("z_loss", 1j), ("softcap", "30"), ("softcap", True),
    ("softcap", np.array([30.0])),
]


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name,value", _BAD_SCALARS, ids=lambda v: repr(v)[:20])
def test_issue13_item13_scalar_option_of_wrong_type_names_it(lib, name, value):
    x = to_lib(lib, np.zeros((2, 3)), "float32")
    y = to_lib(lib, np.array([0, 2]))
    with pytest.raises((TypeError, ValueError), match=rf"^{name}: "):
        logitkit.cross_entropy(x, y, **{name: value})
    if name == "temperature":
        for fn in (logitkit.softmax, logitkit.log_softmax):
            with pytest.raises((TypeError, ValueError), match=r"^temperature: "):
                fn(x, temperature=value)
    if lib != "jax":
        with pytest.raises((TypeError, ValueError), match=rf"^{name}: "):
            logitkit.cross_entropy_with_grad(x, y, **{name: value})


def test_issue13_item13_bool_is_not_a_float():
    x, y = np.zeros((2, 3)), np.array([0, 2])
    with pytest.raises(TypeError, match=r"^temperature: .*bool"):
        logitkit.cross_entropy(x, y, temperature=True)
    with pytest.raises(TypeError, match=r"^label_smoothing: .*bool"):
        logitkit.cross_entropy(x, y, label_smoothing=False)
    # NumPy scalars are real numbers and keep working
    want = float(logitkit.cross_entropy(x, y, temperature=2.0, label_smoothing=0.25))
    got = float(logitkit.cross_entropy(x, y, temperature=np.float32(2.0), label_smoothing=np.float64(0.25)))
    assert got == want


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
def test_issue13_item13_huge_ignore_index_names_it(lib):
    x = to_lib(lib, np.zeros((2, 3)), "float32")
    y = to_lib(lib, np.array([0, 2]))
    with pytest.raises(ValueError, match=r"^ignore_index: .*int64"):
        logitkit.cross_entropy(x, y, ignore_index=2 ** 70)
    with pytest.raises(ValueError, match=r"^ignore_index: "):
        logitkit.token_logprobs(x, y, ignore_index=-(2 ** 64))
    with pytest.raises(TypeError, match=r"^ignore_index: "):
        logitkit.cross_entropy(x, y, ignore_index=True)


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
def test_issue13_item13_list_arguments_name_themselves(lib):
    x = to_lib(lib, np.zeros((2, 3)), "float32")
    y = to_lib(lib, np.array([0, 2]))
    with pytest.raises(TypeError, match=r"^where: "):
        logitkit.softmax(x, where=[[True, False, True]] * 2)
    with pytest.raises(TypeError, match=r"^where: "):
        logitkit.logsumexp(x, where=True)
    with pytest.raises(TypeError, match=r"^weight: "):
        logitkit.cross_entropy(x, y, weight=[1.0, 2.0, 3.0])
    h = to_lib(lib, np.zeros((2, 4)), "float32")
    W = to_lib(lib, np.zeros((3, 4)), "float32")
    with pytest.raises(TypeError, match=r"^linear_bias: "):
        logitkit.linear_cross_entropy(h, W, y, linear_bias=[0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match=r"^weight: "):
        logitkit.linear_cross_entropy(h, W, y, weight=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# item 11: read-only NumPy logits are valid input, read in place (no copy)


def _readonly_cases(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 50)).astype(np.float32)
    y = rng.integers(0, 50, 64)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    ro = x.copy()
    ro.flags.writeable = False
    cases = [mm, ro]
    jax = pytest.importorskip("jax")
    cases.append(np.asarray(jax.numpy.asarray(x)))
    for c in cases:
        assert not c.flags.writeable
    return x, y, cases


def test_issue13_item11_read_only_logits_accepted(tmp_path):
    x, y, cases = _readonly_cases(tmp_path)
    y_ro = y.copy()
    y_ro.flags.writeable = False
    for xr in cases:
        for opts in ({}, {"temperature": 2.0}, {"softcap": 3.0}, {"label_smoothing": 0.1}):
            np.testing.assert_array_equal(logitkit.cross_entropy(xr, y_ro, **opts),
                                          logitkit.cross_entropy(x, y, **opts))
            got = logitkit.cross_entropy_with_grad(xr, y_ro, reduction="none", **opts)
            want = logitkit.cross_entropy_with_grad(x, y, reduction="none", **opts)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        for fn in (logitkit.softmax, logitkit.log_softmax, logitkit.logsumexp):
            np.testing.assert_array_equal(fn(xr), fn(x))


def test_issue13_item11_read_only_logits_not_copied():
    import tracemalloc

    x = np.random.default_rng(3).standard_normal((1000, 2000)).astype(np.float32)  # 8 MB
    x.flags.writeable = False
    y = np.zeros(1000, np.int64)
    logitkit.cross_entropy(x, y)  # warm up (compilation allocates)
    tracemalloc.start()
    try:
        logitkit.cross_entropy(x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 8, f"{peak} bytes allocated: the logits were copied"


def test_issue13_item11_out_logits_read_only_is_a_clear_error(tmp_path):
    x, y, cases = _readonly_cases(tmp_path)
    for xr in cases:
        before = np.array(xr)
        with pytest.raises(ValueError, match=r"^out: .*read-only"):
            logitkit.cross_entropy_with_grad(xr, y, out=xr)
        np.testing.assert_array_equal(np.asarray(xr), before)


# ----------------------------------------------------------------------------------------------
# item 8: numba's workqueue layer must survive several Python threads calling the kernels

_THREADS_SCRIPT = r"""
import threading, numpy as np, logitkit, torch
from logitkit.kernels import cpu
cpu.set_num_threads(2)  # parallel kernels (the inputs are above the per-thread threshold)
rng = np.random.default_rng(8)
x = rng.standard_normal((512, 1024)).astype(np.float32)
y = rng.integers(0, 1024, 512)
x64 = x.astype(np.float64)
lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
want = float(np.mean(lse - x64[np.arange(512), y]))
p = np.exp(x64 - lse[:, None])
errs, done = [], []
def work(k):
    try:
        for _ in range(10):
            xt = torch.from_numpy(x)
            for got in (logitkit.cross_entropy(x, y), logitkit.cross_entropy(xt, torch.from_numpy(y))):
                assert abs(float(got) - want) <= 1e-6 * want, (float(got), want)
            _, g = logitkit.cross_entropy_with_grad(x, y, reduction="sum")
            oh = np.zeros_like(p); oh[np.arange(512), y] = 1
            assert np.abs(g - (p - oh)).max() < 1e-6
            assert np.abs(logitkit.softmax(x) - p).max() < 1e-6
            done.append(k)
    except BaseException as e:
        errs.append(repr(e))
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
import numba
assert numba.threading_layer() == "workqueue", numba.threading_layer()
assert not errs, errs
print("OK", len(done))
"""


@pytest.mark.timeout(240)
def test_issue13_item8_workqueue_layer_survives_threads():
    import os
    import subprocess
    import sys

    pytest.importorskip("numba")
    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=200)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["OK", "40"]


# ----------------------------------------------------------------------------------------------
# item 12: an empty class axis, an empty batch and hidden size 0 have one defined result


@pytest.mark.parametrize("lib", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("shape,axis", [((5, 0, 0), -1), ((3, 0), -1), ((0, 4), -1), ((2, 0, 3), 1)])
def test_issue13_item12_empty_softmax_axis(lib, shape, axis):
    x = to_lib(lib, np.zeros(shape), "float32")
    for fn in (logitkit.softmax, logitkit.log_softmax):
        for t in (1.0, 2.0):
            out = fn(x, axis=axis, temperature=t)
            assert tuple(out.shape) == shape and str(out.dtype).endswith("float32")
    lse = to_np(logitkit.logsumexp(x, axis=axis))
    want_shape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    assert lse.shape == want_shape and np.all(lse == -np.inf)


@pytest.mark.parametrize("lib", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                                  {"weight": "w"}, {"temperature": 2.0, "softcap": 5.0}])
def test_issue13_item12_no_classes_every_label_ignored(lib, opts):
    x = to_lib(lib, np.zeros((3, 0)), "float32")
    y = to_lib(lib, np.full(3, -100))
    if opts.get("weight") == "w":
        opts = {"weight": to_lib(lib, np.zeros(0), "float32")}
    for red in ("mean", "sum"):
        assert float(logitkit.cross_entropy(x, y, reduction=red, **opts)) == 0.0
    rows = to_np(logitkit.cross_entropy(x, y, reduction="none", **opts))
    np.testing.assert_array_equal(rows, np.zeros(3))
    np.testing.assert_array_equal(to_np(logitkit.token_logprobs(x, y)), np.zeros(3))
    # the class-index labels are now in [0, 0) nowhere: the usual out-of-range error
    with pytest.raises(ValueError, match=r"^labels: class index 0 at position 1 is out of range \[0, 0\)"):
        logitkit.cross_entropy(x, to_lib(lib, np.array([-100, 0, -100])), **opts)
    if lib != "jax":
        loss, g = logitkit.cross_entropy_with_grad(x, y, **opts)
        assert float(loss) == 0.0 and tuple(g.shape) == (3, 0)


def test_issue13_item12_no_classes_gradients():
    jax = pytest.importorskip("jax")
    x = to_lib("jax", np.zeros((3, 0)), "float32")
    y = to_lib("jax", np.full(3, -100))
    val, g = jax.value_and_grad(lambda a: logitkit.cross_entropy(a, y, label_smoothing=0.1))(x)
    assert float(val) == 0.0 and g.shape == (3, 0)
    torch = pytest.importorskip("torch")
    xt = torch.zeros((3, 0), requires_grad=True)
    logitkit.cross_entropy(xt, torch.full((3,), -100)).backward()
    assert xt.grad.shape == (3, 0)
    # probability labels over no class: each row's sum is over nothing, 0
    yp = np.zeros((3, 0), np.float32)
    np.testing.assert_array_equal(logitkit.cross_entropy(np.zeros((3, 0), np.float32), yp,
                                                         reduction="none"), np.zeros(3))


@pytest.mark.parametrize("lib", ["numpy", "jax", "torch"])
def test_issue13_item12_empty_batch(lib):
    x = to_lib(lib, np.zeros((0, 5)), "float32")
    y = to_lib(lib, np.zeros(0, np.int64))
    for opts in ({}, {"label_smoothing": 0.2, "z_loss": 1e-4, "weight": to_lib(lib, np.ones(5), "float32")}):
        for red in ("mean", "sum"):
            assert float(logitkit.cross_entropy(x, y, reduction=red, **opts)) == 0.0
        assert tuple(logitkit.cross_entropy(x, y, reduction="none", **opts).shape) == (0,)
    assert tuple(logitkit.cross_entropy(x, to_lib(lib, np.zeros((0, 5)), "float32")).shape) == ()


def test_issue13_item12_linear_hidden_size_zero_numpy():
    # H = 0: the logits are the bias (or 0), so the loss is cross_entropy of the bias rows
    b = np.arange(6.0)
    y = np.array([0, 1, 5, 3])
    got = logitkit.linear_cross_entropy(np.zeros((4, 0)), np.zeros((6, 0)), y, linear_bias=b)
    z = b - b.max()
    want = np.mean(np.log(np.exp(z).sum()) - z[y])
    assert float(got) == pytest.approx(want, rel=1e-14)
    loss, dh, dW, db = logitkit.linear_cross_entropy_with_grad(np.zeros((4, 0)), np.zeros((6, 0)), y,
                                                               linear_bias=b)
    assert dh.shape == (4, 0) and dW.shape == (6, 0)
    p = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(db, p - np.bincount(y, minlength=6) / 4, rtol=1e-12, atol=1e-15)
    assert float(logitkit.linear_cross_entropy(np.zeros((0, 3)), np.zeros((6, 3)), np.zeros(0, np.int64))) == 0.0
    assert float(logitkit.linear_cross_entropy(np.zeros((2, 3)), np.zeros((0, 3)), np.full(2, -100))) == 0.0
