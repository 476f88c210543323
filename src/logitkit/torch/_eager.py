"""The eager CPU route: numba kernels called straight on zero-copy NumPy views of the tensors.

In eager mode the custom operators of :mod:`._ops` cost more than a small problem's whole kernel
(the dispatcher's schema handling, the registry lookup, tensor-side reductions of a few elements
each): a (100, 10) forward and backward took 3.7x ``F.cross_entropy``. Here the autograd
functions call the kernels' NumPy entry points directly and reduce the per-row losses with NumPy,
whose per-call cost on small arrays is a fraction of torch's. ``torch.compile`` keeps tracing the
custom operators (this route is never taken while compiling), CUDA runs Triton, and bfloat16 /
float16 or :func:`logitkit.kernels.registry.use_core` keep the operator route.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..core.reduction import reduce_loss, row_scales, row_weights
from ..kernels import registry

__all__ = ["kernels_for", "ce_index_forward", "ce_index_backward", "softmax_forward", "softmax_backward"]

_FAST_DTYPES = (torch.float32, torch.float64)


def kernels_for(x: Tensor) -> Any:
    """The CPU kernel module for rows ``x`` in eager mode, or ``None`` (take the operator route)."""
    if x.device.type != "cpu" or x.dtype not in _FAST_DTYPES or registry._forced_core[0]:
        return None
    if torch.compiler.is_compiling():
        return None
    return registry._load("cpu")


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().numpy()


def _weights(y: np.ndarray, w: Optional[np.ndarray], ignore_index: int, acc: Any) -> tuple[Any, Any]:
    if w is None:  # the common case without the generic gather
        validf = (y != ignore_index).astype(acc)
        return validf, validf
    return row_weights(np, y, w, ignore_index, acc)


def ce_index_forward(k: Any, x: Tensor, labels: Tensor, weight: Optional[Tensor], ignore_index: int,
                     label_smoothing: float, reduction: str, z_loss: float, softcap: Optional[float],
                     temperature: float) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """``(loss, lse, m, r)`` of validated rows ``x`` (N, V), N and V > 0; ``m``, ``r`` NumPy."""
    xn, yn = _np(x), labels.numpy()
    wn = _np(weight)
    ce, m, r = k.ce_forward(xn, yn, weight=wn, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            softcap=softcap, temperature=temperature)
    acc = ce.dtype
    lse = m + r
    if reduction == "none" and z_loss == 0.0:
        loss = ce
    else:
        validf, wy = _weights(yn, wn, ignore_index, acc)
        loss = np.asarray(reduce_loss(np, ce, lse, validf, wy, reduction, z_loss), dtype=acc)
    return torch.from_numpy(loss), torch.from_numpy(lse), m, r


def ce_index_backward(k: Any, x: Tensor, labels: Tensor, weight: Optional[Tensor], m: np.ndarray, r: np.ndarray,
                      g_loss: Optional[Tensor], ignore_index: int, label_smoothing: float, reduction: str,
                      z_loss: float, softcap: Optional[float], temperature: float, inplace: bool) -> Tensor:
    """The gradient of ``Σ g_loss·loss`` with respect to ``x``; over ``x``'s memory when ``inplace``."""
    xn, yn, wn = _np(x), labels.numpy(), _np(weight)
    acc = m.dtype
    if g_loss is None:
        go: Any = 0.0
    elif reduction == "none":
        go = np.ascontiguousarray(g_loss.detach().numpy(), dtype=acc)
    else:
        go = acc.type(g_loss.item())
    validf, wy = _weights(yn, wn, ignore_index, acc)
    g_ce, g_z = row_scales(np, validf, wy, reduction, go)
    out = xn if inplace else None
    grad = k.ce_backward(xn, yn, m, r, g_ce, g_z if z_loss != 0.0 else None, weight=wn, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, temperature=temperature,
                         out=out)
    if inplace:
        # Written through a NumPy view: tell autograd, as an in-place torch op would, so every
        # other saved reference to the logits fails its version check instead of reading this.
        torch.autograd.graph.increment_version(x)
        return x
    return torch.from_numpy(grad)


