"""The fused linear head on tf.Tensor / tf.Variable: eager, tf.function, jit_compile=True.

Values are checked against float64 NumPy on materialized logits (logitkit.reference and the
textbook formulas below); gradients against tf.GradientTape on a materialized float64 TensorFlow
computation written here in plain tf ops. Neither reference calls logitkit.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import logitkit  # noqa: E402
from logitkit import reference  # noqa: E402
from logitkit.tensorflow import linear as tf_linear  # noqa: E402

MODES = ("eager", "function", "xla")
OPTS = dict(ignore_index=-1, label_smoothing=0.1, z_loss=1e-2, softcap=4.0, temperature=0.7)


def run(mode, fn, *args):
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=(mode == "xla"), autograph=False)(*args)


@pytest.fixture
def problem(rng):
    N, H, V = 13, 6, 37
    h = rng.standard_normal((N, H))
    W = rng.standard_normal((V, H))
    b = rng.standard_normal(V)
    y = rng.integers(0, V, N)
    y[[2, 9]] = -1
    w = rng.uniform(0.5, 2.0, V)
    return h, W, b, y, w


def tf_logits(h, W, b, softcap=None, temperature=1.0):
    z = tf.matmul(h, W, transpose_b=True)
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * tf.tanh(z / softcap)
    return z / temperature


def tf_ce64(h, W, b, y, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
            z_loss=0.0, softcap=None, temperature=1.0):
    """torch-semantics cross-entropy of the materialized logits, float64 tf ops only."""
    z = tf_logits(h, W, b, softcap, temperature)
    V = z.shape[-1]
    logp = tf.nn.log_softmax(z)
    lse = tf.reduce_logsumexp(z, axis=-1)
    valid = y != ignore_index
    lab = tf.where(valid, y, tf.zeros_like(y))
    w = tf.ones([V], z.dtype) if weight is None else tf.constant(weight, z.dtype)
    validf = tf.cast(valid, z.dtype)
    wy = tf.gather(w, lab) * validf
    nll = -tf.gather(logp, lab, axis=1, batch_dims=1)
    smooth = -tf.reduce_sum(logp * w, axis=-1)
    ce = validf * ((1 - label_smoothing) * wy * nll + label_smoothing / V * smooth)
    zt = validf * z_loss * lse * lse
    if reduction == "none":
        return ce + zt
    if reduction == "sum":
        return tf.reduce_sum(ce) + tf.reduce_sum(zt)
    return tf.math.divide_no_nan(tf.reduce_sum(ce), tf.reduce_sum(wy)) + \
        tf.math.divide_no_nan(tf.reduce_sum(zt), tf.reduce_sum(validf))


def objective(ce_fn, h, W, b, y, **kw):
    """mean + 0.3·sum + Σ u·none: one scalar whose gradient checks all three reductions."""
    u = tf.cast(tf.range(1, tf.shape(y)[0] + 1), h.dtype) / 10.0
    parts = [ce_fn(h, W, b, y, reduction=r, **kw) for r in ("mean", "sum", "none")]
    return parts, parts[0] + 0.3 * parts[1] + tf.reduce_sum(u * parts[2])


def lce(h, W, b, y, **kw):
    return logitkit.linear_cross_entropy(h, W, y, linear_bias=b, **kw)


def grads(ce_fn, h, W, b, y, **kw):
    with tf.GradientTape() as tape:
        tape.watch([h, W] + ([] if b is None else [b]))
        parts, obj = objective(ce_fn, h, W, b, y, **kw)
    return parts, tape.gradient(obj, [h, W] + ([] if b is None else [b]))


def _check(parts, gs, h, W, b, y, kw, rtol=1e-10):
    z64 = h @ W.T + (0 if b is None else b)
    for red, got in zip(("mean", "sum", "none"), parts):
        want = reference.cross_entropy64(z64, y, reduction=red, **kw)
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol)
    args = [tf.constant(a) for a in (h, W)] + ([] if b is None else [tf.constant(b)])
    ref_parts, ref_g = grads(tf_ce64, *args[:2], args[2] if b is not None else None, tf.constant(y), **kw)
    for red, got, want in zip(("mean", "sum", "none"), parts, ref_parts):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=rtol, atol=rtol, err_msg=red)
    assert len(gs) == len(ref_g)
    for got, want in zip(gs, ref_g):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_linear_cross_entropy_every_option(mode, problem):
    h, W, b, y, w = problem
    kw = dict(OPTS, weight=w)
    hv, Wv, bv = tf.Variable(h), tf.Variable(W), tf.Variable(b)

    def f():
        with tf.GradientTape() as tape:
            parts, obj = objective(lce, hv, Wv, bv, tf.constant(y), **dict(kw, weight=tf.constant(w)))
        return parts, tape.gradient(obj, [hv, Wv, bv])

    parts, gs = run(mode, f)
    _check(parts, gs, h, W, b, y, kw)


@pytest.mark.parametrize("route", ["host", "graph"])
def test_linear_cross_entropy_chunks_without_bias(route, problem, monkeypatch):
    """Several chunks (4 rows; 13 rows pad the last on the graph route), no bias, plain options."""
    h, W, _, y, _ = problem
    if route == "graph":  # what an accelerator gets outside XLA
        monkeypatch.setattr(tf_linear, "on_host", lambda x: False)
    hc, Wc = tf.constant(h), tf.constant(W)
    parts, gs = grads(lambda *a, **k: lce(*a, chunk_size=4, **k), hc, Wc, None, tf.constant(y), ignore_index=-1)
    _check(parts, gs, h, W, None, y, dict(ignore_index=-1))


def test_linear_cross_entropy_tape_outside_function(problem):
    """A tape outside tf.function: forward cannot see it, backward recomputes the logits."""
    h, W, b, y, _ = problem
    hv, Wv, bv = tf.Variable(h), tf.Variable(W), tf.Variable(b)
    f = tf.function(lambda: lce(hv, Wv, bv, tf.constant(y), ignore_index=-1, z_loss=1e-3), autograph=False)
    with tf.GradientTape() as tape:
        loss = f()
    gs = tape.gradient(loss, [hv, Wv, bv])
    with tf.GradientTape() as tape:
        want = tf_ce64(hv, Wv, bv, tf.constant(y), ignore_index=-1, z_loss=1e-3)
    for got, ref in zip(gs, tape.gradient(want, [hv, Wv, bv])):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-12)


def test_float32_unknown_batch_and_leading_dims(rng):
    """float32 (B, T, H) hidden; tf.function with an unknown batch dimension; loss 'none' keeps (B, T)."""
    h = rng.standard_normal((2, 5, 8)).astype(np.float32)
    W = rng.standard_normal((50, 8)).astype(np.float32)
    y = rng.integers(0, 50, (2, 5))

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 8], tf.float32), tf.TensorSpec([None, 5], tf.int64)],
                 autograph=False)
    def f(hh, yy):
        return logitkit.linear_cross_entropy(hh, tf.constant(W), yy, reduction="none")

    got = f(tf.constant(h), tf.constant(y))
    assert got.shape == (2, 5) and got.dtype == tf.float32
    want = reference.cross_entropy64(h.astype(np.float64) @ W.T.astype(np.float64), y, reduction="none")
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-6)


def test_host_route_never_holds_the_logits(rng):
    """N×V logits would be 8 MB; the NumPy driver's allocations stay a few chunks' worth."""
    N, H, V = 512, 16, 4096
    h = tf.constant(rng.standard_normal((N, H)).astype(np.float32))
    W = tf.Variable(rng.standard_normal((V, H)).astype(np.float32) * 0.1)
    y = tf.constant(rng.integers(0, V, N))
    logitkit.linear_cross_entropy(h, W, y, chunk_size=32)  # compile the kernels first
    tracemalloc.start()
    try:
        with tf.GradientTape() as tape:
            loss = logitkit.linear_cross_entropy(h, W, y, chunk_size=32)
        g = tape.gradient(loss, W)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert g.shape == (V, H) and np.isfinite(float(loss))
    assert peak < 4 * 32 * V * 4 + 2 * V * H * 4 + (1 << 20), peak  # chunks + dW + dh, not N·V·4


@pytest.mark.parametrize("mode", ["eager", "function", "graph route"])  # XLA: test_empty_batch, the guide
def test_linear_entropy_and_token_logprobs(mode, problem, monkeypatch):
    h, W, b, y, _ = problem
    if mode == "graph route":  # XLA's route, without XLA's compile time
        monkeypatch.setattr(tf_linear, "on_host", lambda x: False)
        mode = "eager"
    hv, Wv, bv = tf.Variable(h), tf.Variable(W), tf.Variable(b)
    yc = tf.constant(np.where(y < 0, 0, y))

    def f():
        with tf.GradientTape() as tape:
            ent = logitkit.linear_entropy(hv, Wv, linear_bias=bv, softcap=3.0, temperature=1.3, chunk_size=5)
            lp = logitkit.linear_token_logprobs(hv, Wv, yc, linear_bias=bv, temperature=1.3)
            obj = tf.reduce_sum(ent * tf.range(1.0, 14.0, dtype=tf.float64)) + tf.reduce_sum(lp)
        return ent, lp, tape.gradient(obj, [hv, Wv, bv])

    ent, lp, gs = run(mode, f)
    z = h @ W.T + b
    zc = 3.0 * np.tanh(z / 3.0) / 1.3
    logp = reference.log_softmax64(zc)
    np.testing.assert_allclose(ent.numpy(), -(np.exp(logp) * logp).sum(-1), rtol=1e-12)
    lpt = reference.log_softmax64(z / 1.3)
    np.testing.assert_allclose(lp.numpy(), np.take_along_axis(lpt, yc.numpy()[:, None], -1)[:, 0], rtol=1e-12)
    with tf.GradientTape() as tape:
        zz = tf_logits(hv, Wv, bv, 3.0, 1.3)
        ls = tf.nn.log_softmax(zz)
        ent_ref = -tf.reduce_sum(tf.exp(ls) * ls, -1)
        lp_ref = tf.gather(tf.nn.log_softmax(tf_logits(hv, Wv, bv, None, 1.3)), yc, axis=1, batch_dims=1)
        obj = tf.reduce_sum(ent_ref * tf.range(1.0, 14.0, dtype=tf.float64)) + tf.reduce_sum(lp_ref)
    for got, want in zip(gs, tape.gradient(obj, [hv, Wv, bv])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "function", "xla", "graph route"])
def test_linear_head_outputs_per_token_temperature_and_teacher(mode, problem, rng, monkeypatch):
    h, W, b, y, _ = problem
    if mode == "graph route":  # what an accelerator gets outside XLA
        monkeypatch.setattr(tf_linear, "on_host", lambda x: False)
        mode = "eager"
    N, V = len(y), W.shape[0]
    temp = rng.uniform(0.5, 2.0, N)
    teacher = rng.standard_normal((N, V))
    hv, Wv, bv = tf.Variable(h), tf.Variable(W), tf.Variable(b)
    outputs = ("loss", "logprobs", "entropy", "lse", "argmax", "kl")

    def f():
        with tf.GradientTape() as tape:
            out = logitkit.linear_head(hv, Wv, tf.constant(y), linear_bias=bv, outputs=outputs,
                                       temperature=tf.constant(temp), ignore_index=-1, z_loss=1e-2,
                                       teacher_logits=tf.constant(teacher), chunk_size=4)
            obj = out.loss + tf.reduce_sum(out.logprobs) + 0.5 * tf.reduce_sum(out.entropy) + \
                0.25 * tf.reduce_sum(out.lse) + 2.0 * tf.reduce_sum(out.kl)
        return out, tape.gradient(obj, [hv, Wv, bv])

    out, gs = run(mode, f)
    valid = y != -1
    z = (h @ W.T + b) / temp[:, None]
    logp = reference.log_softmax64(z)
    lab = np.where(valid, y, 0)
    lq = reference.log_softmax64(teacher)
    np.testing.assert_allclose(out.loss.numpy(), reference.cross_entropy64(z, y, ignore_index=-1, z_loss=1e-2),
                               rtol=1e-12)
    np.testing.assert_allclose(out.logprobs.numpy(), np.where(valid, logp[np.arange(N), lab], 0), rtol=1e-12)
    np.testing.assert_allclose(out.entropy.numpy(), np.where(valid, -(np.exp(logp) * logp).sum(-1), 0),
                               rtol=1e-12)
    np.testing.assert_allclose(out.lse.numpy(), np.where(valid, reference.logsumexp64(z), 0), rtol=1e-12)
    np.testing.assert_array_equal(out.argmax.numpy(), np.where(valid, (h @ W.T + b).argmax(-1), 0))
    np.testing.assert_allclose(out.kl.numpy(), np.where(valid, (np.exp(lq) * (lq - logp)).sum(-1), 0),
                               rtol=1e-10, atol=1e-14)
    with tf.GradientTape() as tape:
        tc = tf.constant(temp)[:, None]
        zz = tf_logits(hv, Wv, bv) / tc
        ls = tf.nn.log_softmax(zz)
        vf = tf.constant(valid.astype(np.float64))
        lse = tf.reduce_logsumexp(zz, -1) * vf
        lp = tf.gather(ls, tf.constant(lab), axis=1, batch_dims=1) * vf
        loss = -tf.reduce_sum(lp) / vf.numpy().sum() + 1e-2 * tf.reduce_sum(lse * lse) / vf.numpy().sum()
        ent = -tf.reduce_sum(tf.exp(ls) * ls, -1) * vf
        lqt = tf.constant(lq)
        kl = tf.reduce_sum(tf.exp(lqt) * (lqt - ls), -1) * vf
        obj = loss + tf.reduce_sum(lp) + 0.5 * tf.reduce_sum(ent) + 0.25 * tf.reduce_sum(lse) + 2.0 * tf.reduce_sum(kl)
    for got, want in zip(gs, tape.gradient(obj, [hv, Wv, bv])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


def test_linear_head_under_xla(problem, rng):
    """The loss alone is linear_cross_entropy; argmax alone has no gradient; a top-k teacher refuses."""
    h, W, b, y, _ = problem
    hc, Wc, yc = tf.constant(h), tf.constant(W), tf.constant(y)

    def f():
        out = logitkit.linear_head(hc, Wc, yc, ignore_index=-1, outputs=("loss",))
        return out.loss, logitkit.linear_head(hc, Wc, outputs=("argmax",), linear_bias=tf.constant(b)).argmax

    loss, am = tf.function(f, jit_compile=True)()
    np.testing.assert_allclose(float(loss), reference.cross_entropy64(h @ W.T, y, ignore_index=-1), rtol=1e-12)
    np.testing.assert_array_equal(am.numpy(), (h @ W.T + b).argmax(-1))
    idx = tf.constant(np.argsort(-(h @ W.T), -1)[:, :3])
    topk = (idx, tf.constant(rng.standard_normal((len(y), 3))))
    with pytest.raises(NotImplementedError, match="teacher_topk"):
        tf.function(lambda: logitkit.linear_head(hc, Wc, yc, outputs=("kl",), ignore_index=-1,
                                                 teacher_topk=topk).kl, jit_compile=True)()


def test_errors(problem):
    h, W, b, y, w = problem
    hc, Wc = tf.constant(h), tf.constant(W)
    bad = tf.constant(np.where(y < 0, 40, y))
    with pytest.raises(ValueError, match="labels: class index 40"):
        logitkit.linear_cross_entropy(hc, Wc, bad)
    graph = tf.function(lambda yy: logitkit.linear_cross_entropy(hc, Wc, yy), autograph=False,
                        input_signature=[tf.TensorSpec([13], tf.int64)])  # labels read when it runs
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels: class index 40"):
        graph(bad)
    with pytest.raises(TypeError, match="linear_weight"):
        logitkit.linear_cross_entropy(hc, tf.cast(Wc, tf.float32), tf.constant(y), ignore_index=-1)
    wv = tf.Variable(w)
    with tf.GradientTape() as tape:
        tape.watch(wv)
        with pytest.raises(ValueError, match="weight: class weights are not differentiated"):
            logitkit.linear_cross_entropy(hc, Wc, tf.constant(y), weight=wv, ignore_index=-1)


@pytest.mark.parametrize("mode,dtype", [("eager", "bfloat16"), ("xla", "float16")])
def test_low_precision(mode, dtype, rng):
    """bfloat16 / float16 inputs accumulate in float32: loss and gradients within the input's rounding."""
    h = rng.standard_normal((9, 16))
    W = rng.standard_normal((40, 16)) * 0.3
    y = rng.integers(0, 40, 9)
    dt = getattr(tf, dtype)
    hv, Wv = tf.Variable(tf.cast(h, dt)), tf.Variable(tf.cast(W, dt))

    def f():
        with tf.GradientTape() as tape:
            loss = logitkit.linear_cross_entropy(hv, Wv, tf.constant(y))
        return loss, tape.gradient(loss, [hv, Wv])

    loss, gs = run(mode, f)
    assert loss.dtype == dt and gs[0].dtype == dt and gs[1].dtype == dt
    h64, W64 = (tf.cast(v, tf.float64) for v in (hv, Wv))
    with tf.GradientTape() as tape:
        tape.watch([h64, W64])
        want = tf_ce64(h64, W64, None, tf.constant(y))
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    np.testing.assert_allclose(float(tf.cast(loss, tf.float64)), float(want), rtol=tol)
    for got, ref in zip(gs, tape.gradient(want, [h64, W64])):
        np.testing.assert_allclose(tf.cast(got, tf.float64).numpy(), ref.numpy(), rtol=0, atol=tol * 0.5)


