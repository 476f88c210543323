"""Fused linear + cross-entropy on JAX arrays against the float64 NumPy reference.

Reference: ``logitkit.reference.cross_entropy64`` / ``cross_entropy_grad64`` of ``h @ W.T + b``,
chained through the product by hand, independent of the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import logitkit  # noqa: E402
from logitkit import reference as R  # noqa: E402
from logitkit.jax import linear as L  # noqa: E402


def _problem(rng, N=29, H=7, V=41, ignore=(3, 10, 11)):
    h = rng.standard_normal((N, H))
    W = rng.standard_normal((V, H)) * 0.7
    b = rng.standard_normal(V)
    y = rng.integers(0, V, N)
    y[[i for i in ignore if i < N]] = -100
    return h, W, b, y


def _reference(h, W, b, y, reduction, g, **o):
    z = h @ W.T + b
    loss = R.cross_entropy64(z, y, reduction=reduction, **o)
    dz = R.cross_entropy_grad64(z, y, reduction=reduction, **o)
    dz = dz * (g[:, None] if np.ndim(g) else g)
    return loss, dz @ W, dz.T @ h, dz.sum(0)


def _x64():
    return jax.enable_x64(True)


OPTIONS = [
    dict(),
    dict(label_smoothing=0.2, z_loss=1e-3),
    dict(weight=True, softcap=4.0, temperature=0.8),
]


@pytest.mark.parametrize("chunk", [None, 6, (5, 9)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_float64_loss_and_vjp(rng, opts, reduction, chunk):
    h, W, b, y = _problem(rng)
    o = dict(opts)
    if o.get("weight") is True:
        o["weight"] = rng.random(W.shape[0]) + 0.25
    g = rng.standard_normal(y.shape[0]) if reduction == "none" else 1.7
    want = _reference(h, W, b, y, reduction, g, **o)
    with _x64():
        jo = {k: (jnp.asarray(v) if k == "weight" else v) for k, v in o.items()}
        f = jax.jit(lambda h, W, b: L.linear_cross_entropy(h, W, jnp.asarray(y), linear_bias=b, reduction=reduction,
                                                           chunk_size=chunk, **jo))
        loss, vjp = jax.vjp(f, jnp.asarray(h), jnp.asarray(W), jnp.asarray(b))
        grads = vjp(jnp.asarray(g, jnp.float64) * jnp.ones_like(loss))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(loss), want[0], rtol=1e-12, atol=1e-12)
        for got, exp in zip(grads, want[1:]):
            np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-10, atol=1e-12)


def test_traced_labels_under_jit_grad(rng):
    h, W, b, y = _problem(rng, N=16, ignore=(0, 15))
    want = _reference(h, W, b, y, "mean", 1.0, label_smoothing=0.1)

    @jax.jit
    def step(h, W, b, y):
        return jax.value_and_grad(lambda h, W, b: L.linear_cross_entropy(h, W, y, linear_bias=b,
                                                                         label_smoothing=0.1),
                                  argnums=(0, 1, 2))(h, W, b)

    loss, grads = step(*(jnp.asarray(a, jnp.float32) for a in (h, W, b)), jnp.asarray(y))
    np.testing.assert_allclose(float(loss), want[0], rtol=2e-6)
    for got, exp in zip(grads, want[1:]):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(rng, reduction):
    h, W, b, y = _problem(rng, N=8)
    y[:] = -100
    f = lambda h, W, b: jnp.sum(L.linear_cross_entropy(h, W, jnp.asarray(y), linear_bias=b,  # noqa: E731
                                                       reduction=reduction, z_loss=0.1))
    args = [jnp.asarray(a, jnp.float32) for a in (h, W, b)]
    assert float(f(*args)) == 0.0
    for gr in jax.grad(f, argnums=(0, 1, 2))(*args):
        assert not np.any(np.asarray(gr))


@pytest.mark.parametrize("chunk", [None, (8, 16)])
def test_bfloat16(rng, chunk):
    h, W, b, y = _problem(rng, N=33, H=16, V=40)
    hb, Wb, bb = (jnp.asarray(a, jnp.float32).astype(jnp.bfloat16) for a in (h, W, b))
    hr, Wr, br = (np.asarray(a.astype(jnp.float32), np.float64) for a in (hb, Wb, bb))
    want = _reference(hr, Wr, br, y, "mean", 1.0)
    loss, grads = jax.value_and_grad(lambda h, W, b: L.linear_cross_entropy(h, W, jnp.asarray(y), linear_bias=b,
                                                                            chunk_size=chunk),
                                     argnums=(0, 1, 2))(hb, Wb, bb)
    assert loss.dtype == jnp.bfloat16
    assert abs(float(loss) - want[0]) <= 2 ** -7 * want[0]
    for got, exp in zip(grads, want[1:]):
        assert got.dtype == jnp.bfloat16
        err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - exp).max()
        assert err <= 2 ** -6 * np.abs(exp).max()


def test_entropy_and_logprobs(rng):
    h, W, b, y = _problem(rng, N=11, V=17, ignore=(4,))
    z = h @ W.T + b
    logp = R.log_softmax64(z)
    ent = -(np.exp(logp) * logp).sum(-1)
    lp = np.where(y != -100, np.take_along_axis(logp, np.where(y < 0, 0, y)[:, None], -1)[:, 0], 0.0)
    gw = rng.standard_normal(11)
    p = np.exp(logp)
    # d(Σ g H)/dz = -g p (log p + H); d(Σ g logp_y)/dz = g (onehot - p) on rows not ignored
    dz_e = -gw[:, None] * p * (logp + ent[:, None])
    onehot = np.eye(17)[np.where(y < 0, 0, y)] * (y != -100)[:, None]
    dz_l = gw[:, None] * (onehot - p) * (y != -100)[:, None]
    dz = dz_e + dz_l
    with _x64():
        args = [jnp.asarray(a) for a in (h, W, b)]
        for chunk in (None, (4, 5)):
            e = L.linear_entropy(*args[:2], linear_bias=args[2], chunk_size=chunk)
            lg = L.linear_token_logprobs(*args[:2], jnp.asarray(y), linear_bias=args[2], chunk_size=chunk)
            np.testing.assert_allclose(np.asarray(e), ent, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(np.asarray(lg), lp, rtol=1e-12, atol=1e-13)

            def tot(h, W, b):
                e = L.linear_entropy(h, W, linear_bias=b, chunk_size=chunk)
                lg = L.linear_token_logprobs(h, W, jnp.asarray(y), linear_bias=b, chunk_size=chunk)
                return jnp.sum((e + lg) * jnp.asarray(gw))

            grads = jax.grad(tot, argnums=(0, 1, 2))(*args)
            for got, exp in zip(grads, (dz @ W, dz.T @ h, dz.sum(0))):
                np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-10, atol=1e-12)


def test_errors():
    h = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="labels: class index 9"):
        L.linear_cross_entropy(h, jnp.zeros((5, 4)), jnp.asarray([0, 9, 1]))
    with pytest.raises(TypeError, match="linear_weight: expected hidden's dtype"):
        L.linear_cross_entropy(h, jnp.zeros((5, 4), jnp.bfloat16), jnp.asarray([0, 1, 1]))


def test_issue13_item15_jax_linear_token_logprobs_and_entropy(rng):
    # Issue 13 item 15: logitkit.jax lacked linear_token_logprobs and linear_entropy (logitkit.torch has
    # both). Values against float64 NumPy, gradients against jax.grad through the materialized logits.
    import logitkit.jax as lj

    assert lj.linear_token_logprobs is L.linear_token_logprobs and lj.linear_entropy is L.linear_entropy
    h, W, b, y = _problem(rng, N=9, V=13, ignore=(2,))
    z = h @ W.T + b
    logp = R.log_softmax64(z)
    valid = y != -100
    lp = np.where(valid, np.take_along_axis(logp, np.where(valid, y, 0)[:, None], -1)[:, 0], 0.0)
    ent = -(np.exp(logp) * logp).sum(-1)
    with _x64():
        args = [jnp.asarray(a) for a in (h, W, b)]
        jy = jnp.asarray(y)
        np.testing.assert_allclose(np.asarray(lj.linear_token_logprobs(*args[:2], jy, linear_bias=args[2])), lp,
                                   rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(np.asarray(lj.linear_entropy(*args[:2], linear_bias=args[2])), ent,
                                   rtol=1e-12, atol=1e-13)
        gw = jnp.asarray(rng.standard_normal(9))

        def ours(h, W, b):
            return jnp.sum((lj.linear_token_logprobs(h, W, jy, linear_bias=b, temperature=0.8)
                            + lj.linear_entropy(h, W, linear_bias=b, temperature=0.8)) * gw)

        def ref(h, W, b):
            ls = jax.nn.log_softmax((h @ W.T + b) / 0.8, -1)
            lpr = jnp.where(jy != -100, jnp.take_along_axis(ls, jnp.where(jy != -100, jy, 0)[:, None], -1)[:, 0], 0.0)
            return jnp.sum((lpr - (jnp.exp(ls) * ls).sum(-1)) * gw)

        for g, e in zip(jax.grad(ours, argnums=(0, 1, 2))(*args), jax.grad(ref, argnums=(0, 1, 2))(*args)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-10, atol=1e-12)


def test_issue13_item12_jax_linear_hidden_size_zero():
    """H = 0: the logits are the bias (or 0), as F.linear_cross_entropy gives, with empty-shaped grads."""
    h, w, y = jnp.zeros((3, 0)), jnp.zeros((5, 0)), jnp.array([0, 1, -100])
    b = jnp.arange(5.0)
    np.testing.assert_allclose(float(logitkit.linear_cross_entropy(h, w, y)), np.log(5.0), rtol=1e-6)
    ref = np.log(np.exp(np.arange(5.0)).sum()) - np.array([0.0, 1.0])
    np.testing.assert_allclose(float(logitkit.linear_cross_entropy(h, w, y, linear_bias=b)), ref.mean(), rtol=1e-6)
    gh, gw = jax.grad(lambda h, w: logitkit.linear_cross_entropy(h, w, y), argnums=(0, 1))(h, w)
    assert gh.shape == (3, 0) and gw.shape == (5, 0)
    np.testing.assert_allclose(np.asarray(logitkit.linear_entropy(h, w)), np.full(3, np.log(5.0)), rtol=1e-6)
    out = logitkit.linear_head(h, w, y, outputs=("loss", "logprobs"))
    np.testing.assert_allclose(np.asarray(out.logprobs), [-np.log(5.0)] * 2 + [0.0], rtol=1e-6)
