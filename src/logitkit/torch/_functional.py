"""Drop-ins for ``torch.nn.functional.cross_entropy``, ``softmax`` and ``log_softmax``."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .. import _validate as V
from .._namespace import NUMPY, TORCH
from . import _dtensor, _eager
from ._autograd import CrossEntropyIndex, CrossEntropyProb, SoftmaxRows, check_inplace

__all__ = ["cross_entropy", "softmax", "log_softmax"]


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """The ``reduction`` that torch's deprecated ``size_average``/``reduce`` pair stands for.

    ``None`` means ``True`` for both; ``reduce=False`` gives ``"none"`` whatever ``size_average``
    says; otherwise ``size_average`` picks ``"mean"`` or ``"sum"``. Warns as torch does.
    """
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        ret = "mean"
    elif reduce:
        ret = "sum"
    else:
        ret = "none"
    warnings.warn(f"size_average and reduce args will be deprecated, please use reduction='{ret}' "
                  "instead.", stacklevel=3)
    return ret


_REDUCTIONS = ("mean", "sum", "none")


def _default(value: Any, default: float) -> bool:
    """``value`` is a plain number equal to ``default`` (``True`` is not 1.0 here)."""
    return (type(value) is float or type(value) is int) and value == default


def _loss_dtype(x: Tensor) -> torch.dtype:
    # Under autocast torch runs cross_entropy in float32 (its fp32 cast policy); the loss is then
    # float32. We read the half-precision logits directly (accumulating in float32 anyway), so
    # only the result's dtype changes and no float32 copy of the logits is made.
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype


def ce_lastdim(x: Tensor, y: Tensor, *, kind: str, out_shape: tuple, weight: Optional[Tensor],
               ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
               softcap: Optional[float], temperature: float, return_lse: bool = False,
               inplace_backward: bool = False, label_name: str = "labels") -> Any:
    """Cross-entropy of validated ``x`` (..., V) (class axis last) and labels ``y``.

    ``kind`` is ``"index"`` (``y`` integer, ``x``'s shape without the class axis) or ``"prob"``
    (``y`` floating, ``x``'s shape). ``out_shape`` is the shape of a ``"none"`` loss and of lse.
    """
    if (kind == "index" and weight is None and not return_lse and not inplace_backward and softcap is None
            and label_smoothing == 0.0 and z_loss == 0.0 and temperature == 1.0):
        loss = _eager.fast_ce(x, y, ignore_index, reduction)
        if loss is not None:
            return loss
    C = x.shape[-1]
    # An explicit row count: reshape(-1, 0) cannot infer it when the class axis is empty.
    x2d = x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), C)
    out_dtype = _loss_dtype(x)
    eps, zl, T = float(label_smoothing), float(z_loss), float(temperature)
    cap = None if softcap is None else float(softcap)
    inplace = bool(inplace_backward) and x2d.requires_grad and torch.is_grad_enabled()
    if torch._C._are_functorch_transforms_active():
        return _transformed_ce(x2d, y, kind, out_shape, weight, ignore_index, reduction, eps, zl, cap, T, return_lse,
                               bool(inplace_backward), label_name, out_dtype)
    if kind == "index":
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            # torch refuses too ("not differentiable with respect to argument 'weight'"); a
            # gradient silently left at None would be a wrong result.
            raise ValueError("weight: cross-entropy with class indices is not differentiable with "
                             "respect to weight (as in torch); pass weight.detach()")
        if not torch.compiler.is_compiling():
            # Every check before any memory is written (the op repeats it when compiled).
            V.check_label_range(TORCH, y, C, ignore_index, name=label_name)
        y1 = y.reshape(x2d.shape[0])
        if y1.dtype != torch.int64:
            y1 = y1.to(torch.int64)
        if inplace:
            check_inplace(x2d)
        loss, lse = CrossEntropyIndex.apply(x2d, y1, weight, int(ignore_index), eps, reduction, zl, cap, T,
                                            inplace, out_dtype)
    else:
        y2d = y.reshape(x2d.shape)
        if inplace:
            check_inplace(x2d)
        loss, lse = CrossEntropyProb.apply(x2d, y2d, weight, eps, reduction, zl, cap, T, inplace,
                                           out_dtype)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    if return_lse:
        return loss, lse.reshape(out_shape)
    return loss


def _host_values(t: Tensor) -> Any:
    """A NumPy view of a contiguous CPU tensor's memory, read without any torch op (under a
    transform even ``detach`` gives a wrapped tensor, which has no memory to read)."""
    import ctypes

    import numpy as np

    n = t.numel()
    if n == 0:
        return np.zeros(tuple(t.shape), np.int64)
    buf = (ctypes.c_char * (n * t.element_size())).from_address(t.data_ptr())
    return np.frombuffer(buf, dtype=str(t.dtype).rsplit(".", 1)[-1], count=n).reshape(tuple(t.shape))


def _transformed_ce(x2d: Tensor, y: Tensor, kind: str, out_shape: tuple, weight: Optional[Tensor], ignore_index: int,
                    reduction: str, eps: float, zl: float, cap: Optional[float], T: float, return_lse: bool,
                    inplace_backward: bool, label_name: str, out_dtype: torch.dtype) -> Any:
    """Cross-entropy under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jvp`` ...).

    The autograd functions run kernels on the tensors' memory, which a transform's wrapped
    tensors do not have; here the same maths runs as logitkit's core on differentiable torch ops
    (the exact formulation: log1p for confident rows, -inf masking), which every transform
    differentiates and batches as it does torch's own ops.
    """
    from .._namespace import get_namespace
    from ..core import cross_entropy as core_ce
    from ..core.reduction import reduce_loss, row_weights

    if inplace_backward:
        raise ValueError("inplace_backward=True: not supported under torch.func transforms (grad, vmap, jvp, "
                         "jacrev, ...), which need the logits after the backward; use inplace_backward=False")
    xp = get_namespace(TORCH)
    acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    if kind == "index":
        if weight is not None and weight.requires_grad:
            raise ValueError("weight: cross-entropy with class indices is not differentiable with respect to "
                             "weight (as in torch); pass weight.detach()")
        lab = y  # the labels' own values, under the transforms' wrappers (vmap: the whole batch)
        while torch._C._functorch.is_functorch_wrapped_tensor(lab):
            lab = torch._C._functorch.get_unwrapped(lab)
        if lab.device.type == "cpu" and lab.is_contiguous():
            V.check_label_range(NUMPY, _host_values(lab), x2d.shape[-1], ignore_index, name=label_name)
        y1 = y.reshape(x2d.shape[0]).to(torch.int64)
        ce, m, r = core_ce.ce_forward(xp, x2d, y1, weight=w, ignore_index=ignore_index, label_smoothing=eps,
                                      softcap=cap, temperature=T)
        validf, wy = row_weights(xp, y1, w, ignore_index, ce.dtype)
    else:
        ce, m, r = core_ce.prob_forward(xp, x2d, y.reshape(x2d.shape), weight=w, label_smoothing=eps, softcap=cap,
                                        temperature=T)
        validf = wy = torch.ones_like(ce)
    lse = m + r
    loss = reduce_loss(xp, ce, lse, validf, wy, reduction, zl).to(out_dtype)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return (loss, lse.reshape(out_shape)) if return_lse else loss


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: Optional[float] = None, temperature: float = 1.0,
                  return_lse: bool = False, inplace_backward: bool = False,
                  num_items_in_batch: Any = None) -> Any:
    r"""``torch.nn.functional.cross_entropy`` with a fused forward and backward.

    With ``z = softcap·tanh(x/softcap) / T`` (both optional) and ``lse = log Σ_c exp z_c``, the
    loss of one position with class index ``y`` is

    .. math:: (1-ε)\,w_y(\mathrm{lse}-z_y) + \tfrac{ε}{C}\sum_c w_c(\mathrm{lse}-z_c) + ζ\,\mathrm{lse}^2

    and with probability targets ``t``: :math:`\sum_c w_c \tilde t_c (\mathrm{lse}-z_c) + ζ\,\mathrm{lse}^2`,
    :math:`\tilde t = (1-ε)t + ε/C`. ``reduction="mean"`` divides the first part by Σ w_y of the
    positions not ignored (by their number for probability targets) and the z-loss by their count.

    Args (as torch): ``input`` (C), (N, C) or (N, C, d1, ..., dK), class dim 1; ``target``
    class indices of shape (), (N) or (N, d1, ..., dK), or probabilities of ``input``'s shape;
    ``weight`` (C,); ``ignore_index``; ``reduction`` ``"mean"``/``"sum"``/``"none"``;
    ``label_smoothing`` ε; the deprecated ``size_average``/``reduce`` map to ``reduction`` as in
    torch. Keyword-only extras: ``z_loss`` ζ, ``softcap``, ``temperature`` T, ``return_lse``
    (also return lse, of the target's index shape, float32 or float64), ``inplace_backward``
    (backward writes the gradient over ``input``'s memory: no new N×C buffer, but the logits
    are consumed; refused with an error when anything else still needs them).

    Differences from torch: a mean over no position (empty batch, every target ignored) is 0
    with a zero gradient where torch returns NaN; under autocast the half-precision logits are
    read directly (no float32 copy) and the loss is float32 as in torch.

    Forward saves only the input, the targets and two float32 numbers per position.

    ``num_items_in_batch`` (int or 0-d tensor, Hugging Face's meaning): ``"mean"`` is the
    (weighted) sum, z-loss included, divided by it (see :func:`logitkit.torch.global_num_items`).
    DTensor inputs (logits ``Shard`` on the class dim, the tokens, or ``Replicate``) run
    :mod:`logitkit.torch._dtensor`: a vocabulary-parallel loss, a global mean, a DTensor loss.

    >>> import torch, logitkit.torch as lt
    >>> x = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    >>> lt.cross_entropy(x, torch.tensor([0]))
    tensor(0.2395, grad_fn=<CrossEntropySmallBackward>)
    """
    if num_items_in_batch is not None:  # before the fast path, which has no such option
        return _dtensor.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                      label_smoothing, z_loss=z_loss, softcap=softcap, temperature=temperature,
                                      return_lse=return_lse, inplace_backward=inplace_backward,
                                      num_items_in_batch=num_items_in_batch)
    if (weight is None and size_average is None and reduce is None and return_lse is False
            and inplace_backward is False and softcap is None and type(ignore_index) is int
            and reduction in _REDUCTIONS and _default(label_smoothing, 0.0) and _default(z_loss, 0.0)
            and _default(temperature, 1.0) and type(input) is Tensor and type(target) is Tensor):
        # torch's defaults on small CPU rows: a few attribute checks, then one kernel per pass
        loss = _eager.fast_ce(input, target, ignore_index, reduction)
        if loss is not None:
            return loss
    if _dtensor.is_dtensor(input, target, weight):  # never on the fast path: type(DTensor) is not Tensor
        return _dtensor.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                      label_smoothing, z_loss=z_loss, softcap=softcap, temperature=temperature,
                                      return_lse=return_lse, inplace_backward=inplace_backward)
    _check_tensor("input", input)
    _check_tensor("target", target)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    V.check_logits("input", input)
    V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                    softcap=softcap, temperature=temperature)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    C = input.shape[1] if input.ndim > 1 else input.shape[0]
    if weight is not None:
        _check_tensor("weight", weight)
        V.check_weight(weight, C)
        if weight.device != input.device:
            raise ValueError(f"weight: expected device {input.device}, got {weight.device}")
    if target.device != input.device:
        raise ValueError(f"target: expected device {input.device}, got {target.device}")
    if input.ndim == 1:
        x, out_shape = input.unsqueeze(0), ()
    elif input.ndim == 2:
        x, out_shape = input, (input.shape[0],)
    else:
        x = input.movedim(1, -1)
        out_shape = tuple(x.shape[:-1])
    if target.dtype.is_floating_point:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(f"target: probabilities must have input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if ignore_index >= 0:
            # torch: "ignore_index is not supported for floating point target" (a negative one,
            # like the default -100, can never match a class and is let through)
            raise ValueError(f"ignore_index: {ignore_index} is not supported for probability targets "
                             "(floating target), as in torch; use a negative ignore_index")
        y = target.unsqueeze(0) if input.ndim == 1 else (target if input.ndim == 2 else target.movedim(1, -1))
        kind = "prob"
    elif V.is_integer(target.dtype):
        if tuple(target.shape) != out_shape:
            raise ValueError(f"target: class indices must have shape {out_shape} for input of shape "
                             f"{tuple(input.shape)} (class dim 1), got {tuple(target.shape)}")
        y, kind = target, "index"
    else:
        raise TypeError(f"target: expected integer class indices or floating probabilities, got "
                        f"{target.dtype}")
    return ce_lastdim(x, y, kind=kind, out_shape=out_shape, weight=weight, ignore_index=ignore_index,
                      reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                      softcap=softcap, temperature=temperature, return_lse=return_lse,
                      inplace_backward=inplace_backward, label_name="target")


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax


def _softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's implicit ``dim`` (deprecated): 0 for 0-, 1- and 3-D input, else 1; warns."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call to "
                  "include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def softmax_lastdim(x: Tensor, dim: int, temperature: float, log: bool) -> Tensor:
    """Fused softmax of validated ``x`` along ``dim`` (moved last internally)."""
    T = float(temperature)
    if torch._C._are_functorch_transforms_active():
        # torch.func transforms: the core on differentiable torch ops (see _transformed_ce)
        from .._namespace import get_namespace
        from ..core import softmax as core_sm

        fn = core_sm.log_softmax if log else core_sm.softmax
        if x.ndim == 0:
            return fn(get_namespace(TORCH), x.reshape(1), -1, None, T).reshape(()).to(x.dtype)
        return fn(get_namespace(TORCH), x, dim % x.ndim, None, T).to(x.dtype)
    if x.ndim == 0:
        return SoftmaxRows.apply(x.reshape(1, 1), T, log).reshape(())
    d = dim % x.ndim
    if x.numel() == 0:
        # Nothing to compute: torch's own op gives the empty result (and its autograd node), as
        # F.softmax does; reshaping to rows cannot, when the softmax axis itself is empty.
        fn = torch.log_softmax if log else torch.softmax
        return fn(x if T == 1.0 else x / T, d)
    last = d == x.ndim - 1
    moved = x if last else x.movedim(d, -1)
    y = SoftmaxRows.apply(moved.reshape(-1, moved.shape[-1]), T, log).reshape(moved.shape)
    if not last:
        y = y.movedim(-1, d)
        if x.is_contiguous():  # keep torch's output layout
            y = y.contiguous()
    return y


def _softmax_impl(name: str, input: Tensor, dim: Optional[int], stacklevel: int,
                  dtype: Optional[torch.dtype], temperature: float, log: bool) -> Tensor:
    _check_tensor("input", input)
    if dtype is not None:
        input = input.to(dtype)
    elif (input.device.type == "cuda" and input.dtype in (torch.float16, torch.bfloat16)
          and torch.is_autocast_enabled("cuda")):
        input = input.float()  # CUDA autocast runs softmax / log_softmax in float32
    V.check_options(temperature=temperature)
    if not input.dtype.is_floating_point or input.dtype not in (torch.float16, torch.bfloat16,
                                                                torch.float32, torch.float64):
        raise TypeError(f"input: expected a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {input.dtype}")
    if dim is None:
        dim = _softmax_dim(name, input.ndim, stacklevel + 1)
    nd = max(input.ndim, 1)
    dim = V.norm_axis(dim, nd, "dim")
    return softmax_lastdim(input, dim, temperature, log)


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None, *, temperature: float = 1.0) -> Tensor:
    r"""``torch.nn.functional.softmax``: :math:`e^{x_j/T} / \sum_k e^{x_k/T}` along ``dim``, fused.

    ``dtype`` casts the input first, as torch does; ``temperature`` T (keyword-only) divides the
    logits. Backward saves only the output. Higher-order gradients work.

    >>> import torch, logitkit.torch as lt
    >>> lt.softmax(torch.tensor([0.0, 0.6931472]), dim=0)
    tensor([0.3333, 0.6667])
    """
    if dtype is None and type(input) is Tensor and type(temperature) is float and temperature == 1.0:
        y = _eager.fast_softmax(input, dim, False)  # 2-D CPU rows along dim 1: one kernel call per pass
        if y is not None:
            return y
    return _softmax_impl("softmax", input, dim, _stacklevel, dtype, temperature, False)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None, *, temperature: float = 1.0) -> Tensor:
    r"""``torch.nn.functional.log_softmax``: :math:`x_j/T - \log\sum_k e^{x_k/T}` along ``dim``, fused.

    >>> import torch, logitkit.torch as lt
    >>> lt.log_softmax(torch.tensor([1e4, 1e4]), dim=0)
    tensor([-0.6931, -0.6931])
    """
    if dtype is None and type(input) is Tensor and type(temperature) is float and temperature == 1.0:
        y = _eager.fast_softmax(input, dim, True)
        if y is not None:
            return y
    return _softmax_impl("log_softmax", input, dim, _stacklevel, dtype, temperature, True)
