"""numpy spellings over TensorFlow ops: the ``xp`` that runs :mod:`logitkit.core` on ``tf.Tensor``.

Only what the core and :mod:`logitkit.functional` use. TensorFlow never promotes dtypes, so
``where`` gives a Python scalar the dtype of the tensor beside it; shapes may hold ``None``
(unknown batch dimensions inside ``tf.function``), which ``reshape`` and ``broadcast_to`` accept
where the result is still determined. Setting nothing global (no NumPy behaviour mode).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["namespace"]

_NS = None


def namespace() -> Any:
    global _NS
    if _NS is None:
        _NS = _TFNamespace()
    return _NS


def _dims(shape: Any) -> list | None:
    """A static shape as a list of ints and ``None``s (``None`` for an unknown rank)."""
    if isinstance(shape, (tuple, list)):
        return list(shape)
    shape = tf.TensorShape(shape) if not isinstance(shape, tf.TensorShape) else shape
    return None if shape.rank is None else shape.as_list()


class _WeakWhere:
    """``where(cond, scalar, scalar)``: its dtype comes from the tensor it meets next (NumPy's weak scalars)."""

    def __init__(self, cond: Any, a: Any, b: Any) -> None:
        self.cond, self.a, self.b = cond, a, b

    def resolve(self, dtype: Any) -> Any:
        return tf.where(self.cond, tf.cast(self.a, dtype), tf.cast(self.b, dtype))


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable))


class _TFNamespace:
    float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
    int64, bool_ = tf.int64, tf.bool

    exp = staticmethod(tf.exp)
    log = staticmethod(tf.math.log)
    log1p = staticmethod(tf.math.log1p)
    expm1 = staticmethod(tf.math.expm1)
    tanh = staticmethod(tf.tanh)
    abs = staticmethod(tf.abs)
    sqrt = staticmethod(tf.sqrt)
    isnan = staticmethod(tf.math.is_nan)
    isinf = staticmethod(tf.math.is_inf)
    isfinite = staticmethod(tf.math.is_finite)
    logical_not = staticmethod(tf.logical_not)
    logical_and = staticmethod(tf.logical_and)
    logical_or = staticmethod(tf.logical_or)
    zeros_like = staticmethod(tf.zeros_like)
    ones_like = staticmethod(tf.ones_like)
    expand_dims = staticmethod(tf.expand_dims)

    @staticmethod
    def _pair(a: Any, b: Any) -> tuple[Any, Any]:
        if _is_tensor(a) and not _is_tensor(b):
            return a, b.resolve(a.dtype) if isinstance(b, _WeakWhere) else tf.cast(b, a.dtype)
        if _is_tensor(b) and not _is_tensor(a):
            return a.resolve(b.dtype) if isinstance(a, _WeakWhere) else tf.cast(a, b.dtype), b
        if not _is_tensor(a):
            raise TypeError("where / maximum / minimum of two non-tensors on TensorFlow")
        return a, b

    def maximum(self, a: Any, b: Any) -> Any:
        return tf.maximum(*self._pair(a, b))

    def minimum(self, a: Any, b: Any) -> Any:
        return tf.minimum(*self._pair(a, b))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return _WeakWhere(cond, a, b)
        return tf.where(cond, *self._pair(a, b))

    def full_like(self, x: Any, value: Any) -> Any:
        return tf.fill(tf.shape(x), tf.cast(value, x.dtype))

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        return tf.convert_to_tensor(x, dtype=dtype)

    def astype(self, x: Any, dtype: Any) -> Any:
        if isinstance(x, _WeakWhere):
            return x.resolve(dtype)
        return x if x.dtype == dtype else tf.cast(x, dtype)

    def ascontiguousarray(self, x: Any) -> Any:
        return x

    def max(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None) -> Any:
        if dtype is not None:
            x = self.astype(x, dtype)
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def any(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return tf.reduce_any(x, axis=axis, keepdims=keepdims)

    def squeeze(self, x: Any, axis: int) -> Any:
        return tf.squeeze(x, axis=axis)

    def reshape(self, x: Any, shape: Any) -> Any:
        dims = _dims(shape) if not isinstance(shape, int) else [shape]
        if dims is not None and dims.count(None) + dims.count(-1) <= 1:
            return tf.reshape(x, [-1 if d is None else d for d in dims])
        if isinstance(shape, tf.Tensor):
            return tf.reshape(x, shape)
        raise ValueError(f"cannot reshape a tensor to the partly unknown shape {shape}")

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        nd = x.shape.rank
        perm = [i for i in range(nd) if i != source % nd]
        perm.insert(destination % nd, source % nd)
        return tf.transpose(x, perm)

    def broadcast_to(self, x: Any, shape: Any) -> Any:
        target, have = _dims(shape), _dims(x.shape)
        if target is None or have is None or len(have) > len(target) or any(
                h is not None and t is not None and h not in (1, t)
                for h, t in zip(have[::-1], target[::-1])):
            raise ValueError(f"shape {x.shape} does not broadcast to {shape}")
        if None in target:
            # ``where`` broadcasts by itself; the static check above is all that is possible.
            return x
        return tf.broadcast_to(x, target)

    def take_along_axis(self, x: Any, idx: Any, axis: int) -> Any:
        nd = x.shape.rank
        if nd == 1:
            return tf.gather(x, idx)
        if axis % nd != nd - 1:
            raise ValueError("take_along_axis: only the last axis is supported on TensorFlow")
        return tf.gather(x, idx, axis=nd - 1, batch_dims=nd - 1)

    def zeros(self, shape: Any, dtype: Any = None, like: Any = None) -> Any:
        return tf.zeros(shape, dtype=dtype or tf.float32)

    def arange(self, n: int, like: Any = None) -> Any:
        return tf.range(n, dtype=tf.int64)
