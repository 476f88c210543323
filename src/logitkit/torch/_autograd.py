"""Fused ``torch.autograd.Function`` s over 2-D rows (class axis last).

Cross-entropy forward saves the input, the labels, the class weights and two float32 numbers per
row (``m`` and ``r``, with ``lse = m + r``), never an ``N×V`` softmax. Backward makes the whole
gradient in one pass over the logits through the ``ce_backward`` stage, with the per-row
multipliers ``g_ce``/``g_z`` of :func:`logitkit.core.reduction.row_scales` times ``grad_output``.

``inplace_backward=True`` writes that gradient into the logits' own memory. The forward does not
modify the logits, so nothing is marked dirty there; the backward's write goes through a mutating
custom operator, which bumps the logits' version counter exactly as an in-place torch op does.
Every other saved reference to the logits (another op that saved them, a second backward through
the same graph) therefore fails PyTorch's saved-tensor version check instead of reading a
gradient, and the cases that can be seen ahead (a leaf that requires grad, an op whose backward
needs the logits' values) are refused at the call with a message saying why.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from .._namespace import TORCH, get_namespace
from ..core import cross_entropy as core_ce
from ..core.logsumexp import transform, transform_grad_factor
from ..core.reduction import reduce_loss, row_scales, row_weights
from . import _eager, _ops  # noqa: F401  (_ops registers torch.ops.logitkit.*)
from ._ops import acc_dtype

__all__ = ["CrossEntropyIndex", "CrossEntropyProb", "SoftmaxRows", "check_inplace"]

_ops_ns = torch.ops.logitkit


def _xp() -> Any:
    return get_namespace(TORCH)


# ----------------------------------------------------------------------------------------------
# in-place safety


class InplaceError(RuntimeError):
    """``inplace_backward=True`` cannot be used on these logits (the message says why)."""


_INPLACE = "cross_entropy(..., inplace_backward=True)"

# Backward nodes of view ops: their output shares memory with their input, so a node further up
# that saved its own output has saved the logits too.
_VIEW_NODES = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "PermuteBackward0",
    "SliceBackward0", "SelectBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "UnsqueezeBackward0", "ExpandBackward0", "AsStridedBackward0", "DiagonalBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "NarrowBackward0",
    "DetachBackward0", "ViewAsRealBackward0", "ViewAsComplexBackward0",
})


def _saved_tensors(node: Any) -> Iterator[Tensor]:
    """Tensors an autograd node saved for its backward (both built-in and Python nodes)."""
    names = [a for a in dir(node) if a.startswith("_saved_")] + ["saved_tensors"]
    for name in names:
        try:
            value = getattr(node, name)
        except (RuntimeError, AttributeError):  # freed already, or not a tensor slot
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            if isinstance(v, Tensor):
                yield v


def _saved_tensor_hooks_active() -> bool:
    """Whether default saved-tensor hooks are installed (``saved_tensors_hooks``, ``save_on_cpu``)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - a torch without the query: assume hooks (safe)
        return True
    return top(False) is not None