def softmax_forward(k: Any, x: Tensor, temperature: float, log: bool) -> Tensor:
    """``softmax`` (or ``log_softmax``) of ``x / T`` along the last axis of rows ``x`` (N, V > 0)."""
    fn = k.log_softmax_forward if log else k.softmax_forward
    return torch.from_numpy(fn(_np(x), temperature=temperature))


def softmax_backward(k: Any, y: Tensor, dy: Tensor, log: bool) -> Tensor:
    """The vector-Jacobian product of softmax (or log_softmax) from its output ``y``."""
    fn = k.log_softmax_backward if log else k.softmax_backward
    dyn = dy.detach()
    if dyn.dtype != y.dtype:
        dyn = dyn.to(y.dtype)
    return torch.from_numpy(fn(_np(y), np.ascontiguousarray(dyn.numpy())))


# ----------------------------------------------------------------------------------------------
# the small-call fast path: torch.nn.functional.cross_entropy's default options on 2-D float32 /
# float64 CPU rows and int64 class indices. It checks with a few attribute tests, calls the
# compiled kernel once per pass without the NumPy entry point's argument handling, and for a small
# problem makes the gradient in the forward pass (one kernel call in all).

# Up to this many logits the forward pass also writes the gradient and saves it (at most 64 KiB
# of float32, less than what the call's own bookkeeping allocates); above, forward saves only the
# input and two numbers per row, and backward makes the gradient.
FUSED_MAX = 1 << 14
_II_MAX = 1 << 62


def fast_ce(input: Tensor, target: Tensor, ignore_index: int, reduction: str, checked: bool = False) -> Any:
    """The loss through the fast path, or ``None`` when the call needs the general route.

    ``reduction`` must already be one of ``"mean"``, ``"sum"``, ``"none"``. ``checked``: the
    labels' range was checked by the caller. Every line here runs on each small call, in the
    cold caches a model's step leaves behind: the checks are attribute tests, in one expression.
    """
    if (_is_compiling() or input.ndim != 2 or target.ndim != 1 or input.dtype not in _FAST_DTYPES
            or target.dtype != _I64 or not input.is_cpu or not target.is_cpu or _forced[0] or _functorch_active()
            or not -_II_MAX < ignore_index < _II_MAX or not input.is_contiguous() or not target.is_contiguous()):
        return None  # (the functorch transforms take the general route)
    N, C = input.shape
    if N == 0 or C == 0 or target.shape[0] != N:
        return None
    k = _cpu[0] if _cpu else _load_cpu()
    if k is None:
        return None
    if N * C < _serial_max[0] or k.get_num_threads() == 1:
        # serial: one compiled call checks the labels, runs the kernel and reduces
        input, target = _unwrap_if_dead(input), _unwrap_if_dead(target)
        if not (input.requires_grad and _grad_enabled()):
            return CrossEntropySmall.forward(None, input, target, ignore_index, reduction)
        if _saved_hooks(False) is None:  # hooks (offloading, checkpointing) see what the class below saves
            return _apply_small(input, target, ignore_index, reduction)
    lo, hi = torch.aminmax(target)  # one C++ call: cheaper than two NumPy reductions here
    in_range = lo.item() >= 0 and hi.item() < C
    if not in_range and not checked:  # only then the full check, which names the bad label
        _bad_labels(target, C, ignore_index)
    # every label a class, so none is ignore_index: the mean's count is N without a pass
    n_valid = N if in_range and not 0 <= ignore_index < C else -1
    return CrossEntropyIndex.apply(input, target, ignore_index, reduction, n_valid)


_I64 = torch.int64
_forced = registry._forced_core
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore: True)
_cpu: list = []
_serial_max = [0]  # below this many logits the kernels run serially (their own entry points' rule)


