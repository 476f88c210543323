"""Array conversions shared by the top-level tests (NumPy, torch, JAX) and the float64 oracles."""

from __future__ import annotations

import numpy as np
import pytest

LIBS = ("numpy", "torch", "jax")
# Relative spacing of each dtype: the loss is returned in the input dtype, so half an ulp of it
# (eps / 2) bounds an exactly rounded result.
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}


def need(lib: str):
    """The library's module, or skip the test when it is not installed."""
    if lib == "torch":
        return pytest.importorskip("torch")
    if lib == "jax":
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        return jnp
    return np


def np_dtype(name: str):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name)


def to_lib(lib: str, a, dtype: str | None = None, requires_grad: bool = False):
    """``a`` (anything NumPy accepts) as an array of ``lib``; ``dtype`` a name, default: keep."""
    a = np.asarray(a)
    floating = a.dtype.kind == "f" or a.dtype.name == "bfloat16"
    if lib == "numpy":
        return a.astype(np_dtype(dtype)) if dtype else a
    if lib == "torch":
        torch = need("torch")
        if floating:
            t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float64)))
            t = t.to(getattr(torch, dtype or str(a.dtype)))
        elif a.dtype == bool:
            t = torch.from_numpy(np.ascontiguousarray(a))
        else:
            t = torch.from_numpy(np.ascontiguousarray(a.astype(np.int64)))
        return t.requires_grad_(requires_grad) if requires_grad else t
    jnp = need("jax")
    if floating:
        if (dtype or str(a.dtype)) == "float64":
            pytest.skip("JAX float64 needs jax_enable_x64")
        return jnp.asarray(a.astype(np.float32)).astype(dtype or str(a.dtype))
    return jnp.asarray(a if a.dtype == bool else a.astype(np.int32))


def lib_of(x) -> str:
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        return "jax"
    return "numpy"


def to_np(x) -> np.ndarray:
    """Any array as float64 NumPy (exact for every floating input dtype)."""
    if lib_of(x) == "torch":
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    a = np.asarray(x)
    return a.astype(np.float64) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") else a


def dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "")


def rel_err(got, want) -> np.ndarray:
    """Elementwise relative error (exact matches of 0 / inf count as 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(got - want) / np.abs(want)
    return np.where(got == want, 0.0, err)


def rows(rng, n: int, v: int, scale: float = 3.0, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal((n, v)) * scale).astype(dtype)
