"""tf.nn semantics of the TensorFlow-named pair on tf tensors, on TensorFlow's own op-test cases.

The cases are those of TensorFlow's xent_op_test_base.py / sparse_xent_op_test_base.py; each is
checked against tf.nn itself (dtype, shape, value) and a float64 NumPy reference. Where the labels
do not sum to 1 the logits' gradient is the exact one, checked by finite differences, not
TensorFlow's ``p - y``.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import logitkit  # noqa: E402
from logitkit import reference  # noqa: E402

DTYPES = ("float16", "bfloat16", "float32", "float64")
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6, "float64": 1e-14}


def dense(labels, logits, axis=-1, ours=True):
    fn = logitkit.softmax_cross_entropy_with_logits if ours else tf.nn.softmax_cross_entropy_with_logits
    x = tf.convert_to_tensor(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = fn(labels=labels, logits=x, axis=axis)
    return loss, tape.gradient(loss, x)


def sparse(labels, logits, ours=True):
    fn = logitkit.sparse_softmax_cross_entropy_with_logits if ours else tf.nn.sparse_softmax_cross_entropy_with_logits
    x = tf.convert_to_tensor(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = fn(labels=labels, logits=x)
    return loss, tape.gradient(loss, x)


def f64(t):
    return np.asarray(tf.cast(t, tf.float64))


def np_xent(labels, logits, axis=-1):
    logp = reference.log_softmax64(np.moveaxis(f64(logits), axis, -1))
    return -(np.moveaxis(f64(labels), axis, -1) * logp).sum(-1)


@pytest.mark.parametrize("dt", DTYPES)
def test_dense_np_xent_every_dtype(dt):
    logits = tf.constant([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]], dt)
    labels = tf.constant([[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.0]], dt)
    (loss, g), (tl, tg) = dense(labels, logits), dense(labels, logits, ours=False)
    assert loss.dtype == tl.dtype == logits.dtype and loss.shape == tl.shape == (2,)
    np.testing.assert_allclose(f64(loss), np_xent(labels, logits), rtol=TOL[dt])
    np.testing.assert_allclose(f64(loss), [1.3862, 1.9401], rtol=max(1e-3, TOL[dt]))
    np.testing.assert_allclose(f64(g), f64(tg), rtol=TOL[dt], atol=TOL[dt])  # labels sum to 1: p - y


def test_dense_3d_every_axis_and_zero_dimension():
    labels = np.array([[[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]],
                       [[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]],
                       [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]], np.float32)
    logits = np.array([[[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]],
                       [[2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0]],
                       [[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]], np.float32)
    for axis in (0, 1, -1):
        ours = logitkit.softmax_cross_entropy_with_logits(labels=labels, logits=tf.constant(logits), axis=axis)
        theirs = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits, axis=axis)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(f64(ours), np_xent(labels, logits, axis), rtol=1e-6)
    z = tf.zeros([0, 2, 4])
    out = logitkit.softmax_cross_entropy_with_logits(labels=z, logits=z)
    assert out.shape == (0, 2) and out.dtype == tf.float32


def test_dense_labels_broadcast_and_exact_gradient():
    logits = tf.constant([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], tf.float64)
    for labels in (tf.constant([[0.0, 0.0, 0.0, 1.0]], tf.float64), tf.constant([[0.0], [2.0], [0.25]], tf.float64)):
        (loss, g), (tl, _) = dense(labels, logits), dense(labels, logits, ours=False)
        np.testing.assert_allclose(f64(loss), f64(tl), rtol=1e-14)
        yb = np.broadcast_to(f64(labels), (3, 4))
        p = reference.softmax64(f64(logits))
        np.testing.assert_allclose(f64(g), p * yb.sum(-1, keepdims=True) - yb, rtol=1e-13, atol=1e-15)
    # TensorFlow's single-class case: the loss is identically 0, so its gradient is exactly 0
    # (TensorFlow's p - y reports [2, 1, 0, 0]).
    loss, g = dense(tf.constant([[-1.0], [0.0], [1.0], [1.0]]), tf.constant([[1.0], [-1.0], [0.0], [1.0]]))
    np.testing.assert_array_equal(f64(loss), 0.0)
    np.testing.assert_array_equal(f64(g), 0.0)


def test_dense_gradients_finite_differences_and_second_order():
    labels = tf.constant([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.5], tf.float64, shape=[3, 4])
    logits = tf.constant([0.1, 0.2, 0.3, 0.4, 0.1, 0.4, 0.9, 1.6, 0.1, 0.8, 2.7, 6.4], tf.float64, shape=[3, 4])
    f = logitkit.softmax_cross_entropy_with_logits
    for fn, at in ((lambda x: f(labels=labels, logits=x), logits), (lambda y: f(labels=y, logits=logits), labels),
                   (lambda y: f(labels=y * 1.7, logits=logits * 3.0), labels)):
        analytic, numeric = tf.test.compute_gradient(fn, [at])
        assert np.max(np.abs(analytic[0] - numeric[0])) < 5e-8
    def hessian(fn, y):
        with tf.GradientTape() as t2:
            t2.watch(logits)
            with tf.GradientTape() as t1:
                t1.watch(logits)
                loss = tf.reduce_sum(fn(labels=y, logits=logits))
            g = t1.gradient(loss, logits)
        return f64(t2.jacobian(g, logits))

    # Labels that sum to 1: TensorFlow's second derivative.
    y1 = labels / tf.reduce_sum(labels, -1, keepdims=True)
    np.testing.assert_allclose(hessian(f, y1), hessian(tf.nn.softmax_cross_entropy_with_logits, y1),
                               rtol=1e-12, atol=1e-14)
    # TensorFlow's own case, labels / 3: the exact Σy·(diag p - p pᵀ) per row (TensorFlow's
    # second derivative is that of its p - y, which drops the Σy).
    p = reference.softmax64(f64(logits))
    s = f64(labels).sum(-1) / 3.0
    want = np.zeros((3, 4, 3, 4))
    for i in range(3):
        want[i, :, i, :] = s[i] * (np.diag(p[i]) - np.outer(p[i], p[i]))
    np.testing.assert_allclose(hessian(f, labels / 3.0), want, rtol=1e-12, atol=1e-14)


def test_dense_refusals_and_conversions():
    f = logitkit.softmax_cross_entropy_with_logits
    with pytest.raises(ValueError, match="labels: shape"):  # TensorFlow's testShapeMismatch
        f(labels=tf.constant([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), logits=tf.constant([[0.0, 1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="labels: shape"):  # rows broadcast only all-or-none
        f(labels=tf.ones([2, 1, 4]), logits=tf.zeros([2, 3, 4]))
    with pytest.raises(ValueError, match="logits: cannot be a scalar"):
        f(labels=tf.constant(1.0), logits=tf.constant(1.0))
    with pytest.raises(TypeError, match="logits: expected a floating dtype"):
        f(labels=tf.ones([2, 3]), logits=tf.ones([2, 3], tf.int32))
    with pytest.raises(TypeError, match="sparse_softmax_cross_entropy_with_logits"):
        f(labels=tf.constant([0, 2]), logits=tf.zeros([2, 3]))
    # As TensorFlow: float64 labels are cast to float32 logits' dtype; lists and NumPy convert;
    # integer labels of the logits' shape are probabilities cast to floating point.
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    for labels in (np.array([[0.2, 0.3, 0.5]]), [[0.2, 0.3, 0.5]]):
        out = f(labels=labels, logits=tf.constant(x))
        assert out.dtype == tf.float32
        np.testing.assert_allclose(f64(out), f64(tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=x)),
                                   rtol=1e-6)
    out = f(labels=tf.constant([[0, 0, 1]]), logits=tf.constant(x))
    np.testing.assert_allclose(f64(out), -reference.log_softmax64(x)[:, 2], rtol=1e-6)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("ldt", ("int32", "int64"))
def test_sparse_np_xent_every_dtype(dt, ldt):
    labels = tf.constant([3, 0], ldt)
    logits = tf.constant([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]], dt)
    (loss, g), (tl, tg) = sparse(labels, logits), sparse(labels, logits, ours=False)
    assert loss.dtype == tl.dtype and loss.shape == tl.shape == (2,)
    want = -reference.log_softmax64(f64(logits))[[0, 1], [3, 0]]
    np.testing.assert_allclose(f64(loss), want, rtol=TOL[dt] / 2 if dt != "float64" else 1e-15)
    np.testing.assert_allclose(f64(loss), [1.3862, 3.4420], rtol=max(1e-3, TOL[dt]))
    np.testing.assert_allclose(f64(g), f64(tg), rtol=TOL[dt], atol=TOL[dt])


def test_sparse_ranks_shapes_and_empty():
    f = logitkit.sparse_softmax_cross_entropy_with_logits
    out = f(labels=tf.constant(0), logits=tf.constant([1.0, 1.0]))  # testVector: a scalar loss
    assert out.shape == () and abs(float(out) - np.log(2)) < 1e-7
    labels = tf.constant([[3], [0]])
    logits = tf.constant([[[1.0, 1.0, 1.0, 1.0]], [[1.0, 2.0, 3.0, 4.0]]])
    np.testing.assert_allclose(f64(f(labels=labels, logits=logits)),
                               f64(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)), rtol=1e-6)
    loss, g = sparse(tf.constant([0, 0, 0]), tf.constant([[1.0], [-1.0], [0.0]]))  # testSingleClass
    np.testing.assert_array_equal(f64(loss), 0.0)
    np.testing.assert_array_equal(f64(g), 0.0)
    out = f(labels=tf.zeros([0], tf.int32), logits=tf.zeros([0, 3]))
    assert out.shape == (0,)
    with pytest.raises(ValueError, match="logits: cannot be a scalar"):
        f(labels=tf.constant(0), logits=tf.constant(1.0))
    with pytest.raises(ValueError, match="labels: rank"):
        f(labels=tf.constant([[0, 2]]), logits=tf.zeros([2, 3]))
    with pytest.raises(ValueError, match="labels: shape"):
        f(labels=tf.constant([0, 2]), logits=tf.zeros([3, 2]))
    with pytest.raises(TypeError, match="int32 or int64"):
        f(labels=tf.constant([0, 1], tf.uint8), logits=tf.zeros([2, 3]))
    with pytest.raises(TypeError, match="int32 or int64"):
        f(labels=tf.constant([0.0, 1.0]), logits=tf.zeros([2, 3]))


def test_sparse_invalid_labels_eager_graph_xla():
    f = logitkit.sparse_softmax_cross_entropy_with_logits
    labels, logits = tf.constant([4, 3, 0, -1]), tf.zeros([4, 4])
    with pytest.raises(ValueError, match="class index 4 at position 0 is out of range"):
        f(labels=labels, logits=logits)
    graph = tf.function(lambda y, x: f(labels=y, logits=x))
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        graph(labels, logits)
    xla = tf.function(lambda y, x: f(labels=y, logits=x), jit_compile=True)(labels, logits)
    theirs = tf.function(lambda y, x: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=x),
                         jit_compile=True)(labels, logits)
    np.testing.assert_array_equal(np.isnan(f64(xla)), [True, False, False, True])
    np.testing.assert_array_equal(np.isnan(f64(xla)), np.isnan(f64(theirs)))
    dyn = tf.function(lambda y, x: f(labels=y, logits=x),
                      input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 4], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape must equal"):
        dyn(tf.constant([0, 1, 2]), tf.zeros([2, 4]))


def test_sparse_gradient_check_and_high_dim(rng):
    labels = tf.constant([3, 0, 1])
    logits = tf.constant(rng.standard_normal((3, 4)))
    analytic, numeric = tf.test.compute_gradient(
        lambda x: logitkit.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=x), [logits])
    assert np.max(np.abs(analytic[0] - numeric[0])) < 5e-8  # the finite differences themselves
    x = rng.standard_normal((2, 3, 2, 5)).astype(np.float32)
    y = rng.integers(0, 5, (2, 3, 2))
    ours, g = sparse(tf.constant(y), tf.constant(x))
    theirs, tg = sparse(tf.constant(y), tf.constant(x), ours=False)
    assert ours.shape == theirs.shape == (2, 3, 2)
    np.testing.assert_allclose(f64(ours), -np.take_along_axis(reference.log_softmax64(x), y[..., None], -1)[..., 0],
                               rtol=2e-7)
    np.testing.assert_allclose(f64(g), f64(tg), rtol=1e-5, atol=1e-7)
