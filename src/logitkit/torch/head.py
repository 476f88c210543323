r"""The fused LM head for torch: the autograd of :func:`logitkit.linear_head`.

One ``torch.autograd.Function`` returns the per-token values a call needs (cross-entropy terms,
lse, log-probabilities, entropy, divergence; argmax without gradient) from the chunk driver of
:mod:`logitkit.core.linear_head` on torch ops; the reduction of the loss (and its z-loss, through
``lse``) is ordinary torch arithmetic on them, so autograd hands the function one cotangent per
token and output, and its backward combines them all in one pass that recomputes the logits chunk
by chunk (four matrix products, five with a teacher head). Saved for backward: the inputs and a
few numbers per token, never an ``N×V`` tensor. ``outputs=("loss",)`` with a scalar temperature
never reaches this module (it is :func:`logitkit.torch.linear_cross_entropy`).

Which route runs where, inside the operators' bodies (:func:`_head_forward`, :func:`_head_backward`):

* CUDA tensors with Triton installed, outputs drawn from ``loss`` / ``logprobs`` / ``entropy`` /
  ``lse``, no teacher, a scalar temperature: the Triton kernels, the logits never in memory
  (:func:`_triton_head` chooses). Forward is one launch over the head: the head kernel of
  :mod:`logitkit.kernels.triton.linear_head` (lse, logprobs, entropy; an unsmoothed loss, class
  weights included, is ``-w_y logprobs``), or the loss kernel of
  :mod:`logitkit.kernels.triton.linear_ce` for a loss alone (with ``lse``); a smoothed loss with
  logprobs or entropy takes both (two passes). Backward is one pass: the loss kernel's for the loss
  alone, the head kernel's for every other mixture (the loss's cotangent spread over logprobs, lse
  and the smoothing sum; z-loss arrives as the cotangent of ``lse``). Class weights, label smoothing,
  softcap, ``ignore_index`` and z-loss are all covered. A bad label gives a NaN row and raises at a
  later call through the deferred check of :mod:`logitkit.kernels.triton._labels`, whose poll runs
  before each forward launch here.
* Everything else — CPU tensors, ``argmax``, ``kl`` (any teacher), per-token temperatures, no
  Triton — runs the chunk driver (numba row pass on CPU, torch ops on CUDA). Both routes give the
  same per-row values: accumulation dtype, ignored rows 0 (``m, r`` included), ``lse = m + r``.

Under ``torch.compile`` the chunk driver (its host-side planning of the rows not ignored, numba)
stays inside two custom operators, ``logitkit::linear_head_forward`` and
``logitkit::linear_head_backward``, whose fake implementations give the outputs' shapes from the
symbolic batch size: no graph break, no recompile for a new batch size. Their arguments are the
options flattened into tensors, numbers and strings. Eager calls run the same functions without
the dispatcher (:func:`logitkit.torch.linear._call`). Checks that read tensor values (label range,
per-token temperatures, top-k indices, a 0-d ``num_items_in_batch``) run at the call site in
eager mode and, under ``torch.compile``, inside the forward operator when it runs — on CPU
tensors only, so that nothing waits for a device inside the compiled region.

>>> import torch, logitkit.torch as lt
>>> h = torch.randn(6, 8, requires_grad=True); W = torch.randn(50, 8); y = torch.randint(0, 50, (6,))
>>> out = lt.linear_head(h, W, y, outputs=("logprobs", "entropy"))
>>> (out.logprobs.sum() + 0.01 * out.entropy.sum()).backward(); h.grad.shape
torch.Size([6, 8])
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor

from .. import _validate
from .. import linear as _public
from .._namespace import TORCH, get_namespace
from ..core import linear_head as core_head
from ..kernels.triton import _labels as _triton_labels  # imports torch only, not triton
from . import _dtensor
from .linear import (TorchOps, _acc, _call, _chunk_args, _chunk_size, _grads_fake, _none_empty, _op, _plain,
                     _rows)

__all__ = ["linear_head", "fused_linear_head", "with_grad_run", "head_values"]

# the forward operator's outputs, in this order; those a call does not need are empty tensors
_FWD = ("m", "r", "ce", "lse", "lp", "ent", "kl", "aux", "am")


def _keys(spec: core_head.HeadSpec) -> tuple:
    """The differentiable per-row values the autograd Function returns for ``spec``, in order."""
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


@functools.lru_cache(maxsize=256)
def _spec(outputs: str, ii: int, eps: float, cap: Optional[float], T: float, has_labels: bool, kind: str,
          div: str, beta: float, tt: float, need_lse: bool) -> core_head.HeadSpec:
    teacher = "none" if kind == "none" else ("topk" if kind == "topk" else "dense")
    return core_head.HeadSpec(tuple(outputs.split(",")), ii, eps, cap, T, has_labels, teacher, div, beta, tt,
                              need_lse)


def _static(spec: core_head.HeadSpec, kind: str, chunk_size: Any) -> tuple:
    """The operators' non-tensor arguments of one call (what dynamo passes as constants)."""
    ct, cc = _chunk_args(chunk_size)
    return (",".join(spec.outputs), spec.ignore_index, spec.label_smoothing, spec.softcap, spec.temperature, kind,
            spec.divergence, spec.beta, spec.teacher_temperature, spec.need_lse, ct, cc)


