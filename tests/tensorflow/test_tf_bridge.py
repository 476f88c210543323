"""Every top-level function on tf.Tensor / tf.Variable: eager, tf.function, jit_compile=True.

References come from float64 NumPy (logitkit.reference and textbook formulas below) and mpmath,
never from logitkit; gradients are checked against analytic float64 gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import logitkit  # noqa: E402
from logitkit import _cases, reference  # noqa: E402

MODES = ("eager", "function", "xla")


def run(mode, fn, *args):
    """``fn(*args)`` eagerly, inside ``tf.function`` or compiled by XLA."""
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=(mode == "xla"), autograph=False)(*args)


def value_and_grad(mode, fn, *args):
    """``(fn(*args), d sum(fn) / d args)`` through a GradientTape, in ``mode``."""
    def vg(*a):
        with tf.GradientTape() as tape:
            tape.watch(a)
            out = fn(*a)
        return out, tape.gradient(out, a)

    return run(mode, vg, *args)


def f64(t):
    return np.asarray(tf.cast(t, tf.float64))


@pytest.fixture
def data(rng):
    x = (rng.standard_normal((6, 9)) * 3).astype(np.float32)
    y = rng.integers(0, 9, 6)
    y[2] = -100
    return x, y


def test_import_logitkit_imports_no_tensorflow():
    code = ("import numpy as np, logitkit, json, sys\n"
            "logitkit.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", [
    dict(),
    dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3),
    dict(reduction="none", softcap=5.0, temperature=2.0, weight=True),
])
def test_cross_entropy_value_and_grad(mode, opts, data, rng):
    x, y = data
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = rng.uniform(0.5, 2.0, 9).astype(np.float32)
    tw = {k: (tf.constant(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
    loss, (g,) = value_and_grad(mode, lambda a: logitkit.cross_entropy(a, tf.constant(y), **tw), tf.constant(x))
    assert isinstance(loss, tf.Tensor) and loss.dtype == tf.float32
    np.testing.assert_allclose(f64(loss), reference.cross_entropy64(x, y, **opts), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(f64(g), reference.cross_entropy_grad64(x, y, **opts), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ("eager", "xla"))
def test_probability_labels_grad_to_logits_and_labels(mode, rng):
    x = rng.standard_normal((5, 7))
    y = rng.dirichlet(np.ones(7), 5) * rng.uniform(0.5, 2, (5, 1))  # rows need not sum to 1
    loss, (gx, gy) = value_and_grad(
        mode, lambda a, b: logitkit.cross_entropy(a, b, reduction="sum", label_smoothing=0.2), tf.constant(x),
        tf.constant(y))
    np.testing.assert_allclose(f64(loss), reference.cross_entropy64(x, y, reduction="sum", label_smoothing=0.2),
                               rtol=1e-13)
    np.testing.assert_allclose(f64(gx), reference.cross_entropy_grad64(x, y, reduction="sum", label_smoothing=0.2),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f64(gy), -0.8 * reference.log_softmax64(x), rtol=1e-13)


def test_variable_class_axis_and_dtypes(rng):
    x = rng.standard_normal((3, 5, 4))
    y = rng.integers(0, 5, (3, 4))
    v = tf.Variable(x.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = logitkit.cross_entropy(v, tf.constant(y, tf.int32), axis=1, reduction="none")
    g = tape.gradient(loss, v)
    xm = np.moveaxis(x.astype(np.float32), 1, -1)
    assert loss.shape == (3, 4)
    np.testing.assert_allclose(f64(loss), reference.cross_entropy64(xm, y, reduction="none"), rtol=2e-6)
    np.testing.assert_allclose(f64(g), np.moveaxis(reference.cross_entropy_grad64(xm, y, reduction="sum"), -1, 1),
                               rtol=1e-5, atol=1e-7)
    for dt, tol in (("float16", 2 ** -10), ("bfloat16", 2 ** -7), ("float64", 1e-15)):
        out = logitkit.cross_entropy(tf.cast(x, dt), tf.constant(y), axis=1, reduction="none")
        assert out.dtype.name == dt
        want = reference.cross_entropy64(np.moveaxis(f64(tf.cast(x, dt)), 1, -1), y, reduction="none")
        np.testing.assert_allclose(f64(out), want, rtol=tol)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_family_value_and_grad(mode, rng):
    x = rng.standard_normal((4, 6)) * 2
    x[1, 2] = -np.inf
    dy = rng.standard_normal((4, 6))
    mask = rng.random((4, 6)) > 0.3
    mask[:, 0] = True
    p = reference.softmax64(x / 1.5)
    lsm = reference.log_softmax64(x / 1.5)

    def fns(a):
        return (tf.reduce_sum(logitkit.softmax(a, temperature=1.5) * dy),
                tf.reduce_sum(tf.where(tf.math.is_finite(lsm), logitkit.log_softmax(a, temperature=1.5) * dy, 0)),
                tf.reduce_sum(logitkit.logsumexp(a)),
                tf.reduce_sum(logitkit.softmax(a, where=tf.constant(mask)) * dy))

    for k, want in enumerate([
            p * (dy - (p * dy).sum(-1, keepdims=True)) / 1.5,
            np.where(np.isfinite(lsm), dy, 0) / 1.5 - p * np.where(np.isfinite(lsm), dy, 0).sum(-1, keepdims=True) / 1.5,
            reference.softmax64(x)]):
        _, (g,) = value_and_grad(mode, lambda a, k=k: fns(a)[k], tf.constant(x))
        np.testing.assert_allclose(f64(g), want, rtol=1e-12, atol=1e-14)
    pm = reference.softmax64(np.where(mask, x, -np.inf))
    out, (g,) = value_and_grad(mode, lambda a: fns(a)[3], tf.constant(x))
    np.testing.assert_allclose(f64(g), pm * (dy - (pm * dy).sum(-1, keepdims=True)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ("eager", "xla"))
def test_entropy_kl_token_logprobs(mode, rng):
    p_l, q_l = rng.standard_normal((2, 4, 6)) * 2
    y = rng.integers(0, 6, 4)
    p, q = reference.softmax64(p_l), reference.softmax64(q_l)
    logp, logq = np.log(p), np.log(q)
    H = -(p * logp).sum(-1)
    KL = (p * (logp - logq)).sum(-1)
    h, (gh,) = value_and_grad(mode, lambda a: logitkit.entropy(a), tf.constant(p_l))
    np.testing.assert_allclose(f64(h), H, rtol=1e-13)
    np.testing.assert_allclose(f64(gh), -p * (logp + H[:, None]), rtol=1e-11, atol=1e-14)
    kl, (gp, gq) = value_and_grad(mode, lambda a, b: logitkit.kl_divergence(a, b), tf.constant(p_l), tf.constant(q_l))
    np.testing.assert_allclose(f64(kl), KL, rtol=1e-12)
    np.testing.assert_allclose(f64(gp), p * (logp - logq - KL[:, None]), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(f64(gq), q - p, rtol=1e-11, atol=1e-14)
    tl = run(mode, lambda a, b: logitkit.token_logprobs(a, b), tf.constant(p_l), tf.constant(y))
    np.testing.assert_allclose(f64(tl), logp[np.arange(4), y], rtol=1e-13)


def test_cross_entropy_with_grad_and_refusals(data):
    x, y = data
    loss, g = logitkit.cross_entropy_with_grad(tf.constant(x), tf.constant(y), label_smoothing=0.1)
    np.testing.assert_allclose(f64(g), reference.cross_entropy_grad64(x, y, label_smoothing=0.1), rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="out"):
        logitkit.cross_entropy_with_grad(tf.constant(x), tf.constant(y), out=tf.constant(x))
    with pytest.raises(TypeError, match="different libraries"):
        logitkit.cross_entropy(tf.constant(x), y)
    with pytest.raises(ValueError, match="class index 12 at position 0"):
        logitkit.cross_entropy(tf.constant(x), tf.constant([12, 0, 0, 0, 0, 0]))
    # Inside tf.function the CPU kernels check the labels as they run; under XLA the labels
    # cannot be read at all and the row is NaN. Never a silent loss.
    bad = tf.constant([12, 0, 0, 0, 0, 0])
    f = tf.function(lambda a, b: logitkit.cross_entropy(a, b, reduction="none"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="class index 12 at position 0"):
        f(tf.constant(x), bad)
    out = tf.function(lambda a, b: logitkit.cross_entropy(a, b, reduction="none"), jit_compile=True)(tf.constant(x), bad)
    assert np.isnan(f64(out)[0]) and np.isfinite(f64(out)[1:]).all()


@pytest.mark.parametrize("opts", [dict(), dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=4.0)])
def test_cpu_kernel_route_matches_tf_ops_route(data, rng, opts, monkeypatch):
    """Eager and tf.function run the numba kernels (tf.numpy_function); XLA and
    LOGITKIT_KERNELS=core run TensorFlow ops on the core. Both give the same loss and gradient."""
    from logitkit.kernels import registry
    from logitkit.tensorflow import _bridge

    x, y = data
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = tf.constant(rng.uniform(0.5, 2.0, 9).astype(np.float32))
    assert _bridge._cpu_kernels(tf.constant(x)) is not None  # numba is a test dependency
    fn = lambda a: logitkit.cross_entropy(a, tf.constant(y), **opts)  # noqa: E731
    with registry.use_core():
        assert _bridge._cpu_kernels(tf.constant(x)) is None
        want, (gw,) = value_and_grad("eager", fn, tf.constant(x))
    for mode in ("eager", "function"):
        got, (g,) = value_and_grad(mode, fn, tf.constant(x))
        np.testing.assert_allclose(f64(got), f64(want), rtol=4e-7)
        np.testing.assert_allclose(f64(g), f64(gw), rtol=2e-6, atol=1e-9)


def test_unknown_batch_dimension_in_tf_function(data):
    x, y = data
    f = tf.function(lambda a, b: logitkit.cross_entropy(a, b, weight=tf.ones(9), reduction="none"),
                    input_signature=[tf.TensorSpec([None, 9], tf.float32), tf.TensorSpec([None], tf.int64)])
    np.testing.assert_allclose(f64(f(tf.constant(x), tf.constant(y))), reference.cross_entropy64(x, y, reduction="none"),
                               rtol=2e-6)


@pytest.mark.parametrize("mode", ("eager", "xla"))
def test_contract_rows_exact(mode):
    """float32 per-row loss within 2^-21 of mpmath on the demo's hard rows, where tf.nn is not."""
    tf_errs = []
    for case in _cases.cases(V=1024):
        x, y = tf.constant(case.logits), tf.constant([case.label])
        got = run(mode, lambda a, b: logitkit.sparse_softmax_cross_entropy_with_logits(labels=b, logits=a), x, y)
        assert _cases.rel_err(float(got[0]), case.exact) <= 2.0 ** -21, case.name
        got = run(mode, lambda a, b: logitkit.cross_entropy(a, b, reduction="none"), x, y)
        assert _cases.rel_err(float(got[0]), case.exact) <= 2.0 ** -21, case.name
        peer = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=x)
        tf_errs.append(_cases.rel_err(float(peer[0]), case.exact))
    assert max(tf_errs) > 2.0 ** -21  # the point of it: TensorFlow's own op is not exact there


