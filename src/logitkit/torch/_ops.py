"""The kernel stages as torch custom operators (``torch.ops.logitkit.*``).

Each operator takes 2-D ``(N, V)`` rows (class axis last) and runs the stage of
:mod:`logitkit.kernels` on the best backend for the tensor:

- CUDA tensors: the registry's ``"triton"`` backend, else the core on torch ops;
- CPU tensors: the registry's ``"cpu"`` (numba) kernels through zero-copy NumPy views
  (bfloat16 travels as ``ml_dtypes.bfloat16``), else the core on torch ops.

Wrapping the stages as custom operators makes them opaque, shape-checked nodes for
``torch.compile``: dynamo traces the autograd functions around them without a graph break, and
the fake implementations below give the output shapes without running a kernel.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _validate
from .._namespace import NUMPY, TORCH, get_namespace
from ..kernels import registry
from ..kernels.triton import _labels as _triton_labels  # imports torch only, not triton
from . import _eager, _library

__all__ = ["acc_dtype", "run_stage"]

try:  # bfloat16 NumPy views need ml_dtypes (a dependency of jax); without it bf16 runs the core
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None


# Build the torch namespace now, not lazily inside a traced call: torch.compile would guard on
# "not built yet", and the first real run would then force a recompile.
get_namespace(TORCH)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 logits, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np_view(t: Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor (bfloat16 as ``ml_dtypes.bfloat16``)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_ml_dtypes.bfloat16)
    return t.numpy()


def _row_major(x: Tensor) -> Tensor:
    """``x`` with contiguous rows (copied only when its layout is not already row-major)."""
    return x if x.is_contiguous() else x.contiguous()


def _select(stage: str, x: Tensor) -> tuple[bool, Callable[..., Any]]:
    """``(numpy_kernel, fn)``: a NumPy-facing CPU kernel, else the registry's torch stage."""
    if x.device.type == "cpu" and x.numel() > 0 and (x.dtype != torch.bfloat16 or _ml_dtypes is not None):
        backend, fn = registry.select(stage, NUMPY, _np_view(x))
        if backend != "core":
            return True, fn
    return False, registry.select(stage, TORCH, x)[1]


def _to_np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else _np_view(_row_major(t))


def _from_np(a: Any) -> Tensor:
    a = np.ascontiguousarray(a)
    if _ml_dtypes is not None and a.dtype == _ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# Stages without an ``out`` argument, for every backend / for the core.
_NO_OUT = ("ce_forward", "logsumexp_forward")
_CORE_NO_OUT = _NO_OUT + ("softmax_backward", "log_softmax_backward")
_HUGE_MIN = 1 << 22
_MADV_HUGEPAGE = 14
_libc: list = []


def _advise_huge_pages(t: Tensor) -> None:
    """Ask Linux for transparent huge pages on a fresh CPU buffer, before anything touches it.

    NumPy does this for its large arrays and torch's CPU allocator does not; with 4 KiB pages
    the first write to a new 500 MB gradient spends ~150 ms in page faults, with 2 MiB pages
    ~20 ms. Advice only: where it is not available nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        if not _libc:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.append(libc)
        page = mmap.PAGESIZE
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        start, end = -(-ptr // page) * page, (ptr + n) // page * page
        if end > start:
            _libc[0].madvise(start, end - start, _MADV_HUGEPAGE)
    except (OSError, AttributeError):  # pragma: no cover - no libc / no madvise
        pass


def fresh_like(x: Tensor) -> Tensor:
    """A new row-major tensor of ``x``'s shape, dtype and device (huge pages when large, on CPU)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.device.type == "cpu" and out.numel() * out.element_size() >= _HUGE_MIN:
        _advise_huge_pages(out)
    return out


