r"""Fused linear + cross-entropy for torch: a drop-in for ``torch.nn.functional.linear_cross_entropy``.

:func:`linear_cross_entropy` takes exactly the arguments of torch 2.13's
``F.linear_cross_entropy`` (``input``, ``linear_weight``, ``target``, keyword ``linear_bias``,
``weight``, ``reduction``, ``ignore_index``, ``label_smoothing``, ``options``) plus the keyword-only
extras ``z_loss``, ``softcap``, ``temperature`` and ``chunk_size``. The logits are never
materialized, in forward or backward; what forward saves for backward is the gradients (``mean`` /
``sum``) or the inputs and two numbers per token (``none``), never an ``N×V`` tensor.

CPU tensors run the chunk driver of :mod:`logitkit.core.linear_cross_entropy` with the numba
kernels through zero-copy NumPy views; CUDA tensors run the Triton linear cross-entropy kernels
when Triton is installed, the chunk driver on torch ops otherwise.

>>> import torch, logitkit.torch as lt
>>> h = torch.randn(64, 32, requires_grad=True); W = torch.randn(1000, 32, requires_grad=True)
>>> y = torch.randint(0, 1000, (64,))
>>> lt.linear_cross_entropy(h, W, y, label_smoothing=0.1).backward()
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _validate
from .. import linear as _public
from .._namespace import NUMPY, TORCH, get_namespace
from ..core import linear_cross_entropy as core
from ..core.reduction import reduce_loss, row_scales, row_weights
from ..kernels import registry
from . import _dtensor, _library

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "linear_token_logprobs", "linear_entropy",
           "TorchOps"]

try:  # bfloat16 NumPy views need ml_dtypes (a dependency of jax); without it bf16 runs the core
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None


def _np_view(t: Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a contiguous CPU tensor (bfloat16 as ``ml_dtypes.bfloat16``)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_ml_dtypes.bfloat16)
    return t.numpy()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchOps:
    """In-place tensor operations for :class:`logitkit.core.linear_cross_entropy.Head`.

    The chunk's logits stay in the input dtype (as ``F.linear`` would give them); the stages
    accumulate in float32. For float16/bfloat16, ``dW`` accumulates in float32 from float32 copies
    of the chunk (4 more bytes per logit of workspace).
    """

    lib = TORCH

    def __init__(self, hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> None:
        self.xp = get_namespace(TORCH)
        self.device = hidden.device
        self.dtype = hidden.dtype
        self.acc = _acc(hidden.dtype)
        self.low = self.acc != self.dtype
        self.W, self.b = linear_weight, linear_bias
        self.logit_dtype = hidden.dtype
        self.logit_bytes = hidden.element_size() + (4 if self.low else 0)

    def empty(self, shape: tuple, dtype: Any) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape: tuple, dtype: Any) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def index(self, idx: np.ndarray) -> Tensor:
        return torch.as_tensor(idx, dtype=torch.int64, device=self.device)

    def rows(self, x: Tensor, sel: Any) -> Tensor:
        return x[sel]

    def put_rows(self, dst: Tensor, sel: Any, src: Tensor) -> None:
        dst[sel] = src.to(dst.dtype)

    def logits(self, h_c: Tensor, c0: int, c1: int, out: Tensor) -> Tensor:
        w = self.W[c0:c1]
        if self.b is not None:
            return torch.addmm(self.b[c0:c1], h_c, w.T, out=out)
        return torch.mm(h_c, w.T, out=out)

    def dh(self, dz: Tensor, c0: int, c1: int, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
        w = self.W[c0:c1]
        if accumulate:
            if out.dtype == w.dtype:
                return out.addmm_(dz, w)
            return out.addmm_(dz.to(out.dtype), w.to(out.dtype))
        if out is not None and out.dtype == w.dtype and out.is_contiguous():
            return torch.mm(dz, w, out=out)
        res = torch.mm(dz, w)
        if out is None:
            return res
        return out.copy_(res)

    def add_dw(self, dw: Tensor, dz: Tensor, h_c: Tensor, c0: int, c1: int) -> None:
        dw[c0:c1].addmm_(dz.T.to(dw.dtype), h_c.to(dw.dtype))

    def add_db(self, db: Tensor, dz: Tensor, c0: int, c1: int) -> None:
        db[c0:c1] += dz.sum(0, dtype=db.dtype)

    def stage(self, name: str, x2: Tensor) -> tuple[str, Any]:
        """The registry's stage for these rows: numba on CPU (through NumPy views), Triton on CUDA."""
        if x2.device.type == "cpu" and (x2.dtype != torch.bfloat16 or _ml_dtypes is not None):
            backend, fn = registry.select(name, NUMPY, _np_view(x2))
            if backend != "core":
                return backend, _via_numpy(fn)
        return registry.select(name, TORCH, x2)

    def kernel_labels(self, labels: Tensor) -> Tensor:
        return labels

    def to_out(self, x: Tensor, dtype: Any) -> Tensor:
        return x if x.dtype == dtype else x.to(dtype)


