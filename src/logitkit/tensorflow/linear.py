r"""The fused linear head on TensorFlow: ``linear_cross_entropy``, ``linear_entropy``, ``linear_head``.

``z = hidden @ linear_weight.T + linear_bias`` is never held whole: only a chunk of rows of it
exists at a time. Gradients with respect to ``hidden``, ``linear_weight`` and ``linear_bias`` come
from ``tf.custom_gradient``, in eager mode, inside ``tf.function`` and with ``jit_compile=True``.
Two routes, chosen per call:

* **host** (CPU tensors, outside XLA): the NumPy driver of :mod:`logitkit.core.linear_cross_entropy`
  (numba kernels in place on each chunk) runs inside ``tf.numpy_function`` in graph functions, so
  TensorFlow hands it zero-copy views and adopts its 64-byte aligned gradients. A ``mean`` or
  ``sum`` loss whose inputs a tape is watching computes the gradients during forward (three
  matrix products); backward only scales them. Otherwise forward keeps ``m, r`` per row and
  backward recomputes the logits (four products).
* **graph** (``jit_compile=True``, GPU/TPU placement): TensorFlow ops over chunks of rows (a
  ``tf.map_fn`` forward, a ``tf.while_loop`` backward that accumulates ``dW`` and ``db``), the
  core stages on each chunk. XLA keeps one chunk of logits per loop iteration. Whole rows only:
  a ``chunk_size`` pair ``(rows, cols)`` keeps its ``rows`` and ignores ``cols`` here.

``linear_head`` takes both routes too, except a top-k teacher (``teacher_topk``), which runs on the
host route only and raises a ``NotImplementedError`` naming it elsewhere.

>>> import tensorflow as tf, logitkit
>>> h = tf.Variable(tf.ones([4, 8])); W = tf.zeros([16, 8]); y = tf.range(4)
>>> with tf.GradientTape() as tape:
...     loss = logitkit.linear_cross_entropy(h, W, y)
>>> round(float(loss), 5), tape.gradient(loss, h).shape  # log 16
(2.77259, TensorShape([4, 8]))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from .._namespace import acc_dtype, dtype_name
from ..core import cross_entropy as core_ce
from ..core import linear_cross_entropy as core
from ..core import linear_head as core_head
from ..core.logsumexp import transform
from ..core.linear_head import HeadOutput
from ..core.reduction import reduce_loss, row_scales, row_weights
from ._bridge import _aligned_empty, _recording, _reduce, in_xla_context
from ._namespace import namespace

__all__ = ["fused_linear_cross_entropy", "fused_linear_entropy", "fused_linear_head", "on_host"]

_XP = namespace()


# ----------------------------------------------------------------------------------------------
# helpers


def on_host(x: Any) -> bool:
    """True when ``x`` is a CPU tensor outside XLA: the NumPy driver can serve it."""
    if in_xla_context():
        return False
    device = (x.device or "").upper()
    if "GPU" in device or "TPU" in device:
        return False
    # An unplaced graph tensor may land on an accelerator: only a CPU-only machine is sure.
    return "CPU" in device or not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


class _HostOps(core.NumpyOps):
    """:class:`~logitkit.core.linear_cross_entropy.NumpyOps` whose gradient buffers are 64-byte
    aligned: ``tf.numpy_function`` adopts them without a copy."""

    def zeros(self, shape: tuple, dtype: Any) -> Any:
        out = _aligned_empty(tuple(int(s) for s in shape), np.dtype(dtype))
        out.fill(0)
        return out

    def dh(self, dz: Any, c0: int, c1: int, out: Any = None, accumulate: bool = False) -> Any:
        """``dz @ W[c0:c1]`` computed as ``(W.T @ dz.T).T``: OpenBLAS runs that shape (M = H,
        N = rows) 4-5x faster than M = rows, K = V (192 x 32000 @ 32000 x 512: 236 ms against
        1009 ms here, 2-core EPYC, loaded)."""
        w = self.W[c0:c1]
        res = np.matmul(w.T, dz.astype(w.dtype, copy=False).T).T
        if out is None:
            return res
        if accumulate:
            out += res
        else:
            out[...] = res
        return out


_SECOND = ("hidden: second derivatives of the fused linear head are not available on TensorFlow (its "
           "backward pass is not differentiable again); compute the logits and use logitkit.cross_entropy")


@tf.custom_gradient
def _no_second(t: Any) -> Any:
    """Identity whose derivative raises: a gradient of the head's gradient is refused, not wrong."""
    def grad(g):
        raise NotImplementedError(_SECOND)

    return tf.identity(t), grad


def _once(grad_fn: Any) -> Any:
    """``grad_fn`` whose gradients cannot be differentiated again (see :func:`_no_second`)."""
    def wrapped(*gs):
        out = grad_fn(*gs)
        return [None if g is None else _no_second(g) for g in out]

    return wrapped