def check_inplace(logits: Tensor) -> None:
    """Refuse logits whose memory must not be overwritten by their gradient.

    Raises :class:`InplaceError` (a ``RuntimeError``) for a leaf that requires grad (or a view
    of one: its ``.grad`` would alias its data), for overlapping memory (expanded tensors), and
    when an op that produced the logits saved them for its own backward (``sigmoid``, ``exp``,
    ``tanh`` ...), which runs after this loss's backward and would read the gradient, and under
    saved-tensor hooks (their packed tensors bypass the version check that catches the rest).
    """
    base = logits._base if logits._base is not None else logits
    if base.is_leaf and base.requires_grad:
        raise InplaceError(
            f"{_INPLACE}: the logits are a leaf tensor that requires grad (or a view of one); "
            "their .grad would share memory with their values. Pass logits computed by the "
            "model, or use inplace_backward=False.")
    if any(st == 0 and n > 1 for st, n in zip(logits.stride(), logits.shape)):
        raise InplaceError(f"{_INPLACE}: the logits are an expanded tensor (stride 0) whose elements "
                           "share memory; use inplace_backward=False.")
    if torch.compiler.is_compiling():
        return
    if _saved_tensor_hooks_active():
        raise InplaceError(
            f"{_INPLACE}: saved-tensor hooks are active (torch.autograd.graph.saved_tensors_hooks, "
            "save_on_cpu, activation checkpointing). The tensors they pack skip PyTorch's version "
            "check, so another op that saved the logits would silently read the gradient written "
            "over them; use inplace_backward=False.")
    storage = logits.untyped_storage().data_ptr()
    stack, seen = [logits.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for saved in _saved_tensors(node):
            if saved.numel() > 0 and saved.untyped_storage().data_ptr() == storage:
                raise InplaceError(
                    f"{_INPLACE}: {node.name()} saved the logits for its own backward, which runs "
                    "after this loss's backward and would read the gradient written over them; "
                    "use inplace_backward=False.")
        if node.name() in _VIEW_NODES:
            stack.extend(n for n, _ in node.next_functions)


def _unpack(ctx: Any) -> tuple[Tensor, ...]:
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if getattr(ctx, "inplace", False) and "modified by an inplace operation" in str(exc):
            raise InplaceError(
                f"{_INPLACE}: the logits changed after the forward, most likely because a backward "
                "through this graph already wrote the gradient over them (retain_graph, or the "
                "same logits given to two in-place losses); use inplace_backward=False.") from exc
        raise


# ----------------------------------------------------------------------------------------------
# cross-entropy


def _lse_grad(x: Tensor, m: Tensor, r: Tensor, g_lse: Tensor, softcap: Optional[float],
              temperature: float) -> Tensor:
    """``g_lse · d lse / d x = g_lse · softmax(z) · dz/dx`` in the accumulation dtype."""
    xp = _xp()
    xa = x.to(m.dtype)
    z = transform(xp, xa, softcap, temperature)
    m1, r1 = m[:, None], r[:, None]
    p = torch.exp((z - torch.where(torch.isfinite(m1), m1, 0.0)) - r1)
    p = torch.where(m1 == -math.inf, 0.0, torch.where(torch.isfinite(m1), p, math.nan))
    dz = g_lse.to(m.dtype)[:, None] * p
    factor = transform_grad_factor(xp, xa, softcap, temperature)
    return dz if factor is None else dz * factor


class CrossEntropyIndex(torch.autograd.Function):
    """Cross-entropy of rows ``x`` (N, V) with int64 class indices ``labels`` (N,).

    Returns ``(loss, lse)``: ``loss`` reduced as ``reduction`` says, in ``out_dtype``; ``lse``
    (N,) in the accumulation dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, labels: Tensor, weight: Optional[Tensor], ignore_index: int,
                label_smoothing: float, reduction: str, z_loss: float, softcap: Optional[float],
                temperature: float, inplace: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.opts = (ignore_index, label_smoothing, reduction, z_loss, softcap, temperature)
        ctx.inplace = inplace
        k = _eager.kernels_for(x)
        if k is not None and x.shape[0] > 0 and x.shape[1] > 0:
            loss, lse, m_np, r_np = _eager.ce_index_forward(k, x, labels, weight, ignore_index, label_smoothing,
                                                            reduction, z_loss, softcap, temperature)
            ctx.save_for_backward(x, labels, weight)
            ctx.kernels, ctx.mr = k, (m_np, r_np)
            return (loss if loss.dtype == out_dtype else loss.to(out_dtype)), lse
        ctx.kernels = None
        with torch.autocast(x.device.type, enabled=False):
            ce, m, r = _ops_ns.ce_forward(x, labels, weight, ignore_index, label_smoothing, softcap,
                                          temperature)
            xp = _xp()
            validf, wy = row_weights(xp, labels, weight, ignore_index, ce.dtype)
            lse = m + r
            loss = reduce_loss(xp, ce, lse, validf, wy, reduction, z_loss).to(out_dtype)
        ctx.save_for_backward(x, labels, weight, m, r)
        return loss, lse

    @staticmethod
    def backward(ctx: Any, g_loss: Optional[Tensor], g_lse: Optional[Tensor]) -> tuple[Any, ...]:
        if ctx.kernels is not None:
            x, labels, weight = _unpack(ctx)
            m, r = (torch.from_numpy(a) for a in ctx.mr)
        else:
            x, labels, weight, m, r = _unpack(ctx)
        ignore_index, eps, reduction, z_loss, softcap, temperature = ctx.opts
        none = (None,) * 9
        if not ctx.needs_input_grad[0] or (g_loss is None and g_lse is None):
            return (None, None) + none
        if torch.is_grad_enabled():
            return (_ce_index_double(ctx, x, labels, weight, g_loss, g_lse), None) + none
        if ctx.kernels is not None:
            # The lse term needs the logits' values: take it before they may be overwritten.
            extra = None if g_lse is None else _lse_grad(x, m, r, g_lse, softcap, temperature)
            grad = _eager.ce_index_backward(ctx.kernels, x, labels, weight, ctx.mr[0], ctx.mr[1], g_loss,
                                            ignore_index, eps, reduction, z_loss, softcap, temperature, ctx.inplace)
            if extra is not None:
                grad = grad.add_(extra.to(grad.dtype))
            return (grad, None) + none
        xp = _xp()
        acc = m.dtype
        with torch.autocast(x.device.type, enabled=False):
            validf, wy = row_weights(xp, labels, weight, ignore_index, acc)
            go = torch.zeros((), dtype=acc, device=x.device) if g_loss is None else g_loss.to(acc)
            g_ce, g_z = row_scales(xp, validf, wy, reduction, go)
            g_ce = g_ce.expand(m.shape).contiguous()
            g_z = g_z.expand(m.shape).contiguous()
            # The lse term needs the logits' values: take it before they may be overwritten.
            extra = None if g_lse is None else _lse_grad(x, m, r, g_lse, softcap, temperature)
            args = (labels, m, r, g_ce, g_z, weight, ignore_index, eps, z_loss, softcap, temperature)
            if ctx.inplace:
                _ops_ns.ce_backward_(x, *args)
                grad = x
            else:
                grad = _ops_ns.ce_backward(x, *args)
            if extra is not None:
                grad = grad.add_(extra.to(grad.dtype))
        return (grad, None) + none


def _ce_index_double(ctx: Any, x: Tensor, labels: Tensor, weight: Optional[Tensor],
                     g_loss: Optional[Tensor], g_lse: Optional[Tensor]) -> Tensor:
    """Backward with ``create_graph=True``: recompute with differentiable torch ops."""
    if ctx.inplace:
        raise InplaceError(f"{_INPLACE}: higher-order gradients need the logits after the backward; "
                           "use inplace_backward=False.")
    ignore_index, eps, reduction, z_loss, softcap, temperature = ctx.opts
    xp = _xp()
    ce, m, r = core_ce.ce_forward(xp, x, labels, weight=weight, ignore_index=ignore_index,
                                  label_smoothing=eps, softcap=softcap, temperature=temperature)
    validf, wy = row_weights(xp, labels, weight, ignore_index, ce.dtype)
    loss = reduce_loss(xp, ce, m + r, validf, wy, reduction, z_loss)
    return _grad_of(x, (loss, m + r), (g_loss, g_lse))


def _grad_of(x: Tensor, outs: tuple[Tensor, ...], grads: tuple[Optional[Tensor], ...]) -> Tensor:
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if g is not None]
    (gx,) = torch.autograd.grad([o for o, _ in pairs], [x], [g for _, g in pairs], create_graph=True,
                                allow_unused=True)
    return torch.zeros_like(x) if gx is None else gx


class CrossEntropyProb(torch.autograd.Function):
    """Cross-entropy of rows ``x`` (N, V) with probability labels ``y`` (N, V).

    Differentiable in ``x``, ``y`` and the class weights, as torch's probability-target loss is."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, weight: Optional[Tensor], label_smoothing: float,
                reduction: str, z_loss: float, softcap: Optional[float], temperature: float,
                inplace: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        xp = _xp()
        with torch.autocast(x.device.type, enabled=False):
            ce, m, r = _ops_ns.prob_forward(x, y, weight, label_smoothing, softcap, temperature)
            ones = torch.ones_like(ce)
            lse = m + r
            loss = reduce_loss(xp, ce, lse, ones, ones, reduction, z_loss).to(out_dtype)
        ctx.save_for_backward(x, y, weight, m, r)
        ctx.set_materialize_grads(False)
        ctx.opts = (label_smoothing, reduction, z_loss, softcap, temperature)
        ctx.inplace = inplace
        return loss, lse

    @staticmethod
    def backward(ctx: Any, g_loss: Optional[Tensor], g_lse: Optional[Tensor]) -> tuple[Any, ...]:
        x, y, weight, m, r = _unpack(ctx)
        eps, reduction, z_loss, softcap, temperature = ctx.opts
        none = (None,) * 8
        if g_loss is None and g_lse is None:
            return (None, None) + none
        xp = _xp()
        if torch.is_grad_enabled():
            if ctx.inplace:
                raise InplaceError(f"{_INPLACE}: higher-order gradients need the logits after the "
                                   "backward; use inplace_backward=False.")
            ce, m2, r2 = core_ce.prob_forward(xp, x, y, weight=weight, label_smoothing=eps,
                                              softcap=softcap, temperature=temperature)
            ones = torch.ones_like(ce)
            loss = reduce_loss(xp, ce, m2 + r2, ones, ones, reduction, z_loss)
            pairs = [(o, g.to(o.dtype)) for o, g in ((loss, g_loss), (m2 + r2, g_lse)) if g is not None]
            wrt = [t for t, need in zip((x, y, weight), ctx.needs_input_grad[:3]) if need]
            gs = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                          create_graph=True, allow_unused=True))
            out = [gs.pop(0) if need else None for need in ctx.needs_input_grad[:3]]
            return tuple(out) + none[1:]
        acc = m.dtype
        with torch.autocast(x.device.type, enabled=False):
            ones = torch.ones_like(m)
            go = torch.zeros((), dtype=acc, device=x.device) if g_loss is None else g_loss.to(acc)
            g_ce, g_z = row_scales(xp, ones, ones, reduction, go)
            g_ce = g_ce.expand(m.shape)
            gy = None
            if ctx.needs_input_grad[1]:
                # d loss / d y_c = g_ce · (1 − eps) · w_c · (lse − z_c), taken before x may be overwritten
                z = transform(xp, x.to(acc), softcap, temperature)
                nlogp = (m[:, None] - z) + r[:, None]
                scale = g_ce[:, None] * (1.0 - eps)
                if weight is not None:
                    scale = scale * weight.to(acc)
                gy = torch.where(scale == 0, 0.0, scale * nlogp).to(y.dtype)
            gw = None
            if ctx.needs_input_grad[2]:
                # d loss / d w_c = Σ_i g_ce_i · ỹ_ic · (lse_i − z_ic), ỹ the smoothed targets
                z = transform(xp, x.to(acc), softcap, temperature)
                yt = y.to(acc) * (1.0 - eps) + eps / y.shape[-1]
                terms = g_ce[:, None] * yt * ((m[:, None] - z) + r[:, None])
                gw = torch.where(yt == 0, 0.0, terms).sum(0).to(weight.dtype)
            gx = None
            if ctx.needs_input_grad[0]:
                extra = None if g_lse is None else _lse_grad(x, m, r, g_lse, softcap, temperature)
                args = (y, m, r, g_ce.contiguous(), g_z.expand(m.shape).contiguous(), weight, eps, z_loss,
                        softcap, temperature)
                if ctx.inplace:
                    _ops_ns.prob_backward_(x, *args)
                    gx = x
                else:
                    gx = _ops_ns.prob_backward(x, *args)
                if extra is not None:
                    gx = gx.add_(extra.to(gx.dtype))
        return (gx, gy, gw) + none[1:]


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax


