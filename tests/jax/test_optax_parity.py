"""logitkit.jax against optax: same values and gradients on every function, axis and ``where``."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import logitkit.jax as lj  # noqa: E402

RTOL, ATOL = 2e-6, 2e-6  # optax rounds lse into a float32 first; logitkit does not


def _close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 4, 7)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 7, (3, 4)))
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 4, 7)), jnp.float32))
    mask = jnp.asarray(rng.random((3, 4, 7)) > 0.3)
    mask = mask.at[0, 0].set(False)  # a fully masked row
    mask = mask.at[1, 1].set(True).at[1, 1, int(y[1, 1])].set(False)  # label masked, row not
    return x, y, p, mask, rng


def _value_and_grads(fn, argnums, *args, **kw):
    """``fn``'s value and the gradient of a weighted sum of it, in one jitted program (one
    compilation per case is much cheaper than eager dispatch of every primitive)."""

    def both(*a):
        val = fn(*a, **kw)
        weights = jnp.arange(1, val.size + 1, dtype=val.dtype).reshape(val.shape)
        return val, jax.grad(lambda *b: jnp.sum(fn(*b, **kw) * weights), argnums=argnums)(*a)

    return jax.jit(both)(*args)


@pytest.mark.parametrize("where_kind", [None, "entries", "rows"])
def test_integer_labels_match_optax(data, where_kind):
    x, y, _, mask, _ = data
    where = {None: None, "entries": mask, "rows": mask.any(-1).at[2, 3].set(False)}[where_kind]
    ours, g_ours = _value_and_grads(lj.softmax_cross_entropy_with_integer_labels, 0, x, y, where=where)
    ref, g_ref = _value_and_grads(optax.softmax_cross_entropy_with_integer_labels, 0, x, y, where=where)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    _close(ours, ref)
    _close(g_ours, g_ref)
    if where_kind == "entries":
        assert float(ours[0, 0]) == 0.0 and not np.any(np.asarray(g_ours[0, 0]))
        # optax reads the label's logit unmasked: the gradient there is -1, none from the softmax
        assert float(g_ours[1, 1, int(y[1, 1])]) == pytest.approx(-float(1 * 4 + 1 + 1), rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -2, (1, 2), (2, 0)])
def test_integer_labels_axes_match_optax(data, axis):
    x, _, _, mask, rng = data
    ax = (axis,) if isinstance(axis, int) else axis
    nclass = int(np.prod([x.shape[a] for a in ax]))
    batch = tuple(s for i, s in enumerate(x.shape) if i not in [a % 3 for a in ax])
    y = jnp.asarray(rng.integers(0, nclass, batch))
    for where in (None, mask):
        ours, g_ours = _value_and_grads(lj.softmax_cross_entropy_with_integer_labels, 0, x, y, axis=axis, where=where)
        ref, g_ref = _value_and_grads(optax.softmax_cross_entropy_with_integer_labels, 0, x, y, axis=axis, where=where)
        _close(ours, ref)
        _close(g_ours, g_ref)


@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None])
@pytest.mark.parametrize("where_kind", [None, "entries", "rows"])
def test_probability_labels_match_optax(data, axis, where_kind):
    x, _, p, mask, _ = data
    if where_kind == "rows" and axis is None:
        pytest.skip("optax has no batch-shaped where for axis=None")
    where = {None: None, "entries": mask, "rows": mask.any(-1)}[where_kind]
    if where_kind == "rows" and axis != -1:
        where = mask.any(-1 if axis is None else axis)
    ours, (gx, gy) = _value_and_grads(lj.softmax_cross_entropy, (0, 1), x, p, axis=axis, where=where)
    ref, (rx, ry) = _value_and_grads(optax.softmax_cross_entropy, (0, 1), x, p, axis=axis, where=where)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    _close(ours, ref)
    _close(gx, rx)
    # optax's label gradient is NaN on masked entries (0·(-inf)); logitkit's is the exact 0 there.
    finite = np.isfinite(np.asarray(ry))
    _close(np.asarray(gy)[finite], np.asarray(ry)[finite])
    if where is not None:
        full = np.broadcast_to(np.asarray(jnp.expand_dims(where, axis) if where.ndim != x.ndim else where),
                               x.shape)
        assert not np.any(np.asarray(gy)[~full])
        assert np.all(np.isfinite(np.asarray(gy)))


def test_probability_labels_broadcast_and_integer_one_hot(data):
    x, y, _, _, _ = data
    row = jnp.asarray([0.1, 0.2, 0.0, 0.3, 0.1, 0.2, 0.1], jnp.float32)
    _close(lj.softmax_cross_entropy(x, row), optax.softmax_cross_entropy(x, row))
    gl = jax.grad(lambda r: lj.softmax_cross_entropy(x, r).sum())(row)
    gr = jax.grad(lambda r: optax.softmax_cross_entropy(x, r).sum())(row)
    _close(gl, gr, rtol=1e-5)
    onehot_int = jax.nn.one_hot(y, 7, dtype=jnp.int32)
    ours = lj.softmax_cross_entropy(x, onehot_int)
    assert ours.dtype == optax.softmax_cross_entropy(x, onehot_int).dtype
    _close(ours, optax.softmax_cross_entropy_with_integer_labels(x, y))


def test_safe_softmax_cross_entropy_matches_optax():
    x = jnp.asarray([[0.0, -jnp.inf, 1.0, 2.0], [3.0, -jnp.inf, -jnp.inf, 0.5]], jnp.float32)
    p = jnp.asarray([[0.5, 0.0, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]], jnp.float32)
    ours, (gx, gy) = _value_and_grads(lj.safe_softmax_cross_entropy, (0, 1), x, p)
    ref, (rx, ry) = _value_and_grads(optax.safe_softmax_cross_entropy, (0, 1), x, p)
    _close(ours, ref)
    _close(gx, rx)
    _close(gy, ry)  # +inf on the -inf logits in both: d/dy = -log p
    # optax's plain softmax_cross_entropy is NaN on these rows; logitkit's equals the safe one.
    assert np.all(np.isnan(np.asarray(optax.softmax_cross_entropy(x, p))))
    _close(lj.softmax_cross_entropy(x, p), ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_follow_optax(data, dtype):
    x, y, p, _, _ = data
    xl = x.astype(dtype)
    ours = lj.softmax_cross_entropy_with_integer_labels(xl, y)
    assert ours.dtype == optax.softmax_cross_entropy_with_integer_labels(xl, y).dtype == xl.dtype
    mixed = lj.softmax_cross_entropy(xl, p)
    assert mixed.dtype == optax.softmax_cross_entropy(xl, p).dtype == jnp.float32
    # accumulated in float32: the loss of the rounded logits, rounded once
    x64 = np.asarray(xl.astype(jnp.float32), np.float64)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    ref = lse - np.take_along_axis(x64, np.asarray(y)[..., None], -1)[..., 0]
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=eps, atol=eps)
    g = jax.grad(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).sum())(xl)
    assert g.dtype == xl.dtype


def test_jit_and_vmap_match_eager(data):
    x, y, p, mask, _ = data
    f = lambda a, b, w: lj.softmax_cross_entropy_with_integer_labels(a, b, where=w)
    _close(jax.jit(f)(x, y, mask), f(x, y, mask), rtol=1e-7, atol=0)
    _close(jax.vmap(f)(x, y, mask), f(x, y, mask), rtol=1e-7, atol=0)
    g = lambda a, b: lj.softmax_cross_entropy(a, b)
    _close(jax.vmap(jax.grad(lambda a, b: g(a, b).sum()))(x, p), jax.grad(lambda a: g(a, p).sum())(x), rtol=1e-6)
    ref = optax.softmax_cross_entropy_with_integer_labels
    _close(jax.jit(jax.vmap(jax.grad(lambda a, b: f(a, b, None).sum())))(x, y),
           jax.grad(lambda a: ref(a, y).sum())(x))


def test_errors_name_the_argument(data):
    x, y, p, _, _ = data
    with pytest.raises(TypeError, match="logits"):
        lj.softmax_cross_entropy_with_integer_labels(x.astype(jnp.int32), y)
    with pytest.raises(TypeError, match="labels"):
        lj.softmax_cross_entropy_with_integer_labels(x, p)
    with pytest.raises(ValueError, match="labels: class index 7 at position"):
        lj.softmax_cross_entropy_with_integer_labels(x, y.at[2, 1].set(7))
    with pytest.raises(ValueError, match="labels: class index -1"):
        lj.softmax_cross_entropy_with_integer_labels(x, y.at[0, 0].set(-1))
    with pytest.raises(ValueError, match="axis"):
        lj.softmax_cross_entropy_with_integer_labels(x, y, axis=None)
    with pytest.raises(ValueError, match="axis"):
        lj.softmax_cross_entropy(x, p, axis=3)
    with pytest.raises(ValueError, match="where"):
        lj.softmax_cross_entropy(x, p, where=jnp.ones((5, 7), bool))
    with pytest.raises(ValueError, match="labels"):
        lj.softmax_cross_entropy(x, p[:, :, :3])
    # Traced labels cannot be checked first: the bad row is NaN, the others are untouched.
    out = jax.jit(lj.softmax_cross_entropy_with_integer_labels)(x, y.at[2, 1].set(7))
    assert np.isnan(float(out[2, 1])) and np.isfinite(np.delete(np.asarray(out).ravel(), 9)).all()