def _refuse_watched_weight(weight: Any) -> None:
    if weight is not None and _recording(tf.convert_to_tensor(weight)):
        raise ValueError("weight: class weights are not differentiated, and a GradientTape is watching "
                         "this one; pass tf.stop_gradient(weight) (or a non-trainable tensor)")


def _check_host_labels(y: np.ndarray, V: int, ignore_index: int, name: str = "labels") -> None:
    """Labels inside a graph are read here, on the host, before any kernel indexes with them."""
    bad = ((y < 0) | (y >= V)) & (y != ignore_index)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: class index {int(y[i])} at position {i} is out of range [0, {V}) "
                         f"and is not ignore_index={ignore_index}")


def _acc(dtype: Any) -> Any:
    return acc_dtype(_XP, dtype)


_GRAPHS: dict = {}


def _graph(key: tuple, np_fn: Any, out_dtypes: Any, shapes: Any) -> Any:
    """A ``tf.function`` running ``np_fn`` through ``tf.numpy_function`` (cached per ``key``).

    Graph functions even for eager callers: there ``numpy_function`` passes zero-copy views and
    adopts aligned outputs, where eager ``numpy_function`` copies both. ``shapes(*inputs)`` gives
    the static output shapes.
    """
    if key in _GRAPHS:
        return _GRAPHS[key]

    @tf.function(autograph=False, reduce_retracing=True)
    def run(*xs):
        dtypes = out_dtypes(*xs)
        outs = tf.numpy_function(np_fn, list(xs), dtypes, stateful=False)
        for t, s in zip(outs, shapes(*xs)):
            t.set_shape(s)
        return outs

    _GRAPHS[key] = run
    return run


def _flat_inputs(hidden: Any, W: Any, labels: Any) -> tuple[Any, Any, Any]:
    H = hidden.shape[-1]
    h2 = tf.reshape(hidden, [-1, H])
    y = None if labels is None else tf.cast(tf.reshape(labels, [-1]), tf.int64)
    return h2, W, y


# ----------------------------------------------------------------------------------------------
# linear cross-entropy


def fused_linear_cross_entropy(hidden: Any, linear_weight: Any, labels: Any, linear_bias: Any, opts: dict,
                               reduction: str, chunk_size: Any) -> Any:
    """Validated TensorFlow arguments of :func:`logitkit.linear_cross_entropy` in, the loss out."""
    _refuse_watched_weight(opts["weight"])
    w = None if opts["weight"] is None else tf.stop_gradient(tf.convert_to_tensor(opts["weight"]))
    opts = dict(opts, weight=w)
    h2, W, y = _flat_inputs(hidden, linear_weight, labels)
    b = linear_bias
    xs = [h2, W] + ([] if b is None else [b])
    acc = _acc(hidden.dtype)
    host = on_host(hidden)
    if reduction != "none" and _recording(*xs):
        loss = (_host_fused if host else _graph_fused)(xs, y, w, opts, reduction, chunk_size)
    else:
        rows = _host_rows if host else _graph_rows
        ce, zt = rows(xs, y, w, opts, chunk_size)
        validf, wy = row_weights(_XP, y, w, opts["ignore_index"], acc)
        loss = _reduce(ce, zt, validf, wy, reduction)
    if reduction == "none":
        loss = tf.reshape(loss, tf.shape(labels))
    return tf.cast(loss, hidden.dtype)


def _head_np(h, W, b, y, w, opts, chunk_size):
    _check_host_labels(y, W.shape[0], opts["ignore_index"])
    ops = _HostOps(h, W, b)
    return core.Head(ops, h, W, y, b, dict(opts, weight=w), chunk_size=chunk_size)


def _split(extra: tuple, has_b: bool, has_w: bool) -> tuple[Any, Any]:
    extra = list(extra)
    b = extra.pop(0) if has_b else None
    w = extra.pop(0) if has_w else None
    return b, w


def _static_key(opts: dict, *more: Any) -> tuple:
    return tuple((k, v) for k, v in sorted(opts.items()) if k != "weight") + more


