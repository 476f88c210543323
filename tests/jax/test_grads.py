"""The custom VJPs: float64 gradient checks, higher order, transformations, and what they keep."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy
from jax.test_util import check_grads as _check_grads  # noqa: E402

import logitkit  # noqa: E402
import logitkit.jax as lj  # noqa: E402
from logitkit.kernels.registry import use_core  # noqa: E402


def check_grads(f, args, *rest, **kw):
    """``jax.test_util.check_grads`` of ``jax.jit(f)``: the same derivative rules, traced once.
    Unjitted, every primitive of every perturbed call compiles on its own (about 3x the time);
    the eager dispatch of these functions is covered by the value and parity tests."""
    return _check_grads(jax.jit(f), args, *rest, **kw)


def _data(dtype=np.float64):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 6)) * 1.5, dtype)
    y = jnp.asarray(rng.integers(0, 6, 4)).at[2].set(-100)
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((4, 6)), dtype))
    w = jnp.asarray(rng.random(6) + 0.5, dtype)
    return x, y, p, w


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2, "z_loss": 1e-2},
                                  {"softcap": 3.0, "temperature": 0.7}, {"reduction": "sum"}],
                         ids=["plain", "smooth-zloss", "softcap-temperature", "sum"])
def test_check_grads_float64(x64, opts):
    x, y, p, w = _data()
    assert x.dtype == jnp.float64
    # integer labels: logits and class weights; probabilities: logits, labels and class weights
    check_grads(lambda a, c: lj.cross_entropy(a, y, weight=c, **opts), (x, w), order=1, modes=["rev"])
    check_grads(lambda a, b, c: lj.cross_entropy(a, b, weight=c, **opts), (x, p, w), order=1, modes=["rev"])


def test_check_grads_optax_functions_and_masks_float64(x64):
    x, y, p, _ = _data()
    y = jnp.where(y < 0, 1, y)
    where = x > -1.0
    check_grads(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y, where=where), (x,), 1, modes=["rev"])
    check_grads(lambda a, b: lj.softmax_cross_entropy(a, b, where=where), (x, p), 1, modes=["rev"])
    check_grads(lambda a, b: lj.safe_softmax_cross_entropy(a, b), (x, p), 1, modes=["rev"])
    # (check_grads also calls with NumPy arrays; the top level would refuse NumPy x with a JAX mask)
    check_grads(lambda a: logitkit.softmax(jnp.asarray(a), where=where, temperature=1.3), (x,), 1,
                modes=["rev"])
    check_grads(lambda a: jnp.where(where, logitkit.log_softmax(jnp.asarray(a), axis=0, where=where), 0.0),
                (x,), 1, modes=["rev"])


def test_second_order_reverse_and_hessian(x64):
    x, y, p, w = _data()
    x, y, p = x[1:3], y[1:3], p[1:3]  # one ignored row, one not; second order is costly to check
    f = lambda a: lj.cross_entropy(a, y, weight=w, label_smoothing=0.1, z_loss=1e-2)
    check_grads(f, (x,), order=2, modes=["rev"])
    check_grads(lambda a: lj.softmax_cross_entropy(a, p).sum(), (x,), order=2, modes=["rev"])
    # Hessian of the plain loss against the float64 formula diag(p) - p pᵀ (per row, / rows)
    yv = jnp.where(y < 0, 0, y)
    h = jax.hessian(lambda a: lj.softmax_cross_entropy_with_integer_labels(a[None], yv[1:])[0])(x[1])
    q = np.asarray(jax.nn.softmax(x[1]))
    np.testing.assert_allclose(np.asarray(h), np.diag(q) - np.outer(q, q), atol=1e-12)


def test_jit_vmap_checkpoint_agree():
    x, y, p, w = _data(np.float32)
    f = lambda a, b: lj.cross_entropy(a, b, weight=w, z_loss=1e-3, label_smoothing=0.05)
    g_eager = jax.grad(f)(x, y)
    g_ckpt = jax.jit(jax.grad(jax.checkpoint(f)))(x, y)
    np.testing.assert_allclose(np.asarray(g_ckpt), np.asarray(g_eager), rtol=1e-6, atol=1e-8)
    xs, ys = jnp.stack([x, 2 * x]), jnp.stack([y, y[::-1]])
    per = jax.jit(jax.vmap(jax.value_and_grad(f)))(xs, ys)
    for i in range(2):
        v, g = jax.value_and_grad(f)(xs[i], ys[i])
        np.testing.assert_allclose(float(per[0][i]), float(v), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(per[1][i]), np.asarray(g), rtol=1e-5, atol=1e-8)


def _new_residual_bytes(fn, x, *others):
    """Bytes that ``jax.vjp`` keeps for the backward beyond the caller's own arrays."""
    _, vjp_fn = jax.vjp(fn, x)
    own = {a.unsafe_buffer_pointer() for a in (x, *others)}
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_fn)
               if isinstance(leaf, jax.Array) and leaf.unsafe_buffer_pointer() not in own)


def test_forward_keeps_per_row_statistics_only():
    rng = np.random.default_rng(0)
    N, V = 64, 512
    x = jnp.asarray(rng.standard_normal((N, V)), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, N))
    ours = _new_residual_bytes(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).mean(), x, y)
    theirs = _new_residual_bytes(lambda a: optax.softmax_cross_entropy_with_integer_labels(a, y).mean(), x, y)
    # O(N) numbers beside the logits it already holds; optax keeps a new N×V array (its exp)
    assert ours <= 64 * N, ours
    assert theirs >= N * V * 4, theirs
    onehot = jax.nn.one_hot(y, V)
    prob = _new_residual_bytes(lambda a: lj.softmax_cross_entropy(a, onehot).mean(), x, onehot)
    assert prob <= 64 * N, prob


def test_compiled_temporaries_not_above_optax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 2048)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2048, 256))

    def temp(loss):
        step = jax.jit(jax.value_and_grad(lambda a: loss(a, y).mean()))
        ma = step.lower(x).compile().memory_analysis()
        if ma is None:
            pytest.skip("no memory analysis on this backend")
        return ma.temp_size_in_bytes

    ours, theirs = temp(lj.softmax_cross_entropy_with_integer_labels), temp(optax.softmax_cross_entropy_with_integer_labels)
    # Both hold only per-row vectors (the kernel route a few more: ce, m, r, int32 labels), never
    # an N×V temporary: the gradient is written straight into the output.
    N, V = x.shape
    assert ours <= theirs + 16 * N, (ours, theirs)
    assert ours < N * V, ours
    with use_core():  # the XLA route: the same bound
        assert temp(lj.softmax_cross_entropy_with_integer_labels) <= theirs + 16 * N