def _make_run(spec: core_head.HeadSpec, h2: Tensor, W: Tensor, b: Optional[Tensor], lab: Optional[Tensor],
              temp: Optional[Tensor], weight: Optional[Tensor], kind: str, t0: Optional[Tensor],
              t1: Optional[Tensor], t2: Optional[Tensor], chunk_size: Any) -> core_head.HeadRun:
    """The chunk driver on torch ops; ``(t0, t1, t2)`` the teacher's tensors in rows (see :func:`_teacher`)."""
    teacher, tops = None, None
    if kind == "head":
        tops = TorchOps(t0, t1, t2)
        teacher = ("head", t0)
    elif kind == "logits":
        teacher = ("logits", t0)
    elif kind == "topk":
        teacher = ("topk", t0, t1)
    return core_head.HeadRun(TorchOps(h2, W, b), h2, W, lab, temp, weight, spec, teacher, tops, chunk_size)


def _runtime_checks(h2: Tensor, V: int, lab: Optional[Tensor], ii: int, temp: Optional[Tensor], kind: str,
                    t0: Optional[Tensor], t1: Optional[Tensor], num_items: Optional[Tensor]) -> None:
    """The value checks of :func:`logitkit.linear.validate_linear_head` that a compiled call site
    skipped (it could not read the tensors); CPU tensors only, as there."""
    if lab is not None:
        _validate.check_label_range(TORCH, lab, V, ii, name="labels")
    if temp is not None and temp.device.type == "cpu" and temp.numel():
        ok = torch.isfinite(temp) & (temp > 0)
        if not bool(ok.all()):
            bad = temp.reshape(-1)[~ok.reshape(-1)][0]
            raise ValueError(f"temperature: expected finite values > 0 for every token, got {float(bad)}")
    if kind == "topk":
        _public._check_teacher(TORCH, h2, V, ("kl",), None, None, None, None, (t0, t1))
    if num_items is not None and num_items.device.type == "cpu" and not float(num_items) > 0:
        raise ValueError(f"num_items_in_batch: expected a value > 0, got {float(num_items)}")


# ----------------------------------------------------------------------------------------------
# the Triton route (CUDA tensors)

_TRITON_OUTPUTS = frozenset(("loss", "logprobs", "entropy", "lse"))


def _triton_supported(h2: Tensor, W: Tensor, spec: core_head.HeadSpec, kind: str, temp: Optional[Tensor]) -> bool:
    """Whether the Triton kernels compute this call exactly: outputs among loss / logprobs /
    entropy / lse, no teacher, a scalar temperature, one dtype, a non-empty problem."""
    return (kind == "none" and temp is None and _TRITON_OUTPUTS.issuperset(spec.outputs)
            and W.dtype == h2.dtype and h2.shape[0] > 0 and W.shape[0] > 0)


def _triton_head(h2: Tensor, W: Tensor, spec: core_head.HeadSpec, kind: str, temp: Optional[Tensor]) -> Any:
    """The Triton head kernels (:mod:`logitkit.kernels.triton.linear_head`, which also carries the
    loss kernels of :mod:`~logitkit.kernels.triton.linear_ce`) for this call, or ``None``: the
    chunk driver on torch ops (CPU tensors, Triton missing or forced to the core, or a call they
    do not cover, see :func:`_triton_supported`)."""
    if not h2.is_cuda or not _triton_supported(h2, W, spec, kind, temp):
        return None
    from ..kernels import registry

    if registry._forced_core[0]:
        return None
    try:
        from ..kernels.triton import linear_head as tri
    except Exception:  # no triton / no GPU toolchain
        return None
    return tri