def run_stage(stage: str, x: Tensor, *args: Any, out: Optional[Tensor] = None, **kw: Any) -> Any:
    """Run ``stage`` on rows ``x`` with tensor ``args`` and keyword options ``kw``.

    ``out`` (a tensor of ``x``'s shape and dtype, possibly ``x`` itself) receives the result of a
    gradient or softmax stage; results come back as tensors on ``x``'s device.
    """
    x = _row_major(x)
    # A kernel writes only into row-major memory; any other ``out`` gets a copy at the end.
    target = out if out is not None and out.is_contiguous() else None
    numpy_kernel, fn = _select(stage, x)
    if numpy_kernel:
        np_args = [_to_np(a) if isinstance(a, Tensor) else a for a in args]
        np_kw = {k: (_to_np(v) if isinstance(v, Tensor) else v) for k, v in kw.items()}
        if stage in _NO_OUT:
            res = fn(_np_view(x), *np_args, **np_kw)
            return tuple(_from_np(a) for a in res) if isinstance(res, tuple) else _from_np(res)
        if target is None:
            target = fresh_like(x)  # torch owns every result buffer
        res = fn(_np_view(x), *np_args, out=_np_view(target), **np_kw)
        # ``ce_forward_backward`` returns ``(ce, m, r, out)``; the others return ``out``.
        res = tuple(_from_np(a) for a in res[:-1]) + (target,) if isinstance(res, tuple) else target
    else:
        # A bad label that a Triton kernel flagged on this device in an earlier call raises here,
        # once the flag's asynchronous copy has landed (never waits; see kernels/triton/_labels).
        _triton_labels.poll(x.device)
        if stage not in _CORE_NO_OUT:
            kw["out"] = target
        res = fn(x, *args, **kw)
    if out is not None:
        written = res[-1] if isinstance(res, tuple) else res
        if written is not out:
            out.copy_(written)
            res = res[:-1] + (out,) if isinstance(res, tuple) else out
    return res


def _check_labels(x: Tensor, labels: Tensor, ignore_index: int) -> None:
    # Host-side check (CPU tensors only: reading CUDA labels would synchronize the device).
    _validate.check_label_range(TORCH, labels, x.shape[-1], ignore_index)