def _load_cpu() -> Any:
    k = registry._load("cpu")
    if k is not None:
        _serial_max[0] = 2 * k._MIN_PER_THREAD
        _cpu.append(k)
    return k


def _bad_labels(target: Tensor, C: int, ignore_index: int) -> None:
    """Raise the general route's error, which names the first bad label and its position."""
    from .. import _validate
    from .._namespace import TORCH

    _validate.check_label_range(TORCH, target, C, ignore_index, name="target")


_entry_points: list = [None, None]  # the compiled entries of :mod:`._entry`, float32 and float64


def _entry(is64: bool) -> Any:
    ep = _entry_points[is64]
    if ep is None:
        from . import _entry as mod  # imports numba, compiles or loads the entries

        ep = _entry_points[is64] = mod.ce_entry(is64)
    return ep


_FREED = ("Trying to backward through the graph a second time (or directly access saved tensors after they "
          "have already been freed). Specify retain_graph=True if you need to backward through the graph a "
          "second time or if you need to access saved tensors after calling backward.")
_MODIFIED = ("one of the variables needed for gradient computation has been modified by an inplace operation: "
             "the logits given to logitkit.torch.cross_entropy are at version {now}; expected version {then} "
             "instead.")


class _DoubleOpts:
    """What :func:`._autograd._ce_index_double` reads from a context: the default options."""

    inplace = False

    def __init__(self, ignore_index: int, reduction: str) -> None:
        self.opts = (ignore_index, 0.0, reduction, 0.0, None, 1.0)


