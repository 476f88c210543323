r"""optax-compatible softmax cross-entropy losses, exact and lean under ``jax.grad``.

Same names, signatures and results as optax 0.2.x (``optax.losses``), including ``axis`` (an int
or a tuple of axes) and ``where``; see each docstring for the few places where logitkit is
deliberately stricter or more exact. All of them run through the custom JVPs of
:mod:`logitkit.jax._rows`: the forward keeps per-row ``(max, log Σ exp)`` only.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate
from .._namespace import JAX
from . import _rows

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels",
           "safe_softmax_cross_entropy", "cross_entropy"]


def _array(name: str, a: Any) -> Any:
    if isinstance(a, jax.Array):
        return a
    try:
        return jnp.asarray(a)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}") from exc


def _check_floating(name: str, a: Any) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {a.dtype}")


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Class axes, normalized and in the caller's order; ``None`` means every axis."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, tuple):
        items = axis
    elif isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        items = (axis,)
    else:
        raise ValueError(f"axis: expected an int or a tuple of ints, got {type(axis).__name__}")
    out = []
    for a in items:
        a = operator.index(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"axis: {a} is out of bounds for an array of dimension {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis: repeated axis in {axis}")
    return tuple(out)


def _classes_last(a: Any, axes: tuple[int, ...]) -> Any:
    """Move the class ``axes`` last (in their order) and flatten them into one."""
    batch = tuple(i for i in range(a.ndim) if i not in axes)
    if len(axes) == 1 and axes[0] == a.ndim - 1:
        return a
    if len(axes) == 1:
        return jnp.moveaxis(a, axes[0], -1)
    a = jnp.transpose(a, batch + axes)
    return a.reshape(a.shape[:len(batch)] + (-1,))


def _mask(where: Any, logits: Any, axis: Any, axes: tuple[int, ...]) -> Any:
    """optax's ``where``: of the logits' shape, or of the batch shape (expanded at ``axis``)."""
    if where is None:
        return None
    where = _array("where", where)
    if where.ndim != logits.ndim:
        if axis is None:
            raise ValueError(f"where: with axis=None it must have the logits' {logits.ndim} "
                             f"dimensions, got shape {where.shape}")
        where = jnp.expand_dims(where, axis)
    try:
        jnp.broadcast_shapes(where.shape, logits.shape)
    except ValueError as exc:
        raise ValueError(f"where: shape {where.shape} does not broadcast to the logits' shape "
                         f"{logits.shape}") from exc
    where = where.astype(bool)
    if len(axes) > 1 or where.shape[axes[0]] != 1:
        # A per-class mask (or several class axes) is needed in full; a per-row mask (size 1 on
        # the class axis) stays small.
        where = jnp.broadcast_to(where, logits.shape)
    return _classes_last(where, axes)


def softmax_cross_entropy(logits: Any, labels: Any, axis: int | tuple[int, ...] | None = -1,
                          where: Any = None) -> Any:
    r"""Softmax cross-entropy with probability labels: :math:`-\sum_c y_c \log \mathrm{softmax}(x)_c`.

    Drop-in for ``optax.softmax_cross_entropy`` (0.2.x). ``logits``: ``[..., num_classes]``;
    ``labels``: broadcastable to the logits (one-hot or any distribution); ``axis``: the class
    axis, a tuple of them, or ``None`` for all; ``where``: boolean mask of the logits' shape (masked
    classes take no part) or of the batch shape (masked rows give 0). Returns the batch shape in
    the promoted dtype of logits and labels.

    Differences from optax, all where optax gives NaN or loses accuracy: a class with label 0 and
    logit ``-inf`` contributes 0 (``0·log 0 = 0``, like ``safe_softmax_cross_entropy``); the label
    gradient of masked entries is 0 (optax: NaN); confident rows keep their tiny losses.

    >>> import jax.numpy as jnp, logitkit.jax as lj
    >>> lj.softmax_cross_entropy(jnp.array([[1.2, -0.8, -0.5]]), jnp.array([[1.0, 0.0, 0.0]]))
    Array([0.2761...], dtype=float32)
    """
    logits, labels = _array("logits", logits), _array("labels", labels)
    _check_floating("logits", logits)
    if not (jnp.issubdtype(labels.dtype, jnp.number) or labels.dtype == bool):
        raise TypeError(f"labels: expected a numeric dtype, got {labels.dtype}")
    axes = _axes(axis, logits.ndim)
    try:
        labels = jnp.broadcast_to(labels, logits.shape)
    except ValueError as exc:
        raise ValueError(f"labels: shape {labels.shape} does not broadcast to the logits' shape "
                         f"{logits.shape}") from exc
    out_dtype = jnp.result_type(logits.dtype, labels.dtype)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(out_dtype)
    mask = _mask(where, logits, axis, axes)
    x = _classes_last(logits, axes)
    y = _classes_last(labels, axes)
    ce, _ = _rows.prob_rows(x, y, None, mask)
    return ce.astype(out_dtype)


def safe_softmax_cross_entropy(logits: Any, labels: Any) -> Any:
    r"""Softmax cross-entropy treating ``0·log softmax(-inf)`` as 0 (``optax.safe_softmax_cross_entropy``).

    ``logits``: ``[..., num_classes]``; ``labels``: broadcastable to them. Returns ``[...]``.
    The logits' gradient is :math:`p \sum_c y_c - y`; the labels' is :math:`-\log p`.

    >>> import jax.numpy as jnp, logitkit.jax as lj
    >>> lj.safe_softmax_cross_entropy(jnp.array([[0.0, -jnp.inf]]), jnp.array([[1.0, 0.0]]))
    Array([0.], dtype=float32)
    """
    return softmax_cross_entropy(logits, labels, axis=-1)


def softmax_cross_entropy_with_integer_labels(logits: Any, labels: Any,
                                              axis: int | tuple[int, ...] = -1,
                                              where: Any = None) -> Any:
    r"""Softmax cross-entropy with class indices: :math:`\log \sum_j e^{x_j} - x_y` per example.

    Drop-in for ``optax.softmax_cross_entropy_with_integer_labels`` (0.2.x). ``logits``:
    ``[..., num_classes]``; ``labels``: integers of the batch shape; ``axis``: the class axis, or
    a tuple of axes whose flattened slice the labels index. ``where`` (logits' shape or batch
    shape) hides classes from the normalizer, as in optax: the label's logit is still read
    unmasked, and a row with nothing unmasked gives 0. Returns the batch shape, logits' dtype.

    Stricter than optax: a label outside ``[0, num_classes)`` raises ``ValueError`` (optax wraps
    ``-1`` and returns NaN for ``num_classes``); under ``jax.jit`` that row's loss is NaN.
    Confident rows keep their ~1e-13 losses (optax: 0) and rows with a common offset of 1e4
    keep full float32 accuracy.

    >>> import jax.numpy as jnp, logitkit.jax as lj
    >>> lj.softmax_cross_entropy_with_integer_labels(jnp.array([[1.2, -0.8, -0.5]]), jnp.array([0]))
    Array([0.2761...], dtype=float32)
    """
    logits, labels = _array("logits", logits), _array("labels", labels)
    _check_floating("logits", logits)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    if axis is None:
        raise ValueError("axis: expected an int or a tuple of ints, got None")
    axes = _axes(axis, logits.ndim)
    mask = _mask(where, logits, axis, axes)
    x = _classes_last(logits, axes)
    try:
        labels = jnp.broadcast_to(labels, x.shape[:-1])
    except ValueError as exc:
        raise ValueError(f"labels: shape {labels.shape} does not match the batch shape "
                         f"{x.shape[:-1]} of the logits") from exc
    _validate.check_label_range(JAX, labels, x.shape[-1], None)
    ce, _ = _rows.index_rows(x, labels, None, mask)
    return ce.astype(logits.dtype)


def cross_entropy(logits: Any, labels: Any, *, axis: int = -1, weight: Any = None,
                  ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                  z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0) -> Any:
    r"""Cross-entropy with every logitkit option, on JAX arrays (see :func:`logitkit.cross_entropy`).

    Per row, with ``z = softcap·tanh(x/softcap)/T`` and ``lse = log Σ_c e^{z_c}``:
    ``(1-ε)·w_y·(lse - z_y) + ε/V·Σ_c w_c·(lse - z_c) + ζ·lse²`` for integer labels, and
    ``Σ_c w_c·ỹ_c·(lse - z_c) + ζ·lse²`` with ``ỹ = (1-ε)·y + ε/V`` for probability labels;
    reduced with torch semantics (``"mean"`` divides by ``Σ w_y``; a mean over nothing is 0).
    Inputs that are not JAX arrays are converted. Differentiable in ``logits``, ``weight`` and
    probability ``labels``, under ``jit``, ``vmap`` and ``checkpoint``.

    >>> import jax.numpy as jnp, logitkit.jax as lj
    >>> float(lj.cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1])))  # doctest: +ELLIPSIS
    0.6931...
    """
    from ..functional import cross_entropy as _cross_entropy

    logits = _array("logits", logits)
    labels = _array("labels", labels)
    if weight is not None:
        weight = _array("weight", weight)
    return _cross_entropy(logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                          softcap=softcap, temperature=temperature)