class SoftmaxRows(torch.autograd.Function):
    """``softmax(x / T)`` (or ``log_softmax``) of rows ``x`` (N, V); saves only its output.

    Backward runs the fused ``softmax_backward`` stage; with ``create_graph=True`` it uses
    differentiable torch ops on the saved output, so higher-order gradients work.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, temperature: float, log: bool) -> Tensor:
        k = _eager.kernels_for(x)
        if k is not None and x.shape[0] > 0 and x.shape[1] > 0:
            y = _eager.softmax_forward(k, x, temperature, log)
        else:
            k = None
            with torch.autocast(x.device.type, enabled=False):
                op = _ops_ns.log_softmax_forward if log else _ops_ns.softmax_forward
                y = op(x, temperature)
        ctx.save_for_backward(y)
        ctx.temperature, ctx.log, ctx.kernels = temperature, log, k
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            acc = acc_dtype(y.dtype)
            ya, dya = y.to(acc), dy.to(acc)
            if ctx.log:
                dx = dya - torch.exp(ya) * dya.sum(-1, keepdim=True)
            else:
                dx = ya * (dya - (ya * dya).sum(-1, keepdim=True))
            dx = dx.to(y.dtype)
        elif ctx.kernels is not None:
            dx = _eager.softmax_backward(ctx.kernels, y, dy, ctx.log)
        else:
            with torch.autocast(y.device.type, enabled=False):
                op = _ops_ns.log_softmax_backward if ctx.log else _ops_ns.softmax_backward
                dx = op(y, dy)
        if ctx.temperature != 1.0:
            dx = dx / ctx.temperature
        return dx, None, None