def _host_fused(xs: list, y: Any, w: Any, opts: dict, reduction: str, chunk_size: Any) -> Any:
    """Scalar loss whose gradients come from the forward pass (three products, then scaling)."""
    has_b, has_w = len(xs) == 3, w is not None

    def np_fn(h, W, y_, *extra):
        b, wn = _split(extra, has_b, has_w)
        head = _head_np(h, W, b, y_, wn, opts, chunk_size)
        g_ce, g_z = head.scales(reduction, 1.0)
        need = (True, True, has_b)
        if core.choose_strategy(reduction, head.plan, True) == "fused":
            ce, m, r, dh, dw, db = head.forward(g_ce, g_z, need)
        else:
            ce, m, r = head.forward()
            dh, dw, db = head.backward(m, r, g_ce, g_z, need)
        loss = np.asarray(head.loss(ce, m, r, reduction), head.acc)
        return (loss, dh, dw) + ((db,) if has_b else ())

    def dtypes(h, W, y_, *extra):
        return [_acc(h.dtype), h.dtype, W.dtype] + ([extra[0].dtype] if has_b else [])

    def shapes(h, W, y_, *extra):
        return [[], h.shape, W.shape] + ([extra[0].shape] if has_b else [])

    run = _graph(("lce_fused", reduction, has_b, has_w, chunk_size) + _static_key(opts), np_fn, dtypes, shapes)
    wl = [w] if has_w else []

    @tf.custom_gradient
    def f(*inputs):
        loss, *grads = run(inputs[0], inputs[1], y, *inputs[2:], *wl)

        def grad(g):
            g = tf.cast(g, grads[0].dtype)
            # g is 1 for the loss of a model: hand over the forward's buffers without a copy.
            return [tf.cond(tf.equal(g, 1), lambda d=d: tf.identity(d), lambda d=d: d * tf.cast(g, d.dtype))
                    for d in grads]

        return loss, _once(grad)

    return f(*xs)


def _host_rows(xs: list, y: Any, w: Any, opts: dict, chunk_size: Any) -> tuple[Any, Any]:
    """Per-row ``(ce, zt)`` (``zt = z_loss·lse²``, 0 on ignored rows); backward recomputes."""
    has_b, has_w = len(xs) == 3, w is not None
    z_loss, ign = opts["z_loss"], opts["ignore_index"]

    def np_fwd(h, W, y_, *extra):
        b, wn = _split(extra, has_b, has_w)
        head = _head_np(h, W, b, y_, wn, opts, chunk_size)
        ce, m, r = head.forward()
        lse = m + r
        zt = np.where(y_ != ign, z_loss * lse * lse, 0.0).astype(ce.dtype) if z_loss else np.zeros_like(ce)
        return ce, zt, m, r

    def np_bwd(h, W, y_, m, r, dce, dzt, *extra):
        b, wn = _split(extra, has_b, has_w)
        head = _head_np(h, W, b, y_, wn, opts, chunk_size)
        dh, dw, db = head.backward(m, r, dce, dzt, (True, True, has_b))
        return (dh, dw) + ((db,) if has_b else ())

    key = _static_key(opts, has_b, has_w, chunk_size)
    fwd = _graph(("lce_rows",) + key, np_fwd, lambda h, *_: [_acc(h.dtype)] * 4,
                 lambda h, *_: [h.shape[:1]] * 4)
    bwd = _graph(("lce_back",) + key, np_bwd,
                 lambda h, W, *rest: [h.dtype, W.dtype] + ([rest[5].dtype] if has_b else []),
                 lambda h, W, *rest: [h.shape, W.shape] + ([rest[5].shape] if has_b else []))
    wl = [w] if has_w else []

    @tf.custom_gradient
    def f(*inputs):
        ce, zt, m, r = fwd(inputs[0], inputs[1], y, *inputs[2:], *wl)

        def grad(dce, dzt):
            dce = tf.zeros_like(ce) if dce is None else tf.cast(dce, ce.dtype)
            dzt = tf.zeros_like(zt) if dzt is None else tf.cast(dzt, zt.dtype)
            return list(bwd(inputs[0], inputs[1], y, m, r, dce, dzt, *inputs[2:], *wl))

        return (ce, zt), _once(grad)

    return f(*xs)


# -- the graph route: TensorFlow ops over chunks of rows


