r"""Keras 3 losses over logitkit: ``keras.losses``' names and arguments, exact on every backend.

Keras hands a loss backend tensors (``tf.Tensor``, ``jax.Array`` or ``torch.Tensor``, after
casting both to the loss's ``dtype``, float32 by default, so class indices arrive as floats); the
per-example loss comes from logitkit's top-level functions, which send each backend's tensors to
its bridge (custom gradients that keep only per-row statistics). Keras itself then applies
``sample_weight``, masks and ``reduction``, as for its own losses.

``from_logits`` defaults to ``True`` and ``False`` is refused: after a softmax the probabilities
of a confident row have rounded to 1 and 0, and its loss cannot be recovered exactly.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

import logitkit

__all__ = ["SparseCategoricalCrossentropy", "CategoricalCrossentropy", "sparse_softmax_cross_entropy",
           "softmax_cross_entropy"]

# The ignore index when ignore_class is None: int32's minimum, which no label keeps (see below).
_NO_IGNORE = -(2 ** 31)


def _require_logits(from_logits: Any) -> None:
    if from_logits is not True:
        raise ValueError(
            f"from_logits: logitkit's losses take logits (from_logits=True), got {from_logits!r}. "
            "Probabilities from a softmax have lost the exactness of confident rows (p rounds to 1); "
            "drop the model's softmax activation and pass from_logits=True")


def _check_axis(axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    return int(axis)


def _concrete(x: Any) -> Any:
    """``x`` as a NumPy array when its values can be read now (not traced, not on a device), else ``None``."""
    mod = type(x).__module__
    try:
        if mod.startswith("torch"):
            return x.detach().numpy() if x.device.type == "cpu" else None
        if mod.startswith("tensorflow"):
            import tensorflow as tf

            return None if tf.is_symbolic_tensor(x) else x.numpy()
        import jax

        return None if isinstance(x, jax.core.Tracer) else np.asarray(x)
    except Exception:  # noqa: BLE001 - unreadable values are checked on the device instead
        return None


def sparse_softmax_cross_entropy(y_true: Any, y_pred: Any, from_logits: bool = True,
                                 ignore_class: int | None = None, axis: int = -1) -> Any:
    r"""Per-example :math:`\mathrm{lse}(x) - x_y`, ``keras.losses.sparse_categorical_crossentropy``'s arguments.

    ``y_true``: class indices of ``y_pred``'s shape without ``axis`` (or with a size-1 ``axis``),
    integer or float (as Keras passes them); ``ignore_class`` rows give 0 and are masked out of
    Keras's mean. Returns ``y_pred``'s shape without ``axis``.

    >>> import numpy as np
    >>> from logitkit.keras import sparse_softmax_cross_entropy
    >>> loss = sparse_softmax_cross_entropy(np.array([1.0]), np.array([[0.0, 0.0]], np.float32))
    >>> round(float(np.asarray(loss)[0]), 6)
    0.693147
    """
    _require_logits(from_logits)
    axis = _check_axis(axis)
    y_pred = keras.ops.convert_to_tensor(y_pred)
    y_true = keras.ops.convert_to_tensor(y_true)
    ndim = len(y_pred.shape)
    ax = axis % ndim if -ndim <= axis < ndim else axis
    if len(y_true.shape) == ndim and y_true.shape[ax] == 1:
        y_true = keras.ops.squeeze(y_true, axis=ax)
    if not (keras.backend.standardize_dtype(y_true.dtype).startswith("int")):
        values = _concrete(y_true)
        if values is not None and not np.array_equal(values, np.round(values)):
            raise ValueError("y_true: class indices must be whole numbers, got a fractional value "
                             "(use CategoricalCrossentropy for probabilities)")
        y_true = keras.ops.cast(y_true, "int32")
    if ignore_class is None:
        # A label at the sentinel becomes -1: out of range (an error, or NaN when traced), not ignored.
        y_true = keras.ops.where(keras.ops.equal(y_true, _NO_IGNORE), -1, y_true)
    ignore_index = _NO_IGNORE if ignore_class is None else int(ignore_class)
    loss = logitkit.cross_entropy(y_pred, y_true, axis=axis, ignore_index=ignore_index, reduction="none")
    if ignore_class is not None:
        from keras.src.backend.common.masking import set_keras_mask

        set_keras_mask(loss, keras.ops.not_equal(y_true, ignore_index))
    return loss


def softmax_cross_entropy(y_true: Any, y_pred: Any, from_logits: bool = True, label_smoothing: float = 0.0,
                          axis: int = -1) -> Any:
    r"""Per-example :math:`-\sum_c \tilde y_c \log \mathrm{softmax}(x)_c`, ``keras.losses.categorical_crossentropy``'s arguments.

    ``y_true``: probabilities (one-hot or soft) of ``y_pred``'s shape; with ``label_smoothing`` ε,
    :math:`\tilde y = (1-ε) y + ε/V` over the ``V`` classes of ``axis``. Returns ``y_pred``'s
    shape without ``axis``.

    >>> import numpy as np
    >>> from logitkit.keras import softmax_cross_entropy
    >>> loss = softmax_cross_entropy(np.array([[0.0, 1.0]]), np.array([[0.0, 0.0]], np.float32))
    >>> round(float(np.asarray(loss)[0]), 6)
    0.693147
    """
    _require_logits(from_logits)
    axis = _check_axis(axis)
    y_pred = keras.ops.convert_to_tensor(y_pred)
    y_true = keras.ops.cast(keras.ops.convert_to_tensor(y_true), y_pred.dtype)
    return logitkit.cross_entropy(y_pred, y_true, axis=axis, label_smoothing=float(label_smoothing),
                                  reduction="none")


@keras.saving.register_keras_serializable(package="logitkit")
class SparseCategoricalCrossentropy(keras.losses.Loss):
    """``keras.losses.SparseCategoricalCrossentropy`` from logits, exact for confident rows.

    Same arguments (``from_logits`` must be ``True``, its default here) and the same reduction,
    sample weights and masks, on the tensorflow, jax and torch backends.

    >>> import numpy as np, logitkit.keras
    >>> loss = logitkit.keras.SparseCategoricalCrossentropy()
    >>> round(float(loss(np.array([0.0]), np.array([[40.0, 0.0, 0.0]], np.float32))), 20)  # 2·e^-40, not 0
    8.5e-18
    """

    def __init__(self, from_logits: bool = True, ignore_class: int | None = None,
                 reduction: str | None = "sum_over_batch_size", axis: int = -1,
                 name: str = "sparse_categorical_crossentropy", dtype: Any = None) -> None:
        _require_logits(from_logits)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits, self.ignore_class, self.axis = from_logits, ignore_class, _check_axis(axis)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return sparse_softmax_cross_entropy(y_true, y_pred, from_logits=self.from_logits,
                                            ignore_class=self.ignore_class, axis=self.axis)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(from_logits=self.from_logits, ignore_class=self.ignore_class, axis=self.axis)
        return config


@keras.saving.register_keras_serializable(package="logitkit")
class CategoricalCrossentropy(keras.losses.Loss):
    """``keras.losses.CategoricalCrossentropy`` from logits, exact for confident rows.

    Same arguments (``from_logits`` must be ``True``, its default here), including
    ``label_smoothing`` and ``axis``.

    >>> import numpy as np, logitkit.keras
    >>> loss = logitkit.keras.CategoricalCrossentropy(label_smoothing=0.1)
    >>> round(float(loss(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]], np.float32))), 6)
    0.693147
    """

    def __init__(self, from_logits: bool = True, label_smoothing: float = 0.0, axis: int = -1,
                 reduction: str | None = "sum_over_batch_size", name: str = "categorical_crossentropy",
                 dtype: Any = None) -> None:
        _require_logits(from_logits)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits, self.label_smoothing, self.axis = from_logits, float(label_smoothing), _check_axis(axis)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return softmax_cross_entropy(y_true, y_pred, from_logits=self.from_logits,
                                     label_smoothing=self.label_smoothing, axis=self.axis)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(from_logits=self.from_logits, label_smoothing=self.label_smoothing, axis=self.axis)
        return config
