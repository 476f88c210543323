r"""The TensorFlow bridge of :mod:`logitkit.functional`: top-level functions on ``tf.Tensor`` land here.

Every public function that receives a ``tf.Tensor`` or ``tf.Variable`` calls :func:`dispatch`,
which reads variables (the tape sees the read) and either runs this module's version of the
function or calls the framework-agnostic one back, which then reaches :func:`cross_entropy`,
:func:`softmax` and :func:`log_softmax` here with the class axis moved last.

Gradients come from ``tf.custom_gradient`` over the core stages (:mod:`logitkit.core`, run on
TensorFlow ops through :mod:`._namespace`), in eager mode, inside ``tf.function`` and under
``jit_compile=True``:

* cross-entropy saves the per-row statistics ``m`` (row maximum) and ``r = log Σ exp(z - m)``
  beside its inputs and rebuilds ``p`` in backward, never an ``N×V`` softmax;
* softmax and log_softmax save only their output;
* logsumexp, entropy and the KL divergence save only their inputs and recompute in backward.

When a tape is watching while a gradient is taken (a second derivative), backward instead
differentiates the core forward with TensorFlow's autodiff, which TensorFlow differentiates again.

>>> import tensorflow as tf, logitkit
>>> x = tf.Variable([[0.0, 0.0, 0.0]])
>>> with tf.GradientTape() as tape:
...     loss = logitkit.cross_entropy(x, tf.constant([2]))
>>> [round(float(v), 4) for v in tape.gradient(loss, x)[0]]
[0.3333, 0.3333, -0.6667]
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from .. import _validate as V
from .._namespace import TENSORFLOW, acc_dtype, dtype_name, library_of
from ..core import cross_entropy as core_ce
from ..core import softmax as core_sm
from ..core.reduction import denominators, row_weights
from ._namespace import namespace

__all__ = ["dispatch", "cross_entropy", "softmax", "log_softmax", "in_xla_context"]

_XP = namespace()


# ----------------------------------------------------------------------------------------------
# entry


def _read(a: Any) -> Any:
    return tf.convert_to_tensor(a) if isinstance(a, tf.Variable) else a


@tf.autograph.experimental.do_not_convert
def dispatch(name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """Run public function ``name`` (``fn`` its framework-agnostic body) on TensorFlow arguments."""
    args = tuple(_read(a) for a in args)
    kwargs = {k: _read(v) for k, v in kwargs.items()}
    own = _OWN.get(name)
    if own is not None:
        return own(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def in_xla_context() -> bool:
    """True while tracing for XLA (``tf.function(jit_compile=True)``)."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _recording(*tensors: Any) -> bool:
    """True when a tape watches any of ``tensors`` now: backward itself is being differentiated."""
    from tensorflow.python.eager import record

    return record.should_record_backprop([t for t in tensors if t is not None])