def _via_numpy(fn: Any) -> Any:
    """Call a NumPy kernel on CPU tensors; its in-place ``out`` writes through the views."""

    def conv(a: Any) -> Any:
        if isinstance(a, Tensor):
            return _np_view(a if a.is_contiguous() else a.contiguous())
        return a

    def back(a: np.ndarray) -> Tensor:
        a = np.ascontiguousarray(a)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def run(*args: Any, **kw: Any) -> Any:
        res = fn(*[conv(a) for a in args], **{k: conv(v) for k, v in kw.items()})
        return tuple(back(a) for a in res) if isinstance(res, tuple) else back(res)

    return run


# ----------------------------------------------------------------------------------------------
# the stages as custom operators: opaque to torch.compile (dynamo never traces numba or the chunk
# driver's host-side planning), with fake implementations that give the shapes symbolically, so a
# new batch size does not recompile. Eager calls run the same functions without the dispatcher.


def _triton_linear() -> Any:
    """The Triton linear cross-entropy kernels, or ``None`` (not installed, or forced to the core)."""
    if registry._forced_core[0]:
        return None
    try:
        from ..kernels.triton import linear_ce
    except Exception:  # no triton / no GPU toolchain: the chunk driver on torch ops
        return None
    return linear_ce


def _chunk_args(chunk_size: Any) -> tuple[int, int]:
    """``chunk_size`` (validated) as two ints for the operators' schema; 0 means automatic."""
    if chunk_size is None:
        return 0, 0
    if isinstance(chunk_size, tuple):
        return int(chunk_size[0]), int(chunk_size[1])
    return int(chunk_size), 0


def _chunk_size(ct: int, cc: int) -> Any:
    if ct == 0:
        return None
    return (ct, cc) if cc else ct


def _opts(weight: Optional[Tensor], ii: int, eps: float, zl: float, cap: Optional[float], T: float) -> dict:
    return dict(weight=weight, ignore_index=ii, label_smoothing=eps, z_loss=zl, softcap=cap, temperature=T)


def _head(h2: Tensor, W: Tensor, lab: Tensor, bias: Optional[Tensor], opts: dict, chunk_size: Any,
          kernels: bool = True) -> core.Head:
    return core.Head(TorchOps(h2, W, bias), h2, W, lab, bias, opts, chunk_size=chunk_size, kernels=kernels)


def _none_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Operator outputs cannot be None: a gradient that is not needed travels as an empty tensor.
    return like.new_empty((0,)) if t is None else t


def _check(check: bool, lab: Tensor, V: int, ii: int) -> None:
    if check:  # under torch.compile the call site could not read the labels
        _validate.check_label_range(TORCH, lab, V, ii, name="target")