def test_second_order_matches_tf_nn(rng):
    x = tf.constant(rng.standard_normal((3, 5)))
    y = tf.constant(rng.integers(0, 5, 3))
    lab = tf.constant(rng.dirichlet(np.ones(5), 3))

    def hessian(loss_fn):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(loss_fn(x))
            g = inner.gradient(loss, x)
        return outer.jacobian(g, x, experimental_use_pfor=False)  # pfor costs more to trace here

    for ours, theirs in [
            (lambda a: logitkit.sparse_softmax_cross_entropy_with_logits(labels=y, logits=a),
             lambda a: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=a)),
            (lambda a: logitkit.softmax_cross_entropy_with_logits(labels=lab, logits=a),
             lambda a: tf.nn.softmax_cross_entropy_with_logits(labels=lab, logits=a)),
            (lambda a: logitkit.cross_entropy(a, y, label_smoothing=0.3, z_loss=0.1, softcap=3.0),
             None),
            (lambda a: logitkit.log_softmax(a)[:, 1] * 2.0, lambda a: tf.nn.log_softmax(a)[:, 1] * 2.0),
            (lambda a: logitkit.softmax(a)[:, 0], lambda a: tf.nn.softmax(a)[:, 0]),
            (lambda a: logitkit.logsumexp(a), lambda a: tf.reduce_logsumexp(a, -1))]:
        h = hessian(ours)
        if theirs is None:  # the plain-TF formula of the same loss, differentiated twice by TF
            def theirs(a):
                z = 3.0 * tf.tanh(a / 3.0)
                lse = tf.reduce_logsumexp(z, -1)
                logp = z - lse[:, None]
                nll = -tf.gather(logp, y, batch_dims=1)
                return tf.reduce_mean(0.7 * nll - 0.3 * tf.reduce_mean(logp, -1) + 0.1 * lse ** 2)
        np.testing.assert_allclose(f64(h), f64(hessian(theirs)), rtol=1e-10, atol=1e-12)


