"""The class-index losses on the numba kernels (XLA FFI custom calls) against the XLA route."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import logitkit.jax as lj  # noqa: E402
from logitkit import reference  # noqa: E402
from logitkit.jax import _ffi  # noqa: E402
from logitkit.kernels.registry import use_core  # noqa: E402

pytestmark = pytest.mark.skipif(not _ffi._importable() or jax.default_backend() != "cpu",
                                reason="needs numba and JAX on the CPU")


def _data(n=24, v=37, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((n, v))).astype(dtype)
    y = rng.integers(0, v, n)
    y[::5] = -100
    w = rng.uniform(0.2, 2.0, v).astype(np.float32)
    return x, y, w


def _both(f, *args):
    """f(*args) on the kernel route and on the XLA route."""
    a = f(*args)
    with use_core():
        b = f(*args)
    return a, b


def _hlo(f, *args):
    return jax.jit(f).lower(*args).as_text()


def test_kernel_route_is_a_custom_call_and_use_core_is_not():
    x, y, _ = _data()
    x, y = jnp.asarray(x), jnp.asarray(y)
    f = lambda a: lj.cross_entropy(a, y)  # noqa: E731
    assert "logitkit_ce_forward_float32" in _hlo(f, x)
    text = _hlo(jax.grad(f), x)
    assert "logitkit_ce_forward_float32" in text and "logitkit_ce_backward_float32" in text
    with use_core():
        assert "logitkit_ce" not in _hlo(jax.grad(f), x)
    # a class mask always takes the XLA route
    where = jnp.ones(x.shape, bool)
    yy = jnp.abs(y) % x.shape[-1]
    assert "logitkit_ce" not in _hlo(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, yy, where=where), x)


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"softcap": 5.0},
    {"temperature": 0.7},
    {"softcap": 3.0, "temperature": 1.6, "label_smoothing": 0.05},
    {"z_loss": 1e-2, "reduction": "sum"},
    {"ignore_index": 3, "reduction": "none"},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_values_and_gradients_match_the_xla_route(opts, weighted, dtype, x64):
    x, y, w = _data(dtype=np.float64)
    x = jnp.asarray(x).astype(dtype)
    y = jnp.asarray(np.where(y == -100, opts.get("ignore_index", -100), y))
    w = jnp.asarray(w, jnp.float32 if dtype != "float64" else jnp.float64) if weighted else None

    def f(a, c):
        out = lj.cross_entropy(a, y, weight=c, **opts)
        return out.sum() if out.ndim else out

    (v1, (g1, gw1)), (v2, (g2, gw2)) = _both(lambda: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w))
    tol = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-6, "bfloat16": 2e-6}[dtype]
    np.testing.assert_allclose(float(v1), float(v2), rtol=tol * 4)
    gtol = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(np.asarray(g1, np.float64), np.asarray(g2, np.float64), rtol=gtol, atol=gtol * 1e-3)
    if weighted:
        # float32 sums over rows in another order: compare at the scale of the largest entry
        scale = float(np.abs(np.asarray(gw2)).max())
        np.testing.assert_allclose(np.asarray(gw1), np.asarray(gw2), rtol=tol * 10, atol=tol * 10 * scale)


def test_float32_against_the_float64_oracle_with_options():
    x, y, w = _data(n=40, v=300)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    got = lj.cross_entropy(xj, yj, weight=jnp.asarray(w), label_smoothing=0.1, reduction="none")
    want = reference.cross_entropy64(x, y, weight=w, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6)
    g = jax.grad(lambda a: lj.cross_entropy(a, yj, reduction="sum"))(xj)
    np.testing.assert_allclose(np.asarray(g), reference.cross_entropy_grad64(x, y, reduction="sum"), atol=2e-7)


def test_confident_row_keeps_its_tiny_loss_and_gradient():
    x = np.zeros((1, 4), np.float32)
    x[0, 2] = 30.0
    y = jnp.asarray([2])
    ce = lj.softmax_cross_entropy_with_integer_labels(jnp.asarray(x), y)
    want = 3 * np.exp(-30.0)
    np.testing.assert_allclose(float(ce[0]), want, rtol=1e-6)
    g = jax.grad(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).sum())(jnp.asarray(x))
    np.testing.assert_allclose(float(g[0, 2]), -want, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, 37, 10**6])
def test_traced_out_of_range_label_gives_a_nan_row_not_garbage(bad):
    x, y, _ = _data()
    y = np.where(y == -100, 0, y)  # optax's function has no ignore_index
    y[1] = bad
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    f = jax.jit(lambda a, b: lj.softmax_cross_entropy_with_integer_labels(a, b))
    ce = np.asarray(f(xj, yj))
    assert np.isnan(ce[1]) and np.isfinite(ce[np.arange(len(y)) != 1]).all()
    g = np.asarray(jax.jit(jax.grad(lambda a, b: f(a, b).sum()))(xj, yj))
    assert np.isnan(g[1]).all() and np.isfinite(np.delete(g, 1, axis=0)).all()


def test_int64_labels_beyond_int32_are_bad_not_wrapped(x64):
    x, y, _ = _data()
    y = np.where(y == -100, 0, y).astype(np.int64)
    y[2] = 2**32 + 1  # would be class 1 if cast to int32 first
    f = jax.jit(lj.softmax_cross_entropy_with_integer_labels)  # traced labels: not checked eagerly
    ce = np.asarray(f(jnp.asarray(x), jnp.asarray(y)))
    assert np.isnan(ce[2])


def test_ignored_rows_are_zero_with_zero_gradient():
    x, y, _ = _data()
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    loss = np.asarray(lj.cross_entropy(xj, yj, reduction="none"))
    assert (loss[y == -100] == 0).all() and (loss[y != -100] > 0).all()
    g = np.asarray(jax.grad(lambda a: lj.cross_entropy(a, yj, z_loss=1e-2))(xj))
    assert (g[y == -100] == 0).all() and (np.abs(g[y != -100]).sum(-1) > 0).all()


def test_special_rows_match_the_xla_route():
    x = np.zeros((4, 5), np.float32)
    x[0] = -np.inf
    x[1, 2] = np.inf
    x[2, 3] = np.nan
    x[3, :] = [1e4, 1e4 + 1, 1e4, 1e4 - 2, 1e4]
    y = jnp.asarray([0, 1, 2, 1])
    f = lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y)  # noqa: E731
    a, b = _both(f, jnp.asarray(x))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_vmap_over_logits_and_weights():
    x, y, w = _data()
    xs = jnp.stack([jnp.asarray(x), 2 * jnp.asarray(x)])
    ws = jnp.stack([jnp.asarray(w), jnp.ones_like(jnp.asarray(w))])
    yj = jnp.asarray(y)
    f = lambda a, c: lj.cross_entropy(a, yj, weight=c, label_smoothing=0.1)  # noqa: E731
    vals, grads = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1))))(xs, ws)
    for i in range(2):
        v, (gx, gw) = jax.value_and_grad(f, argnums=(0, 1))(xs[i], ws[i])
        np.testing.assert_allclose(float(vals[i]), float(v), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[0][i]), np.asarray(gx), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.asarray(grads[1][i]), np.asarray(gw), rtol=1e-5, atol=1e-9)


def test_parallel_size_and_higher_rank_inputs():
    # above the serial threshold (2 x 2^17 elements), with two batch axes
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 64, 1200)).astype(np.float32)
    y = rng.integers(0, 1200, (4, 64))
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    f = lambda a: lj.softmax_cross_entropy_with_integer_labels(a, yj).mean()  # noqa: E731
    (v1, g1), (v2, g2) = _both(lambda: jax.jit(jax.value_and_grad(f))(xj))
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-10)
    want = reference.cross_entropy64(x.reshape(-1, 1200), y.reshape(-1))
    np.testing.assert_allclose(float(v1), want, rtol=1e-6)


def test_second_order_through_the_kernels(x64):
    x, y, w = _data(n=3, v=6, dtype=np.float64)
    y = np.abs(y) % 6
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    f = lambda a: lj.cross_entropy(a, yj, weight=jnp.asarray(w, jnp.float64), label_smoothing=0.1)  # noqa: E731
    h1, h2 = _both(lambda: jax.jit(jax.hessian(f))(xj))  # jitted: eager compiles op by op
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-10, atol=1e-14)


def test_large_gradient_buffer_with_huge_page_advice():
    # a 16 MB gradient: the backward handler advises huge pages on XLA's fresh output first
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((512, 8192)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 8192, 512))
    f = jax.jit(jax.grad(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).sum()))
    g1 = f(x)
    with use_core():
        g2 = jax.jit(jax.grad(lambda a: lj.softmax_cross_entropy_with_integer_labels(a, y).sum()))(x)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(np.asarray(g1).sum(-1), 0.0, atol=1e-5)


# ---------------------------------------------------------------------------- probability labels
def _probs(n=24, v=37, seed=1):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(v, 0.3), n)
    p[::4] = np.eye(v)[rng.integers(0, v, len(p[::4]))]  # some one-hot rows
    return p


def test_probability_labels_take_the_kernel_route():
    x, _, _ = _data()
    p = jnp.asarray(_probs(), jnp.float32)
    f = lambda a: lj.softmax_cross_entropy(a, p).sum()  # noqa: E731
    text = _hlo(jax.grad(f), jnp.asarray(x))
    assert "logitkit_prob_forward_float32" in text and "logitkit_prob_backward_float32" in text


PROB_OPTIONS = [{}, {"label_smoothing": 0.1}, {"softcap": 4.0, "temperature": 1.3}, {"z_loss": 1e-2},
                {"temperature": 0.5, "reduction": "none"}]


@pytest.mark.parametrize("opts", PROB_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_probability_values_and_all_gradients_match_the_xla_route(opts, weighted, dtype, x64):
    x, _, w = _data(dtype=np.float64)
    x = jnp.asarray(x).astype(dtype)
    acc = jnp.float64 if dtype == "float64" else jnp.float32
    p = jnp.asarray(_probs(), acc)
    w = jnp.asarray(w, acc) if weighted else None

    def f(a, b, c):
        out = lj.cross_entropy(a, b, weight=c, **opts)
        return out.sum() if out.ndim else out

    (v1, g1), (v2, g2) = _both(lambda: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, p, w))
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(float(v1), float(v2), rtol=tol * 4)
    for a, b in zip(g1, g2):
        if b is None:
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        gtol = {"float64": 1e-11, "float32": 2e-6, "bfloat16": 8e-3}[dtype] if a.shape == x.shape else tol * 10
        np.testing.assert_allclose(a, b, rtol=gtol, atol=gtol * max(1e-3, np.abs(b).max() * 1e-2))


def test_probability_oracle_confident_and_special_rows():
    x, _, _ = _data(n=20, v=50)
    p = _probs(n=20, v=50)
    got = lj.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), reference.cross_entropy64(x, p, reduction="none"), rtol=3e-6)
    # one-hot on a confident row: exact tiny loss; -inf row with zero target: 0; NaN row: NaN
    x = np.zeros((3, 4), np.float32)
    x[0, 1] = 30.0
    x[1] = -np.inf
    x[2, 0] = np.nan
    p = np.zeros((3, 4), np.float32)
    p[0, 1] = 1.0
    p[2, 2] = 1.0
    a, b = _both(lambda: lj.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(p)))
    np.testing.assert_allclose(float(a[0]), 3 * np.exp(-30.0), rtol=1e-6)
    assert float(a[1]) == 0.0 and np.isnan(float(a[2]))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    g = np.asarray(jax.grad(lambda a: lj.softmax_cross_entropy(a, jnp.asarray(p)).sum())(jnp.asarray(x)))
    assert (g[1] == 0).all() and np.isnan(g[2]).all()


def test_probability_second_order_and_vmap(x64):
    x, _, _ = _data(n=3, v=5, dtype=np.float64)
    p = jnp.asarray(_probs(n=3, v=5))
    f = lambda a: lj.cross_entropy(a, p, label_smoothing=0.1, z_loss=1e-2)  # noqa: E731
    h1, h2 = _both(lambda: jax.jit(jax.hessian(f))(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-10, atol=1e-14)
    xs = jnp.stack([jnp.asarray(x), -jnp.asarray(x)])
    ps = jnp.stack([p, p[::-1]])
    g = lambda a, b: lj.softmax_cross_entropy(a, b).sum()  # noqa: E731
    vals, grads = jax.jit(jax.vmap(jax.value_and_grad(g, argnums=(0, 1))))(xs, ps)
    for i in range(2):
        v, (gx, gp) = jax.value_and_grad(g, argnums=(0, 1))(xs[i], ps[i])
        np.testing.assert_allclose(float(vals[i]), float(v), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grads[0][i]), np.asarray(gx), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(np.asarray(grads[1][i]), np.asarray(gp), rtol=1e-12, atol=1e-15)


def test_independent_kernel_calls_in_one_program():
    # XLA may run independent custom calls on different threads at once; both launch the
    # parallel kernels (each above the serial threshold)
    rng = np.random.default_rng(5)
    xs = [jnp.asarray(rng.standard_normal((256, 2048)).astype(np.float32)) for _ in range(3)]
    ys = [jnp.asarray(rng.integers(0, 2048, 256)) for _ in range(3)]

    def f(a, b, c):
        return sum(lj.softmax_cross_entropy_with_integer_labels(t, y).mean() for t, y in zip((a, b, c), ys))

    v, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*xs)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(g[i]), reference.cross_entropy_grad64(np.asarray(xs[i]), np.asarray(ys[i])),
                                   atol=1e-8)
    want = sum(reference.cross_entropy64(np.asarray(t), np.asarray(y)) for t, y in zip(xs, ys))
    np.testing.assert_allclose(float(v), want, rtol=1e-6)


# ---------------------------------------------------------------------------- softmax / log_softmax
import logitkit  # noqa: E402


def test_softmax_takes_the_kernel_route_only_over_the_last_axis_without_mask():
    x = jnp.asarray(_data()[0])
    assert "logitkit_softmax_forward_float32" in _hlo(logitkit.softmax, x)
    assert "logitkit_softmax_backward_float32" in _hlo(jax.grad(lambda a: (logitkit.log_softmax(a) ** 2).sum()), x)
    assert "logitkit_softmax" not in _hlo(lambda a: logitkit.softmax(a, axis=0), x)
    assert "logitkit_softmax" not in _hlo(lambda a: logitkit.softmax(a, where=a > 0), x)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_softmax_values_and_gradients_match_the_xla_route_and_float64(log, temperature, dtype, x64):
    x64_, _, _ = _data(n=17, v=300, dtype=np.float64)
    x = jnp.asarray(x64_).astype(dtype)
    xr = np.asarray(x.astype(jnp.float64))
    fn = logitkit.log_softmax if log else logitkit.softmax
    gw = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape)).astype(dtype)
    f = lambda a: (fn(a, temperature=temperature).astype(jnp.float64) * gw.astype(jnp.float64)).sum()  # noqa: E731
    (o1, g1), (o2, g2) = _both(lambda: (jax.jit(lambda a: fn(a, temperature=temperature))(x), jax.jit(jax.grad(f))(x)))
    want = reference.log_softmax64(xr / temperature) if log else reference.softmax64(xr / temperature)
    tol = {"float64": 1e-13, "float32": 2e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    for o in (o1, o2):
        np.testing.assert_allclose(np.asarray(o, np.float64), want, rtol=tol, atol=tol * 1e-2)
    np.testing.assert_allclose(np.asarray(g1, np.float64), np.asarray(g2, np.float64), rtol=tol * 4,
                               atol=tol * np.abs(np.asarray(g2, np.float64)).max())


def test_softmax_special_rows_vmap_and_second_order(x64):
    x = np.zeros((3, 4))
    x[0] = -np.inf
    x[1, 2] = np.inf
    x[2, 1] = 1e4
    for fn in (logitkit.softmax, logitkit.log_softmax):
        a, b = _both(lambda: fn(jnp.asarray(x)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    xs = jnp.asarray(np.random.default_rng(8).standard_normal((2, 5, 6)))
    np.testing.assert_allclose(np.asarray(jax.vmap(logitkit.softmax)(xs)), np.asarray(jax.nn.softmax(xs)), rtol=1e-13)
    h1, h2 = _both(lambda: jax.hessian(lambda a: logitkit.log_softmax(a)[0, 1] + logitkit.softmax(a)[1, 2])(xs[0]))
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-10, atol=1e-14)


def test_a_handler_that_cannot_be_built_falls_back_to_xla_with_a_warning(monkeypatch):
    def fail(kind, dtype):
        raise OSError("no toolchain")

    monkeypatch.setattr(_ffi, "_target", fail)
    monkeypatch.setattr(_ffi, "_broken", {})
    x, y, _ = _data()
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    with pytest.warns(RuntimeWarning, match="no toolchain"):
        text = _hlo(lambda a: lj.cross_entropy(a, yj), xj)
    assert "logitkit_ce" not in text
    np.testing.assert_allclose(float(lj.cross_entropy(xj, yj)), reference.cross_entropy64(x, y), rtol=1e-6)


_SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import logitkit
import logitkit.jax as lj
from logitkit import reference

assert jax.device_count() == 2
rng = np.random.default_rng(0)
x64 = 3 * rng.standard_normal((16, 50))
y = rng.integers(0, 50, 16)
ref = reference.cross_entropy64(x64, y, reduction="none")
grad_ref = reference.cross_entropy_grad64(x64, y)
mesh = jax.make_mesh((2,), ("b",))
spec = NamedSharding(mesh, P("b"))
xs = jax.device_put(jnp.asarray(x64, jnp.float32), spec)
ys = jax.device_put(jnp.asarray(y), spec)
loss = lambda a, b: lj.softmax_cross_entropy_with_integer_labels(a, b).mean()

# jit over two devices: the XLA route, which keeps the batch sharding (no all-gather)
step = jax.jit(jax.value_and_grad(loss))
hlo = step.lower(xs, ys).compile().as_text()
assert "logitkit_ce_forward" not in hlo and "all-gather" not in hlo
v, g = step(xs, ys)
assert g.sharding.is_equivalent_to(spec, 2), g.sharding
np.testing.assert_allclose(float(v), ref.mean(), rtol=2 ** -20)
np.testing.assert_allclose(np.asarray(g), grad_ref, rtol=1e-5, atol=1e-9)

# inside shard_map each device runs the kernels on its own rows
body = jax.shard_map(jax.grad(lambda a, b: lj.softmax_cross_entropy_with_integer_labels(a, b).sum()),
                     mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b"))
sm = jax.jit(body)
hlo = sm.lower(xs, ys).compile().as_text()
assert "logitkit_ce_forward" in hlo and "logitkit_ce_backward" in hlo and "all-gather" not in hlo
np.testing.assert_allclose(np.asarray(sm(xs, ys)), grad_ref * 16, rtol=1e-5, atol=1e-8)

# probability labels and softmax in a shard_map body: kernels, per-device rows
t64 = reference.softmax64(rng.standard_normal((16, 50)))
ts = jax.device_put(jnp.asarray(t64, jnp.float32), spec)
def body(a, t):
    ce, g = jax.value_and_grad(lambda u: lj.softmax_cross_entropy(u, t).sum())(a)
    return lj.softmax_cross_entropy(a, t), g, logitkit.log_softmax(a)
sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b")))
hlo = sm.lower(xs, ts).compile().as_text()
assert "logitkit_prob_forward" in hlo and "logitkit_softmax_forward" in hlo and "all-gather" not in hlo
ce, g, ls = sm(xs, ts)
np.testing.assert_allclose(np.asarray(ce), -(t64 * reference.log_softmax64(x64)).sum(-1), rtol=2 ** -21)
np.testing.assert_allclose(np.asarray(g), reference.softmax64(x64) - t64, rtol=1e-5, atol=1e-8)
np.testing.assert_allclose(np.asarray(ls), reference.log_softmax64(x64), rtol=2 ** -21, atol=1e-7)
print("ok")
"""


