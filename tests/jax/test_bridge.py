"""Top-level softmax / log_softmax on JAX arrays: the bridge's custom VJPs, masks, temperature."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import logitkit  # noqa: E402
from logitkit.reference import row_lse_mp  # noqa: E402


def _ref(x, where, T, axis):
    z = np.where(where, np.asarray(x, np.float64) / T, -np.inf)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m)
    s = e.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)
        logp = np.where(where & (s > 0), z - m - np.log(np.where(s > 0, s, 1.0)), -np.inf)
    return p, logp


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_and_log_softmax_with_mask_and_temperature(axis):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 6)) * 3, jnp.float32)
    where = rng.random((5, 6)) > 0.4
    where[:, 2] = False  # a fully masked column (a row when axis=0)
    where[3] = False     # and a fully masked row
    mask = jnp.asarray(where)
    p_ref, logp_ref = _ref(x, where, 0.7, axis)

    @jax.jit
    def run(x):
        p = logitkit.softmax(x, axis=axis, where=mask, temperature=0.7)
        lp = logitkit.log_softmax(x, axis=axis, where=mask, temperature=0.7)
        gp = jax.grad(lambda a: jnp.sum(logitkit.softmax(a, axis=axis, where=mask, temperature=0.7) * x))(x)
        gl = jax.grad(lambda a: jnp.sum(jnp.where(mask, logitkit.log_softmax(a, axis=axis, where=mask,
                                                                            temperature=0.7), 0.0)))(x)
        return p, lp, gp, gl

    p, lp, gp, gl = map(np.asarray, run(x))
    np.testing.assert_allclose(p, p_ref, rtol=2e-6, atol=1e-7)
    finite = np.isfinite(logp_ref)
    np.testing.assert_array_equal(np.isfinite(lp), finite)
    np.testing.assert_allclose(lp[finite], logp_ref[finite], rtol=2e-6, atol=2e-6)
    # d/da Σ p(a)·c = p·(c - Σ p·c)/T (c = x held constant), and d/da Σ_unmasked log p = (1 - n·p)/T
    c = np.asarray(x, np.float64)
    gp_ref = p_ref * (c - (p_ref * c).sum(axis, keepdims=True)) / 0.7
    np.testing.assert_allclose(gp, gp_ref, rtol=1e-5, atol=1e-6)
    n = where.sum(axis, keepdims=True)
    gl_ref = np.where(where, (1.0 - n * p_ref) / 0.7, 0.0)
    np.testing.assert_allclose(gl, gl_ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gl))


def test_log_softmax_keeps_confident_and_offset_rows_exact():
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(9)
    confident = rng.standard_normal(4096).astype(np.float32)
    confident[7] = 40.0
    offset = (1e4 + rng.standard_normal(4096)).astype(np.float32)
    x = np.stack([confident, offset])
    lp = np.asarray(jax.jit(logitkit.log_softmax)(jnp.asarray(x)), np.float64)
    for i, j in [(0, 7), (1, 100)]:
        exact = float(mpmath.mpf(float(x[i, j])) - row_lse_mp(x[i]))  # subtracted before rounding
        assert abs(lp[i, j] - exact) <= 2.0 ** -21 * abs(exact)


def test_top_level_functions_use_the_custom_jvps():
    x = jnp.ones((2, 3))
    for fn in (logitkit.softmax, logitkit.log_softmax):
        assert "custom_jvp_call" in str(jax.make_jaxpr(fn)(x))
    assert "custom_jvp_call" in str(jax.make_jaxpr(lambda a: logitkit.cross_entropy(a, jnp.zeros(2, int)))(x))


def test_half_precision_softmax_rounds_once():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2000)) * 4, jnp.bfloat16)
    p = logitkit.softmax(x)
    assert p.dtype == jnp.bfloat16
    ref, _ = _ref(np.asarray(x.astype(jnp.float32)), np.ones((3, 2000), bool), 1.0, -1)
    np.testing.assert_allclose(np.asarray(p.astype(jnp.float32)), ref, rtol=2 ** -8, atol=1e-12)