def _wvec(weight: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if weight is None else weight.to(device=x.device, dtype=acc_dtype(x.dtype)).contiguous()


# ----------------------------------------------------------------------------------------------
# cross-entropy with class-index labels


@_library.define("logitkit::ce_forward")
def ce_forward(x: Tensor, labels: Tensor, weight: Optional[Tensor], ignore_index: int,
               label_smoothing: float, softcap: Optional[float],
               temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(ce, m, r)`` of rows ``x`` (N, V) with int64 ``labels`` (N,), accumulation dtype."""
    if weight is None and label_smoothing == 0.0 and softcap is None and temperature == 1.0:
        fast = _eager.op_rows_stats(x, labels, ignore_index)  # small CPU rows: one compiled call, labels checked
        if fast is not None:
            return fast
    _check_labels(x, labels, ignore_index)
    acc = acc_dtype(x.dtype)
    N, V = x.shape
    if N == 0:
        e = x.new_empty((0,), dtype=acc)
        return e, e.clone(), e.clone()
    w = _wvec(weight, x)
    opts = dict(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                temperature=temperature)
    if V == 0:
        # No class: only ignored rows are valid (the label check refused the rest where it ran);
        # each gives 0, lse = log(empty sum) = -inf; an unchecked label gives a NaN row.
        ce = torch.where(labels == ignore_index, 0.0, math.nan).to(acc)
        m = torch.full((N,), -math.inf, dtype=acc, device=x.device)
        r = torch.zeros((N,), dtype=acc, device=x.device)
    else:
        ce, m, r = run_stage("ce_forward", x, labels, **opts)
    return (ce.to(device=x.device, dtype=acc).contiguous(), m.to(device=x.device, dtype=acc).contiguous(),
            r.to(device=x.device, dtype=acc).contiguous())


@ce_forward.register_fake
def _(x, labels, weight, ignore_index, label_smoothing, softcap, temperature):
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    return x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


def _backward_into(x: Tensor, labels: Tensor, m: Tensor, r: Tensor, g_ce: Tensor, g_z: Tensor,
                   weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: Optional[float], temperature: float, out: Optional[Tensor]) -> Tensor:
    N, V = x.shape
    if N == 0 or V == 0:
        if out is None:
            return torch.zeros_like(x, memory_format=torch.contiguous_format)
        return out.zero_()
    acc = acc_dtype(x.dtype)
    if (weight is None and label_smoothing == 0.0 and z_loss == 0.0 and softcap is None and temperature == 1.0
            and out is not None and out is not x):
        g = _eager.op_rows_backward(x, labels, m, r, g_ce, ignore_index, out)  # small CPU rows: the serial kernel
        if g is not None:
            return g
    return run_stage("ce_backward", x, labels, m, r, g_ce.to(acc).contiguous(), g_z.to(acc).contiguous(),
                     out=out, weight=_wvec(weight, x), ignore_index=ignore_index,
                     label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                     temperature=temperature)


@_library.define("logitkit::ce_backward")
def ce_backward(x: Tensor, labels: Tensor, m: Tensor, r: Tensor, g_ce: Tensor, g_z: Tensor,
                weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                softcap: Optional[float], temperature: float) -> Tensor:
    """The gradient of ``Σ g_ce·ce + g_z·z_loss·lse²`` with respect to rows ``x``, a new tensor."""
    out = fresh_like(x)
    return _backward_into(x, labels, m, r, g_ce, g_z, weight, ignore_index, label_smoothing, z_loss,
                          softcap, temperature, out)


@ce_backward.register_fake
def _(x, labels, m, r, g_ce, g_z, weight, ignore_index, label_smoothing, z_loss, softcap, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("logitkit::ce_backward_", mutates_args=("x",))
def ce_backward_(x: Tensor, labels: Tensor, m: Tensor, r: Tensor, g_ce: Tensor, g_z: Tensor,
                 weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                 softcap: Optional[float], temperature: float) -> None:
    """:func:`ce_backward` written over ``x`` itself (one read and one write of each row)."""
    _backward_into(x, labels, m, r, g_ce, g_z, weight, ignore_index, label_smoothing, z_loss,
                   softcap, temperature, x)


@ce_backward_.register_fake
def _(x, labels, m, r, g_ce, g_z, weight, ignore_index, label_smoothing, z_loss, softcap, temperature):
    return None


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax over the last axis of rows


def _softmax_core(x: Tensor, temperature: float, log: bool) -> Tensor:
    from ..core import softmax as core_sm
    from .._namespace import get_namespace

    fn = core_sm.log_softmax if log else core_sm.softmax
    return fn(get_namespace(TORCH), x, -1, None, temperature)


def _softmax_rows(x: Tensor, temperature: float, log: bool) -> Tensor:
    y = _eager.op_softmax(x, temperature, log)  # CPU float rows: one compiled call
    if y is not None:
        return y
    if x.shape[0] == 0 or x.shape[1] == 0:
        return _softmax_core(x, temperature, log).contiguous()
    stage = "log_softmax_forward" if log else "softmax_forward"
    res = run_stage(stage, x, temperature=temperature)
    return res.to(device=x.device).contiguous()


@_library.define("logitkit::softmax_forward")
def softmax_forward(x: Tensor, temperature: float) -> Tensor:
    """``softmax(x / T)`` along the last axis of rows ``x`` (N, V), in ``x``'s dtype."""
    return _softmax_rows(x, temperature, False)


@_library.define("logitkit::log_softmax_forward")
def log_softmax_forward(x: Tensor, temperature: float) -> Tensor:
    """``log_softmax(x / T)`` along the last axis of rows ``x`` (N, V), in ``x``'s dtype."""
    return _softmax_rows(x, temperature, True)


def _fake_like(x, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


softmax_forward.register_fake(_fake_like)
log_softmax_forward.register_fake(_fake_like)


def _softmax_vjp(y: Tensor, dy: Tensor, log: bool) -> Tensor:
    dx = _eager.op_softmax_backward(y, dy, log)  # CPU float rows: one compiled call
    if dx is not None:
        return dx
    dy = dy.to(y.dtype).contiguous()
    if y.numel() == 0:
        return torch.zeros_like(y, memory_format=torch.contiguous_format)
    stage = "log_softmax_backward" if log else "softmax_backward"
    res = run_stage(stage, y, dy)
    return res.to(device=y.device, dtype=y.dtype).contiguous()


@_library.define("logitkit::softmax_backward")
def softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    """Vector-Jacobian product of softmax, ``y·(dy − Σ y·dy)``, from the forward output ``y``."""
    return _softmax_vjp(y, dy, False)


@_library.define("logitkit::log_softmax_backward")
def log_softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    """Vector-Jacobian product of log_softmax, ``dy − exp(y)·Σ dy``, from the forward output ``y``."""
    return _softmax_vjp(y, dy, True)


def _fake_vjp(y, dy):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


softmax_backward.register_fake(_fake_vjp)
log_softmax_backward.register_fake(_fake_vjp)


# ----------------------------------------------------------------------------------------------
# cross-entropy with probability labels (no kernel stage: the core on torch ops, kept opaque to
# the compiler like the stages above)


def _prob_core(name: str) -> Callable[..., Any]:
    from ..core import cross_entropy as core_ce
    from .._namespace import get_namespace

    return functools.partial(getattr(core_ce, name), get_namespace(TORCH))


@_library.define("logitkit::prob_forward")
def prob_forward(x: Tensor, y: Tensor, weight: Optional[Tensor], label_smoothing: float,
                 softcap: Optional[float], temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(ce, m, r)`` of rows ``x`` (N, V) with probability labels ``y`` (N, V)."""
    if x.shape[1] == 0:  # an empty sum: loss 0, lse = -inf
        acc = acc_dtype(x.dtype)
        n = x.shape[0]
        return (torch.zeros((n,), dtype=acc, device=x.device),
                torch.full((n,), -math.inf, dtype=acc, device=x.device),
                torch.zeros((n,), dtype=acc, device=x.device))
    ce, m, r = _prob_core("prob_forward")(x, y, weight=_wvec(weight, x), label_smoothing=label_smoothing,
                                          softcap=softcap, temperature=temperature)
    return ce.contiguous(), m.contiguous(), r.contiguous()


@prob_forward.register_fake
def _(x, y, weight, label_smoothing, softcap, temperature):
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    return x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


def _prob_backward_into(x, y, m, r, g_ce, g_z, weight, label_smoothing, z_loss, softcap, temperature, out):
    if x.numel() == 0:
        return out.zero_()
    acc = acc_dtype(x.dtype)
    return _prob_core("prob_backward")(x, y, m, r, g_ce.to(acc), g_z.to(acc), weight=_wvec(weight, x),
                                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                       temperature=temperature, out=out)


@_library.define("logitkit::prob_backward")
def prob_backward(x: Tensor, y: Tensor, m: Tensor, r: Tensor, g_ce: Tensor, g_z: Tensor,
                  weight: Optional[Tensor], label_smoothing: float, z_loss: float, softcap: Optional[float],
                  temperature: float) -> Tensor:
    """Gradient of ``Σ g_ce·ce + g_z·z_loss·lse²`` for probability labels, a new tensor."""
    out = fresh_like(x)
    return _prob_backward_into(x, y, m, r, g_ce, g_z, weight, label_smoothing, z_loss, softcap, temperature,
                               out)


@prob_backward.register_fake
def _(x, y, m, r, g_ce, g_z, weight, label_smoothing, z_loss, softcap, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("logitkit::prob_backward_", mutates_args=("x",))
def prob_backward_(x: Tensor, y: Tensor, m: Tensor, r: Tensor, g_ce: Tensor, g_z: Tensor,
                   weight: Optional[Tensor], label_smoothing: float, z_loss: float, softcap: Optional[float],
                   temperature: float) -> None:
    """:func:`prob_backward` written over ``x`` itself."""
    _prob_backward_into(x, y, m, r, g_ce, g_z, weight, label_smoothing, z_loss, softcap, temperature, x)


@prob_backward_.register_fake
def _(x, y, m, r, g_ce, g_z, weight, label_smoothing, z_loss, softcap, temperature):
    return None