def _lce_forward(h2: Tensor, W: Tensor, bias: Optional[Tensor], lab: Tensor, weight: Optional[Tensor], ii: int,
                 eps: float, zl: float, cap: Optional[float], T: float, reduction: str, ct: int, cc: int,
                 check: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, m, r)``: the reduced loss (``(N,)`` for ``"none"``) in the accumulation dtype."""
    _check(check, lab, W.shape[0], ii)
    opts = _opts(weight, ii, eps, zl, cap, T)
    tri = _triton_linear() if h2.is_cuda else None
    if tri is not None:
        ce, m, r = tri.linear_ce_forward(h2, W, lab, bias, weight=weight, ignore_index=ii, label_smoothing=eps,
                                         softcap=cap, temperature=T)
        xp = get_namespace(TORCH)
        validf, wy = row_weights(xp, lab, weight, ii, _acc(h2.dtype))
        loss = reduce_loss(xp, ce, m + r, validf, wy, reduction, zl)
    else:
        head = _head(h2, W, lab, bias, opts, _chunk_size(ct, cc))
        ce, m, r = head.forward()
        loss = head.loss(ce, m, r, reduction)
    return loss.contiguous(), m.contiguous(), r.contiguous()


def _lce_grads(h2: Tensor, W: Tensor, bias: Optional[Tensor], lab: Tensor, weight: Optional[Tensor], ii: int,
               eps: float, zl: float, cap: Optional[float], T: float, reduction: str, ct: int, cc: int,
               need_dh: bool, need_dw: bool, need_db: bool, check: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dh, dw, db)`` of a ``mean``/``sum`` loss, the gradients for a unit ``grad_output``.

    Whole-row chunks compute the gradients during the forward pass (three matrix products, the
    fused strategy); vocabulary tiles recompute the logits here (four).
    """
    _check(check, lab, W.shape[0], ii)
    head = _head(h2, W, lab, bias, _opts(weight, ii, eps, zl, cap, T), _chunk_size(ct, cc))
    g_ce, g_z = head.scales(reduction)
    need = (need_dh, need_dw, need_db and bias is not None)
    if core.choose_strategy(reduction, head.plan, False) == "fused":
        ce, m, r, dh, dw, db = head.forward(g_ce, g_z, need)
    else:
        ce, m, r = head.forward()
        dh, dw, db = head.backward(m, r, g_ce, g_z, need)
    loss = head.loss(ce, m, r, reduction)
    return loss.contiguous(), _none_empty(dh, h2), _none_empty(dw, W), _none_empty(db, h2)


def _lce_backward(h2: Tensor, W: Tensor, bias: Optional[Tensor], lab: Tensor, weight: Optional[Tensor],
                  m: Tensor, r: Tensor, g: Tensor, ii: int, eps: float, zl: float, cap: Optional[float], T: float,
                  reduction: str, ct: int, cc: int, need_dh: bool, need_dw: bool,
                  need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh, dw, db)`` of ``Σ g·loss`` from the saved row statistics, recomputing the logits."""
    need = (need_dh, need_dw, need_db and bias is not None)
    acc = _acc(h2.dtype)
    tri = _triton_linear() if h2.is_cuda else None
    if tri is not None:
        xp = get_namespace(TORCH)
        validf, wy = row_weights(xp, lab, weight, ii, acc)
        g_ce, g_z = row_scales(xp, validf, wy, reduction, g.to(acc))
        dh, dw, db, _ = tri.linear_ce_backward(h2, W, lab, m, r, g_ce, g_z, bias, weight=weight, ignore_index=ii,
                                               label_smoothing=eps, z_loss=zl, softcap=cap, temperature=T)
    else:
        head = _head(h2, W, lab, bias, _opts(weight, ii, eps, zl, cap, T), _chunk_size(ct, cc))
        g_ce, g_z = head.scales(reduction, g.to(acc))
        dh, dw, db = head.backward(m, r, g_ce, g_z, need)
    dh, dw, db = (t if n else None for t, n in zip((dh, dw, db), need))
    return _none_empty(dh, h2), _none_empty(dw, W), _none_empty(db, h2)


def _lent_forward(h2: Tensor, W: Tensor, bias: Optional[Tensor], cap: Optional[float], T: float, ct: int,
                  cc: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(entropy, m, r)`` per row."""
    lab = torch.zeros(h2.shape[0], dtype=torch.int64, device=h2.device)
    head = _head(h2, W, lab, bias, _opts(None, -100, 0.0, 0.0, cap, T), _chunk_size(ct, cc), kernels=False)
    ent, m, r = head.entropy()
    return ent.contiguous(), m.contiguous(), r.contiguous()


