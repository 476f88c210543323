r"""The public, framework-agnostic functions.

Each takes NumPy arrays, torch tensors or JAX arrays and returns the same kind on the same device.
Data flows one way: namespace detection -> argument checks -> the framework adapter (which owns
autograd) or, for NumPy, the kernel registry (fused kernel if one fits, else the core).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

from . import _validate as V
from ._namespace import JAX, NUMPY, TENSORFLOW, TORCH, acc_dtype, library_of, namespace_of
from .core import cross_entropy as core_ce
from .core import logsumexp as core_lse
from .core import softmax as core_sm
from .core.reduction import reduce_loss, row_scales, row_weights
from .kernels import registry

__all__ = [
    "logsumexp", "softmax", "log_softmax", "cross_entropy", "cross_entropy_with_grad",
    "softmax_cross_entropy_with_logits", "sparse_softmax_cross_entropy_with_logits",
    "token_logprobs", "entropy", "kl_divergence",
]

def _adapter(lib: str) -> Any:
    """The framework bridge that owns autograd for ``lib``, or ``None`` (core ops then)."""
    # Import statements, not importlib: torch.compile traces an import statement (even a first
    # import inside a compiled function) but graph-breaks on importlib.import_module.
    try:
        if lib == TORCH:
            from .torch import _bridge
        elif lib == JAX:
            from .jax import _bridge
        elif lib == TENSORFLOW:
            from .tensorflow import _bridge
        else:
            return None
    except ImportError:
        return None
    return _bridge


def _moved(xp: Any, x: Any, axis: int) -> Any:
    return x if axis == x.ndim - 1 else xp.moveaxis(x, axis, -1)


def _unmoved(xp: Any, x: Any, axis: int, ndim: int) -> Any:
    return x if axis == ndim - 1 else xp.moveaxis(x, -1, axis)


# ----------------------------------------------------------------------------------------------
# logsumexp / softmax / log_softmax


def logsumexp(x: Any, axis: int = -1, *, keepdims: bool = False, where: Any = None) -> Any:
    r"""Log-sum-exp along ``axis``: :math:`\log \sum_j e^{x_j}`, exact for ±inf, masks and empty axes.

    Args:
      x: floating array (NumPy, torch or JAX).
      axis: the reduced axis.
      keepdims: keep ``axis`` with size 1.
      where: optional boolean mask broadcastable to ``x``; ``False`` entries take no part.

    Returns ``x``'s dtype (accumulated in float32, or float64 for float64). A fully masked or
    empty row gives ``-inf``; a row with ``+inf`` and no NaN gives ``+inf``; NaN propagates.

    >>> import numpy as np, logitkit
    >>> float(logitkit.logsumexp(np.array([1000.0, 1000.0])))  # doctest: +ELLIPSIS
    1000.693147...
    """
    lib, xp = namespace_of(x=x, where=where)
    V.check_logits("x", x)
    ax = V.norm_axis(axis, x.ndim)
    where = _broadcast_mask(xp, where, x)
    return core_lse.logsumexp(x, ax, keepdims=keepdims, where=where, xp=xp)


def _broadcast_mask(xp: Any, where: Any, x: Any) -> Any:
    if where is None:
        return None
    if not hasattr(where, "dtype"):
        raise TypeError(f"where: expected a boolean array, got {type(where).__name__}")
    if V.dtype_name(where.dtype) not in ("bool", "bool_"):
        raise TypeError(f"where: expected a boolean mask, got dtype {V.dtype_name(where.dtype)}")
    try:
        return xp.broadcast_to(where, x.shape)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"where: shape {tuple(where.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}") from exc


def softmax(x: Any, axis: int = -1, *, where: Any = None, temperature: float = 1.0) -> Any:
    r"""Softmax :math:`p_j = e^{x_j/T} / \sum_k e^{x_k/T}` along ``axis``.

    ``where`` masks entries out (they get 0); a fully masked row gives zeros, never NaN.
    Returns ``x``'s dtype, computed in float32 (float64 for float64).

    >>> import numpy as np, logitkit
    >>> logitkit.softmax(np.array([0.0, np.log(3.0)])).round(6)
    array([0.25, 0.75])
    """
    lib, xp = namespace_of(x=x, where=where)
    V.check_logits("x", x)
    V.check_options(temperature=temperature)
    ax = V.norm_axis(axis, x.ndim)
    where = _broadcast_mask(xp, where, x)
    bridge = _adapter(lib)
    if bridge is not None and hasattr(bridge, "softmax"):
        return bridge.softmax(x, ax, where=where, temperature=temperature)
    if lib == NUMPY and where is None:
        return _rowwise(xp, "softmax_forward", x, ax, temperature)
    return core_sm.softmax(xp, x, ax, where, temperature)


def log_softmax(x: Any, axis: int = -1, *, where: Any = None, temperature: float = 1.0) -> Any:
    r"""Log-softmax :math:`x_j/T - \log \sum_k e^{x_k/T}` along ``axis``; masked entries give ``-inf``.

    >>> import numpy as np, logitkit
    >>> logitkit.log_softmax(np.array([1e4, 1e4]))
    array([-0.69314718, -0.69314718])
    """
    lib, xp = namespace_of(x=x, where=where)
    V.check_logits("x", x)
    V.check_options(temperature=temperature)
    ax = V.norm_axis(axis, x.ndim)
    where = _broadcast_mask(xp, where, x)
    bridge = _adapter(lib)
    if bridge is not None and hasattr(bridge, "log_softmax"):
        return bridge.log_softmax(x, ax, where=where, temperature=temperature)
    if lib == NUMPY and where is None:
        return _rowwise(xp, "log_softmax_forward", x, ax, temperature)
    return core_sm.log_softmax(xp, x, ax, where, temperature)


def _rowwise(xp: Any, stage: str, x: Any, ax: int, temperature: float) -> Any:
    """Run a row-wise NumPy stage on a 2-D C-contiguous view (copy only if the layout needs it)."""
    xm = _moved(xp, x, ax)
    Vn = xm.shape[-1]
    if Vn == 0 or xm.size == 0:
        return core_sm.softmax(xp, x, ax, None, temperature) if stage == "softmax_forward" \
            else core_sm.log_softmax(xp, x, ax, None, temperature)
    x2 = xp.ascontiguousarray(xm).reshape(-1, Vn)
    _, fn = registry.select(stage, NUMPY, x2)
    out = fn(x2, temperature=temperature, out=None)
    return _unmoved(xp, out.reshape(xm.shape), ax, x.ndim)


# ----------------------------------------------------------------------------------------------
# cross-entropy


def _prepare_ce(logits: Any, labels: Any, axis: int, weight: Any, ignore_index: int,
                label_smoothing: float, reduction: str, z_loss: float, softcap: float | None,
                temperature: float) -> tuple[str, Any, Any, Any, str, int]:
    """Checks every argument before any work; returns ``(lib, xp, x_moved, labels_moved, kind, axis)``."""
    lib, xp = namespace_of(logits=logits, labels=labels, weight=weight)
    V.check_logits("logits", logits)
    V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                    softcap=softcap, temperature=temperature)
    V.check_ignore_index(ignore_index)
    ax = V.norm_axis(axis, logits.ndim)
    x = _moved(xp, logits, ax)
    nclass = x.shape[-1]
    V.check_weight(weight, nclass)
    if labels is None or not hasattr(labels, "dtype"):
        raise TypeError(f"labels: expected an array, got {type(labels).__name__}")
    if V.is_floating(labels.dtype):
        kind = "prob"
        if labels.ndim != logits.ndim:
            V.check_prob_shape(labels, logits.shape)
        y = _moved(xp, labels, ax)
        V.check_prob_shape(y, x.shape)
    else:
        kind = V.labels_kind(labels, x.shape)
        y = labels
        V.check_label_range(lib, labels, nclass, ignore_index)
    return lib, xp, x, y, kind, ax


def cross_entropy(logits: Any, labels: Any, *, axis: int = -1, weight: Any = None,
                  ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                  z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0) -> Any:
    r"""Softmax cross-entropy from logits, with ``torch.nn.functional.cross_entropy`` semantics.

    With ``z = softcap·tanh(x/softcap) / T`` and ``lse = log Σ_c e^{z_c}``, one row's loss is

    .. math::
        \ell = (1-\varepsilon)\, w_y (\mathrm{lse} - z_y)
               + \tfrac{\varepsilon}{V} \sum_c w_c (\mathrm{lse} - z_c)
               + \zeta\, \mathrm{lse}^2

    for integer labels ``y``, and :math:`\sum_c w_c \tilde y_c (\mathrm{lse} - z_c) + \zeta\,\mathrm{lse}^2`
    with :math:`\tilde y = (1-\varepsilon) y + \varepsilon/V` for probability labels.

    Args:
      logits: ``(..., V, ...)`` floating; the class axis is ``axis``.
      labels: integer class indices of the logits' shape without ``axis``, or floating
        probabilities of the logits' shape.
      weight: optional ``(V,)`` class weights (torch semantics: the mean divides by Σ w_y).
      ignore_index: rows with this label contribute 0 and are left out of the mean.
      label_smoothing: ε in [0, 1]. reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      z_loss: ζ, PaLM's auxiliary ``ζ·lse²`` per row that is not ignored (never class-weighted;
        the mean divides it by the number of rows not ignored).
      softcap: Gemma 2's logit soft-capping ``c·tanh(x/c)``, applied first. temperature: T.

    Unlike torch, a mean over nothing (empty batch, every row ignored) is 0 with zero gradient.

    >>> import numpy as np, logitkit
    >>> x = np.array([[40.0, 0.0, 0.0]], dtype=np.float32); y = np.array([0])
    >>> float(logitkit.cross_entropy(x, y))  # 2·e^-40, not 0   # doctest: +ELLIPSIS
    8.49...e-18
    """
    ignore_index = V.check_ignore_index(ignore_index)
    lib, xp, x, y, kind, ax = _prepare_ce(logits, labels, axis, weight, ignore_index, label_smoothing,
                                          reduction, z_loss, softcap, temperature)
    opts = dict(weight=weight, label_smoothing=float(label_smoothing), softcap=softcap,
                temperature=float(temperature))
    bridge = _adapter(lib)
    # No class at all: the core defines it once for every library (0 for ignored rows, NaN for
    # rows whose label could not be checked), rather than each bridge's kernels.
    if bridge is not None and hasattr(bridge, "cross_entropy") and x.shape[-1] > 0:
        return bridge.cross_entropy(x, y, kind=kind, ignore_index=ignore_index, reduction=reduction,
                                    z_loss=float(z_loss), **opts)
    return _ce_eager(lib, xp, x, y, kind, ignore_index, reduction, float(z_loss), opts)


def _numel(x: Any) -> int:
    """Element count for any library (``torch.Tensor.size`` is a method, not a number)."""
    return math.prod(tuple(x.shape))


def _rows2d(xp: Any, x: Any) -> Any:
    return xp.ascontiguousarray(x).reshape(-1, x.shape[-1])


def _ce_eager(lib: str, xp: Any, x: Any, y: Any, kind: str, ignore_index: int, reduction: str,
              z_loss: float, opts: dict) -> Any:
    """Forward only, through the registry for NumPy and through core ops (own autograd) otherwise."""
    acc = acc_dtype(xp, x.dtype)
    if kind == "index":
        if lib == NUMPY and x.size > 0:
            x2 = _rows2d(xp, x)
            _, fwd = registry.select("ce_forward", lib, x2)
            ce, m, r = fwd(x2, y.reshape(-1).astype("int64"), ignore_index=ignore_index, **opts)
            shape = x.shape[:-1]
            ce, m, r = ce.reshape(shape), m.reshape(shape), r.reshape(shape)
        else:
            ce, m, r = core_ce.ce_forward(xp, x, y, ignore_index=ignore_index, **opts)
        validf, wy = row_weights(xp, y, opts["weight"], ignore_index, acc)
    else:
        ce, m, r = core_ce.prob_forward(xp, x, y, **opts)
        validf = wy = xp.ones_like(ce)
    loss = reduce_loss(xp, ce, m + r, validf, wy, reduction, z_loss)
    return xp.astype(loss, x.dtype)


def cross_entropy_with_grad(logits: Any, labels: Any, *, axis: int = -1, weight: Any = None,
                            ignore_index: int = -100, label_smoothing: float = 0.0,
                            reduction: str = "mean", z_loss: float = 0.0, softcap: float | None = None,
                            temperature: float = 1.0, out: Any = None) -> tuple[Any, Any]:
    r"""``(loss, d loss / d logits)`` of :func:`cross_entropy` from one fused pass over the logits.

    For ``reduction="none"`` the gradient is that of the sum of the per-row losses. ``out``
    (an array of the logits' shape and dtype) receives the gradient; ``out=logits`` computes it in
    place, with no new ``N×V`` array (NumPy and torch; JAX arrays are immutable).

    >>> import numpy as np, logitkit
    >>> x = np.array([[0.0, 0.0]]); loss, g = logitkit.cross_entropy_with_grad(x, np.array([1]))
    >>> g
    array([[ 0.5, -0.5]])
    """
    ignore_index = V.check_ignore_index(ignore_index)
    lib, xp, x, y, kind, ax = _prepare_ce(logits, labels, axis, weight, ignore_index, label_smoothing,
                                          reduction, z_loss, softcap, temperature)
    if out is not None:
        _check_out(lib, out, logits)
    opts = dict(weight=weight, label_smoothing=float(label_smoothing), softcap=softcap,
                temperature=float(temperature), z_loss=float(z_loss))
    acc = acc_dtype(xp, x.dtype)
    if lib == TORCH:
        import torch

        with torch.no_grad():
            return _ce_with_grad(lib, xp, logits, x, y, kind, ax, ignore_index, reduction, opts, acc, out)
    return _ce_with_grad(lib, xp, logits, x, y, kind, ax, ignore_index, reduction, opts, acc, out)


def _check_out(lib: str, out: Any, logits: Any) -> None:
    if lib == JAX:
        raise TypeError("out: JAX arrays are immutable; call without out")
    from ._namespace import library_of

    if library_of(out) != lib:
        raise TypeError(f"out: expected a {lib} array like logits, got {type(out).__name__}")
    if tuple(out.shape) != tuple(logits.shape) or out.dtype != logits.dtype:
        raise ValueError(f"out: expected shape {tuple(logits.shape)} and dtype {logits.dtype}, "
                         f"got {tuple(out.shape)} and {out.dtype}")
    if lib == NUMPY and not out.flags.writeable:
        what = "out=logits asks for the gradient in place, but the logits are" if out is logits \
            else "out is"
        raise ValueError(f"out: {what} a read-only array; pass a writeable array or out=None")


def _ce_with_grad(lib, xp, logits, x, y, kind, ax, ignore_index, reduction, opts, acc, out):
    if kind == "index":
        validf, wy = row_weights(xp, y, opts["weight"], ignore_index, acc)
    else:
        validf = wy = xp.astype(xp.ones_like(y[..., 0]), acc)
    g_ce, g_z = row_scales(xp, validf, wy, reduction)
    grad_target = _moved(xp, out, ax) if out is not None else None
    if kind == "index" and lib in (NUMPY, TORCH) and _numel(x) > 0:
        ce, m, r, grad = _fused_rows(lib, xp, x, y, g_ce, g_z, ignore_index, opts, grad_target)
    elif kind == "index":
        ce, m, r, grad = core_ce.ce_forward_backward(xp, x, y, g_ce, g_z, ignore_index=ignore_index,
                                                     out=grad_target, **opts)
    else:
        ce, m, r, grad = core_ce.prob_forward_backward(xp, x, y, g_ce, g_z, out=grad_target, **opts)
    loss = reduce_loss(xp, ce, m + r, validf, wy, reduction, opts["z_loss"])
    if out is not None:
        return xp.astype(loss, x.dtype), out
    return xp.astype(loss, x.dtype), _unmoved(xp, grad, ax, logits.ndim)


def _fused_rows(lib, xp, x, y, g_ce, g_z, ignore_index, opts, grad_target):
    """One fused pass on 2-D rows; writes straight into ``grad_target`` when its layout allows."""
    shape, nclass = x.shape[:-1], x.shape[-1]
    contiguous = _is_c_contiguous(lib, x) and (grad_target is None or _is_c_contiguous(lib, grad_target))
    x2 = x.reshape(-1, nclass) if contiguous else _contiguous(lib, x).reshape(-1, nclass)
    if grad_target is not None and contiguous:
        out2 = grad_target.reshape(-1, nclass)
    else:
        out2 = None
    y2 = y.reshape(-1)
    if lib == NUMPY:
        _, fused = registry.select("ce_forward_backward", lib, x2)
        y2 = y2.astype("int64")
    else:
        # torch's bridge reaches the numba kernels through zero-copy views and Triton on CUDA.
        from .torch._ops import run_stage

        fused = functools.partial(run_stage, "ce_forward_backward")
        y2 = y2.long()
    ce, m, r, grad2 = fused(x2, y2, g_ce.reshape(-1), g_z.reshape(-1), ignore_index=ignore_index,
                            out=out2, **opts)
    grad = grad2.reshape(x.shape)
    if grad_target is not None and out2 is None:
        core_ce.write_out(xp, grad_target, grad)
        grad = grad_target
    return ce.reshape(shape), m.reshape(shape), r.reshape(shape), grad


def _is_c_contiguous(lib: str, x: Any) -> bool:
    return x.is_contiguous() if lib == TORCH else bool(x.flags.c_contiguous)


def _contiguous(lib: str, x: Any) -> Any:
    if lib == TORCH:
        return x.contiguous()
    import numpy as np

    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------------------------
# TensorFlow names


def softmax_cross_entropy_with_logits(labels: Any, logits: Any, axis: int = -1) -> Any:
    r"""TensorFlow 2's dense softmax cross-entropy: per example :math:`-\sum_c y_c \log \mathrm{softmax}(x)_c`.

    Differentiable in ``labels`` as well as ``logits``; returns the logits' shape without ``axis``.
    The logits' gradient is the exact :math:`p \sum_c y_c - y` (TensorFlow's ``p - y`` whenever
    the labels sum to 1).

    >>> import numpy as np, logitkit
    >>> logitkit.softmax_cross_entropy_with_logits(labels=np.array([[0.5, 0.5]]), logits=np.array([[0.0, 0.0]]))
    array([0.69314718])
    """
    if labels is None or not hasattr(labels, "dtype") or V.is_integer(labels.dtype):
        raise TypeError("labels: expected floating probabilities of the logits' shape "
                        "(use sparse_softmax_cross_entropy_with_logits for class indices)")
    return cross_entropy(logits, labels, axis=axis, reduction="none")


def sparse_softmax_cross_entropy_with_logits(labels: Any, logits: Any) -> Any:
    r"""TensorFlow's sparse softmax cross-entropy: per example :math:`\mathrm{lse}(x) - x_y`.

    ``labels``: integer class indices of shape ``logits.shape[:-1]``, each in ``[0, V)`` (there is
    no ignore index: a label outside the range raises, or gives NaN for that row under ``jax.jit``).

    >>> import numpy as np, logitkit
    >>> logitkit.sparse_softmax_cross_entropy_with_logits(labels=np.array([0]), logits=np.array([[0.0, 0.0]]))
    array([0.69314718])
    """
    if labels is None or not hasattr(labels, "dtype") or not V.is_integer(labels.dtype):
        raise TypeError("labels: expected integer class indices")
    lib, xp = namespace_of(logits=logits, labels=labels)
    V.check_logits("logits", logits)
    V.check_label_range(lib, labels, logits.shape[-1], None)
    # There is no ignore index: checked labels are never -1, and an unchecked -1 (traced JAX,
    # CUDA) would be "ignored" here, so such rows are set to NaN below like any bad index.
    loss = cross_entropy(logits, labels, reduction="none", ignore_index=-1)
    return _nan_if_out_of_range(xp, loss, labels, logits.shape[-1])


def _nan_if_out_of_range(xp: Any, values: Any, labels: Any, V_: int) -> Any:
    ok = (labels >= 0) & (labels < V_)
    # Cast back: NumPy promotes an ml_dtypes bfloat16 array and a Python float to float64.
    return xp.astype(xp.where(ok, values, math.nan), values.dtype)


# ----------------------------------------------------------------------------------------------
# per-position helpers


def token_logprobs(logits: Any, labels: Any, axis: int = -1, *, ignore_index: int = -100) -> Any:
    r"""``log softmax(logits)[label]`` per position (RL, evaluation); 0 where ``label == ignore_index``.

    >>> import numpy as np, logitkit
    >>> logitkit.token_logprobs(np.array([[0.0, 0.0]]), np.array([1]))
    array([-0.69314718])
    """
    if hasattr(labels, "dtype") and not V.is_integer(labels.dtype):
        raise TypeError("labels: token_logprobs needs integer class indices")
    # cross_entropy checks every other argument (once).
    loss = cross_entropy(logits, labels, axis=axis, ignore_index=ignore_index, reduction="none")
    return -loss


def entropy(logits: Any, axis: int = -1) -> Any:
    r"""Entropy of ``softmax(logits)`` per position: :math:`H = \mathrm{lse} - \sum_c p_c x_c`.

    Computed as :math:`r + \sum_c p_c (m - x_c)` so that it stays accurate for confident rows.
    ``-inf`` logits (masked classes) contribute 0.

    >>> import numpy as np, logitkit
    >>> float(logitkit.entropy(np.zeros(4)))  # log 4  # doctest: +ELLIPSIS
    1.386294...
    """
    lib, xp = namespace_of(logits=logits)
    V.check_logits("logits", logits)
    ax = V.norm_axis(axis, logits.ndim)
    return core_sm.entropy(xp, _moved(xp, logits, ax))


def kl_divergence(p_logits: Any, q_logits: Any, axis: int = -1, temperature: float = 1.0) -> Any:
    r"""KL divergence :math:`\mathrm{KL}(\mathrm{softmax}(p/T) \,\|\, \mathrm{softmax}(q/T))` per position.

    Used for distillation (``p`` the teacher, ``q`` the student). Classes where the teacher's
    probability is 0 contribute 0. Multiply by ``T**2`` yourself if you follow Hinton et al.

    >>> import numpy as np, logitkit
    >>> float(logitkit.kl_divergence(np.zeros(3), np.zeros(3)))
    0.0
    """
    lib, xp = namespace_of(p_logits=p_logits, q_logits=q_logits)
    V.check_logits("p_logits", p_logits)
    V.check_logits("q_logits", q_logits)
    V.check_options(temperature=temperature)
    if tuple(p_logits.shape) != tuple(q_logits.shape):
        raise ValueError(f"q_logits: expected p_logits' shape {tuple(p_logits.shape)}, got {tuple(q_logits.shape)}")
    ax = V.norm_axis(axis, p_logits.ndim)
    return core_sm.kl_divergence(xp, _moved(xp, p_logits, ax), _moved(xp, q_logits, ax), temperature)


# ----------------------------------------------------------------------------------------------
# TensorFlow entry


def _tensorflow_entry(fn: Any) -> Any:
    """``fn``, sending calls that hold a TensorFlow tensor or variable to the TensorFlow bridge.

    The bridge reads variables (so that a tape sees the read), runs TensorFlow's own semantics for
    the functions with TensorFlow's names and custom gradients for the rest, and calls ``fn``
    back for what this module does for every library.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Only when TensorFlow is imported already: logitkit never imports it for a call.
        if "tensorflow" in sys.modules and any(
                library_of(a) == TENSORFLOW for a in (*args, *kwargs.values())):
            from .tensorflow import _bridge

            return _bridge.dispatch(name, fn, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


for _name in __all__:
    globals()[_name] = _tensorflow_entry(globals()[_name])
del _name