def test_multi_device_jit_keeps_xla_partitioning_and_shard_map_bodies_use_the_kernels():
    # XLA knows no partitioning rule for the custom calls: under a multi-device jit they would
    # all-gather the logits. A fresh process, because the device count is fixed at JAX's start.
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_shard_map_body_on_one_device_runs_the_kernels():
    # the custom calls' results must carry the body's varying mesh axes, or shard_map rejects them
    from jax.sharding import NamedSharding, PartitionSpec as P

    x, y, w = _data()
    mesh = jax.make_mesh((1,), ("b",))
    xs, ys = (jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("b"))) for a in (x, y))

    def rows_and_grad(a, b):
        ce = lj.cross_entropy(a, b, reduction="none")
        return ce, jax.grad(lambda u: lj.cross_entropy(u, b, reduction="sum"))(a)

    body = jax.shard_map(rows_and_grad, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b"))
    assert "logitkit_ce_forward" in _hlo(body, xs, ys)
    ce, g = jax.jit(body)(xs, ys)
    np.testing.assert_allclose(np.asarray(ce), reference.cross_entropy64(x, y, reduction="none"),
                               rtol=2 ** -21)
    np.testing.assert_allclose(np.asarray(g), reference.cross_entropy_grad64(x, y, reduction="sum"),
                               rtol=1e-5, atol=1e-8)


def _custom_calls(f, *args):
    hlo = jax.jit(f).lower(*args).compile().as_text()
    return {k: hlo.count(f'custom_call_target="logitkit_{k}_float32"')
            for k in ("ce_forward", "ce_backward", "prob_forward", "prob_backward")}, hlo


@pytest.mark.parametrize("in_axis", [0, 1])
def test_per_example_vmap_folds_the_batch_into_one_kernel_call(in_axis):
    # the JAX idiom: a per-example loss under vmap, and per-example gradients
    rng = np.random.default_rng(5)
    x = (3 * rng.standard_normal((6, 4, 29))).astype(np.float32)  # 6 examples of 4 rows
    y = rng.integers(0, 29, (6, 4))
    y[2, 1] = -100
    xb = np.moveaxis(x, 0, in_axis)
    yb = np.moveaxis(y, 0, in_axis)
    one = lambda a, b: lj.cross_entropy(a, b, label_smoothing=0.1, reduction="sum")  # noqa: E731
    per_ex = jax.vmap(jax.value_and_grad(one), in_axes=(in_axis, in_axis))
    calls, hlo = _custom_calls(per_ex, xb, yb)
    assert calls["ce_forward"] == 1 and calls["ce_backward"] == 1 and "while" not in hlo
    vals, grads = jax.jit(per_ex)(jnp.asarray(xb), jnp.asarray(yb))
    for i in range(6):
        kw = dict(label_smoothing=0.1, reduction="sum")
        np.testing.assert_allclose(float(vals[i]), reference.cross_entropy64(x[i], y[i], **kw), rtol=2 ** -20)
        np.testing.assert_allclose(np.asarray(grads[i]), reference.cross_entropy_grad64(x[i], y[i], **kw),
                                   rtol=1e-5, atol=1e-8)


def test_vmap_that_cannot_fold_runs_per_element_and_stays_correct():
    x, y, w = _data(n=8, v=23)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    ys = jnp.stack([yj, jnp.roll(yj, 1), jnp.roll(yj, 2)])
    ws = jnp.stack([jnp.asarray(w), jnp.ones(23), 2 * jnp.asarray(w)])
    # labels mapped over shared logits: folding would copy the logits; a mapped weight cannot fold
    by_labels = jax.vmap(lambda b: lj.cross_entropy(xj, b, weight=ws[0]), in_axes=0)
    by_weight = jax.vmap(lambda c: lj.cross_entropy(xj, yj, weight=c), in_axes=0)
    for f, arg in ((by_labels, ys), (by_weight, ws)):
        calls, hlo = _custom_calls(f, arg)
        assert calls["ce_forward"] == 1 and "while" in hlo  # one call inside a loop
        got = np.asarray(jax.jit(f)(arg))
        with use_core():
            want = np.asarray(jax.jit(f)(arg))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(by_labels(ys))[1],
        reference.cross_entropy64(x, np.roll(y, 1), weight=w.astype(np.float64)), rtol=2 ** -21)