def _lent_backward(h2: Tensor, W: Tensor, bias: Optional[Tensor], ent: Tensor, m: Tensor, r: Tensor, g: Tensor,
                   cap: Optional[float], T: float, ct: int, cc: int, need_dh: bool, need_dw: bool,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    need = (need_dh, need_dw, need_db and bias is not None)
    lab = torch.zeros(h2.shape[0], dtype=torch.int64, device=h2.device)
    head = _head(h2, W, lab, bias, _opts(None, -100, 0.0, 0.0, cap, T), _chunk_size(ct, cc), kernels=False)
    dh, dw, db = head.entropy_backward(ent, m, r, g.reshape(-1).to(head.acc), need)
    dh, dw, db = (t if n else None for t, n in zip((dh, dw, db), need))
    return _none_empty(dh, h2), _none_empty(dw, W), _none_empty(db, h2)


_OPS = {}


def _op(name: str, fn: Any, fake: Any) -> None:
    op = _library.define(f"logitkit::{name}")(fn)
    op.register_fake(fake)
    _OPS[name] = fn


def _row_stats_fake(h2: Tensor) -> tuple[Tensor, Tensor]:
    acc = _acc(h2.dtype)
    return h2.new_empty((h2.shape[0],), dtype=acc), h2.new_empty((h2.shape[0],), dtype=acc)


def _loss_fake(h2: Tensor, reduction: str) -> Tensor:
    return h2.new_empty((h2.shape[0],) if reduction == "none" else (), dtype=_acc(h2.dtype))


def _grads_fake(h2, W, bias, need_dh, need_dw, need_db):
    dh = h2.new_empty(h2.shape) if need_dh else h2.new_empty((0,))
    dw = W.new_empty(W.shape) if need_dw else W.new_empty((0,))
    db = bias.new_empty(bias.shape) if need_db and bias is not None else h2.new_empty((0,))
    return dh, dw, db


_op("linear_ce_forward", _lce_forward,
    lambda h2, W, bias, lab, weight, ii, eps, zl, cap, T, reduction, ct, cc, check:
    (_loss_fake(h2, reduction),) + _row_stats_fake(h2))
_op("linear_ce_grads", _lce_grads,
    lambda h2, W, bias, lab, weight, ii, eps, zl, cap, T, reduction, ct, cc, need_dh, need_dw, need_db, check:
    (_loss_fake(h2, reduction),) + _grads_fake(h2, W, bias, need_dh, need_dw, need_db))
_op("linear_ce_backward", _lce_backward,
    lambda h2, W, bias, lab, weight, m, r, g, ii, eps, zl, cap, T, reduction, ct, cc, need_dh, need_dw, need_db:
    _grads_fake(h2, W, bias, need_dh, need_dw, need_db))
_op("linear_entropy_forward", _lent_forward,
    lambda h2, W, bias, cap, T, ct, cc: (h2.new_empty((h2.shape[0],), dtype=_acc(h2.dtype)),) + _row_stats_fake(h2))
_op("linear_entropy_backward", _lent_backward,
    lambda h2, W, bias, ent, m, r, g, cap, T, ct, cc, need_dh, need_dw, need_db:
    _grads_fake(h2, W, bias, need_dh, need_dw, need_db))


def _call(name: str, *args: Any) -> Any:
    """The operator while torch.compile traces (an opaque node), the plain function in eager mode
    (the dispatcher's schema handling costs more than a small head's whole kernel)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.logitkit, name)(*args)
    return _OPS[name](*args)


# ----------------------------------------------------------------------------------------------
# autograd


def _rows(hidden: Tensor) -> Tensor:
    """``hidden`` as contiguous rows ``(N, H)``; an explicit ``N`` also when ``H`` is 0."""
    h2 = hidden if hidden.dim() == 2 else hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
    return h2.contiguous()


def _scale_(t: Optional[Tensor], g: Tensor, fresh: bool) -> Optional[Tensor]:
    """``t * g``; in place (no second gradient-sized buffer) unless the graph is kept."""
    if t is None:
        return None
    if torch.compiler.is_compiling():
        return t * g.to(t.dtype)
    if t.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0:
        return t.clone() if fresh else t
    return t * g.to(t.dtype) if fresh else t.mul_(g.to(t.dtype))


def _keep_graph() -> bool:
    """Whether this backward keeps the graph (``retain_graph=True``): then saved buffers must survive."""
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):  # older torch: assume the graph is kept (safe)
        return True


def _grads_in_forward(h2: Tensor, reduction: str, need: tuple) -> bool:
    """The fused strategy (gradients made by the forward pass) where it applies: see
    :func:`core.choose_strategy`; CUDA's Triton kernels recompute by design."""
    if not any(need) or reduction == "none":
        return False
    if h2.is_cuda and _triton_linear() is not None:
        return False
    return os.environ.get("LOGITKIT_LCE_STRATEGY", "").lower() != "recompute"


class _LinearCE(torch.autograd.Function):
    """Loss of the head ``hidden @ W.T + b``; forward saves the gradients (fused) or the inputs
    and two numbers per row (recompute), never the logits."""

    @staticmethod
    def forward(ctx, hidden, linear_weight, linear_bias, labels, weight, ii, eps, zl, cap, T, reduction, ct, cc,
                check):
        h2 = _rows(hidden)
        W = linear_weight.contiguous()
        lab = labels.reshape(h2.shape[0])
        if lab.dtype != torch.int64:
            lab = lab.long()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                linear_bias is not None and ctx.needs_input_grad[2])
        ctx.need, ctx.hidden_shape, ctx.reduction = need, hidden.shape, reduction
        ctx.args = (ii, eps, zl, cap, T, reduction, ct, cc)
        if _grads_in_forward(h2, reduction, need):
            loss, dh, dw, db = _call("linear_ce_grads", h2, W, linear_bias, lab, weight, ii, eps, zl, cap, T,
                                     reduction, ct, cc, need[0], need[1], need[2], check)
            ctx.mode = "fused"
            ctx.save_for_backward(dh, dw, db)
        else:
            loss, m, r = _call("linear_ce_forward", h2, W, linear_bias, lab, weight, ii, eps, zl, cap, T, reduction,
                               ct, cc, check)
            ctx.mode = "recompute"
            if any(need):
                ctx.save_for_backward(h2, W, linear_bias, lab, weight, m, r)
        return _shape_loss(loss, reduction, labels.shape).to(hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need = ctx.need
        if ctx.mode == "fused":
            if getattr(ctx, "consumed", False):
                raise RuntimeError("linear_cross_entropy: backward ran twice through a graph that was not "
                                   "retained; pass retain_graph=True to the first backward")
            dh, dw, db = ctx.saved_tensors
            fresh = _keep_graph()
            ctx.consumed = not fresh
            g = grad.reshape(())
            dh, dw, db = (_scale_(t, g, fresh) if n else None for t, n in zip((dh, dw, db), need))
        else:
            h2, W, bias, lab, weight, m, r = ctx.saved_tensors
            ii, eps, zl, cap, T, reduction, ct, cc = ctx.args
            g = grad.reshape(h2.shape[0]) if reduction == "none" else grad.reshape(())
            dh, dw, db = _call("linear_ce_backward", h2, W, bias, lab, weight, m, r, g.contiguous(), ii, eps, zl,
                               cap, T, reduction, ct, cc, need[0], need[1], need[2])
        dh = dh.reshape(ctx.hidden_shape) if need[0] else None
        return (dh, dw if need[1] else None, db if need[2] else None) + (None,) * 11


def _shape_loss(loss: Tensor, reduction: str, shape: Any) -> Tensor:
    return loss.reshape(shape) if reduction == "none" else loss.reshape(())


def fused_linear_cross_entropy(hidden: Tensor, linear_weight: Tensor, labels: Tensor, linear_bias: Optional[Tensor],
                               opts: dict, reduction: str, chunk_size: Any) -> Tensor:
    """Validated arguments in, differentiable loss out (the adapter of :func:`logitkit.linear_cross_entropy`)."""
    weight = opts["weight"]
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # As torch's own loss refuses it; a weight.grad silently left at None would be a wrong result.
        raise ValueError("weight: cross-entropy with class indices is not differentiable with respect to "
                         "weight (as in torch); pass weight.detach()")
    ct, cc = _chunk_args(chunk_size)
    return _LinearCE.apply(hidden, linear_weight, linear_bias, labels, weight, opts["ignore_index"],
                           opts["label_smoothing"], opts["z_loss"], opts["softcap"], opts["temperature"], reduction,
                           ct, cc, torch.compiler.is_compiling())


def _entropy_spec(cap: Optional[float], T: float) -> Any:
    from ..core.linear_head import HeadSpec

    return HeadSpec(("entropy",), -100, 0.0, cap, T, False, "none", "kl", 0.5, 1.0, False)


class _LinearEntropy(torch.autograd.Function):
    """Entropy per token; backward recomputes the logits (the per-token ``grad`` is unknown before)."""

    @staticmethod
    def forward(ctx, hidden, linear_weight, linear_bias, cap, T, ct, cc):
        h2 = _rows(hidden)
        W = linear_weight.contiguous()
        ent, m, r = _call("linear_entropy_forward", h2, W, linear_bias, cap, T, ct, cc)
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                    linear_bias is not None and ctx.needs_input_grad[2])
        ctx.hidden_shape, ctx.args = hidden.shape, (cap, T, ct, cc)
        if any(ctx.need):
            ctx.save_for_backward(h2, W, linear_bias, ent, m, r)
        return ent.reshape(hidden.shape[:-1]).to(hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h2, W, bias, ent, m, r = ctx.saved_tensors
        need = ctx.need
        dh, dw, db = _call("linear_entropy_backward", h2, W, bias, ent, m, r, grad.reshape(h2.shape[0]).contiguous(),
                           *ctx.args, need[0], need[1], need[2])
        dh = dh.reshape(ctx.hidden_shape) if need[0] else None
        return (dh, dw if need[1] else None, db if need[2] else None) + (None,) * 4


def fused_linear_entropy(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], opts: dict,
                         chunk_size: Any) -> Tensor:
    """Adapter of :func:`logitkit.linear_entropy` for tensors (differentiable).

    Whole rows (``chunk_size`` ``None``, tokens per chunk, or tiles as wide as the vocabulary) run
    the fused head's chunk loop and operators (:func:`logitkit.torch.head.head_values`, its numba
    row pass on CPU: 1.3x faster at N=1024, H=256, V=32000 forward+backward, 2.8x at 256 x 64 x
    1000); vocabulary tiles keep the online merge across tiles (:class:`_LinearEntropy`).
    """
    ct, cc = _chunk_args(chunk_size)
    if cc == 0 or cc >= linear_weight.shape[0]:
        from . import head

        vals = head.head_values(hidden, linear_weight, linear_bias, None, None, None, None,
                                _entropy_spec(opts["softcap"], opts["temperature"]), chunk_size)
        return vals["ent"].reshape(hidden.shape[:-1]).to(hidden.dtype)
    return _LinearEntropy.apply(hidden, linear_weight, linear_bias, opts["softcap"], opts["temperature"], ct, cc)