class CrossEntropySmall(torch.autograd.Function):
    """Cross-entropy with torch's default options on rows the serial kernels run (``N·V`` below
    the kernels' threading threshold), the loss reduced or per row.

    Forward is one compiled call (:mod:`._entry`); up to ``FUSED_MAX`` logits it also makes the
    gradient for a unit grad_output, and backward only scales it. Above, forward keeps the row
    statistics and backward makes the gradient in one pass. The logits are held as an attribute
    rather than saved (saving costs more than this loss's whole kernel): backward checks their
    version counter itself wherever it reads them, and a second backward of a freed graph raises
    as torch does.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
        # ``ctx`` None: no gradient wanted (called directly, not through apply). ``ctx.state`` is the
        # gradient for a unit grad_output (a tensor, N·V ≤ FUSED_MAX and a reduced loss), or
        # ``(m, r, inv)``: the row statistics and the mean's 1 / count.
        N, C = x.shape
        npdt = np.float64 if x.dtype == torch.float64 else np.float32
        red = 0 if reduction == "mean" else (1 if reduction == "sum" else 2)
        loss = torch.from_numpy(np.empty((N,) if red == 2 else (), npdt))
        fused = ctx is not None and red != 2 and N * C <= FUSED_MAX
        gp = mp = rp = 0
        if fused:
            state = torch.empty_like(x, memory_format=torch.contiguous_format)
            gp = state.data_ptr()
        elif ctx is not None:
            m, r = np.empty(N, npdt), np.empty(N, npdt)
            mp, rp = m.ctypes.data, r.ctypes.data
        is64 = npdt is np.float64
        valid = (_entry_points[is64] or _entry(is64))(x.data_ptr(), labels.data_ptr(), loss.data_ptr(), gp, mp, rp,
                                                      N, C, ignore_index, red, fused)
        if valid < 0:
            _bad_labels(labels, C, ignore_index)  # names the label; the entry found it at -1 - valid
            raise ValueError(f"target: class index {int(labels[-1 - valid])} at position {-1 - valid} is outside "
                             f"[0, {C}) and is not ignore_index={ignore_index}")
        if ctx is not None:
            ctx.s = (state if fused else (m, r, (1.0 / valid if valid else 0.0) if red == 0 else 1.0), x, labels,
                     x._version, ignore_index, reduction)
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        saved = ctx.s
        if saved is None:
            raise RuntimeError(_FREED)
        state, x, labels, version, ii, red = saved
        if _grad_enabled():  # create_graph: differentiable torch ops on the logits
            if x._version != version:
                raise RuntimeError(_MODIFIED.format(now=x._version, then=version))
            from ._autograd import _ce_index_double

            return _ce_index_double(_DoubleOpts(ii, red), x, labels, None, g, None), None, None, None
        if _keep_graph():
            if type(state) is Tensor:
                return (state.clone() if g.item() == 1.0 else state * g), None, None, None
        else:
            ctx.s = saved = None
            if type(state) is Tensor:  # the graph's last use: autograd takes this buffer as the .grad
                if g.item() != 1.0:
                    state.mul_(g)
                return state, None, None, None
        if x._version != version:
            raise RuntimeError(_MODIFIED.format(now=x._version, then=version))
        return _small_backward(x, labels, state, g, ii, red), None, None, None


def _small_backward(x: Tensor, labels: Tensor, state: tuple, g: Tensor, ignore_index: int, reduction: str) -> Tensor:
    m, r, inv = state
    xn, yn = x.detach().numpy(), labels.numpy()
    N, C = xn.shape
    acc = xn.dtype
    if reduction == "none":
        gce = np.ascontiguousarray(g.detach().numpy(), dtype=np.float64)
    else:
        gce = np.full(N, inv * g.item())
    out = np.empty((N, C), acc)
    k = registry._load("cpu")
    kern, nt = _run(k, "ce_backward", N * C)
    kern(xn, yn, m, r, gce, _const("zeros", N, np.float64), _const("ones", C, acc), float(C), ignore_index, 0.0, 0.0,
         1.0, 1.0, False, out, False, np.empty(0, acc), min(N, nt))
    return torch.from_numpy(out)


_consts: dict = {}


def _const(kind: str, n: int, dtype: Any) -> np.ndarray:
    """A cached ``ones``/``zeros`` vector (the kernels only read these; never write into one)."""
    key = (kind, n, dtype)
    a = _consts.get(key)
    if a is None:
        if len(_consts) > 64:
            _consts.clear()
        a = (np.ones if kind == "ones" else np.zeros)(n, dtype)
        _consts[key] = a
    return a


_serial: dict = {}


def _run(k: Any, name: str, size: int) -> tuple[Any, int]:
    """The compiled kernel for ``size`` elements and its thread count (serial ones cached)."""
    if size < 2 * k._MIN_PER_THREAD:  # what the kernels' own entry points run at this size
        fn = _serial.get(name)
        if fn is None:
            fn = _serial[name] = k._kernel(name, 1)
        return fn, 1
    nt = k._apply_threads(size)
    return k._kernel(name, nt), nt


class CrossEntropyIndex(torch.autograd.Function):
    """The small-call variant of :class:`._autograd.CrossEntropyIndex` (default options only).

    Returns the reduced loss. Forward saves the input and labels, plus the gradient for a unit
    ``grad_output`` (``N·V ≤ FUSED_MAX``, ``mean``/``sum``) or the row statistics ``m``, ``r``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, labels: Tensor, ignore_index: int, reduction: str, n_valid: int) -> Tensor:
        k = registry._load("cpu")
        ctx.kernels = k
        # what the create_graph backward of the general class reads
        ctx.opts, ctx.inplace = (ignore_index, 0.0, reduction, 0.0, None, 1.0), False
        ctx.save_for_backward(x, labels)
        ctx.set_materialize_grads(False)
        xn, yn = x.detach().numpy(), labels.numpy()
        N, C = xn.shape
        acc = xn.dtype
        ce, m, r = np.empty(N, acc), np.empty(N, acc), np.empty(N, acc)
        w = _const("ones", C, acc)
        zeros = _const("zeros", N, np.float64)
        inv = acc.type(1)
        if reduction == "mean":
            if n_valid < 0:
                n_valid = int(np.count_nonzero(yn != ignore_index))
            inv = inv / acc.type(n_valid) if n_valid else acc.type(0)  # an empty mean is 0
        want = ctx.needs_input_grad[0]
        fused = want and reduction != "none" and N * C <= FUSED_MAX
        kern, _ = _run(k, "ce_direct", N * C)
        if fused:
            grad = np.empty((N, C), acc)
            kern(xn, yn, w, float(C), ignore_index, 0.0, 0.0, np.full(N, float(inv)), zeros, True, grad, False,
                 ce, m, r)
            ctx.stash = grad
        else:
            kern(xn, yn, w, float(C), ignore_index, 0.0, 0.0, zeros, zeros, False, np.empty((N, 0), acc), False,
                 ce, m, r)
            ctx.stash = (m, r) if want else None
        ctx.fused, ctx.inv = fused, inv
        if reduction == "none":
            return torch.from_numpy(ce)
        total = ce.sum(dtype=acc)
        return torch.from_numpy(np.asarray(total * inv if reduction == "mean" else total, dtype=acc))

    @staticmethod
    def backward(ctx: Any, g: Optional[Tensor]) -> tuple[Any, ...]:
        x, labels = ctx.saved_tensors  # raises as torch does on a second backward of a freed graph
        none = (None, None, None, None)
        if g is None or not ctx.needs_input_grad[0]:
            return (None,) + none
        if torch.is_grad_enabled():
            from ._autograd import _ce_index_double

            return (_ce_index_double(ctx, x, labels, None, g, None),) + none
        ignore_index, _, reduction = ctx.opts[:3]
        if ctx.fused:
            grad = torch.from_numpy(ctx.stash)
            keep = _keep_graph()
            if not keep:
                ctx.stash = None
            if g.item() == 1.0:
                return (grad.clone() if keep else grad,) + none
            return ((grad * g) if keep else grad.mul_(g),) + none
        m, r = ctx.stash
        xn, yn = x.detach().numpy(), labels.numpy()
        N, C = xn.shape
        acc = xn.dtype
        if reduction == "none":
            gce = np.ascontiguousarray(g.detach().numpy(), dtype=np.float64)
        else:
            gce = np.full(N, float(ctx.inv) * g.item())
        out = np.empty((N, C), acc)
        kern, nt = _run(ctx.kernels, "ce_backward", N * C)
        kern(xn, yn, m, r, gce, _const("zeros", N, np.float64), _const("ones", C, acc), float(C), ignore_index, 0.0, 0.0, 1.0, 1.0, False,
             out, False, np.empty(0, acc), min(N, nt))
        return (torch.from_numpy(out),) + none


