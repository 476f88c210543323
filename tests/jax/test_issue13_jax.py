"""Issue 13 on logitkit.jax: forward-mode autodiff (item 15), temperature / softcap with a large
common offset (item 2) and empty class axes or batches (item 12), on both routes.

References: optax's own tests (run here on logitkit's functions), central differences
(``check_grads``), reverse mode against forward mode, float64 formulas and mpmath.
"""

from __future__ import annotations

import contextlib
import types
import unittest

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
from jax.test_util import check_grads as _check_grads  # noqa: E402

import logitkit  # noqa: E402
import logitkit.jax as lj  # noqa: E402
from logitkit.jax import _ffi  # noqa: E402
from logitkit.kernels.registry import use_core  # noqa: E402


def check_grads(f, args, *rest, **kw):
    """``jax.test_util.check_grads`` of ``jax.jit(f)``: the same derivative rules, traced once.
    Unjitted, every primitive of every perturbed call compiles on its own (about 3x the time);
    the eager dispatch of these functions is covered by the value and parity tests."""
    return _check_grads(jax.jit(f), args, *rest, **kw)


ROUTES = ["kernels", "xla"]


def _route(route):
    """The kernel route (XLA FFI custom calls) or the XLA route, while the function is traced."""
    return use_core() if route == "xla" else contextlib.nullcontext()


def _kernels_or_skip(route):
    if route == "kernels" and not (_ffi._importable() and jax.default_backend() == "cpu"):
        pytest.skip("the kernel route needs numba and JAX on the CPU")


def _data(dtype=np.float64):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 5)) * 1.5, dtype)
    y = jnp.asarray([1, -100, 4])
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 5)), dtype))
    w = jnp.asarray(rng.random(5) + 0.5, dtype)
    return x, y, p, w


# ---------------------------------------------------------------------------------------------
# item 15: forward mode


CE_OPTIONS = [{}, {"label_smoothing": 0.2, "z_loss": 1e-2, "reduction": "sum"},
              {"softcap": 3.0, "temperature": 0.7, "reduction": "none"}]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=["plain", "smooth-zloss-sum", "softcap-temp-none"])
def test_issue13_item15_forward_mode_jvp(x64, route, opts):
    """``check_grads`` in both modes (central differences for each): cross_entropy with every
    option, in the logits, the class weight and the probability labels."""
    _kernels_or_skip(route)
    x, y, p, w = _data()
    with _route(route):
        check_grads(lambda a, c: lj.cross_entropy(a, y, weight=c, **opts), (x, w), order=1)
        check_grads(lambda a, b, c: lj.cross_entropy(a, b, weight=c, **opts), (x, p, w), order=1)
        # jax.jvp itself, against the float64 formula (p - onehot(y)) · t for the plain sum
        yv = jnp.where(y < 0, 0, y)
        t = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))
        val, tan = jax.jvp(lambda a: lj.cross_entropy(a, yv, reduction="sum"), (x,), (t,))
        q = np.asarray(jax.nn.softmax(x))
        expect = np.sum((q - np.eye(5)[np.asarray(yv)]) * np.asarray(t))
        np.testing.assert_allclose(float(tan), expect, rtol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_issue13_item15_forward_mode_second_order(x64, route):
    """Order 2 in forward mode (forward over forward; reverse over reverse is
    tests/jax/test_grads.py::test_second_order_reverse_and_hessian) on each optax-named loss and
    on cross_entropy with options; jacfwd(jacrev), jacrev(jacfwd) and jacfwd(jacfwd) give the
    Hessian."""
    _kernels_or_skip(route)
    x, y, p, w = _data()
    x, p = x[:2], p[:2]
    yv = jnp.asarray([1, 3])
    with _route(route):
        check_grads(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, yv), (x,), order=2, modes=["fwd"])
        check_grads(lambda a, b: lj.softmax_cross_entropy(a, b), (x, p), order=2, modes=["fwd"])
        check_grads(lambda a, c: lj.cross_entropy(a, yv, weight=c, label_smoothing=0.1, z_loss=1e-2),
                    (x, w), order=2, modes=["fwd"])
        f = lambda a: lj.softmax_cross_entropy_with_integer_labels(a[None], yv[:1])[0]  # noqa: E731
        h1 = jax.jit(jax.jacfwd(jax.jacrev(f)))(x[0])
        h2 = jax.jit(jax.jacrev(jax.jacfwd(f)))(x[0])
        h3 = jax.jit(jax.jacfwd(jax.jacfwd(f)))(x[0])
    q = np.asarray(jax.nn.softmax(x[0]))
    for h in (h1, h2, h3):
        np.testing.assert_allclose(np.asarray(h), np.diag(q) - np.outer(q, q), atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_issue13_item15_forward_mode_masks_and_softmax(x64, route):
    """optax's ``where`` (per class and per row), safe_softmax_cross_entropy and the softmaxes."""
    _kernels_or_skip(route)
    x, _, p, _ = _data()
    yv = jnp.asarray([1, 0, 4])
    where = x > -1.0
    rows = jnp.asarray([True, False, True])
    with _route(route):
        check_grads(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, yv, where=where), (x,), 1)
        check_grads(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, yv, where=rows), (x,), 1)
        check_grads(lambda a, b: lj.softmax_cross_entropy(a, b, where=where), (x, p), 1)
        check_grads(lambda a, b: lj.safe_softmax_cross_entropy(a, b), (x, p), 1)
        for log in (False, True):
            sm = logitkit.log_softmax if log else logitkit.softmax
            check_grads(lambda a: sm(jnp.asarray(a), temperature=1.3), (x,), 2)
            check_grads(lambda a: jnp.where(where, sm(jnp.asarray(a), axis=0, where=where), 0.0), (x,), 1)