def _triton_forward(tri: Any, spec: core_head.HeadSpec, h2: Tensor, W: Tensor, bias: Optional[Tensor],
                    lab: Optional[Tensor], weight: Optional[Tensor]) -> dict:
    """Per-row values as :meth:`HeadRun.forward` gives them (ignored rows 0, ``m, r`` included),
    plus ``lse`` when needed, from one pass over the head (two for a smoothed loss with logprobs
    or entropy: the smoothing sum is the loss kernel's)."""
    o = spec.outputs
    ii, eps = spec.ignore_index, spec.label_smoothing
    opts = dict(ignore_index=ii, softcap=spec.softcap, temperature=spec.temperature)
    want_lp, want_ent = "logprobs" in o, "entropy" in o
    # the loss kernel for a loss alone, or for one the head kernel cannot give (smoothing)
    use_ce = "loss" in o and (eps > 0.0 or not (want_lp or want_ent))
    rows = {}
    if use_ce:
        rows["ce"], m, r = tri.linear_ce_forward(h2, W, lab, bias, weight=weight, label_smoothing=eps, **opts)
        lse = m + r
    if not use_ce or want_lp or want_ent:
        lse, lp, ent, m, r = tri.linear_head_forward(h2, W, lab, bias, **opts)
        if want_lp:
            rows["lp"] = lp
        if want_ent:
            rows["ent"] = ent
        if "loss" in o and not use_ce:
            # no smoothing: ce = w_y (-logprobs), the loss kernel's formula for eps = 0 (NaN for a bad label)
            nll = -lp
            if weight is not None:
                V = W.shape[0]
                safe = torch.where((lab >= 0) & (lab < V), lab, 0)
                nll = weight.to(nll.dtype)[safe] * nll
            rows["ce"] = torch.where(lab != ii, nll, 0.0)
    if lab is not None:
        keep = lab != ii
        m, r = torch.where(keep, m, 0.0), torch.where(keep, r, 0.0)  # the driver never visits ignored rows
        if "lse" in o or spec.need_lse:
            lse = torch.where(keep, lse, 0.0)
    rows["m"], rows["r"] = m, r
    if "lse" in o or spec.need_lse:
        rows["lse"] = lse
    return rows


def _triton_backward(tri: Any, spec: core_head.HeadSpec, h2: Tensor, W: Tensor, bias: Optional[Tensor],
                     lab: Optional[Tensor], weight: Optional[Tensor], m: Tensor, r: Tensor, ent: Optional[Tensor],
                     g_ce: Optional[Tensor], g_lse: Optional[Tensor], g_lp: Optional[Tensor],
                     g_ent: Optional[Tensor]) -> tuple:
    """``(dh, dW, db)`` of ``Σ g·value`` on the Triton kernels, one backward pass: the loss kernel's
    for the loss alone, else the head kernel's, the loss's cotangent spread over ``g_lp``, ``g_lse``
    and ``g_smooth`` (see :func:`logitkit.kernels.triton.linear_head.linear_head_backward`)."""
    ii, eps = spec.ignore_index, spec.label_smoothing
    opts = dict(ignore_index=ii, softcap=spec.softcap, temperature=spec.temperature)
    if g_ce is not None and g_lse is None and g_lp is None and g_ent is None:
        dh, dw, db, _ = tri.linear_ce_backward(h2, W, lab, m, r, g_ce, None, bias, weight=weight,
                                               label_smoothing=eps, **opts)
        return dh, dw, db
    g_sm = None
    if g_ce is not None:
        V = W.shape[0]
        g = g_ce
        if weight is not None:
            safe = torch.where((lab >= 0) & (lab < V), lab, 0)
            g = g * weight.to(g.dtype)[safe]
        g = g * (1.0 - eps)
        g_lp = -g if g_lp is None else g_lp - g
        if eps > 0.0:
            g_sm = g_ce * (eps / V)
            wsum = weight.to(g_ce.dtype).sum() if weight is not None else float(V)
            g_lse = g_sm * wsum if g_lse is None else g_lse + g_sm * wsum
    dh, dw, db = tri.linear_head_backward(h2, W, lab, m, r, ent, g_lse, g_lp, g_ent, bias, g_smooth=g_sm,
                                          weight=weight if g_sm is not None else None, **opts)
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# the two operators