def _autodiff(forward: Callable, xs: list, upstream: list) -> list:
    """Gradients of ``forward(*xs)`` by TensorFlow's autodiff (recorded by any outer tape)."""
    with tf.GradientTape() as tape:
        tape.watch(xs)
        outs = forward(*xs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return tape.gradient(outs, xs, output_gradients=upstream,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _zeros_if_none(g: Any, like: Any) -> Any:
    return tf.zeros_like(like) if g is None else g


def _recomputed(forward: Callable, *xs: Any) -> Any:
    """``forward(*xs)`` whose backward recomputes it under a tape: only the inputs are saved."""

    @tf.custom_gradient
    def f(*inputs):
        out = forward(*inputs)

        def grad(g):
            return _autodiff(forward, list(inputs), [g])

        return out, grad

    return f(*xs)


# ----------------------------------------------------------------------------------------------
# cross-entropy rows (class axis last, 2-D)


def _cpu_kernels(x: Any) -> tuple[Any, Any] | None:
    """The numba kernels' ``(ce_forward, ce_backward)`` for rows ``x``, when they can serve it.

    They run through ``tf.numpy_function`` (zero-copy NumPy views of CPU tensors), so not under
    XLA (``jit_compile=True``), not for tensors on an accelerator and not with
    ``LOGITKIT_KERNELS=core``; TensorFlow ops on the core stages serve those.
    """
    from ..kernels import registry

    device = (x.device or "").upper()
    if in_xla_context() or "GPU" in device or "TPU" in device:
        return None
    # An unplaced graph tensor may land on an accelerator: only a CPU-only machine is sure.
    if "CPU" not in device and (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")):
        return None
    probe = np.empty((1, 1), x.dtype.as_numpy_dtype)
    fwd_backend, fwd = registry.select("ce_forward", "numpy", probe)
    bwd_backend, bwd = registry.select("ce_backward", "numpy", probe)
    return (fwd, bwd) if fwd_backend == bwd_backend == "cpu" else None


def _index_rows(x2: Any, y2: Any, ignore_index: int, z_loss: float, opts: dict) -> tuple[Any, Any]:
    """Per-row ``(ce, zt)`` with ``zt = z_loss·lse²`` (0 on ignored rows) for class indices."""
    valid = y2 != ignore_index
    kernels = _cpu_kernels(x2)
    if kernels is not None:
        return _index_rows_kernels(x2, y2, valid, ignore_index, z_loss, opts, *kernels)

    def forward(x):
        ce, m, r = core_ce.ce_forward(_XP, x, y2, ignore_index=ignore_index, **opts)
        lse = m + r
        zt = tf.where(valid, z_loss * lse * lse, tf.zeros_like(lse)) if z_loss else tf.zeros_like(ce)
        return ce, zt, m, r

    @tf.custom_gradient
    def rows(x):
        ce, zt, m, r = forward(x)

        def grad(dce, dzt):
            dce, dzt = _zeros_if_none(dce, ce), _zeros_if_none(dzt, zt)
            if _recording(x, dce, dzt):
                return _autodiff(lambda v: forward(v)[:2], [x], [dce, dzt])[0]
            return core_ce.ce_backward(_XP, x, y2, m, r, dce, dzt, ignore_index=ignore_index,
                                       z_loss=z_loss, **opts)

        return (ce, zt), grad

    return rows(x2)


def _aligned_empty(shape: tuple, dtype: Any, align: int = 64) -> Any:
    """An uninitialized array at a 64-byte boundary: TensorFlow adopts such a ``numpy_function``
    result without copying it (NumPy's own 16-byte alignment costs a copy of the whole gradient)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + align, np.uint8)
    offset = (-buf.ctypes.data) % align
    return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def _index_rows_kernels(x2: Any, y2: Any, valid: Any, ignore_index: int, z_loss: float, opts: dict,
                        fwd: Callable, bwd: Callable) -> tuple[Any, Any]:
    """:func:`_index_rows` on the numba kernels: one read of the logits forward, one read and one
    write backward, and only ``m``, ``r`` saved between them."""
    w = opts["weight"]
    kw = dict(ignore_index=ignore_index, label_smoothing=opts["label_smoothing"], softcap=opts["softcap"],
              temperature=opts["temperature"])
    k_fwd, k_bwd = _kernel_functions(fwd, bwd, z_loss, tuple(sorted(kw.items())), w is not None)
    acc = acc_dtype(_XP, x2.dtype)
    extra = [] if w is None else [tf.cast(w, acc)]

    def forward(x):
        ce, m, r = k_fwd(x, y2, *extra)
        lse = m + r
        zt = tf.where(valid, z_loss * lse * lse, tf.zeros_like(lse)) if z_loss else tf.zeros_like(ce)
        return ce, zt, m, r

    @tf.custom_gradient
    def rows(x):
        ce, zt, m, r = forward(x)

        def grad(dce, dzt):
            dce, dzt = _zeros_if_none(dce, ce), _zeros_if_none(dzt, zt)
            if _recording(x, dce, dzt):
                def core_forward(v):
                    c, mm, rr = core_ce.ce_forward(_XP, v, y2, ignore_index=ignore_index, **{
                        k: opts[k] for k in ("weight", "label_smoothing", "softcap", "temperature")})
                    return c, tf.where(valid, z_loss * (mm + rr) ** 2, tf.zeros_like(c)) if z_loss else 0.0 * c
                return _autodiff(core_forward, [x], [dce, dzt])[0]
            return k_bwd(x, y2, m, r, tf.cast(dce, acc), tf.cast(dzt, acc), *extra)

        return (ce, zt), grad

    return rows(x2)


_KERNEL_FUNCTIONS: dict = {}


def _kernel_functions(fwd: Callable, bwd: Callable, z_loss: float, kw: tuple, weighted: bool) -> tuple:
    """``tf.function``s that run the kernels through ``tf.numpy_function``, one pair per option set.

    Graph functions even when the caller is eager: there ``numpy_function`` hands the kernels
    zero-copy views and adopts their 64-byte aligned gradient, where eager ``numpy_function``
    copies the logits in and the gradient out (each a full ``N×V`` copy).
    """
    key = (fwd, bwd, z_loss, kw, weighted)
    if key in _KERNEL_FUNCTIONS:
        return _KERNEL_FUNCTIONS[key]
    opts = dict(kw)

    def np_forward(xn, yn, *wn):
        return fwd(xn, yn, weight=wn[0] if wn else None, **opts)

    def np_backward(xn, yn, mn, rn, gce, gz, *wn):
        out = _aligned_empty(xn.shape, xn.dtype)
        return bwd(xn, yn, mn, rn, gce, gz, weight=wn[0] if wn else None, z_loss=z_loss, out=out, **opts)

    @tf.function(autograph=False, reduce_retracing=True)
    def k_fwd(x, y, *w):
        acc = acc_dtype(_XP, x.dtype)
        outs = tf.numpy_function(np_forward, [x, y, *w], [acc, acc, acc], stateful=False)
        for t in outs:
            t.set_shape(x.shape[:1])
        return outs

    @tf.function(autograph=False, reduce_retracing=True)
    def k_bwd(x, y, m, r, gce, gz, *w):
        dx = tf.numpy_function(np_backward, [x, y, m, r, gce, gz, *w], x.dtype, stateful=False)
        dx.set_shape(x.shape)
        return dx

    _KERNEL_FUNCTIONS[key] = (k_fwd, k_bwd)
    return k_fwd, k_bwd


def _prob_rows(x2: Any, y2: Any, z_loss: float, opts: dict) -> tuple[Any, Any]:
    """Per-row ``(ce, zt)`` for probability labels; differentiable in the labels too."""
    eps, w = opts["label_smoothing"], opts["weight"]

    def forward(x, y):
        ce, m, r = core_ce.prob_forward(_XP, x, y, **opts)
        zt = z_loss * (m + r) * (m + r) if z_loss else tf.zeros_like(ce)
        return ce, zt, m, r

    @tf.custom_gradient
    def rows(x, y):
        ce, zt, m, r = forward(x, y)

        def grad(dce, dzt):
            dce, dzt = _zeros_if_none(dce, ce), _zeros_if_none(dzt, zt)
            if _recording(x, y, dce, dzt):
                return _autodiff(lambda a, b: forward(a, b)[:2], [x, y], [dce, dzt])
            dx = core_ce.prob_backward(_XP, x, y, m, r, dce, dzt, z_loss=z_loss, **opts)
            # d ce / d y_c = (1 - eps)·w_c·(lse - z_c), with lse - z_c formed as (m - z_c) + r.
            acc = acc_dtype(_XP, x.dtype)
            z = _transform(tf.cast(x, acc), opts)
            nll = (tf.expand_dims(m, -1) - z) + tf.expand_dims(r, -1)
            dy = tf.expand_dims(tf.cast(dce, acc), -1) * (1.0 - eps) * nll
            if w is not None:
                dy = dy * tf.cast(w, acc)
            return dx, tf.cast(dy, y.dtype)

        return (ce, zt), grad

    return rows(x2, y2)


def _transform(z: Any, opts: dict) -> Any:
    from ..core.logsumexp import transform

    return transform(_XP, z, opts["softcap"], opts["temperature"])


def _reduce(ce: Any, zt: Any, validf: Any, wy: Any, reduction: str) -> Any:
    """torch-semantics reduction of per-row ``ce`` plus the z-loss terms ``zt`` (see core.reduction)."""
    if reduction == "none":
        return ce + zt
    if reduction == "sum":
        return tf.reduce_sum(ce) + tf.reduce_sum(zt)
    inv_w, inv_n = denominators(_XP, validf, wy)
    return tf.reduce_sum(ce) * inv_w + tf.reduce_sum(zt) * inv_n


def cross_entropy(x: Any, y: Any, *, kind: str, ignore_index: int, reduction: str, z_loss: float,
                  weight: Any, label_smoothing: float, softcap: float | None,
                  temperature: float) -> Any:
    """Reduced cross-entropy of ``x`` (class axis last) in ``x``'s dtype; ``"none"`` gives ``x.shape[:-1]``.

    Class weights are constants: a ``weight`` that a tape is watching is refused (as torch refuses
    a weight that requires grad) rather than silently left without a gradient.
    """
    if weight is not None and _recording(tf.convert_to_tensor(weight)):
        raise ValueError("weight: class weights are not differentiated, and a GradientTape is watching "
                         "this one; pass tf.stop_gradient(weight) (or a non-trainable tensor)")
    nclass = x.shape[-1]
    if nclass is None:
        raise ValueError("logits: the class axis must have a static size inside tf.function")
    acc = acc_dtype(_XP, x.dtype)
    batch = tf.shape(x)[:-1]
    x2 = tf.reshape(x, [-1, nclass])
    w = None if weight is None else tf.stop_gradient(tf.convert_to_tensor(weight))
    opts = dict(weight=w, label_smoothing=float(label_smoothing), softcap=softcap,
                temperature=float(temperature))
    if kind == "index":
        y2 = tf.cast(tf.reshape(y, [-1]), tf.int64)
        ce, zt = _index_rows(x2, y2, ignore_index, float(z_loss), opts)
        validf, wy = row_weights(_XP, y2, w, ignore_index, acc)
    elif kind == "prob":
        ce, zt = _prob_rows(x2, tf.reshape(y, [-1, nclass]), float(z_loss), opts)
        validf = wy = tf.ones_like(ce)
    else:
        raise ValueError(f"kind: expected 'index' or 'prob', got {kind!r}")
    loss = _reduce(ce, zt, validf, wy, reduction)
    if reduction == "none":
        loss = tf.reshape(loss, batch)
        loss.set_shape(x.shape[:-1])
    return tf.cast(loss, x.dtype)


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax


def softmax(x: Any, axis: int, *, where: Any = None, temperature: float = 1.0) -> Any:
    """Softmax along ``axis`` (normalized); backward saves only the output."""
    return _softmax_like(x, axis, where, float(temperature), log=False)


def log_softmax(x: Any, axis: int, *, where: Any = None, temperature: float = 1.0) -> Any:
    """Log-softmax along ``axis`` (normalized); backward saves only the output."""
    return _softmax_like(x, axis, where, float(temperature), log=True)


def _softmax_like(x: Any, axis: int, where: Any, temperature: float, log: bool) -> Any:
    fwd = core_sm.log_softmax if log else core_sm.softmax
    bwd = core_sm.log_softmax_backward if log else core_sm.softmax_backward

    def forward(v):
        return fwd(_XP, v, axis, where, temperature)

    @tf.custom_gradient
    def f(v):
        out = forward(v)

        def grad(dy):
            if _recording(v, dy):
                return _autodiff(forward, [v], [dy])[0]
            g = bwd(_XP, out, dy, axis)
            if log:
                # Masked entries (and fully masked rows) are the constant -inf: no gradient.
                g = tf.where(tf.math.is_finite(out), g, tf.zeros_like(g))
            if temperature != 1.0:
                g = g / tf.cast(temperature, g.dtype)
            return g

        return out, grad

    return f(x)


# ----------------------------------------------------------------------------------------------
# this module's versions of public functions


def _logsumexp(fn: Callable, x: Any, axis: int = -1, *, keepdims: bool = False, where: Any = None) -> Any:
    if not isinstance(x, tf.Tensor):  # fn names the mix of libraries
        return fn(x, axis, keepdims=keepdims, where=where)
    return _recomputed(lambda v: fn(v, axis, keepdims=keepdims, where=where), x)


def _entropy(fn: Callable, logits: Any, axis: int = -1) -> Any:
    if not isinstance(logits, tf.Tensor):
        return fn(logits, axis)
    return _recomputed(lambda v: fn(v, axis), logits)


def _kl_divergence(fn: Callable, p_logits: Any, q_logits: Any, axis: int = -1,
                   temperature: float = 1.0) -> Any:
    if not (isinstance(p_logits, tf.Tensor) and isinstance(q_logits, tf.Tensor)):
        return fn(p_logits, q_logits, axis, temperature)
    return _recomputed(lambda p, q: fn(p, q, axis, temperature), p_logits, q_logits)


def _cross_entropy_with_grad(fn: Callable, logits: Any, labels: Any, **kwargs: Any) -> Any:
    if kwargs.get("out") is not None:
        raise TypeError("out: TensorFlow tensors are immutable; call without out")
    return fn(logits, labels, **kwargs)


# ----------------------------------------------------------------------------------------------
# TensorFlow's names, TensorFlow's semantics

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _tf_tensor(name: str, x: Any) -> Any:
    """TensorFlow converts array-likes (lists, NumPy arrays) for its ops; so do its namesakes here."""
    if isinstance(x, tf.Tensor):
        return x
    if x is None or library_of(x) not in (None, "numpy"):
        raise TypeError(f"{name}: expected a TensorFlow tensor (or an array-like TensorFlow converts), "
                        f"got {type(x).__name__}")
    return tf.convert_to_tensor(x)


def _check_logits(logits: Any) -> int:
    if dtype_name(logits.dtype) not in _FLOATS:
        raise TypeError(f"logits: expected a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {dtype_name(logits.dtype)}")
    rank = logits.shape.rank
    if rank is None:
        raise ValueError("logits: the rank must be known (TensorFlow's op needs it too)")
    if rank == 0:
        raise ValueError("logits: cannot be a scalar (expected at least 1 dimension, the class axis)")
    return rank


def _dense_labels_shape(labels: Any, logits: Any, ax: int) -> None:
    """TensorFlow's op broadcasts labels over rows or over classes, nothing else: refuse the rest."""
    ls, xs = labels.shape.as_list(), logits.shape.as_list()
    ok = len(ls) <= len(xs)
    if ok:
        lx = [1] * (len(xs) - len(ls)) + ls
        cls_l, cls_x = lx[ax], xs[ax]
        rows_l = [d for i, d in enumerate(lx) if i != ax]
        rows_x = [d for i, d in enumerate(xs) if i != ax]
        ok = (cls_l in (1, cls_x) or None in (cls_l, cls_x)) and (
            all(d == 1 for d in rows_l) or all(a == b or None in (a, b) for a, b in zip(rows_l, rows_x)))
    if not ok:
        raise ValueError(f"labels: shape {tuple(ls)} must equal the logits' shape {tuple(xs)}, or "
                         f"broadcast to it with size-1 rows or a size-1 class axis")


def _softmax_cross_entropy_with_logits(fn: Callable, labels: Any = None, logits: Any = None,
                                       axis: int = -1, name: Any = None) -> Any:
    """``tf.nn.softmax_cross_entropy_with_logits``: per-example ``-Σ_c y_c log softmax(x)_c``.

    As TensorFlow: labels are cast to the computation dtype (float32 for float16 / bfloat16
    logits), broadcast over rows or over classes, and receive a gradient; the loss has the
    logits' dtype and their shape without ``axis``. Unlike TensorFlow, the logits' gradient is the
    exact ``p·Σ_c y_c - y`` (TensorFlow's ``p - y`` assumes that the labels sum to 1).
    """
    logits, labels = _tf_tensor("logits", logits), _tf_tensor("labels", labels)
    rank = _check_logits(logits)
    ax = V.norm_axis(axis, rank)
    if labels.dtype.is_integer and labels.shape.as_list() != logits.shape.as_list():
        raise TypeError("labels: integer labels must have the logits' shape here (probabilities); "
                        "use sparse_softmax_cross_entropy_with_logits for class indices")
    if not (labels.dtype.is_floating or labels.dtype.is_integer):
        raise TypeError(f"labels: expected a floating or integer dtype, got {dtype_name(labels.dtype)}")
    _dense_labels_shape(labels, logits, ax)
    precise = tf.float32 if dtype_name(logits.dtype) in ("float16", "bfloat16") else logits.dtype
    labels = tf.cast(labels, precise)
    if labels.shape.as_list() != logits.shape.as_list():
        labels = tf.broadcast_to(labels, tf.shape(logits))
    x, y = _XP.moveaxis(logits, ax, -1), _XP.moveaxis(labels, ax, -1)
    return cross_entropy(x, y, kind="prob", ignore_index=-100, reduction="none", z_loss=0.0,
                         weight=None, label_smoothing=0.0, softcap=None, temperature=1.0)


def _sparse_softmax_cross_entropy_with_logits(fn: Callable, labels: Any = None, logits: Any = None,
                                              name: Any = None) -> Any:
    """``tf.nn.sparse_softmax_cross_entropy_with_logits``: per-example ``lse(x) - x_y``.

    As TensorFlow: int32 or int64 labels of rank ``logits.rank - 1`` and the logits' shape without
    the last axis; the loss has the logits' dtype. A label outside ``[0, V)`` raises: a
    ``ValueError`` in eager mode, TensorFlow's ``InvalidArgumentError`` when a ``tf.function``
    runs; under ``jit_compile=True`` its row is NaN (as TensorFlow's own op under XLA).
    """
    logits, labels = _tf_tensor("logits", logits), _tf_tensor("labels", labels)
    rank = _check_logits(logits)
    if labels.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"labels: expected int32 or int64 class indices, got {dtype_name(labels.dtype)}")
    if labels.shape.rank is not None and labels.shape.rank != rank - 1:
        raise ValueError(f"labels: rank must equal the logits' rank - 1; got labels.shape={labels.shape} "
                         f"and logits.shape={logits.shape}")
    if not labels.shape.is_compatible_with(logits.shape[:-1]):
        raise ValueError(f"labels: shape must equal the logits' shape without the last axis; got "
                         f"labels.shape={labels.shape} and logits.shape={logits.shape}")
    nclass = logits.shape[-1]
    checks = []
    if not tf.is_symbolic_tensor(labels):
        V.check_label_range(TENSORFLOW, labels, nclass, None)
    elif not in_xla_context():
        msg = f"labels: a class index is outside the valid range [0, {nclass})"
        checks = [tf.debugging.assert_non_negative(labels, message=msg),
                  tf.debugging.assert_less(labels, tf.cast(nclass, labels.dtype), message=msg)]
        if not labels.shape.is_fully_defined() or not logits.shape[:-1].is_fully_defined():
            checks.append(tf.debugging.assert_equal(tf.shape(labels, out_type=tf.int64),
                                                    tf.shape(logits, out_type=tf.int64)[:-1],
                                                    message="labels: shape must equal the logits' "
                                                            "shape without the last axis"))
    with tf.control_dependencies(checks):
        y = tf.cast(labels, tf.int64)
    # No ignore index: int64's minimum is no valid class, and it is out of range below anyway.
    loss = cross_entropy(logits, y, kind="index", ignore_index=-(2 ** 63), reduction="none", z_loss=0.0,
                         weight=None, label_smoothing=0.0, softcap=None, temperature=1.0)
    ok = (y >= 0) & (y < nclass)
    return tf.where(ok, loss, tf.constant(math.nan, loss.dtype))


_OWN = {"logsumexp": _logsumexp, "entropy": _entropy, "kl_divergence": _kl_divergence,
        "cross_entropy_with_grad": _cross_entropy_with_grad,
        "softmax_cross_entropy_with_logits": _softmax_cross_entropy_with_logits,
        "sparse_softmax_cross_entropy_with_logits": _sparse_softmax_cross_entropy_with_logits}