@pytest.mark.parametrize("route", ROUTES)
def test_issue13_item15_forward_mode_under_jit_vmap_checkpoint(route):
    """jacfwd == jacrev, under jit, vmap and checkpoint, float32."""
    _kernels_or_skip(route)
    x, y, p, w = _data(np.float32)
    opts = {"weight": w, "label_smoothing": 0.05, "z_loss": 1e-3}
    losses = [lambda a: lj.cross_entropy(a, y, **opts),
              lambda a: lj.cross_entropy(a, p, **opts),
              lambda a: lj.softmax_cross_entropy_with_integer_labels(a, jnp.abs(y) % 5).sum(),
              lambda a: lj.softmax_cross_entropy(a, p).sum()]
    with _route(route):
        for f in losses:
            fwd = jax.jit(jax.jacfwd(jax.checkpoint(f)))(x)
            rev = jax.jit(jax.jacrev(f))(x)
            np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), rtol=2e-5, atol=1e-6)
        # a per-example loss under vmap, jvp inside and outside the vmap
        per = lambda a, b: lj.softmax_cross_entropy_with_integer_labels(a, b)  # noqa: E731
        xs, ys = jnp.stack([x, 2 * x]), jnp.stack([jnp.abs(y) % 5, jnp.asarray([0, 1, 2])])
        ts = jnp.ones_like(xs)
        inside = jax.jit(jax.vmap(lambda a, b, t: jax.jvp(lambda u: per(u, b), (a,), (t,))[1]))(xs, ys, ts)
        outside = jax.jvp(lambda u: jax.vmap(per)(u, ys), (xs,), (ts,))[1]
        rev = jax.vmap(lambda a, b, t: jnp.sum(jax.jacrev(per)(a, b) * t, axis=(1, 2)))(xs, ys, ts)
    np.testing.assert_allclose(np.asarray(inside), np.asarray(rev), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(outside), np.asarray(rev), rtol=2e-5, atol=1e-6)


def test_issue13_item15_reverse_mode_keeps_the_kernels():
    """Reverse mode is the transpose of the tangent rule and still runs both kernels (no XLA
    backward), keeping per-row statistics only; forward mode runs the forward kernel."""
    _kernels_or_skip("kernels")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 64, 16))
    f = lambda a: lj.cross_entropy(a, y)  # noqa: E731
    text = jax.jit(jax.grad(f)).lower(x).as_text()
    assert "logitkit_ce_forward_float32" in text and "logitkit_ce_backward_float32" in text
    text = jax.jit(lambda a, t: jax.jvp(f, (a,), (t,))).lower(x, x).as_text()
    assert "logitkit_ce_forward_float32" in text
    p = jax.nn.softmax(x)
    text = jax.jit(jax.grad(lambda a: lj.softmax_cross_entropy(a, p).sum())).lower(x).as_text()
    assert "logitkit_prob_forward_float32" in text and "logitkit_prob_backward_float32" in text