def _head_forward(h2: Tensor, W: Tensor, bias: Optional[Tensor], lab: Optional[Tensor], temp: Optional[Tensor],
                  weight: Optional[Tensor], t0: Optional[Tensor], t1: Optional[Tensor], t2: Optional[Tensor],
                  num_items: Optional[Tensor], outputs: str, ii: int, eps: float, cap: Optional[float], T: float,
                  kind: str, div: str, beta: float, tt: float, need_lse: bool, ct: int, cc: int,
                  check: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row values ``(N,)`` named by :data:`_FWD` (accumulation dtype; ``am`` int64); those not
    needed are empty. ``lse`` is 0 on ignored rows; the others as :meth:`HeadRun.forward` gives them."""
    spec = _spec(outputs, ii, eps, cap, T, lab is not None, kind, div, beta, tt, need_lse)
    if check:  # under torch.compile the call site could not read the tensors
        _runtime_checks(h2, W.shape[0], lab, ii, temp, kind, t0, t1, num_items)
    tri = _triton_head(h2, W, spec, kind, temp)
    if tri is not None:
        # a bad label an earlier Triton launch flagged raises here (no wait); the kernels flag this
        # call's own and queue the flag's copy (kernels/triton/_labels)
        _triton_labels.poll(h2.device)
        rows = _triton_forward(tri, spec, h2, W, bias, lab, weight)
    else:
        rows = _make_run(spec, h2, W, bias, lab, temp, weight, kind, t0, t1, t2, _chunk_size(ct, cc)).forward()
        if "lse" in spec.outputs or need_lse:
            lse = rows["m"] + rows["r"]
            rows["lse"] = lse if lab is None else torch.where(lab != ii, lse, 0.0)
    acc = rows["m"].dtype
    return tuple(rows[k] if k in rows else h2.new_empty((0,), dtype=torch.int64 if k == "am" else acc)
                 for k in _FWD)


def _head_forward_fake(h2, W, bias, lab, temp, weight, t0, t1, t2, num_items, outputs, ii, eps, cap, T, kind, div,
                       beta, tt, need_lse, ct, cc, check):
    o = outputs.split(",")
    acc = _acc(h2.dtype)
    want = {"m": True, "r": True, "ce": "loss" in o, "lse": "lse" in o or need_lse, "lp": "logprobs" in o,
            "ent": "entropy" in o, "kl": "kl" in o, "aux": "kl" in o, "am": "argmax" in o}
    N = h2.shape[0]
    return tuple(h2.new_empty((N,) if want[k] else (0,), dtype=torch.int64 if k == "am" else acc) for k in _FWD)


def _head_backward(h2: Tensor, W: Tensor, bias: Optional[Tensor], lab: Optional[Tensor], temp: Optional[Tensor],
                   weight: Optional[Tensor], t0: Optional[Tensor], t1: Optional[Tensor], t2: Optional[Tensor],
                   m: Tensor, r: Tensor, ent: Optional[Tensor], aux: Optional[Tensor], g_ce: Optional[Tensor],
                   g_lse: Optional[Tensor], g_lp: Optional[Tensor], g_ent: Optional[Tensor], g_kl: Optional[Tensor],
                   outputs: str, ii: int, eps: float, cap: Optional[float], T: float, kind: str, div: str,
                   beta: float, tt: float, need_lse: bool, ct: int, cc: int, need_dh: bool, need_dw: bool,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh, dW, db)`` of ``Σ g_k · value_k`` (empty where not needed), recomputing the logits."""
    spec = _spec(outputs, ii, eps, cap, T, lab is not None, kind, div, beta, tt, need_lse)
    rows = {"m": m, "r": r}
    if ent is not None:
        rows["ent"] = ent
    if aux is not None:
        rows["aux"] = aux
    cots = {k: g for k, g in (("g_ce", g_ce), ("g_lse", g_lse), ("g_lp", g_lp), ("g_ent", g_ent), ("g_kl", g_kl))
            if g is not None}
    need = (need_dh, need_dw, need_db and bias is not None)
    tri = _triton_head(h2, W, spec, kind, temp) if cots else None
    if tri is not None:
        dh, dw, db = _triton_backward(tri, spec, h2, W, bias, lab, weight, m, r, ent, g_ce, g_lse, g_lp, g_ent)
        dh, dw, db = (t if n else None for t, n in zip((dh, dw, db), need))
    else:
        run = _make_run(spec, h2, W, bias, lab, temp, weight, kind, t0, t1, t2, _chunk_size(ct, cc))
        dh, dw, db = run.backward(rows, cots, need, has_bias=bias is not None)
    if dw is not None and dw.dtype != W.dtype:
        dw = dw.to(W.dtype)
    if db is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return _none_empty(dh, h2), _none_empty(dw, W), _none_empty(db, h2)


_op("linear_head_forward", _head_forward, _head_forward_fake)
_op("linear_head_backward", _head_backward,
    lambda h2, W, bias, lab, temp, weight, t0, t1, t2, m, r, ent, aux, g_ce, g_lse, g_lp, g_ent, g_kl, outputs,
    ii, eps, cap, T, kind, div, beta, tt, need_lse, ct, cc, need_dh, need_dw, need_db:
    _grads_fake(h2, W, bias, need_dh, need_dw, need_db))


# ----------------------------------------------------------------------------------------------
# autograd


class _LinearHead(torch.autograd.Function):
    """Per-token values of the head; backward recomputes the logits once for every cotangent.

    ``static`` is :func:`_static`'s tuple; ``keys`` the differentiable values returned (:func:`_keys`),
    then ``argmax`` when ``has_am``.
    """

    @staticmethod
    def forward(ctx, hidden, linear_weight, linear_bias, lab, temp, weight, t0, t1, t2, num_items, static, keys,
                has_am, check):
        h2 = _rows(hidden)
        W = linear_weight.contiguous()
        vals = _call("linear_head_forward", h2, W, linear_bias, lab, temp, weight, t0, t1, t2, num_items, *static,
                     check)
        v = dict(zip(_FWD, vals))
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                linear_bias is not None and ctx.needs_input_grad[2])
        ctx.need, ctx.static, ctx.keys = need, static, keys
        ctx.hidden_shape = hidden.shape
        ctx.set_materialize_grads(False)
        if any(need):
            outputs = static[0].split(",")
            ent = v["ent"] if "entropy" in outputs else None
            aux = v["aux"] if "kl" in outputs else None
            ctx.save_for_backward(h2, W, linear_bias, lab, temp, weight, t0, t1, t2, v["m"], v["r"], ent, aux)
        outs = [v[k] for k in keys]
        if has_am:
            ctx.mark_non_differentiable(v["am"])
            outs.append(v["am"])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        need = ctx.need
        none = (None,) * 14
        if not any(need):
            return none
        cots = {k: g.reshape(-1).contiguous() for k, g in zip(ctx.keys, grads) if g is not None}
        if not cots:
            return none
        h2, W, b, lab, temp, weight, t0, t1, t2, m, r, ent, aux = ctx.saved_tensors
        dh, dw, db = _call("linear_head_backward", h2, W, b, lab, temp, weight, t0, t1, t2, m, r, ent, aux,
                           cots.get("ce"), cots.get("lse"), cots.get("lp"), cots.get("ent"), cots.get("kl"),
                           *ctx.static, need[0], need[1], need[2])
        dh = dh.reshape(ctx.hidden_shape) if need[0] else None
        return (dh, dw if need[1] else None, db if need[2] else None) + none[3:]