# Function.apply without its Python wrapper (which binds arguments and looks for functorch
# transforms: fast_ce takes this route only when none is active, and unwraps dead wrappers)
_apply_small = torch._C._FunctionBase.__dict__["apply"].__get__(None, CrossEntropySmall)


# ----------------------------------------------------------------------------------------------
# the custom operators' bodies (what torch.compile runs) on the same serial route, default options


def op_rows_stats(x: Tensor, labels: Tensor, ignore_index: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """``(ce, m, r)`` per row through the compiled entry (labels checked there), or ``None``."""
    if (x.ndim != 2 or x.dtype not in _FAST_DTYPES or not x.is_cpu or _forced[0] or labels.dtype != _I64
            or not x.is_contiguous() or not labels.is_contiguous() or not -_II_MAX < ignore_index < _II_MAX):
        return None
    N, C = x.shape
    k = _cpu[0] if _cpu else _load_cpu()
    if N == 0 or C == 0 or k is None or (N * C >= _serial_max[0] and k.get_num_threads() > 1):
        return None
    dt = x.dtype
    ce, m, r = torch.empty(N, dtype=dt), torch.empty(N, dtype=dt), torch.empty(N, dtype=dt)
    is64 = dt is _F64
    valid = (_entry_points[is64] or _entry(is64))(x.data_ptr(), labels.data_ptr(), ce.data_ptr(), 0, m.data_ptr(),
                                                  r.data_ptr(), N, C, ignore_index, 2, False)
    if valid < 0:
        _bad_labels(labels, C, ignore_index)
        raise ValueError(f"labels: class index {int(labels[-1 - valid])} at position {-1 - valid} is outside "
                         f"[0, {C}) and is not ignore_index={ignore_index}")
    return ce, m, r


def op_rows_backward(x: Tensor, labels: Tensor, m: Tensor, r: Tensor, g_ce: Tensor, ignore_index: int,
                     out: Tensor) -> Optional[Tensor]:
    """The gradient of ``Σ g_ce·ce`` (default options) into ``out`` by the serial kernel, or ``None``."""
    dt = x.dtype
    if (x.ndim != 2 or dt not in _FAST_DTYPES or not x.is_cpu or _forced[0] or labels.dtype != _I64
            or not x.is_contiguous() or not out.is_contiguous() or out.dtype != dt or not labels.is_contiguous()
            or m.dtype != dt or r.dtype != dt or not m.is_contiguous() or not r.is_contiguous()
            or not -_II_MAX < ignore_index < _II_MAX):
        return None
    N, C = x.shape
    k = _cpu[0] if _cpu else _load_cpu()
    if N == 0 or C == 0 or k is None or (N * C >= _serial_max[0] and k.get_num_threads() > 1):
        return None
    if g_ce.dtype != dt or not g_ce.is_contiguous():
        g_ce = g_ce.to(dt).contiguous()
    is64 = dt is _F64
    (_bwd_points[is64] or _bwd_entry(is64))(x.data_ptr(), labels.data_ptr(), m.data_ptr(), r.data_ptr(),
                                            g_ce.data_ptr(), out.data_ptr(), N, C, ignore_index)
    return out


_bwd_points: list = [None, None]


def _bwd_entry(is64: bool) -> Any:
    ep = _bwd_points[is64]
    if ep is None:
        from . import _entry as mod

        ep = _bwd_points[is64] = mod.ce_backward_entry(is64)
    return ep


# ----------------------------------------------------------------------------------------------
# the small-call softmax / log_softmax: 2-D contiguous float32 / float64 CPU rows, the class axis
# last, temperature 1; one compiled call per pass, serial below the kernels' parallel bound, over
# numba's threads above it (the NumPy entry point's argument handling cost ~100 us a call there).

# [4 * parallel + 2 * backward + float64]
_sm_points: list = [None] * 8


def _sm_entry(i: int) -> Any:
    ep = _sm_points[i]
    if ep is None:
        from . import _entry as mod

        make = mod.softmax_backward_entry if i & 2 else mod.softmax_entry
        ep = _sm_points[i] = make(bool(i & 1), bool(i & 4))
    return ep


def fast_softmax(x: Tensor, dim: Any, log: bool) -> Optional[Tensor]:
    """``softmax`` (``log_softmax``) of ``x`` along ``dim`` through the fast path, or ``None``."""
    if (_is_compiling() or x.ndim != 2 or (dim != 1 and dim != -1) or type(dim) is not int
            or x.dtype not in _FAST_DTYPES or not x.is_cpu or _forced[0] or _functorch_active()
            or not x.is_contiguous()):
        return None
    N, C = x.shape
    if N == 0 or C == 0:
        return None
    k = _cpu[0] if _cpu else _load_cpu()
    if k is None:
        return None
    par = _sm_par(k, N * C)
    if par is None:
        return None
    x = _unwrap_if_dead(x)
    if not (x.requires_grad and _grad_enabled()):
        return SoftmaxSmall.forward(None, x, log, par)
    return _apply_softmax(x, log, par)


def _sm_par(k: Any, size: int) -> Optional[int]:
    """The entry offset for ``size`` elements: 0 serial, 4 parallel (numba's thread count set for
    ``size``), ``None`` when the general route must decide (no thread-safe pool known yet)."""
    if size >= _serial_max[0] and k.get_num_threads() > 1:
        # before the first parallel region, or under numba's workqueue layer, the general route's
        # guard decides; numba's thread count is per calling thread, so it is set on every call
        if k._serial_only or k._layer_needs_guard():
            return None
        k._apply_threads(size)
        return 4
    return 0


def _op_rows_entry(x: Tensor) -> Optional[int]:
    """The softmax entry offset (:func:`_sm_par`) for rows ``x`` in an operator's body: 2-D
    contiguous float32 / float64 CPU rows, none empty; ``None``: the general route."""
    if x.ndim != 2 or x.dtype not in _FAST_DTYPES or not x.is_cpu or _forced[0] or not x.is_contiguous():
        return None
    N, C = x.shape
    k = _cpu[0] if _cpu else _load_cpu()
    if N == 0 or C == 0 or k is None:
        return None
    return _sm_par(k, N * C)


def op_softmax(x: Tensor, temperature: float, log: bool) -> Optional[Tensor]:
    """The softmax operators' body at temperature 1: one compiled call, or ``None``."""
    par = None if temperature != 1.0 else _op_rows_entry(x)
    if par is None:
        return None
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    i = par + (x.dtype is _F64)
    (_sm_points[i] or _sm_entry(i))(x.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], int(log))
    return y


