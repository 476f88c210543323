"""Which array library an input belongs to, and a small numpy-style namespace for each.

The core is written once against ``xp``: a namespace with numpy's names (``xp.max(x, axis=...,
keepdims=...)``, ``xp.where``, ``xp.take_along_axis`` ...). NumPy and ``jax.numpy`` already are
such namespaces; torch gets a thin shim. Detection looks at ``sys.modules`` only, so importing
logitkit never imports torch or jax (the approach of array-api-compat).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["library_of", "namespace_of", "is_floating", "acc_dtype", "NUMPY", "TORCH", "JAX", "TENSORFLOW"]

NUMPY, TORCH, JAX, TENSORFLOW = "numpy", "torch", "jax", "tensorflow"


def library_of(x: Any) -> str | None:
    """Return ``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"`` for an array of that library, else ``None``."""
    if isinstance(x, (np.ndarray, np.generic)):
        return NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return TORCH
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return JAX
    tf = sys.modules.get("tensorflow")
    # getattr: the module may be half-imported; tf.Variable is not a tf.Tensor.
    if tf is not None and isinstance(x, (getattr(tf, "Tensor", ()), getattr(tf, "Variable", ()))):
        return TENSORFLOW
    return None


def _lib_of_arg(name: str, x: Any) -> str | None:
    if x is None or isinstance(x, (bool, int, float)):
        return None
    lib = library_of(x)
    if lib is None:
        if isinstance(x, (list, tuple)):
            # A list would fail later with an AttributeError far from the call; name it here.
            raise TypeError(f"{name}: expected a NumPy array, torch tensor, JAX array or TensorFlow tensor, got "
                            f"{type(x).__name__} (wrap it with numpy.asarray)")
        raise TypeError(f"{name}: expected a NumPy array, torch tensor, JAX array or TensorFlow tensor, got {type(x).__name__}")
    return lib


def namespace_of(**arrays: Any) -> tuple[str, Any]:
    """The library and ``xp`` namespace shared by the named arrays.

    Python scalars and ``None`` take no part; a list or tuple raises a TypeError naming it. Arrays from two libraries raise a
    ``TypeError`` naming both arguments.
    """
    seen: dict[str, str] = {}
    for name, x in arrays.items():
        lib = _lib_of_arg(name, x)
        if lib is not None and lib not in seen:
            seen[lib] = name
    if len(seen) > 1:
        desc = ", ".join(f"{arg!r} is a {lib} array" for lib, arg in seen.items())
        raise TypeError(f"arrays from different libraries cannot be mixed: {desc}")
    lib = next(iter(seen), NUMPY)
    return lib, get_namespace(lib)


def get_namespace(lib: str) -> Any:
    if lib == NUMPY:
        return np
    if lib == JAX:
        import jax.numpy as jnp

        return jnp
    if lib == TORCH:
        return _torch_namespace()
    if lib == TENSORFLOW:
        from .tensorflow._namespace import namespace

        return namespace()
    raise ValueError(f"unknown array library {lib!r}")


_TORCH_NS = None


def _torch_namespace() -> Any:
    global _TORCH_NS
    if _TORCH_NS is None:
        _TORCH_NS = _TorchNamespace()
    return _TORCH_NS


class _TorchNamespace:
    """numpy spellings over torch functions, only what the core uses."""

    def __init__(self) -> None:
        import torch

        self._t = torch
        self.float16, self.bfloat16 = torch.float16, torch.bfloat16
        self.float32, self.float64 = torch.float32, torch.float64
        self.int64, self.bool_ = torch.int64, torch.bool
        for name in ("exp", "log", "log1p", "expm1", "tanh", "abs", "isnan", "isinf", "isfinite",
                     "maximum", "minimum", "zeros_like", "ones_like", "sqrt", "logical_not",
                     "logical_and", "logical_or", "moveaxis", "broadcast_to", "reshape", "full_like"):
            setattr(self, name, getattr(torch, name))

    def asarray(self, x, dtype=None, like=None):
        device = like.device if like is not None and hasattr(like, "device") else None
        return self._t.as_tensor(x, dtype=dtype, device=device)

    def astype(self, x, dtype):
        return x.to(dtype)

    def max(self, x, axis=None, keepdims=False):
        if axis is None:
            return self._t.amax(x)
        return self._t.amax(x, dim=axis, keepdim=keepdims)

    def sum(self, x, axis=None, keepdims=False, dtype=None):
        if axis is None:
            return self._t.sum(x, dtype=dtype)
        return self._t.sum(x, dim=axis, keepdim=keepdims, dtype=dtype)

    def any(self, x, axis=None, keepdims=False):
        if axis is None:
            return self._t.any(x)
        return self._t.any(x, dim=axis, keepdim=keepdims)

    def where(self, cond, a, b):
        # torch.where takes Python scalars on either side and promotes like NumPy.
        return self._t.where(cond, a, b)

    def take_along_axis(self, x, idx, axis):
        if x.ndim == idx.ndim and self._t.compiler.is_compiling():
            # take_along_dim's broadcast pins every size to its traced value (torch 2.13: a new
            # batch size recompiles under dynamic=True); gather on the index expanded to x's other
            # sizes is the same for these calls and stays symbolic (a size-1 x axis raises there)
            ax = axis % x.ndim
            shape = [idx.shape[d] if d == ax else x.shape[d] for d in range(x.ndim)]
            return self._t.gather(x, ax, idx.expand(shape))
        return self._t.take_along_dim(x, idx, dim=axis)

    def zeros(self, shape, dtype=None, like=None):
        return self._t.zeros(shape, dtype=dtype, device=None if like is None else like.device)

    def expand_dims(self, x, axis):
        return self._t.unsqueeze(x, axis)

    def squeeze(self, x, axis):
        return self._t.squeeze(x, axis)

    def arange(self, n, like=None):
        return self._t.arange(n, device=None if like is None else like.device)


def is_floating(dtype: Any) -> bool:
    """True for float16/bfloat16/float32/float64 in any of the four libraries."""
    name = dtype_name(dtype)
    return name in ("float16", "bfloat16", "float32", "float64")


def dtype_name(dtype: Any) -> str:
    if hasattr(dtype, "as_numpy_dtype"):  # tf.DType, whose str() is "<dtype: 'float32'>"
        return dtype.name
    return str(dtype).replace("torch.", "")


def acc_dtype(xp: Any, dtype: Any) -> Any:
    """Accumulation dtype: float64 for float64 input, float32 for every other floating input."""
    return xp.float64 if dtype_name(dtype) == "float64" else xp.float32


def is_integer(dtype: Any) -> bool:
    name = dtype_name(dtype)
    return name.startswith("int") or name.startswith("uint")


# torch.compile cannot trace the first creation of the torch namespace (a global set inside the
# graph); build it now when torch is already imported (no framework is imported here).
if "torch" in sys.modules and hasattr(sys.modules["torch"], "Tensor"):
    _torch_namespace()
