"""logitkit.jax.cross_entropy (and the top-level functions on JAX arrays) against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import logitkit  # noqa: E402
import logitkit.jax as lj  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

N, C = 6, 9
OPTIONS = [
    {},
    {"weight": True},
    {"label_smoothing": 0.15},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"temperature": 0.6},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "temperature": 1.7},
    {"label_smoothing": 1.0},
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((N, C)) * 2).astype(np.float32)
    y = rng.integers(0, C, N)
    y[[1, 4]] = -100
    p = rng.random((N, C)).astype(np.float32)
    p /= p.sum(-1, keepdims=True)
    w = (rng.random(C) + 0.5).astype(np.float32)
    return x, y, p, w


def _kw(opts, w, numpy=False):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = w if numpy else jnp.asarray(w)
    return kw


def _run(labels, kw):
    def both(x, labels, kw_arrays):
        k = {**kw, **kw_arrays}
        return jax.value_and_grad(lambda a: jnp.sum(lj.cross_entropy(a, labels, **k)))(x)

    arrays = {k: v for k, v in kw.items() if hasattr(v, "shape")}
    kw = {k: v for k, v in kw.items() if not hasattr(v, "shape")}
    return both, arrays


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_values_and_gradients_match_float64(data, kind, opts, reduction):
    x, y, p, w = data
    labels = y if kind == "index" else p
    kw = _kw(opts, w)
    static = {k: v for k, v in kw.items() if k != "weight"}

    @jax.jit
    def run(x, labels, weight):
        f = lambda a: lj.cross_entropy(a, labels, weight=weight, reduction=reduction, **static)
        return f(x), jax.grad(lambda a: jnp.sum(f(a)))(x)

    val, grad = run(jnp.asarray(x), jnp.asarray(labels), kw.get("weight"))
    ref = cross_entropy64(x, labels, reduction=reduction, **_kw(opts, w, numpy=True))
    gref = cross_entropy_grad64(x, labels, reduction=reduction, **_kw(opts, w, numpy=True))
    np.testing.assert_allclose(np.asarray(val, np.float64), ref, rtol=3e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad, np.float64), gref, rtol=3e-5, atol=2e-7)


def test_probability_label_and_weight_gradients(data):
    x, _, p, w = data
    eps = 0.2

    @jax.jit
    def grads(x, p, w):
        return jax.grad(lambda a, b, c: lj.cross_entropy(a, b, weight=c, label_smoothing=eps,
                                                          reduction="sum"), argnums=(1, 2))(x, p, w)

    gy, gw = grads(jnp.asarray(x), jnp.asarray(p), jnp.asarray(w))
    x64 = x.astype(np.float64)
    nlogp = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x64.max(-1, keepdims=True) - x64
    np.testing.assert_allclose(np.asarray(gy), (1 - eps) * w * nlogp, rtol=2e-6, atol=1e-7)
    smoothed = p * (1 - eps) + eps / C
    np.testing.assert_allclose(np.asarray(gw), (smoothed * nlogp).sum(0), rtol=2e-6)


def test_index_weight_gradient_includes_the_mean_denominator(data):
    x, y, _, w = data
    eps = 0.1

    @jax.jit
    def grad_w(x, w):
        return jax.grad(lambda c: lj.cross_entropy(x, jnp.asarray(y), weight=c, label_smoothing=eps))(w)

    got = np.asarray(grad_w(jnp.asarray(x), jnp.asarray(w)), np.float64)
    # central differences of the float64 reference (the loss is smooth in w)
    h = 1e-6
    fd = np.array([(cross_entropy64(x, y, weight=w + h * e, label_smoothing=eps)
                    - cross_entropy64(x, y, weight=w - h * e, label_smoothing=eps)) / (2 * h)
                   for e in np.eye(C)])
    np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-6)


def test_every_row_ignored_gives_zero_and_zero_gradient():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
    y = jnp.full((3,), -100)
    val, g = jax.value_and_grad(lambda a: lj.cross_entropy(a, y, z_loss=0.1))(x)
    assert float(val) == 0.0 and not np.any(np.asarray(g))
    val, g = jax.value_and_grad(lambda a: lj.cross_entropy(a[:0], y[:0]))(x)
    assert float(val) == 0.0 and not np.any(np.asarray(g))


def test_minus_inf_logits_are_masking_and_nan_stays_in_its_row():
    x = np.array([[0.0, -np.inf, 1.0, 2.0],
                  [-np.inf] * 4,              # fully masked, and ignored
                  [np.nan, 0.0, 0.0, 0.0],
                  [3.0, 1.0, -np.inf, 0.0]], np.float32)
    y = jnp.asarray([3, -100, 0, 0])
    f = jax.jit(lambda a: lj.cross_entropy(a, y, reduction="none", z_loss=1e-3))
    val = np.asarray(f(jnp.asarray(x)))
    g = np.asarray(jax.jit(jax.grad(lambda a: lj.cross_entropy(a, y, reduction="none").sum()))(jnp.asarray(x)))
    assert np.isnan(val[2]) and np.isnan(g[2]).all()
    keep = [0, 1, 3]
    # the float64 reference meets 0·inf on -inf logits; -1e30 has the same (zero) exp
    ref = cross_entropy64(np.where(np.isneginf(x), -1e30, x)[keep], np.asarray(y)[keep],
                          reduction="none", z_loss=1e-3)
    np.testing.assert_allclose(val[keep], ref, rtol=2e-6)
    assert val[1] == 0.0 and not np.any(g[1])
    assert np.all(np.isfinite(g[keep])) and g[0, 1] == 0.0 and g[3, 2] == 0.0


def test_axis_numpy_inputs_and_top_level_dispatch(data):
    x, y, p, w = data
    xt = np.ascontiguousarray(np.moveaxis(x.reshape(2, 3, C), -1, 1))  # (2, C, 3)
    yt = y.reshape(2, 3)
    got = lj.cross_entropy(xt, yt, axis=1, weight=w, reduction="none")
    assert isinstance(got, jax.Array) and got.shape == (2, 3)
    ref = cross_entropy64(x, y, weight=w, reduction="none").reshape(2, 3)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=1e-7)
    # logitkit.cross_entropy on JAX arrays goes through the custom JVP of logitkit.jax
    jaxpr = str(jax.make_jaxpr(lambda a: logitkit.cross_entropy(a, jnp.asarray(y)))(x))
    assert "custom_jvp_call" in jaxpr


def test_traced_out_of_range_label_is_nan_only_in_its_row(data):
    x, y, _, _ = data
    bad = jnp.asarray(y).at[0].set(C + 3)
    val = jax.jit(lambda a, b: lj.cross_entropy(a, b, reduction="none"))(jnp.asarray(x), bad)
    assert np.isnan(float(val[0])) and np.all(np.isfinite(np.asarray(val[1:])))
    with pytest.raises(ValueError, match="labels"):
        lj.cross_entropy(jnp.asarray(x), bad)