def _flat(t: Optional[Tensor], shape: tuple) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.detach().reshape(shape)
    return t if t.is_contiguous() else t.contiguous()


def _teacher(teacher: Any, N: int) -> tuple:
    """``(kind, t0, t1, t2)``: the validated teacher form as tensors in rows (detached)."""
    if teacher is None:
        return "none", None, None, None
    kind = teacher[0]
    if kind == "head":
        th, tW, tb = teacher[1], teacher[2], teacher[3]
        return kind, _flat(th, (N, th.shape[-1])), tW.detach().contiguous(), None if tb is None else tb.detach()
    if kind == "logits":
        return kind, _flat(teacher[1], (N, teacher[1].shape[-1])), None, None
    k = teacher[1].shape[-1]
    idx = _flat(teacher[1], (N, k))
    return kind, idx if idx.dtype == torch.int64 else idx.long(), _flat(teacher[2], (N, k)), None


def head_values(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], labels: Optional[Tensor],
                temp: Optional[Tensor], weight: Optional[Tensor], teacher: Any, spec: core_head.HeadSpec,
                chunk_size: Any, num_items: Any = None) -> dict:
    """Validated arguments in, the differentiable per-row values ``(N,)`` out (keys of :func:`_keys`,
    plus ``am``): what :func:`fused_linear_head` reduces, and what :func:`logitkit.torch.linear_entropy`
    returns (one chunk loop for both)."""
    N = math.prod(hidden.shape[:-1])
    lab = None
    if labels is not None:
        lab = labels.reshape(N)
        if lab.dtype != torch.int64:
            lab = lab.long()
    kind, t0, t1, t2 = _teacher(teacher, N)
    nt = num_items if isinstance(num_items, Tensor) else None
    keys = _keys(spec)
    has_am = "argmax" in spec.outputs
    res = _LinearHead.apply(hidden, linear_weight, linear_bias, lab, _flat(temp, (N,)),
                            None if weight is None else weight.detach(), t0, t1, t2,
                            None if nt is None else nt.detach(), _static(spec, kind, chunk_size), keys, has_am,
                            torch.compiler.is_compiling())
    vals = dict(zip(keys, res))
    if has_am:
        vals["am"] = res[-1]
    return vals