_OPTAX_CLASSES = ("SoftmaxCrossEntropyTest", "SafeSoftmaxCrossEntropyTest",
                  "SoftmaxCrossEntropyWithIntegerLabelsTest")


def _optax_tests():
    try:
        mod = __import__("optax.losses._classification_test", fromlist=["_"])
    except ImportError:  # optax not installed, or a wheel without its tests
        return None, []
    return mod, [(c, m) for c in _OPTAX_CLASSES for m in sorted(dir(getattr(mod, c)))
                 if m.startswith("test")]


_OPTAX_MOD, _OPTAX_CASES = _optax_tests()


@pytest.mark.skipif(_OPTAX_MOD is None, reason="the installed optax ships no classification tests")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", _OPTAX_CASES, ids=[f"{c}.{m}" for c, m in _OPTAX_CASES])
def test_issue13_item15_optax_classification_tests(monkeypatch, route, case):
    """optax's own tests of the three softmax cross-entropies (``check_grads`` in both modes
    among them), run unchanged on logitkit.jax's functions."""
    _kernels_or_skip(route)
    ours = types.SimpleNamespace(
        softmax_cross_entropy=lj.softmax_cross_entropy,
        safe_softmax_cross_entropy=lj.safe_softmax_cross_entropy,
        softmax_cross_entropy_with_integer_labels=lj.softmax_cross_entropy_with_integer_labels)
    monkeypatch.setattr(_OPTAX_MOD, "_classification", ours)
    cls, method = case
    test = getattr(_OPTAX_MOD, cls)(method)
    result = unittest.TestResult()
    with _route(route):
        test.run(result)
    problems = result.errors + result.failures
    assert result.testsRun == 1 and not problems, problems[0][1] if problems else "not run"


# ---------------------------------------------------------------------------------------------
# item 2: temperature and softcap with a large common offset


def _mp_row(xs, label, temperature, softcap):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        z = [mpmath.mpf(float(v)) for v in xs]
        if softcap is not None:
            z = [softcap * mpmath.tanh(v / softcap) for v in z]
        z = [v / temperature for v in z]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in z))
        return float(lse - z[label]), [float(mpmath.exp(v - lse)) for v in z]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("softcap", [None, 2e4, 5e4], ids=["no-cap", "cap2e4", "cap5e4"])
@pytest.mark.parametrize("temperature", [3.0, 0.3, 7.0])
def test_issue13_item2_temperature_large_offset(route, softcap, temperature):
    """Logits [10000.346, 10000.821] (and shifted copies): float32 loss per row within 2^-21 of
    mpmath at every temperature and softcap, softmax and the weight gradient too."""
    _kernels_or_skip(route)
    x = np.array([[10000.346, 10000.821], [10000.821, 10000.346], [-5000.25, -5000.75],
                  [1e4 + 0.5, 1e4 + 0.5 + 2 ** -9]], np.float32)
    y = np.array([0, 0, 1, 1])
    refs = [_mp_row(x[i], y[i], temperature, softcap) for i in range(len(x))]
    ce_ref = np.array([r[0] for r in refs])
    p_ref = np.array([r[1] for r in refs])
    w = jnp.ones((2,), jnp.float32)
    with _route(route):
        ce = lj.cross_entropy(jnp.asarray(x), jnp.asarray(y), reduction="none", temperature=temperature,
                              softcap=softcap)
        # d(Σ w_y·ce)/d w_c at w = 1 is Σ over rows with label c of ce: the weight-gradient path
        dw = jax.grad(lambda c: lj.cross_entropy(jnp.asarray(x), jnp.asarray(y), weight=c, reduction="sum",
                                                 temperature=temperature, softcap=softcap))(w)
        prob = lj.cross_entropy(jnp.asarray(x), jnp.asarray(np.eye(2, dtype=np.float32)[y]), reduction="none",
                                temperature=temperature, softcap=softcap)
        if softcap is None:
            sm = logitkit.softmax(jnp.asarray(x), temperature=temperature)
            np.testing.assert_allclose(np.asarray(sm, np.float64), p_ref, rtol=2 ** -21, atol=0)
    bound = 2.0 ** -21
    np.testing.assert_allclose(np.asarray(ce, np.float64), ce_ref, rtol=bound, atol=0)
    np.testing.assert_allclose(np.asarray(prob, np.float64), ce_ref, rtol=bound, atol=0)
    dw_ref = np.array([ce_ref[y == c].sum() for c in range(2)])
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=bound, atol=0)