# ----------------------------------------------------------------------------------------------
# torch.nn.functional-compatible entry points


_PLAIN = (Tensor, torch.nn.Parameter, type(None))


def _plain(*xs: Any) -> bool:
    """Every argument a plain tensor, parameter or ``None``: then none is a DTensor.

    Checked before :func:`logitkit.torch._dtensor.is_dtensor`, whose cached DTensor class is a
    mutable global: under torch.compile, reading it guards the graph on its value, which changes
    (one recompile) once anything imports ``torch.distributed.tensor``. Types are guarded anyway.
    """
    for x in xs:
        if type(x) not in _PLAIN:
            return False
    return True


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options: Any = None, z_loss: float = 0.0,
                         softcap: Optional[float] = None, temperature: float = 1.0,
                         chunk_size: Any = None, num_items_in_batch: Any = None) -> Tensor:
    r"""Drop-in for ``torch.nn.functional.linear_cross_entropy`` that never materializes the logits.

    Same result as ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``.

    Args:
      input: ``(H,)`` or ``(N, H)`` (any ``(..., H)`` is accepted). linear_weight: ``(C, H)``.
      target: class indices ``()`` / ``(N,)`` (int64), or probabilities of the logits' shape.
      linear_bias: ``(C,)``. weight, reduction, label_smoothing: as in ``F.cross_entropy``.
      ignore_index: ``None`` means -100 (torch's default); not allowed with probabilities.
      options: a ``torch.nn.LinearCrossEntropyOptions`` (accepted for compatibility; its
        ``batch_chunk_size`` sets the tokens per chunk when ``chunk_size`` is not given).
      z_loss, softcap, temperature: keyword-only extras as in :func:`logitkit.cross_entropy`.
      chunk_size: ``None`` (auto), tokens per chunk, or ``(tokens, classes)``.
      num_items_in_batch: int or 0-d tensor (Hugging Face's meaning): ``"mean"`` is the (weighted)
        sum, z-loss included, divided by it (see :func:`logitkit.torch.global_num_items`).

    DTensor arguments (a ``ColwiseParallel`` head ``Shard(0)``, token-sharded ``Shard(0)`` input
    and target, ``Replicate``) and FSDP2-sharded weights run :mod:`logitkit.torch._dtensor`.

    Probability targets and K-dimensional weights ``(C, d1, ..., H)`` are computed on the full
    logits (as torch itself does for them).

    >>> import torch, logitkit.torch as lt
    >>> h = torch.randn(4, 8); W = torch.randn(10, 8); y = torch.tensor([1, 2, 3, -100])
    >>> torch.allclose(lt.linear_cross_entropy(h, W, y),
    ...                torch.nn.functional.cross_entropy(h @ W.T, y), atol=1e-6)
    True
    """
    if num_items_in_batch is not None or (not _plain(input, linear_weight, target, linear_bias, weight)
                                          and _dtensor.is_dtensor(input, linear_weight, target, linear_bias, weight)):
        return _dtensor.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                             reduction=reduction, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, options=options, z_loss=z_loss,
                                             softcap=softcap, temperature=temperature, chunk_size=chunk_size,
                                             num_items_in_batch=num_items_in_batch)
    if options is not None and chunk_size is None:
        if not hasattr(options, "batch_chunk_size"):
            raise TypeError(f"options: expected a torch.nn.LinearCrossEntropyOptions or None, got "
                            f"{type(options).__name__}")
        chunk_size = options.batch_chunk_size
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if input.dim() < 1:
        raise ValueError("input: expected at least 1 dimension (in_features), got a scalar")
    if linear_weight.dim() < 2:
        raise ValueError(f"linear_weight: expected at least 2 dimensions (C, in_features), got shape "
                         f"{tuple(linear_weight.shape)}")
    if input.dim() == 1 and linear_weight.dim() > 2:
        # torch refuses this too: an unbatched input has no batch dim to put d1, ..., dK after.
        raise ValueError(f"input: a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}) "
                         f"needs batched input (N, {linear_weight.shape[-1]}), got unbatched input of shape "
                         f"{tuple(input.shape)}, as in torch")
    if target.is_floating_point() or linear_weight.dim() > 2:
        return _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap, temperature)
    ii = -100 if ignore_index is None else ignore_index
    if input.dim() == 1:
        loss = linear_cross_entropy(input.unsqueeze(0), linear_weight, target.reshape(1), linear_bias=linear_bias,
                                    weight=weight, reduction=reduction, ignore_index=ii,
                                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                    temperature=temperature, chunk_size=chunk_size)
        return loss.reshape(()) if reduction == "none" else loss
    from .._namespace import namespace_of

    lib, _ = namespace_of(input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                          weight=weight)
    chunk_size = _public.validate_head(lib, input, linear_weight, target, linear_bias, weight, ignore_index=ii,
                                       label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                                       softcap=softcap, temperature=temperature, chunk_size=chunk_size,
                                       names=("input", "linear_weight", "target"))
    opts = _public._opts(weight, ii, label_smoothing, z_loss, softcap, temperature)
    return fused_linear_cross_entropy(input, linear_weight, target, linear_bias, opts, reduction, chunk_size)


