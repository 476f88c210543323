"""The numerical contract's hard rows, in float32, against mpmath; optax's error measured alongside.

Confident row: label logit 40, the others N(0, 1), V = 32000 (true loss about 2.2e-13, which
optax returns as exactly 0). Offset row: every logit 1e4 + N(0, 1), the label's 8 higher (optax
rounds lse to a float32 near 1e4 first, losing about ulp(1e4)/2 = 5e-4 absolutely).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import logitkit  # noqa: E402
import logitkit.jax as lj  # noqa: E402
from logitkit.reference import row_loss_mp  # noqa: E402

TOL = 2.0 ** -21
V = 32000


def _rows():
    rng = np.random.default_rng(11)
    confident = rng.standard_normal(V).astype(np.float32)
    confident[123] = 40.0
    offset = (1e4 + rng.standard_normal(V)).astype(np.float32)
    offset[456] = np.float32(offset.max() + 8.0)
    x = np.stack([confident, offset])
    y = np.array([123, 456])
    exact = np.array([row_loss_mp(x[i], int(y[i])) for i in range(2)])
    return jnp.asarray(x), jnp.asarray(y), exact


@pytest.fixture(scope="module")
def rows():
    return _rows()


def _rel(got, exact):
    return np.abs(np.asarray(got, np.float64) - exact) / exact


def test_optax_fails_both_rows(rows):
    x, y, exact = rows
    err = _rel(optax.softmax_cross_entropy_with_integer_labels(x, y), exact)
    assert err[0] == 1.0  # exactly 0 returned for a loss of ~2.2e-13
    assert err[1] > 8 * TOL


@pytest.mark.parametrize("path", ["integer_labels", "one_hot", "cross_entropy", "top_level", "jit"])
def test_logitkit_meets_the_contract(rows, path):
    x, y, exact = rows
    assert 1e-13 < exact[0] < 1e-12
    if path == "integer_labels":
        got = lj.softmax_cross_entropy_with_integer_labels(x, y)
    elif path == "one_hot":
        got = lj.softmax_cross_entropy(x, jax.nn.one_hot(y, V))
    elif path == "cross_entropy":
        got = lj.cross_entropy(x, y, reduction="none")
    elif path == "top_level":
        got = logitkit.cross_entropy(x, jax.nn.one_hot(y, V), reduction="none")
    else:
        got = jax.jit(lj.softmax_cross_entropy_with_integer_labels)(x, y)
    assert got.dtype == jnp.float32
    assert np.all(_rel(got, exact) <= TOL), _rel(got, exact)


def test_gradients_stay_finite_and_sum_to_zero(rows):
    x, y, _ = rows
    g = jax.jit(jax.grad(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).sum()))(x)
    g = np.asarray(g, np.float64)
    assert np.all(np.isfinite(g))
    # softmax - onehot sums to 0 per row (to the float32 rounding of the label entry)
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-6)
    # the offset row's softmax, from float64 of the same float32 logits
    x64 = np.asarray(x[1], np.float64)
    p = np.exp(x64 - x64.max()); p /= p.sum()
    p[456] -= 1.0
    np.testing.assert_allclose(g[1], p, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_accumulates_in_float32(dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 4096)) * 4, dtype)
    y = jnp.asarray(rng.integers(0, 4096, 8))
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    exact = np.array([row_loss_mp(xf[i], int(y[i]), dps=30) for i in range(8)])
    got = jax.jit(lj.softmax_cross_entropy_with_integer_labels)(x, y)
    assert got.dtype == x.dtype
    # one rounding to the half type at the end, nothing more
    assert np.all(_rel(got.astype(jnp.float32), exact) <= float(jnp.finfo(dtype).eps))
    # the mean in float32 from float32 per-row values
    mean = lj.cross_entropy(x, y)
    assert abs(float(mean) - exact.mean()) <= float(jnp.finfo(dtype).eps) * exact.mean()
    # the gradient: softmax - onehot computed in float32 and rounded once
    g = jax.grad(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).sum())(x)
    p = np.exp(xf - xf.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(8), np.asarray(y)] -= 1.0
    np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), p, rtol=float(jnp.finfo(dtype).eps),
                               atol=1e-7)
