r"""The fused LM head for torch: the autograd of :func:`logitkit.linear_head`.

One ``torch.autograd.Function`` returns the per-token values a call needs (cross-entropy terms,
lse, log-probabilities, entropy, divergence; argmax without gradient) from the chunk driver of
:mod:`logitkit.core.linear_head` on torch ops; the reduction of the loss (and its z-loss, through
``lse``) is ordinary torch arithmetic on them, so autograd hands the function one cotangent per
token and output, and its backward combines them all in one pass that recomputes the logits chunk
by chunk (four matrix products, five with a teacher head). Saved for backward: the inputs and a
few numbers per token, never an ``N×V`` tensor. ``outputs=("loss",)`` with a scalar temperature
never reaches this module (it is :func:`logitkit.torch.linear_cross_entropy`).

>>> import torch, logitkit.torch as lt
>>> h = torch.randn(6, 8, requires_grad=True); W = torch.randn(50, 8); y = torch.randint(0, 50, (6,))
>>> out = lt.linear_head(h, W, y, outputs=("logprobs", "entropy"))
>>> (out.logprobs.sum() + 0.01 * out.entropy.sum()).backward(); h.grad.shape
torch.Size([6, 8])
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import linear as _public
from ..core import linear_head as core_head
from . import _dtensor
from .linear import TorchOps

__all__ = ["linear_head", "fused_linear_head", "with_grad_run"]

_DIFF_KEYS = ("ce", "lse", "lp", "ent", "kl")


def _keys(spec: core_head.HeadSpec) -> tuple:
    o = spec.outputs
    keys = []
    if "loss" in o:
        keys.append("ce")
    if "lse" in o or spec.need_lse:
        keys.append("lse")
    if "logprobs" in o:
        keys.append("lp")
    if "entropy" in o:
        keys.append("ent")
    if "kl" in o:
        keys.append("kl")
    return tuple(keys)


def _flat(t: Optional[Tensor], N: int, last: Optional[int] = None) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.detach()
    t = t.reshape(N) if last is None else t.reshape(N, last)
    return t if t.is_contiguous() else t.contiguous()


class _Cfg:
    def __init__(self, a: Any, keys: tuple) -> None:
        self.a, self.keys = a, keys


def _run(cfg: _Cfg, h2: Tensor, W: Tensor, b: Optional[Tensor], lab: Optional[Tensor],
         temp: Optional[Tensor]) -> core_head.HeadRun:
    a = cfg.a
    N = h2.shape[0]
    teacher, tops = None, None
    if a.teacher is not None:
        kind = a.teacher[0]
        if kind == "head":
            th = _flat(a.teacher[1], N, a.teacher[1].shape[-1])
            tW = a.teacher[2].detach().contiguous()
            tb = None if a.teacher[3] is None else a.teacher[3].detach()
            tops = TorchOps(th, tW, tb)
            teacher = ("head", th)
        elif kind == "logits":
            teacher = ("logits", _flat(a.teacher[1], N, a.teacher[1].shape[-1]))
        else:
            k = a.teacher[1].shape[-1]
            teacher = ("topk", _flat(a.teacher[1], N, k).long(), _flat(a.teacher[2], N, k))
    return core_head.HeadRun(TorchOps(h2, W, b), h2, W, lab, temp, a.weight, a.spec, teacher, tops,
                             a.chunk_size)


class _LinearHead(torch.autograd.Function):
    """Per-token values of the head; backward recomputes the logits once for every cotangent."""

    @staticmethod
    def forward(ctx, hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], cfg: _Cfg):
        a = cfg.a
        H = hidden.shape[-1]
        h2 = hidden.detach().reshape(-1, H).contiguous()
        N = h2.shape[0]
        W = linear_weight.detach().contiguous()
        b = None if linear_bias is None else linear_bias.detach()
        lab = None if a.labels is None else _flat(a.labels, N).long()
        temp = _flat(a.temp, N)
        run = _run(cfg, h2, W, b, lab, temp)
        rows = run.forward()
        valid = None if lab is None else lab != a.spec.ignore_index
        lse = rows["m"] + rows["r"]
        rows_out = dict(rows, lse=lse if valid is None else torch.where(valid, lse, 0.0))
        ctx.cfg = cfg
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                    linear_bias is not None and ctx.needs_input_grad[2])
        ctx.hidden_shape = tuple(hidden.shape)
        ctx.set_materialize_grads(False)
        if any(ctx.need):
            saved = [rows[k] for k in ("m", "r", "ent", "aux") if k in rows]
            ctx.row_keys = [k for k in ("m", "r", "ent", "aux") if k in rows]
            ctx.save_for_backward(h2, W, b, lab, temp, *saved)
        outs = [rows_out[k] for k in cfg.keys]
        if "am" in rows:
            am = rows["am"]
            ctx.mark_non_differentiable(am)
            outs.append(am)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        cfg, need = ctx.cfg, ctx.need
        if not any(need):
            return None, None, None, None
        h2, W, b, lab, temp, *saved = ctx.saved_tensors
        rows = dict(zip(ctx.row_keys, saved))
        cots = {}
        for k, g in zip(cfg.keys, grads):
            if g is not None:
                cots["g_" + k] = g.reshape(-1)
        if not cots:
            return None, None, None, None
        run = _run(cfg, h2, W, b, lab, temp)
        dh, dw, db = run.backward(rows, cots, need, has_bias=b is not None)
        if dw is not None:
            dw = dw.to(W.dtype)
        if db is not None:
            db = db.to(b.dtype)
        dh = None if dh is None else dh.reshape(ctx.hidden_shape)
        return dh, dw, db, None


def with_grad_run(a: Any) -> tuple:
    """``(HeadRun, labels (N,) or None, torch namespace)`` for :func:`logitkit.linear.linear_head_with_grad`."""
    from .._namespace import TORCH, get_namespace

    H = a.hidden.shape[-1]
    h2 = a.hidden.detach().reshape(-1, H).contiguous()
    N = h2.shape[0]
    W = a.W.detach().contiguous()
    b = None if a.bias is None else a.bias.detach()
    lab = None if a.labels is None else _flat(a.labels, N).long()
    run = _run(_Cfg(a, _keys(a.spec)), h2, W, b, lab, _flat(a.temp, N))
    return run, lab, get_namespace(TORCH)


def fused_linear_head(a: Any) -> Any:
    """Validated :class:`logitkit.linear.HeadArgs` of torch tensors in, :class:`HeadOutput` out."""
    keys = _keys(a.spec)
    cfg = _Cfg(a, keys)
    res = _LinearHead.apply(a.hidden, a.W, a.bias, cfg)
    vals = dict(zip(keys, res[:len(keys)]))
    if "argmax" in a.spec.outputs:
        vals["am"] = res[len(keys)]
    N = vals[keys[0]].shape[0] if keys else res[-1].shape[0]
    lab = (torch.zeros(N, dtype=torch.int64, device=a.hidden.device) if a.labels is None
           else a.labels.reshape(-1).long())
    from .._namespace import TORCH, get_namespace

    return _public.assemble_outputs(get_namespace(TORCH), a, vals, lab)


def linear_head(input: Tensor, linear_weight: Tensor, labels: Optional[Tensor] = None, **kwargs: Any) -> Any:
    """:func:`logitkit.linear_head` for torch tensors (every option keyword-only, as there)."""
    if _dtensor.is_dtensor(input, linear_weight, labels, kwargs.get("linear_bias"), kwargs.get("weight")):
        return _dtensor.linear_head(input, linear_weight, labels, **kwargs)
    if not isinstance(input, Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(input).__name__}")
    return _public.linear_head(input, linear_weight, labels, **kwargs)
