"""Name -> implementation: a fused kernel where one supports the input, the core otherwise.

``select(stage, lib, x)`` returns ``(backend_name, fn)`` where ``fn`` takes the stage's arguments
without ``xp`` (see :mod:`logitkit.kernels` for the contract). Kernel packages are imported only
when first asked for, so ``import logitkit`` stays light. ``LOGITKIT_KERNELS=core`` (or
:func:`use_core`) forces the core everywhere, which tests and benchmarks use to compare.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Any, Callable, Iterator

from .._namespace import JAX, NUMPY, TORCH, dtype_name, get_namespace

__all__ = ["select", "use_core", "backends", "STAGES"]

STAGES = (
    "ce_forward", "ce_backward", "ce_forward_backward",
    "softmax_forward", "log_softmax_forward", "logsumexp_forward",
    "softmax_backward", "log_softmax_backward",
)

# backend name -> (module, libraries it serves, dtypes, device types)
_BACKENDS = {
    "cpu": ("logitkit.kernels.cpu", (NUMPY,), ("float16", "bfloat16", "float32", "float64"), ("cpu",)),
    "triton": ("logitkit.kernels.triton", (TORCH,), ("float16", "bfloat16", "float32", "float64"), ("cuda",)),
}
_forced_core = [os.environ.get("LOGITKIT_KERNELS", "").lower() in ("core", "off", "0", "none")]


@functools.lru_cache(maxsize=None)
def _load(backend: str) -> Any:
    """The backend's module if it imports and reports itself available, else ``None``."""
    module_name = _BACKENDS[backend][0]
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return None
    available = getattr(mod, "available", None)
    try:
        return mod if available is not None and available() else None
    except Exception:  # an unusable toolchain is a fallback, not an error
        return None


def backends() -> dict[str, bool]:
    """Each kernel backend and whether it is usable here."""
    return {name: _load(name) is not None for name in _BACKENDS}


def _device_type(lib: str, x: Any) -> str:
    if lib == TORCH:
        return x.device.type
    if lib == JAX:
        return next(iter(x.devices())).platform if hasattr(x, "devices") else "cpu"
    return "cpu"


def _core_stage(stage: str, lib: str) -> Callable[..., Any]:
    from ..core import cross_entropy as ce
    from ..core import softmax as sm

    xp = get_namespace(lib)
    table = {
        "ce_forward": ce.ce_forward,
        "ce_backward": ce.ce_backward,
        "ce_forward_backward": ce.ce_forward_backward,
        "softmax_forward": _softmax_fwd,
        "log_softmax_forward": _log_softmax_fwd,
        "logsumexp_forward": _logsumexp_fwd,
        "softmax_backward": sm.softmax_backward,
        "log_softmax_backward": sm.log_softmax_backward,
    }
    return functools.partial(table[stage], xp)


def _softmax_fwd(xp: Any, x: Any, *, temperature: float = 1.0, out: Any = None) -> Any:
    from ..core.cross_entropy import write_out
    from ..core.softmax import softmax

    return write_out(xp, out, softmax(xp, x, -1, None, temperature))


def _log_softmax_fwd(xp: Any, x: Any, *, temperature: float = 1.0, out: Any = None) -> Any:
    from ..core.cross_entropy import write_out
    from ..core.softmax import log_softmax

    return write_out(xp, out, log_softmax(xp, x, -1, None, temperature))


def _logsumexp_fwd(xp: Any, x: Any) -> Any:
    from .._namespace import acc_dtype
    from ..core.logsumexp import logsumexp

    return xp.astype(logsumexp(x, -1, xp=xp), acc_dtype(xp, x.dtype))


def select(stage: str, lib: str, x: Any) -> tuple[str, Callable[..., Any]]:
    """``(backend, fn)`` for ``stage`` on array ``x`` of library ``lib`` (2-D, class axis last)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if not _forced_core[0] and getattr(x, "ndim", 0) == 2:
        dev, dt = _device_type(lib, x), dtype_name(x.dtype)
        for name, (_, libs, dtypes, devices) in _BACKENDS.items():
            if lib in libs and dt in dtypes and dev in devices:
                mod = _load(name)
                fn = getattr(mod, stage, None) if mod is not None else None
                if fn is not None:
                    return name, fn
    return "core", _core_stage(stage, lib)


@contextlib.contextmanager
def use_core() -> Iterator[None]:
    """Within the block, every stage runs the core (for comparisons and debugging)."""
    old = _forced_core[0]
    _forced_core[0] = True
    try:
        yield
    finally:
        _forced_core[0] = old