def _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
             z_loss, softcap, temperature) -> Tensor:
    """Probability targets / K-dimensional heads: the logits in full, then the cross-entropy."""
    if target.is_floating_point() and ignore_index is not None:
        raise ValueError("ignore_index: cannot be given when target contains class probabilities")
    C, H = linear_weight.shape[0], linear_weight.shape[-1]
    if input.shape[-1] != H:
        raise ValueError(f"linear_weight: expected in_features {input.shape[-1]} (input's last dimension), "
                         f"got shape {tuple(linear_weight.shape)}")
    out_features = tuple(linear_weight.shape[1:-1])
    logits = torch.nn.functional.linear(input, linear_weight.reshape(-1, H),
                                        None if linear_bias is None else linear_bias.reshape(-1))
    logits = logits.reshape(*input.shape[:-1], C, *out_features)
    from .. import functional

    return functional.cross_entropy(logits, target, axis=0 if input.dim() == 1 else 1, weight=weight,
                                    ignore_index=-100 if ignore_index is None else ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                                    softcap=softcap, temperature=temperature)


def _tensors(**named: Any) -> None:
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def linear_token_logprobs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = None, ignore_index: int = -100,
                          softcap: Optional[float] = None, temperature: float = 1.0,
                          chunk_size: Any = None) -> Tensor:
    """``log softmax(input @ W.T + b)[target]`` per token, differentiable; 0 where ignored.

    >>> import torch, logitkit.torch as lt
    >>> lt.linear_token_logprobs(torch.ones(1, 2), torch.zeros(4, 2), torch.tensor([3]))  # log 1/4
    tensor([-1.3863])
    """
    _tensors(input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias)
    chunk_size = _public.validate_head(TORCH, input, linear_weight, target, linear_bias, None,
                                       ignore_index=ignore_index, softcap=softcap, temperature=temperature,
                                       chunk_size=chunk_size, names=("input", "linear_weight", "target"))
    opts = _public._opts(None, ignore_index, 0.0, 0.0, softcap, temperature)
    return -fused_linear_cross_entropy(input, linear_weight, target, linear_bias, opts, "none", chunk_size)