def test_second_derivative_is_refused(problem):
    """A gradient of the head's gradient raises (it would otherwise miss the curvature terms)."""
    h, W, b, y, _ = problem
    hv = tf.Variable(h)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = logitkit.linear_cross_entropy(hv, tf.constant(W), tf.constant(y), ignore_index=-1)
        g = inner.gradient(loss, hv)
    np.testing.assert_allclose(g.numpy(), _check_grad_h(h, W, y), rtol=1e-9, atol=1e-12)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        outer.gradient(g, hv)


def _check_grad_h(h, W, y):
    hc = tf.constant(h)
    with tf.GradientTape() as tape:
        tape.watch(hc)
        loss = tf_ce64(hc, tf.constant(W), None, tf.constant(y), ignore_index=-1)
    return tape.gradient(loss, hc).numpy()


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_empty_batch(mode):
    """No rows: mean 0 with zero gradients, empty per-row outputs (XLA: one chunk of padding)."""
    h, W = tf.Variable(tf.zeros([0, 4], tf.float64)), tf.Variable(tf.ones([7, 4], tf.float64))
    y = tf.zeros([0], tf.int64)

    def f():
        with tf.GradientTape() as tape:
            loss = logitkit.linear_cross_entropy(h, W, y)
        return loss, logitkit.linear_entropy(h, W), tape.gradient(loss, [h, W])

    loss, ent, (dh, dW) = run(mode, f)
    assert float(loss) == 0.0 and ent.shape == (0,) and dh.shape == (0, 4)
    np.testing.assert_array_equal(dW.numpy(), np.zeros((7, 4)))