def _rows_per_chunk(N: Any, V: int, acc: Any, chunk_size: Any) -> int:
    if chunk_size is not None:
        rows = chunk_size[0] if isinstance(chunk_size, tuple) else chunk_size
    else:
        # XLA fuses each chunk's elementwise stages: count two accumulation-dtype copies per logit
        # (96 rows of a 32k vocabulary; 23 rows, the core's count, ran about 25% slower: re-reading W).
        bpl = 2 * (8 if acc == tf.float64 else 4)
        rows = max(1, core.DEFAULT_WORKSPACE // max(1, V * bpl))
    if isinstance(N, int):
        rows = min(rows, max(N, 1))
    return int(rows)


class _Chunks:
    """``hidden`` and per-row arrays cut into ``(n_chunks, rows, ...)`` blocks (padded rows ignored)."""

    def __init__(self, h2: Any, W: Any, b: Any, rows: int) -> None:
        self.N = tf.shape(h2)[0]
        self.rows = rows
        # At least one chunk: XLA compiles a loop body even when it runs 0 times, and its slices of
        # an empty block fail; a chunk of padding rows contributes nothing.
        self.n = tf.maximum((self.N + rows - 1) // rows, 1)
        self.pad = self.n * rows - self.N
        self.acc = _acc(h2.dtype)
        self.H = h2.shape[-1]
        self.h = self.block(h2)
        self.W = W
        self.Wa = tf.cast(W, self.acc)
        self.ba = None if b is None else tf.cast(b, self.acc)

    def block(self, x: Any, fill: Any = 0) -> Any:
        pad = [[0, self.pad]] + [[0, 0]] * (x.shape.rank - 1)
        x = tf.pad(x, pad, constant_values=tf.cast(fill, x.dtype))
        return tf.reshape(x, tf.concat([[self.n, self.rows], tf.shape(x)[1:]], 0))

    def unblock(self, x: Any) -> Any:
        flat = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
        return flat[: self.N]

    def logits(self, h_c: Any) -> Any:
        z = tf.matmul(tf.cast(h_c, self.acc), self.Wa, transpose_b=True)
        return z if self.ba is None else z + self.ba

    def backward(self, dz_fn: Any, need_b: bool, n_rows_out: int = 0) -> tuple:
        """``(dh, dW, db)`` from ``dz_fn(i, z_i)``, the gradient of chunk ``i``'s logits.

        With ``n_rows_out``, ``dz_fn`` returns ``(dz, [v_1 ... v_k])`` (per-row values of the chunk,
        accumulation dtype) and they follow the gradients, unblocked to ``(N,)`` each.
        """
        V = self.W.shape[0]
        dW0 = tf.zeros([V, self.H], self.acc)
        db0 = tf.zeros([V], self.acc)
        dh0 = tf.TensorArray(self.acc, size=self.n, element_shape=[self.rows, self.H])
        rows0 = [tf.TensorArray(self.acc, size=self.n, element_shape=[self.rows]) for _ in range(n_rows_out)]

        def body(i, dW, db, dh, *row_tas):
            h_c = tf.cast(self.h[i], self.acc)
            dz = dz_fn(i, self.logits(h_c))
            if n_rows_out:
                dz, vals = dz
                row_tas = [ta.write(i, v) for ta, v in zip(row_tas, vals)]
            dh = dh.write(i, tf.matmul(dz, self.Wa))
            dW = dW + tf.matmul(dz, h_c, transpose_a=True)
            if need_b:
                db = db + tf.reduce_sum(dz, axis=0)
            return (i + 1, dW, db, dh, *row_tas)

        _, dW, db, dh, *row_tas = tf.while_loop(lambda i, *_: i < self.n, body,
                                                [tf.constant(0), dW0, db0, dh0, *rows0])
        dh = self.unblock(dh.stack())
        return (dh, dW, db) + tuple(self.unblock(ta.stack()) for ta in row_tas)


def _graph_rows(xs: list, y: Any, w: Any, opts: dict, chunk_size: Any) -> tuple[Any, Any]:
    """:func:`_host_rows` in TensorFlow ops (XLA, accelerators)."""
    h2, W = xs[0], xs[1]
    b = xs[2] if len(xs) == 3 else None
    acc = _acc(h2.dtype)
    rows = _rows_per_chunk(h2.shape[0], W.shape[0], acc, chunk_size)
    ign, z_loss = opts["ignore_index"], opts["z_loss"]
    kw = dict(weight=w, ignore_index=ign, label_smoothing=opts["label_smoothing"], softcap=opts["softcap"],
              temperature=opts["temperature"])

    @tf.custom_gradient
    def f(*inputs):
        ch = _Chunks(inputs[0], inputs[1], inputs[2] if b is not None else None, rows)
        yb = ch.block(y, ign)

        def chunk(args):
            h_c, y_c = args
            ce, m, r = core_ce.ce_forward(_XP, ch.logits(h_c), y_c, **kw)
            return ce, m, r

        ce, m, r = (ch.unblock(t) for t in tf.map_fn(chunk, (ch.h, yb), fn_output_signature=(acc, acc, acc)))
        lse = m + r
        valid = y != ign
        zt = tf.where(valid, z_loss * lse * lse, tf.zeros_like(lse)) if z_loss else tf.zeros_like(ce)

        def grad(dce, dzt):
            dce = tf.zeros_like(ce) if dce is None else tf.cast(dce, acc)
            dzt = tf.zeros_like(zt) if dzt is None else tf.cast(dzt, acc)
            mb, rb, gb, zb = ch.block(m), ch.block(r), ch.block(dce), ch.block(dzt)

            def dz_fn(i, z):
                return core_ce.ce_backward(_XP, z, yb[i], mb[i], rb[i], gb[i], zb[i], z_loss=z_loss, **kw)

            dh, dW, db = ch.backward(dz_fn, b is not None)
            out = [tf.cast(dh, inputs[0].dtype), tf.cast(dW, inputs[1].dtype)]
            return out + ([tf.cast(db, inputs[2].dtype)] if b is not None else [])

        return (ce, zt), _once(grad)

    return f(*xs)


def _graph_fused(xs: list, y: Any, w: Any, opts: dict, reduction: str, chunk_size: Any) -> Any:
    """:func:`_host_fused` in TensorFlow ops: one loop computes the loss terms and the gradients."""
    h2, W = xs[0], xs[1]
    has_b = len(xs) == 3
    acc = _acc(h2.dtype)
    rows = _rows_per_chunk(h2.shape[0], W.shape[0], acc, chunk_size)
    ign, z_loss = opts["ignore_index"], opts["z_loss"]
    kw = dict(weight=w, ignore_index=ign, label_smoothing=opts["label_smoothing"], softcap=opts["softcap"],
              temperature=opts["temperature"])
    validf, wy = row_weights(_XP, y, w, ign, acc)
    g_ce, g_z = row_scales(_XP, validf, wy, reduction, 1.0)

    @tf.custom_gradient
    def f(*inputs):
        ch = _Chunks(inputs[0], inputs[1], inputs[2] if has_b else None, rows)
        yb, gb, zb = ch.block(y, ign), ch.block(g_ce), ch.block(g_z)

        def dz_fn(i, z):
            ce, m, r, dz = core_ce.ce_forward_backward(_XP, z, yb[i], gb[i], zb[i], z_loss=z_loss, **kw)
            return dz, [ce, m + r]

        dh, dW, db, ce, lse = ch.backward(dz_fn, has_b, n_rows_out=2)
        zt = tf.where(y != ign, z_loss * lse * lse, tf.zeros_like(lse)) if z_loss else tf.zeros_like(ce)
        loss = _reduce(ce, zt, validf, wy, reduction)
        grads = [tf.cast(dh, inputs[0].dtype), tf.cast(dW, inputs[1].dtype)] + \
            ([tf.cast(db, inputs[2].dtype)] if has_b else [])

        def grad(g):
            return [d * tf.cast(g, d.dtype) for d in grads]

        return loss, _once(grad)

    return f(*xs)


# ----------------------------------------------------------------------------------------------
# linear entropy


def fused_linear_entropy(hidden: Any, linear_weight: Any, linear_bias: Any, opts: dict, chunk_size: Any) -> Any:
    """Validated TensorFlow arguments of :func:`logitkit.linear_entropy` in, ``hidden.shape[:-1]`` out."""
    h2, W, _ = _flat_inputs(hidden, linear_weight, None)
    xs = [h2, W] + ([] if linear_bias is None else [linear_bias])
    ent = (_host_entropy if on_host(hidden) else _graph_entropy)(xs, opts, chunk_size)
    return tf.cast(tf.reshape(ent, tf.shape(hidden)[:-1]), hidden.dtype)


def _host_entropy(xs: list, opts: dict, chunk_size: Any) -> Any:
    has_b = len(xs) == 3

    def head(h, W, b):
        y = np.zeros(h.shape[0], np.int64)
        return core.Head(_HostOps(h, W, b), h, W, y, b, dict(opts, weight=None), chunk_size=chunk_size,
                         kernels=False)

    def np_fwd(h, W, *extra):
        return head(h, W, extra[0] if has_b else None).entropy()

    def np_bwd(h, W, ent, m, r, g, *extra):
        b = extra[0] if has_b else None
        dh, dw, db = head(h, W, b).entropy_backward(ent, m, r, g, (True, True, has_b))
        return (dh, dw) + ((db,) if has_b else ())

    key = _static_key(opts, has_b, chunk_size)
    fwd = _graph(("ent",) + key, np_fwd, lambda h, *_: [_acc(h.dtype)] * 3, lambda h, *_: [h.shape[:1]] * 3)
    bwd = _graph(("ent_back",) + key, np_bwd,
                 lambda h, W, *rest: [h.dtype, W.dtype] + ([rest[4].dtype] if has_b else []),
                 lambda h, W, *rest: [h.shape, W.shape] + ([rest[4].shape] if has_b else []))

    @tf.custom_gradient
    def f(*inputs):
        ent, m, r = fwd(*inputs)

        def grad(g):
            return list(bwd(*inputs[:2], ent, m, r, tf.cast(g, ent.dtype), *inputs[2:]))

        return ent, _once(grad)

    return f(*xs)


def _graph_entropy(xs: list, opts: dict, chunk_size: Any) -> Any:
    h2, W = xs[0], xs[1]
    has_b = len(xs) == 3
    acc = _acc(h2.dtype)
    rows = _rows_per_chunk(h2.shape[0], W.shape[0], acc, chunk_size)
    softcap, temp = opts["softcap"], opts["temperature"]

    @tf.custom_gradient
    def f(*inputs):
        ch = _Chunks(inputs[0], inputs[1], inputs[2] if has_b else None, rows)

        def chunk(h_c):
            z = transform(_XP, ch.logits(h_c), softcap, temp)
            run = core.tile_entropy(_XP, z)
            ent = core.entropy_finish(_XP, run)
            m = tf.reshape(run[0], [-1])
            r = tf.where(m == -math.inf, tf.zeros_like(m), tf.reshape(tf.math.log1p(run[1] + (run[2] - 1.0)), [-1]))
            return ent, m, r

        ent, m, r = (ch.unblock(t) for t in tf.map_fn(chunk, ch.h, fn_output_signature=(acc, acc, acc)))

        def grad(g):
            eb, mb, rb, gb = ch.block(ent), ch.block(m), ch.block(r), ch.block(tf.cast(g, acc))

            def dz_fn(i, z):
                return core.entropy_grad(_XP, z, mb[i], rb[i], eb[i], gb[i], softcap, temp)

            dh, dW, db = ch.backward(dz_fn, has_b)
            out = [tf.cast(dh, inputs[0].dtype), tf.cast(dW, inputs[1].dtype)]
            return out + ([tf.cast(db, inputs[2].dtype)] if has_b else [])

        return ent, _once(grad)

    return f(*xs)


# ----------------------------------------------------------------------------------------------
# linear_head: every output of one pass (host route)

_ROW_KEYS = ("m", "r", "ent", "aux")


def _head_keys(spec: Any) -> tuple:
    """Differentiable per-row values returned to TensorFlow, in this order (as logitkit.torch.head)."""
    o = spec.outputs
    keys = []
    if "loss" in o:
        keys.append("ce")
    if "lse" in o or spec.need_lse:
        keys.append("lse")
    for name, key in (("logprobs", "lp"), ("entropy", "ent"), ("kl", "kl")):
        if name in o:
            keys.append(key)
    return tuple(keys)


def fused_linear_head(a: Any) -> Any:
    """Validated :class:`logitkit.linear.HeadArgs` of TensorFlow tensors in, :class:`HeadOutput` out."""
    spec = a.spec
    _refuse_watched_weight(a.weight)
    if not on_host(a.hidden):
        return _graph_head(a)
    w = None if a.weight is None else tf.stop_gradient(tf.convert_to_tensor(a.weight))
    h2, W, y = _flat_inputs(a.hidden, a.W, a.labels)
    N = tf.shape(h2)[0]
    has_b, has_w, has_y = a.bias is not None, w is not None, a.labels is not None
    temp = None if a.temp is None else tf.reshape(a.temp, [-1])
    teacher = [] if a.teacher is None else [t for t in a.teacher[1:] if t is not None]
    kind = None if a.teacher is None else a.teacher[0]
    t_has_b = kind == "head" and a.teacher[3] is not None
    consts = ([y] if has_y else []) + ([temp] if temp is not None else []) + ([w] if has_w else []) + \
        [tf.stop_gradient(t) for t in teacher]
    keys = _head_keys(spec)
    row_keys = [k for k in core_head.row_names(spec) if k in _ROW_KEYS]
    want_am = "argmax" in spec.outputs
    chunk, ign = a.chunk_size, spec.ignore_index

    def run_np(h, Wn, extra):
        extra = list(extra)
        b = extra.pop(0) if has_b else None
        lab = extra.pop(0) if has_y else None
        tp = extra.pop(0).astype(np.float64) if temp is not None else None
        wn = extra.pop(0) if has_w else None
        n = h.shape[0]
        if lab is not None:
            _check_host_labels(lab, Wn.shape[0], ign)
        t, tops = None, None
        if kind == "head":
            th, tW = extra[0].reshape(n, -1), extra[1]
            tb = extra[2] if t_has_b else None
            tops, t = core.NumpyOps(th, tW, tb), ("head", th)
        elif kind == "logits":
            t = ("logits", extra[0].reshape(n, -1))
        elif kind == "topk":
            k = extra[0].shape[-1]
            t = ("topk", extra[0].reshape(n, k).astype(np.int64), extra[1].reshape(n, k))
        return core_head.HeadRun(_HostOps(h, Wn, b), h, Wn, lab, tp, wn, spec, t, tops, chunk), lab

    def np_fwd(h, Wn, *extra):
        run, lab = run_np(h, Wn, extra)
        rows = run.forward()
        valid = np.ones(h.shape[0], bool) if lab is None else lab != ign
        rows["lse"] = np.where(valid, rows["m"] + rows["r"], 0.0).astype(rows["m"].dtype)
        out = [rows[k] for k in keys] + [rows[k] for k in row_keys]
        return out + ([rows["am"].astype(np.int64)] if want_am else [])

    def np_bwd(h, Wn, *rest):
        nk, nr = len(keys), len(row_keys)
        cots = dict(zip(["g_" + k for k in keys], rest[:nk]))
        rows = dict(zip(row_keys, rest[nk:nk + nr]))
        extra = rest[nk + nr:]
        run, _ = run_np(h, Wn, extra)
        dh, dw, db = run.backward(rows, cots, (True, True, has_b), has_bias=has_b)
        dw = dw.astype(Wn.dtype)
        out = [dh.astype(h.dtype, copy=False), dw]
        return out + ([db.astype(extra[0].dtype)] if has_b else [])

    acc = _acc(a.hidden.dtype)
    n_out = len(keys) + len(row_keys)
    key = ("head", spec, has_b, has_w, has_y, temp is not None, kind, t_has_b, chunk)
    fwd = _graph(key + ("fwd",), np_fwd, lambda *_: [acc] * n_out + ([tf.int64] if want_am else []),
                 lambda h, *_: [h.shape[:1]] * (n_out + int(want_am)))
    bwd = _graph(key + ("bwd",), np_bwd,
                 lambda h, Wn, *rest: [h.dtype, Wn.dtype] + ([rest[n_out].dtype] if has_b else []),
                 lambda h, Wn, *rest: [h.shape, Wn.shape] + ([rest[n_out].shape] if has_b else []))
    xs = [h2, W] + ([a.bias] if has_b else [])

    argmax = []  # not differentiable: leaves the custom gradient beside it

    @tf.custom_gradient
    def f(*inputs):
        outs = fwd(*inputs, *consts)
        vals, saved = outs[:len(keys)], outs[len(keys):n_out]
        if want_am:
            argmax.append(outs[n_out])

        def grad(*gs):
            cots = [tf.zeros_like(v) if g is None else tf.cast(g, acc) for v, g in zip(vals, gs)]
            return list(bwd(inputs[0], inputs[1], *cots, *saved, *inputs[2:], *consts))

        return tuple(vals), _once(grad)

    vals = dict(zip(keys, f(*xs) if keys else ()))
    if want_am:
        if not keys:
            argmax.append(fwd(*xs, *consts)[n_out])
        vals["am"] = argmax[0]
    lab = tf.zeros([N], tf.int64) if y is None else y
    return _assemble(a, vals, lab, tf.shape(a.hidden)[:-1])


def _assemble(a: Any, vals: dict, labels: Any, shape: Any) -> Any:
    """:func:`logitkit.linear.assemble_outputs` on TensorFlow (tensors have no ``reshape`` method)."""
    spec, dtype = a.spec, a.hidden.dtype
    res = {}
    if "loss" in spec.outputs:
        ce = vals["ce"]
        validf, wy = row_weights(_XP, labels, a.weight, spec.ignore_index, ce.dtype)
        lse = vals.get("lse", ce)
        red = a.reduction if a.num_items is None else "sum"
        loss = reduce_loss(_XP, ce, lse, validf, wy, red, a.z_loss)
        if a.num_items is not None:
            loss = loss / tf.cast(a.num_items, loss.dtype)
        res["loss"] = tf.cast(tf.reshape(loss, shape) if a.reduction == "none" else tf.reshape(loss, []), dtype)
    for name, key in (("logprobs", "lp"), ("entropy", "ent"), ("lse", "lse"), ("kl", "kl")):
        if name in spec.outputs:
            res[name] = tf.cast(tf.reshape(vals[key], shape), dtype)
    if "argmax" in spec.outputs:
        res["argmax"] = tf.reshape(vals["am"], shape)
    return HeadOutput(**res)


def _graph_head(a: Any) -> Any:
    """:func:`fused_linear_head` in TensorFlow ops over chunks of rows (XLA, accelerators).

    The chunk stages of :mod:`logitkit.core.linear_head` run on each chunk inside ``tf.map_fn``
    (forward) and ``tf.while_loop`` (backward, accumulating ``dW`` and ``db``).
    """
    spec = a.spec
    kind = None if a.teacher is None else a.teacher[0]
    if kind == "topk":
        raise NotImplementedError("teacher_topk: a top-k teacher runs on TensorFlow CPU tensors outside XLA only "
                                  "(through tf.numpy_function); under jit_compile=True or on an accelerator pass "
                                  "teacher_logits or a teacher head")
    w = None if a.weight is None else tf.stop_gradient(tf.convert_to_tensor(a.weight))
    h2, W, y = _flat_inputs(a.hidden, a.W, a.labels)
    N = tf.shape(h2)[0]
    has_b, has_y = a.bias is not None, a.labels is not None
    acc = _acc(a.hidden.dtype)
    V = int(W.shape[0])
    temps = core_head.STUDENT_TEMPS + (core_head.TEACHER_TEMPS if kind is not None else 0)
    if a.chunk_size is not None:
        rows = a.chunk_size[0] if isinstance(a.chunk_size, tuple) else a.chunk_size
    else:
        rows = max(1, core_head.DEFAULT_WORKSPACE // max(1, V * temps * (8 if acc == tf.float64 else 4)))
    if isinstance(h2.shape[0], int):
        rows = min(rows, max(h2.shape[0], 1))
    want_am = "argmax" in spec.outputs
    cspec = spec._replace(outputs=tuple(o for o in spec.outputs if o != "argmax"))  # argmax: tf.argmax below
    keys = _head_keys(spec)
    names = [k for k in core_head.row_names(cspec)]
    ign = spec.ignore_index
    y_in = y if has_y else tf.zeros([N], tf.int64)
    temp = None if a.temp is None else tf.cast(tf.reshape(a.temp, [-1]), acc)
    if kind == "head":
        th = tf.stop_gradient(tf.reshape(a.teacher[1], [N, -1]))
        tW = tf.stop_gradient(tf.cast(a.teacher[2], acc))
        tb = None if a.teacher[3] is None else tf.stop_gradient(tf.cast(a.teacher[3], acc))
    elif kind == "logits":
        tl = tf.stop_gradient(tf.reshape(a.teacher[1], [N, V]))
    argmax = []

    def body(*inputs):
        ch = _Chunks(inputs[0], inputs[1], inputs[2] if has_b else None, rows)
        blocks = [ch.block(y_in, ign if has_y else 0)]
        if temp is not None:
            blocks.append(ch.block(temp, 1.0))
        if kind == "head":
            blocks.append(ch.block(th))
        elif kind == "logits":
            blocks.append(ch.block(tl))

        def parts(bs):
            bs = list(bs)
            lab = bs.pop(0)
            tp = bs.pop(0) if temp is not None else None
            teach = None
            if kind == "head":
                tz = tf.matmul(tf.cast(bs.pop(0), acc), tW, transpose_b=True)
                teach = tz if tb is None else tz + tb
            elif kind == "logits":
                teach = bs.pop(0)
            return lab, tp, teach

        def chunk(args):
            h_c, bs = args[0], args[1:]
            lab, tp, teach = parts(bs)
            x = ch.logits(h_c)
            vals = core_head.chunk_forward(_XP, x, lab, tp, teach, w, cspec)
            out = [tf.cast(vals[k], acc) for k in names]
            if want_am:
                am = tf.argmax(x, axis=-1, output_type=tf.int64)
                out.append(tf.where(lab != ign, am, tf.zeros_like(am)) if has_y else am)
            return tuple(out)

        sig = tuple([acc] * len(names) + ([tf.int64] if want_am else []))
        outs = [ch.unblock(t) for t in tf.map_fn(chunk, (ch.h, *blocks), fn_output_signature=sig)]
        rows_ = dict(zip(names, outs))
        if want_am:
            argmax.append(outs[-1])
        lse = rows_["m"] + rows_["r"]
        rows_["lse"] = tf.where(y_in != ign, lse, tf.zeros_like(lse)) if has_y else lse
        vals = [rows_[k] for k in keys]

        def grad(*gs):
            cots = {"g_" + k: (tf.zeros_like(v) if g is None else tf.cast(g, acc)) for k, v, g in zip(keys, vals, gs)}
            saved = {k: ch.block(rows_[k]) for k in _ROW_KEYS if k in rows_}
            cb = {k: ch.block(v) for k, v in cots.items()}

            def dz_fn(i, x):
                lab, tp, teach = parts([b[i] for b in blocks])
                return core_head.chunk_backward(_XP, x, lab, tp, teach, w, cspec, {k: v[i] for k, v in saved.items()},
                                                {k: v[i] for k, v in cb.items()})

            dh, dW, db = ch.backward(dz_fn, has_b)
            out = [tf.cast(dh, inputs[0].dtype), tf.cast(dW, inputs[1].dtype)]
            return out + ([tf.cast(db, inputs[2].dtype)] if has_b else [])

        return tuple(vals), _once(grad)

    xs = [h2, W] + ([a.bias] if has_b else [])
    if keys:
        vals = dict(zip(keys, tf.custom_gradient(body)(*xs)))
    else:  # argmax alone: nothing to differentiate
        body(*xs)
        vals = {}
    if want_am:
        vals["am"] = argmax[0]
    return _assemble(a, vals, y_in, tf.shape(a.hidden)[:-1])