# ---------------------------------------------------------------------------------------------
# item 12: empty class axis, empty batch


@pytest.mark.parametrize("route", ROUTES)
def test_issue13_item12_empty_class_axis_and_batch(route):
    """No classes (every label ignored) and no rows give defined results on every logitkit.jax
    loss, the same as on NumPy arrays: 0 for a mean over nothing, empty arrays for per-row
    results, zero gradients of the logits' shape (reverse and forward mode); a label that indexes
    nothing is a clear error. (Probability rows with no class have lse = -inf, so a z-loss makes
    them +inf, as on NumPy.)"""
    _kernels_or_skip(route)
    empty_v = jnp.zeros((3, 0), jnp.float32)
    ignored = jnp.full((3,), -100)
    empty_n = jnp.zeros((0, 5), jnp.float32)
    no_labels = jnp.zeros((0,), jnp.int32)
    with _route(route):
        for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0, "temperature": 0.5},
                     {"weight": jnp.zeros((0,))}):
            for x, y in ((empty_v, ignored), (empty_n, no_labels), (empty_n, jnp.zeros((0, 5))),
                         (empty_v, jnp.zeros((3, 0)))):
                if "weight" in opts and x.shape[-1] != 0:
                    continue
                np_opts = {k: np.asarray(v) if k == "weight" else v for k, v in opts.items()}
                for reduction in ("mean", "sum"):
                    expect = logitkit.cross_entropy(np.asarray(x), np.asarray(y), reduction=reduction,
                                                    **np_opts)
                    assert expect == 0.0 or "z_loss" in opts
                    f = lambda a: lj.cross_entropy(a, y, reduction=reduction, **opts)  # noqa: E731
                    val, g = jax.value_and_grad(f)(x)
                    assert float(val) == float(expect) and g.shape == x.shape
                    assert not np.any(np.asarray(g))
                    _, t = jax.jvp(f, (x,), (x,))
                    assert float(t) == 0.0 or not np.isfinite(float(val))
                none = lj.cross_entropy(x, y, reduction="none", **opts)
                expect = logitkit.cross_entropy(np.asarray(x), np.asarray(y), reduction="none", **np_opts)
                assert none.shape == x.shape[:-1]
                np.testing.assert_array_equal(np.asarray(none), expect)
        # the optax-named functions: one value per row (0 without classes), empty for no rows
        for fn, x, y in ((lj.softmax_cross_entropy, empty_v, jnp.zeros((3, 0))),
                         (lj.safe_softmax_cross_entropy, empty_v, jnp.zeros((3, 0))),
                         (lj.softmax_cross_entropy, empty_n, jnp.zeros((0, 5))),
                         (lj.softmax_cross_entropy_with_integer_labels, empty_n, no_labels)):
            out = fn(x, y)
            assert out.shape == x.shape[:-1] and not np.any(np.asarray(out))
            g = jax.grad(lambda a: fn(a, y).sum())(x)
            assert g.shape == x.shape
        with pytest.raises(ValueError, match="labels"):
            lj.softmax_cross_entropy_with_integer_labels(empty_v, jnp.zeros((3,), jnp.int32))
        with pytest.raises(ValueError, match="labels"):
            lj.cross_entropy(empty_v, jnp.zeros((3,), jnp.int32))
        for sm in (logitkit.softmax, logitkit.log_softmax):
            for shape in ((3, 0), (5, 0, 0), (0, 4)):
                x = jnp.zeros(shape, jnp.float32)
                assert sm(x).shape == shape
                assert jax.grad(lambda a: sm(a).sum())(x).shape == shape
                assert jax.jvp(sm, (x,), (x,))[1].shape == shape
