"""Triton GPU kernels for the stages of :mod:`logitkit.kernels` (torch CUDA tensors in and out).

Every kernel runs one program per row and streams the class axis in blocks with an online
softmax (float32 accumulation, ``exp2`` with ``log2 e`` folded in, int64 row offsets). The same
code runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, torch CPU tensors), which is how
the tests check it without a GPU.

Submodules import triton; this package does not until a kernel is asked for, so
``available()`` works (and says ``False``) where triton is missing.

>>> from logitkit.kernels import triton as tk              # doctest: +SKIP
>>> ce, m, r, dx = tk.ce_forward_backward(x, y, g, g, out=x)  # doctest: +SKIP
>>> tk.check_labels()   # bad labels seen so far raise now (syncs)  # doctest: +SKIP

A bad class index cannot raise inside a kernel: the row is NaN, a device-side flag is set, and
:mod:`._labels` raises the ``ValueError`` at a later call without a host synchronisation (or at
once in :func:`check_labels`); see that module for the cost and the CUDA-graph opt-out.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = [
    "available",
    "ce_forward", "ce_backward", "ce_forward_backward",
    "softmax_forward", "log_softmax_forward", "logsumexp_forward",
    "softmax_backward", "log_softmax_backward",
    "linear_ce_forward", "linear_ce_backward", "linear_head_forward", "linear_head_backward",
    "label_flag", "check_flag", "reset_flag", "check_labels", "deferred_label_check",
]

_WHERE = {
    "ce_forward": "ce", "ce_backward": "ce", "ce_forward_backward": "ce",
    # bad-label flag: no triton import (the torch adapter polls it on every call)
    "label_flag": "_labels", "check_flag": "_labels", "reset_flag": "_labels",
    "check_labels": "_labels", "deferred_label_check": "_labels",
    "softmax_forward": "softmax", "log_softmax_forward": "softmax",
    "logsumexp_forward": "softmax", "softmax_backward": "softmax",
    "log_softmax_backward": "softmax",
    "linear_ce_forward": "linear_ce", "linear_ce_backward": "linear_ce",
    "linear_head_forward": "linear_head", "linear_head_backward": "linear_head",
}


def available() -> bool:
    """True when triton imports and torch sees a CUDA device, or ``TRITON_INTERPRET=1`` is set."""
    try:
        import triton  # noqa: F401
        import torch
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return True
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver means no GPU path, not an error
        return False


# These kernels still form z = x / T (and softcap in float32) before the row max, which near a
# common offset of 1e4 rounds the loss by ~1e-4 (issue 13 item 2). Until they form
# (x - max x) / T like the CPU kernels, a call with temperature != 1 or a softcap runs the core
# stage on torch ops instead: slower, never wrong.
_SHIFT_EXACT_ONLY_AT_T1 = ("ce_forward", "ce_backward", "ce_forward_backward",
                           "softmax_forward", "log_softmax_forward")


def _core_unless_plain(name: str, kernel: Any) -> Any:
    import functools

    @functools.wraps(kernel)
    def stage(*args: Any, **kwargs: Any) -> Any:
        t, cap = kwargs.get("temperature", 1.0), kwargs.get("softcap")
        if cap is None and float(t) == 1.0:
            return kernel(*args, **kwargs)
        if not float(t) > 0.0 or float(t) == float("inf"):
            raise ValueError(f"temperature: expected a positive number, got {t}")
        if cap is not None and not (0.0 < float(cap) < float("inf")):
            raise ValueError(f"softcap: expected a positive number or None, got {cap}")
        from ..._namespace import TORCH
        from ..registry import _core_stage

        return _core_stage(name, TORCH)(*args, **kwargs)

    return stage


def __getattr__(name: str) -> Any:
    # PEP 562: import the kernel module (and triton) on first use.
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    if name in _SHIFT_EXACT_ONLY_AT_T1:
        value = _core_unless_plain(name, value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