def with_grad_run(a: Any) -> tuple:
    """``(HeadRun, labels (N,) or None, torch namespace)`` for :func:`logitkit.linear.linear_head_with_grad`."""
    h2 = _rows(a.hidden.detach())
    N = h2.shape[0]
    W = a.W.detach().contiguous()
    b = None if a.bias is None else a.bias.detach()
    lab = None if a.labels is None else _flat(a.labels, (N,)).long()
    kind, t0, t1, t2 = _teacher(a.teacher, N)
    run = _make_run(a.spec, h2, W, b, lab, _flat(a.temp, (N,)), a.weight, kind, t0, t1, t2, a.chunk_size)
    return run, lab, get_namespace(TORCH)


def fused_linear_head(a: Any) -> Any:
    """Validated :class:`logitkit.linear.HeadArgs` of torch tensors in, :class:`HeadOutput` out."""
    vals = head_values(a.hidden, a.W, a.bias, a.labels, a.temp, a.weight, a.teacher, a.spec, a.chunk_size,
                       a.num_items)
    ref = next(iter(vals.values()))
    lab = (torch.zeros(ref.shape[0], dtype=torch.int64, device=a.hidden.device) if a.labels is None
           else a.labels.reshape(-1).long())
    return _public.assemble_outputs(get_namespace(TORCH), a, vals, lab)


def linear_head(input: Tensor, linear_weight: Tensor, labels: Optional[Tensor] = None, **kwargs: Any) -> Any:
    """:func:`logitkit.linear_head` for torch tensors (every option keyword-only, as there)."""
    b, w = kwargs.get("linear_bias"), kwargs.get("weight")
    if not _plain(input, linear_weight, labels, b, w) and _dtensor.is_dtensor(input, linear_weight, labels, b, w):
        return _dtensor.linear_head(input, linear_weight, labels, **kwargs)
    if not isinstance(input, Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(input).__name__}")
    # Literals here, not logitkit.linear_head's defaults: under torch.compile(dynamic=True) dynamo
    # makes a float that comes from a function's defaults symbolic, and the validation
    # (hasattr(temperature, "shape"), math.isfinite(teacher_temperature)) breaks the graph on one.
    if "temperature" not in kwargs:
        kwargs["temperature"] = 1.0
    if "teacher_temperature" not in kwargs:
        kwargs["teacher_temperature"] = 1.0
    if "beta" not in kwargs:
        kwargs["beta"] = 0.5
    if "label_smoothing" not in kwargs:
        kwargs["label_smoothing"] = 0.0
    if "z_loss" not in kwargs:
        kwargs["z_loss"] = 0.0
    return _public.linear_head(input, linear_weight, labels, **kwargs)