def op_softmax_backward(y: Tensor, dy: Tensor, log: bool) -> Optional[Tensor]:
    """The softmax backward operators' body: one compiled call, or ``None``."""
    par = None if dy.shape != y.shape or not dy.is_cpu else _op_rows_entry(y)
    if par is None:
        return None
    if dy.dtype is not y.dtype or not dy.is_contiguous():
        dy = dy.to(y.dtype).contiguous()
    dx = torch.empty_like(y)
    i = par + 2 + (y.dtype is _F64)
    (_sm_points[i] or _sm_entry(i))(y.data_ptr(), dy.data_ptr(), dx.data_ptr(), y.shape[0], y.shape[1], log)
    return dx


class SoftmaxSmall(torch.autograd.Function):
    """The fast path's softmax / log_softmax; saves its output (``save_for_backward``: an output
    held on the context would be a reference cycle). Backward is one compiled call; with
    ``create_graph=True`` the general class's differentiable formula."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, log: bool, par: int = 0) -> Tensor:
        N, C = x.shape
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        i = par + (x.dtype is _F64)
        (_sm_points[i] or _sm_entry(i))(x.data_ptr(), y.data_ptr(), N, C, int(log))
        if ctx is not None:
            ctx.save_for_backward(y)
            ctx.log = log
            ctx.par = par
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        (y,) = ctx.saved_tensors
        log = ctx.log
        if _grad_enabled():
            if log:
                dx = dy - torch.exp(y) * dy.sum(-1, keepdim=True)
            else:
                dx = y * (dy - (y * dy).sum(-1, keepdim=True))
            return dx, None, None
        if dy.dtype is not y.dtype or not dy.is_contiguous():
            dy = dy.to(y.dtype).contiguous()
        dx = torch.empty_like(y)
        par = ctx.par
        if par:  # the thread count may have changed since the forward pass
            k = _cpu[0]
            if k.get_num_threads() > 1 and not k._serial_only:
                k._apply_threads(y.numel())
            else:
                par = 0
        i = par + 2 + (y.dtype is _F64)
        N, C = y.shape
        (_sm_points[i] or _sm_entry(i))(y.data_ptr(), dy.data_ptr(), dx.data_ptr(), N, C, log)
        return dx, None, None


_F64 = torch.float64
_apply_softmax = torch._C._FunctionBase.__dict__["apply"].__get__(None, SoftmaxSmall)


def _keep_graph_fallback() -> bool:  # pragma: no cover - a torch without the query
    return True  # assume the graph is kept (safe: the saved gradient survives)


# Whether this backward keeps the graph (``retain_graph=True``): then the saved gradient must survive.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", _keep_graph_fallback)