def test_nested_vmap_and_probability_labels_fold():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 5, 17)).astype(np.float32)
    t32 = reference.softmax64(rng.standard_normal((2, 3, 5, 17))).astype(np.float32)
    t = t32.astype(np.float64)  # the oracle sees the float32 labels the kernels see
    one = lambda a, b: lj.softmax_cross_entropy(a, b).sum()  # noqa: E731
    f = jax.vmap(jax.vmap(jax.value_and_grad(one)))
    calls, hlo = _custom_calls(f, x, t32)
    assert calls["prob_forward"] == 1 and calls["prob_backward"] == 1 and "while" not in hlo
    vals, grads = jax.jit(f)(jnp.asarray(x), jnp.asarray(t32))
    logp = reference.log_softmax64(x)
    np.testing.assert_allclose(np.asarray(vals), -(t * logp).sum((-1, -2)), rtol=2 ** -20)
    want = np.exp(logp) * t.sum(-1, keepdims=True) - t  # d/dx of Σ t·(lse - x), Σ t ≠ 1 in float32
    np.testing.assert_allclose(np.asarray(grads), want, rtol=1e-5, atol=1e-7)  # p - t cancels


def test_folded_vmap_composes_with_grad_checkpoint_and_hessian(x64):
    rng = np.random.default_rng(7)
    X = jnp.asarray(rng.standard_normal((5, 3, 11)))
    Y = jnp.asarray(rng.integers(0, 11, (5, 3)))
    W = jnp.asarray(rng.uniform(0.5, 2, 11))
    P = jax.nn.softmax(jnp.asarray(rng.standard_normal((5, 3, 11))))
    ce = lj.cross_entropy
    cases = [
        lambda: jax.grad(lambda X: jax.vmap(lambda a, b: ce(a, b, weight=W))(X, Y).sum())(X),
        lambda: jax.grad(lambda w: jax.vmap(lambda a, b: ce(a, b, weight=w, label_smoothing=0.1))(X, Y).sum())(W),
        lambda: jax.vmap(jax.grad(jax.checkpoint(lambda a, b: ce(a, b))))(X, Y),
        lambda: jax.vmap(jax.hessian(lambda a, b: ce(a, b, z_loss=1e-2)))(X[:, 0], Y[:, 0]),
        lambda: jax.vmap(jax.grad(lambda a, p: lj.softmax_cross_entropy(a, p).sum(), argnums=1))(X, P),
    ]
    for f in cases:
        assert "logitkit_" in jax.jit(f).lower().as_text()
        got = jax.jit(f)()
        with use_core():
            assert "logitkit_" not in jax.jit(lambda f=f: f()).lower().as_text()
            want = jax.jit(lambda f=f: f())()  # a new function: traced again, on the XLA route
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)