def test_tensorflow_numba_torch_coexist():
    """TensorFlow, the numba kernels and torch in one process: each still gives its own answer."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((64, 300)).astype(np.float32)
    y = np.arange(64) % 300
    want = reference.cross_entropy64(x, y)
    a = logitkit.cross_entropy(x, y)
    b = logitkit.cross_entropy(torch.from_numpy(x), torch.from_numpy(y))
    c = logitkit.cross_entropy(tf.constant(x), tf.constant(y))
    for v in (a, float(b), f64(c)):
        np.testing.assert_allclose(float(v), want, rtol=2e-6)


def test_linear_head_takes_tensorflow():
    """Zero weights: uniform over 5 classes, loss and entropy log 5 (tests/tensorflow/test_tf_linear.py has the rest)."""
    h, w, y = tf.zeros((2, 3)), tf.zeros((5, 3)), tf.constant([0, 1])
    for out in (logitkit.linear_cross_entropy(h, w, y), logitkit.linear_entropy(h, w)):
        assert isinstance(out, tf.Tensor)
        np.testing.assert_allclose(f64(out), np.log(5.0), rtol=1e-6)


def test_issue13_item7_watched_class_weight_is_refused_not_dropped():
    """A class weight a tape watches would get no gradient: refused, as torch refuses requires_grad."""
    x = tf.constant(np.random.default_rng(0).standard_normal((4, 5)), tf.float32)
    y = tf.constant([0, 1, 2, 3])
    w = tf.Variable([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match="weight"):
        with tf.GradientTape():
            logitkit.cross_entropy(x, y, weight=w)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = logitkit.cross_entropy(x, y, weight=tf.stop_gradient(w))
    ref = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, x) * tf.gather(w, y)) / tf.reduce_sum(
        tf.gather(w, y))
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    assert tape.gradient(loss, x) is not None