def linear_entropy(input: Tensor, linear_weight: Tensor, *, linear_bias: Optional[Tensor] = None,
                   softcap: Optional[float] = None, temperature: float = 1.0, chunk_size: Any = None) -> Tensor:
    """Entropy of ``softmax(input @ W.T + b)`` per token, differentiable.

    >>> import torch, logitkit.torch as lt
    >>> lt.linear_entropy(torch.ones(1, 2), torch.zeros(4, 2))  # log 4
    tensor([1.3863])
    """
    _tensors(input=input, linear_weight=linear_weight, linear_bias=linear_bias)
    chunk_size = _public.validate_head(TORCH, input, linear_weight, None, linear_bias, None, softcap=softcap,
                                       temperature=temperature, chunk_size=chunk_size,
                                       names=("input", "linear_weight", "target"))
    opts = _public._opts(None, -100, 0.0, 0.0, softcap, temperature)
    return fused_linear_entropy(input, linear_weight, linear_bias, opts, chunk_size)


class LinearCrossEntropyLoss(torch.nn.Module):
    r"""Drop-in for ``torch.nn.LinearCrossEntropyLoss``: a ``Linear`` head and its fused loss.

    Same constructor (``in_features, num_classes, *, out_features=(), bias=False, device, dtype,
    reduction, weight, ignore_index, label_smoothing, options``) and the same parameters
    (``self.linear``, so state dicts load either way), plus the keyword-only extras ``z_loss``,
    ``softcap``, ``temperature`` and ``chunk_size``. ``forward(input, target)``.

    >>> import torch, logitkit.torch as lt
    >>> crit = lt.LinearCrossEntropyLoss(16, 100, bias=True, z_loss=1e-4)
    >>> crit(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device: Any = None, dtype: Any = None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options: Any = None,
                 z_loss: float = 0.0, softcap: Optional[float] = None, temperature: float = 1.0,
                 chunk_size: Any = None) -> None:
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight: expected shape ({num_classes},), got {tuple(weight.shape)}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss, self.softcap, self.temperature = z_loss, softcap, temperature
        self.chunk_size = _public.check_chunk_size(chunk_size)
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        W = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        b = self.linear.bias
        if b is not None:
            b = b.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(input, W, target, linear_bias=b, weight=self.weight, reduction=self.reduction,
                                    ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                    options=self.options, z_loss=self.z_loss, softcap=self.softcap,
                                    temperature=self.temperature, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction!r}")
