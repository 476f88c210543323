"""Argument checks shared by every entry point: each error names the argument and the problem."""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np

from ._namespace import JAX, TORCH, dtype_name, is_floating, is_integer

REDUCTIONS = ("mean", "sum", "none")
_UNSET = object()


def _require_array(name: str, x: Any) -> None:
    if not (hasattr(x, "dtype") and hasattr(x, "shape") and hasattr(x, "ndim")):
        raise TypeError(f"{name}: expected a NumPy array, torch tensor or JAX array, got {type(x).__name__}")


def check_logits(name: str, x: Any) -> None:
    _require_array(name, x)
    if not is_floating(x.dtype):
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {dtype_name(x.dtype)}")
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least 1 dimension (the class axis), got a scalar")


def norm_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name}: expected an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array of {ndim} dimensions")
    return int(axis) % ndim


def real_scalar(name: str, value: Any) -> float:
    """``value`` as a Python float, or a TypeError naming ``name``.

    Python and NumPy real scalars pass; ``bool`` (an int to Python, never a temperature), strings,
    ``None``, complex numbers and arrays (even 0-d ones) are refused rather than coerced.

    >>> real_scalar("temperature", 2)
    2.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number (Python or NumPy scalar), got "
                        f"{type(value).__name__} {_short_repr(value)}")
    return float(value)


def _finite(v: float) -> bool:
    # Comparisons only (no math.isfinite): under torch.compile(dynamic=True) a float option that
    # comes from a function default is a symbolic float, which comparisons accept.
    return v == v and -math.inf < v < math.inf


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def check_ignore_index(ignore_index: Any, name: str = "ignore_index") -> int:
    """``ignore_index`` as an int; it must be an int (not bool) that fits in int64, as labels do."""
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(ignore_index).__name__}")
    value = int(ignore_index)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name}: {value} does not fit in int64 (labels are int64 at most)")
    return value


def check_options(*, reduction: Any = _UNSET, label_smoothing: Any = 0.0, z_loss: Any = 0.0,
                  softcap: Any = None, temperature: Any = 1.0) -> None:
    """Check the scalar options that were passed (``reduction`` only when given, even as ``None``).

    Each must be a real scalar (see :func:`real_scalar`); ``softcap`` may also be ``None``.
    """
    if reduction is not _UNSET and (not isinstance(reduction, str) or reduction not in REDUCTIONS):
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    ls = real_scalar("label_smoothing", label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    zl = real_scalar("z_loss", z_loss)
    if not _finite(zl) or zl < 0:
        raise ValueError(f"z_loss: expected a finite value >= 0, got {z_loss}")
    if softcap is not None:
        cap = real_scalar("softcap", softcap)
        if not (_finite(cap) and cap > 0):
            raise ValueError(f"softcap: expected None or a finite value > 0, got {softcap}")
    t = real_scalar("temperature", temperature)
    if not (_finite(t) and t > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")


def check_weight(weight: Any, V: int) -> None:
    if weight is None:
        return
    _require_array("weight", weight)
    if weight.ndim != 1 or weight.shape[0] != V:
        raise ValueError(f"weight: expected shape ({V},) (one weight per class), got {tuple(weight.shape)}")
    if not is_floating(weight.dtype):
        raise TypeError(f"weight: expected a floating dtype, got {dtype_name(weight.dtype)}")


def labels_kind(labels: Any, logits_moved_shape: tuple, name: str = "labels") -> str:
    """``"index"`` for integer class indices, ``"prob"`` for probabilities; checks the shape."""
    batch = tuple(logits_moved_shape[:-1])
    if is_integer(labels.dtype):
        if tuple(labels.shape) != batch:
            raise ValueError(f"{name}: class indices must have the logits' shape without the class axis, "
                             f"{batch}; got {tuple(labels.shape)}")
        return "index"
    if is_floating(labels.dtype):
        return "prob"
    raise TypeError(f"{name}: expected integer class indices or floating probabilities, "
                    f"got {dtype_name(labels.dtype)}")


def check_prob_shape(labels: Any, moved_shape: tuple, name: str = "labels") -> None:
    if tuple(labels.shape) != tuple(moved_shape):
        raise ValueError(f"{name}: probabilities must have the logits' shape {tuple(moved_shape)}, "
                         f"got {tuple(labels.shape)}")


def _is_tracer(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def check_label_range(lib: str, labels: Any, V: int, ignore_index: int | None, name: str = "labels") -> None:
    """Raise on the first class index outside ``[0, V)`` that is not ``ignore_index``.

    Runs where the labels can be read cheaply: NumPy, torch CPU tensors, concrete JAX arrays.
    Traced JAX labels and CUDA tensors are checked on the device instead (the row's loss is NaN);
    torch labels under ``torch.compile`` are checked by the custom ops when they run.
    """
    if lib == TORCH:
        # Under torch.compile reading the labels would end the graph: the compiled kernels'
        # custom ops repeat this check when they run.
        if labels.device.type != "cpu" or sys.modules["torch"].compiler.is_compiling():
            return
        arr = labels.detach().numpy()
    elif lib == JAX:
        if _is_tracer(labels):
            return
        arr = np.asarray(labels)
    elif lib == "tensorflow":
        # Symbolic labels (inside tf.function) cannot be read: their bad rows give NaN, as traced
        # JAX labels do (the TensorFlow-named functions add a graph assertion).
        if sys.modules["tensorflow"].is_symbolic_tensor(labels):
            return
        arr = labels.numpy()
    else:
        arr = np.asarray(labels)
    bad = (arr < 0) | (arr >= V)
    if ignore_index is not None:
        bad &= arr != ignore_index
    if bad.any():
        pos = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape))
        where = pos if len(pos) != 1 else pos[0]
        extra = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
        raise ValueError(f"{name}: class index {int(arr[pos])} at position {where} is out of range "
                         f"[0, {V}){extra}")