def test_row_mask_where_runs_the_kernels_as_ignored_rows():
    # optax's batch-shaped `where` (padding positions): masked rows are 0 with zero gradient
    x, y, _ = _data(n=12, v=19)
    y = np.where(y < 0, 3, y)
    keep = np.arange(12) % 3 != 0
    f = lambda a, b, m: lj.softmax_cross_entropy_with_integer_labels(a, b, where=m).sum()  # noqa: E731
    args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(keep))
    assert "logitkit_ce_forward" in _hlo(f, *args)
    (v1, g1), (v2, g2) = _both(lambda: jax.jit(jax.value_and_grad(f))(*args))
    want = reference.cross_entropy64(x[keep], y[keep], reduction="sum")
    np.testing.assert_allclose(float(v1), want, rtol=2 ** -20)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-8)
    assert (np.asarray(g1)[~keep] == 0).all()
    v3 = jax.jit(f)(args[0], args[1], args[2][:, None])  # (N, 1): the same row mask
    np.testing.assert_allclose(float(v3), float(v1), rtol=1e-7)
    # an out-of-range traced label stays NaN on a masked row, as on the XLA route
    bad = np.array(y)
    bad[0] = 19
    rows = jax.jit(lambda a, b, m: lj.softmax_cross_entropy_with_integer_labels(a, b, where=m))
    got = np.asarray(rows(jnp.asarray(x), jnp.asarray(bad), jnp.asarray(keep)))
    with use_core():
        ref = np.asarray(jax.jit(lambda a, b, m: lj.softmax_cross_entropy_with_integer_labels(
            a, b, where=m))(jnp.asarray(x), jnp.asarray(bad), jnp.asarray(keep)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[0]) and (got[~keep][1:] == 0).all()
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-6)
