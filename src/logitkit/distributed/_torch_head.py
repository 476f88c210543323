"""torch.distributed binding of the vocabulary-parallel fused head (:func:`vocab_parallel_linear_head`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _validate as V
from .._namespace import TORCH, acc_dtype, dtype_name, get_namespace, is_floating, is_integer
from ..core import linear_head as core_head
from ..linear import divergence_options, resolve_divergence, teacher_form
from ..core.logsumexp import transform, transform_grad_factor
from . import stages
from ._torch import TorchCollectives, _agree, _check_common, _chunks, _head_logits, _local_weight, _options

__all__ = ["vocab_parallel_linear_head"]

# Chunk workspace (see _torch._default_chunk), sized conservatively at 40 bytes a logit, 64 with a
# dense teacher (the entropy's and the divergences' exp and products beside the cross-entropy
# stages' temporaries). Measured (peak RSS, chunk 128 against 8, N=1024, H=256, n=16000, every
# output, forward and backward): about 16 bytes a logit, 38 with a teacher head.
_WORKSPACE_BYTES = 32 << 20
_STUDENT_BYTES = 40
_TEACHER_BYTES = 24


def _default_chunk(n: int, teacher: bool) -> int:
    per = (_STUDENT_BYTES + (_TEACHER_BYTES if teacher else 0)) * max(n, 1)
    return max(1, _WORKSPACE_BYTES // per)


class _Cfg:
    """Everything a call needs besides the differentiable tensors (not hashed, never compared)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _transformed(xp: Any, x: torch.Tensor, cfg: _Cfg, i0: int, i1: int) -> torch.Tensor:
    z = transform(xp, x, cfg.spec.softcap, cfg.spec.temperature)
    if cfg.temp is not None:
        z = z / cfg.temp[i0:i1].to(z.dtype).unsqueeze(-1)
    return z


def _teacher_chunk(cfg: _Cfg, i0: int, i1: int, acc: Any) -> Any:
    t = cfg.teacher
    if t is None or t[0] == "topk":
        return None
    if t[0] == "head":
        zt = _head_logits(t[1][i0:i1], t[2], t[3]).to(acc)
    else:
        zt = t[1][i0:i1].to(acc)
    tau = cfg.spec.teacher_temperature
    return zt if tau == 1.0 else zt / tau


def _chain(xp: Any, dz: torch.Tensor, x: torch.Tensor, cfg: _Cfg, i0: int, i1: int) -> torch.Tensor:
    """``d/dx`` from ``d/dz``: through the softcap, the scalar and the per-token temperatures."""
    factor = transform_grad_factor(xp, x, cfg.spec.softcap, cfg.spec.temperature)
    if factor is not None:
        dz = dz * factor
    if cfg.temp is not None:
        dz = dz / cfg.temp[i0:i1].to(dz.dtype).unsqueeze(-1)
    return dz


def _forward_rows(h: torch.Tensor, w: torch.Tensor, b: Any, cfg: _Cfg) -> dict:
    """The forward pass: chunks, the collectives, the per-row values (statistics dtype)."""
    xp = get_namespace(TORCH)
    spec = cfg.spec
    acc = acc_dtype(xp, h.dtype)
    sdt = torch.float64
    o = spec.outputs
    lab = cfg.labels
    topk = None if cfg.teacher is None or cfg.teacher[0] != "topk" else cfg.teacher[1]
    pieces = []
    for i0, i1 in _chunks(h.shape[0], cfg.chunk):
        x = _head_logits(h[i0:i1], w, b).to(acc)
        z = _transformed(xp, x, cfg, i0, i1)
        pieces.append(stages.head_local_partials(
            xp, z, lab[i0:i1], start=cfg.start, ignore_index=spec.ignore_index,
            label_smoothing=spec.label_smoothing if "loss" in o else 0.0, weight_local=cfg.wl, stat_dtype=sdt,
            entropy="entropy" in o, raw=x if "argmax" in o else None, zt=_teacher_chunk(cfg, i0, i1, acc),
            divergence=spec.divergence, topk=None if topk is None else topk[i0:i1]))
        del x, z
    hp = stages.cat_head_partials(xp, pieces)
    del pieces
    N = h.shape[0]
    P = cfg.comm.size
    F = len(stages.HEADER_FIELDS)
    more = stages.head_max_values(xp, hp)
    n_more = len(more)
    tail = more + ([] if cfg.tail is None else [cfg.tail.to(hp.ce.m.dtype)])
    ok_box: list = []

    def vocab(reduced_tail: Any) -> Any:
        table = reduced_tail[n_more * N:]
        nV = table.reshape(F, P)[stages.HEADER_FIELDS.index("size")].sum()
        ok = stages.header_ok(xp, table, P, vocab_size=nV)
        if cfg.weight is not None:
            ok = ok & (nV == cfg.weight.shape[0])
        if topk is not None and topk.numel():
            ok = ok & (topk.min() >= 0) & (topk.max() < nV)
        ok_box.append(ok)
        return nV.to(torch.float64)

    def global_mt(reduced_tail: Any) -> Any:
        return reduced_tail[:N].reshape(N, 1) if hp.mt is not None else None

    def extra(m: Any, reduced_tail: Any) -> Any:
        return stages.head_slots(xp, hp, m, global_mt(reduced_tail), spec.divergence)

    red = stages.reduce_rows(xp, hp.ce, lab, all_reduce_max=cfg.comm.all_reduce_max,
                             all_reduce_sum=cfg.comm.all_reduce_sum,
                             vocab_size=cfg.vocab_size if cfg.tail is None else vocab,
                             weight=cfg.weight, ignore_index=spec.ignore_index,
                             label_smoothing=spec.label_smoothing if "loss" in o else 0.0,
                             max_tail=_cat(tail) if tail else None, extra_slots=extra)
    mt = global_mt(red.tail)
    rows = stages.head_rows(xp, red, entropy="entropy" in o, teacher=spec.teacher, divergence=spec.divergence,
                            mt=None if mt is None else mt.reshape(N),
                            topk_logprobs=None if topk is None else cfg.teacher[2].to(sdt), spec=spec)
    rows.update(m=red.m, r=red.r, lse=red.lse, ce=red.ce, validf=red.validf, wy=red.wy, V=red.vocab_size)
    if "argmax" in o:
        key = red.tail[(n_more - 1) * N:n_more * N]
        idx = cfg.comm.all_reduce_max(stages.argmax_candidates(xp, hp, key).contiguous())
        rows["am"] = (-idx).to(torch.int64)
    if spec.teacher == "dense" and spec.divergence == "jsd":
        # the generalized JSD needs log M = log(βq + (1−β)p) with the global statistics: a second
        # pass over the chunks (two more products with a teacher head) and one more SUM
        cols = []
        for i0, i1 in _chunks(N, cfg.chunk):
            z = _transformed(xp, _head_logits(h[i0:i1], w, b).to(acc), cfg, i0, i1)
            cols.append(stages.head_jsd_partials(xp, z, _teacher_chunk(cfg, i0, i1, acc), red.m[i0:i1],
                                                 red.r[i0:i1], rows["mt"][i0:i1], rows["rt"][i0:i1],
                                                 spec.beta, sdt))
            del z
        buf = torch.cat(cols).to(acc).t().contiguous().reshape(-1)   # column by column
        sums = cfg.comm.all_reduce_sum(buf).to(sdt).reshape(2, N).t()
        rows["kl"], rows["aux"] = stages.head_jsd_rows(xp, sums, red.r, spec.beta)
    if ok_box:
        bad = ~ok_box[0]
        for k in ("ce", "lp", "ent", "kl", "lse"):
            if k in rows:
                rows[k] = torch.where(bad, float("nan"), rows[k])
    return rows


def _cat(ts: list) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


class _VocabParallelHead(torch.autograd.Function):
    """Per-token values of the sharded head; backward recomputes the logits once for every cotangent."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: Any, cfg: _Cfg) -> tuple:
        spec = cfg.spec
        rows = _forward_rows(h.detach(), w.detach(), None if b is None else b.detach(), cfg)
        if spec.has_labels:
            valid = cfg.labels != spec.ignore_index
            for k in ("lse", "lp", "ent", "kl", "aux"):
                if k in rows:
                    rows[k] = torch.where(valid, rows[k], 0.0)
            if "am" in rows:
                rows["am"] = torch.where(valid, rows["am"], 0)
        ctx.cfg, ctx.rows = cfg, rows
        ctx.save_for_backward(h, w, b)
        ctx.set_materialize_grads(False)
        outs = [rows[k].to(torch.float64) for k in cfg.keys]
        if "am" in rows:
            ctx.mark_non_differentiable(rows["am"])
            outs.append(rows["am"])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Any) -> tuple:
        cfg, rows = ctx.cfg, ctx.rows
        h, w, b = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        cots = {"g_" + k: g.reshape(-1) for k, g in zip(cfg.keys, grads) if g is not None}
        if not cots or not (need_h or need_w or need_b):
            # every rank must take part in the one collective of the backward, or none: the
            # cotangents are the caller's, so the all-reduce runs whenever d hidden is wanted
            if need_h and cfg.reduce_hidden_grad:
                dh = cfg.comm.all_reduce_sum(torch.zeros(h.shape, dtype=acc_dtype(get_namespace(TORCH), h.dtype),
                                                         device=h.device))
                return dh.to(h.dtype), None, None, None
            return None, None, None, None
        xp = get_namespace(TORCH)
        spec = cfg.spec
        acc = acc_dtype(xp, h.dtype)
        h, w = h.detach(), w.detach()
        b = None if b is None else b.detach()
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None
        Vt = float(rows["V"]) if not torch.is_tensor(rows["V"]) else rows["V"]
        wtotal = Vt if cfg.weight is None else cfg.weight.to(torch.float64).sum()
        topk = None if cfg.teacher is None or cfg.teacher[0] != "topk" else cfg.teacher[1]
        keys = ("m", "r", "validf", "wy", "ent", "aux", "mt", "rt", "G")
        for i0, i1 in _chunks(h.shape[0], cfg.chunk):
            if i1 == i0:
                continue
            hc = h[i0:i1]
            x = _head_logits(hc, w, b).to(acc)
            z = _transformed(xp, x, cfg, i0, i1)
            r_c = {k: rows[k][i0:i1] for k in keys if k in rows}
            c_c = {k: v[i0:i1] for k, v in cots.items()}
            dz = stages.head_local_grad(xp, z, cfg.labels[i0:i1], r_c, c_c, start=cfg.start,
                                        ignore_index=spec.ignore_index, has_labels=spec.has_labels, vocab_size=Vt,
                                        wtotal=wtotal, weight_local=cfg.wl, label_smoothing=spec.label_smoothing,
                                        teacher=spec.teacher, divergence=spec.divergence, beta=spec.beta,
                                        zt=_teacher_chunk(cfg, i0, i1, acc),
                                        topk=None if topk is None else topk[i0:i1])
            del z
            dlog = _chain(xp, dz, x, cfg, i0, i1).to(h.dtype)
            del dz, x
            if dh is not None:
                dh[i0:i1] = dlog @ w
            if dw is not None:
                if dlog.dtype == acc:
                    dw.addmm_(dlog.t(), hc)
                else:
                    dw += dlog.t() @ hc
            if db is not None:
                db += dlog.sum(0, dtype=acc)
            del dlog
        if dh is not None and cfg.reduce_hidden_grad:
            dh = cfg.comm.all_reduce_sum(dh)
        return (None if dh is None else dh.to(h.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype), None)


# ----------------------------------------------------------------------------------------------
# argument checks (identical on every rank, so raising before the collectives strands nobody)


def _is_jax(*xs: Any) -> bool:
    return any(type(x).__module__.startswith(("jax", "jaxlib")) for x in xs if x is not None)


def _tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")


def _check_teacher(outs: tuple, lead: tuple, n: int, teacher_hidden: Any, teacher_weight: Any, teacher_bias: Any,
                   teacher_logits: Any, teacher_topk: Any) -> Any:
    if teacher_form(outs, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
                    "rank") is None:
        return None
    if teacher_hidden is not None:
        _tensor("teacher_hidden", teacher_hidden)
        V.check_logits("teacher_hidden", teacher_hidden)
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden: expected leading shape {lead} (hidden's), got "
                             f"{tuple(teacher_hidden.shape)}")
        Ht = teacher_hidden.shape[-1]
        if not isinstance(teacher_weight, torch.Tensor) or tuple(teacher_weight.shape) != (n, Ht):
            raise ValueError(f"teacher_weight: expected this rank's rows of the teacher head, shape ({n}, {Ht}) "
                             f"(the student's local classes), got "
                             f"{tuple(teacher_weight.shape) if isinstance(teacher_weight, torch.Tensor) else teacher_weight!r}")
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise TypeError(f"teacher_weight: expected teacher_hidden's dtype {dtype_name(teacher_hidden.dtype)}, "
                            f"got {dtype_name(teacher_weight.dtype)}")
        if teacher_bias is not None and (not isinstance(teacher_bias, torch.Tensor)
                                         or tuple(teacher_bias.shape) != (n,)
                                         or teacher_bias.dtype != teacher_hidden.dtype):
            raise ValueError(f"teacher_bias: expected shape ({n},) and dtype {dtype_name(teacher_hidden.dtype)}")
        Nt = math.prod(lead)
        return ("head", teacher_hidden.detach().reshape(Nt, Ht), teacher_weight.detach(),
                None if teacher_bias is None else teacher_bias.detach())
    if teacher_logits is not None:
        _tensor("teacher_logits", teacher_logits)
        V.check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != lead + (n,):
            raise ValueError(f"teacher_logits: expected this rank's classes, shape {lead + (n,)}, got "
                             f"{tuple(teacher_logits.shape)}")
        return ("logits", teacher_logits.detach().reshape(math.prod(lead), n))
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk: expected a pair (indices, logprobs), each of shape (..., k)")
    idx, lp = teacher_topk
    _tensor("teacher_topk indices", idx)
    _tensor("teacher_topk logprobs", lp)
    if not is_integer(idx.dtype):
        raise TypeError(f"teacher_topk indices: expected integers (global class indices), got {dtype_name(idx.dtype)}")
    if not is_floating(lp.dtype):
        raise TypeError(f"teacher_topk logprobs: expected a floating dtype, got {dtype_name(lp.dtype)}")
    if idx.ndim != len(lead) + 1 or tuple(idx.shape[:-1]) != lead or idx.shape[-1] < 1:
        raise ValueError(f"teacher_topk indices: expected shape {lead + ('k',)} with k >= 1, got {tuple(idx.shape)}")
    if tuple(lp.shape) != tuple(idx.shape):
        raise ValueError(f"teacher_topk logprobs: expected the indices' shape {tuple(idx.shape)}, got "
                         f"{tuple(lp.shape)}")
    k = idx.shape[-1]
    flat = idx.detach().reshape(-1, k).to(torch.int64)
    if flat.device.type == "cpu" and flat.numel() and k > 1:
        srt = flat.sort(-1).values
        rep = (srt[:, 1:] == srt[:, :-1]).any(-1)
        if bool(rep.any()):
            raise ValueError(f"teacher_topk indices: row {int(rep.nonzero()[0, 0])} repeats a class; the k classes "
                             "must be distinct")
    return ("topk", flat, lp.detach().reshape(-1, k))


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating tensor as int64 (what the ranks must agree on, exactly)."""
    t = t.detach().contiguous().reshape(-1)
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.view(view).to(torch.int64)


def vocab_parallel_linear_head(hidden: torch.Tensor, local_weight: torch.Tensor, labels: torch.Tensor | None = None,
                               *, local_bias: torch.Tensor | None = None, group: Any = None,
                               vocab_start: int | None = None, outputs: Any = ("loss",), temperature: Any = 1.0,
                               softcap: float | None = None, weight: torch.Tensor | None = None,
                               ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                               z_loss: float = 0.0, num_items_in_batch: Any = None, teacher_hidden: Any = None,
                               teacher_weight: Any = None, teacher_bias: Any = None, teacher_logits: Any = None,
                               teacher_topk: Any = None, divergence: str = "kl", beta: float = 0.5,
                               teacher_temperature: float = 1.0, chunk_size: int | None = None,
                               reduce_hidden_grad: bool = True) -> Any:
    r""":func:`logitkit.linear_head` with the head sharded over the vocabulary: every output, no logits gathered.

    Each rank of ``group`` holds the rows ``[vocab_start, vocab_start + n)`` of the head
    (``local_weight`` ``(n, H)``, ``local_bias`` ``(n,)``) and the *same* ``hidden`` ``(..., H)``
    and ``labels`` ``(...)`` (global class indices). Every rank gets the same
    :class:`logitkit.HeadOutput` as ``logitkit.linear_head(hidden, W, labels, ...)`` on the
    concatenated head ``W``: with ``z`` the softcapped logits divided by ``temperature`` (a float
    or one value per token, ``hidden.shape[:-1]``), ``ls = log_softmax(z)`` over the whole
    vocabulary, ``p = exp(ls)``, per token

    * ``loss``: cross-entropy with every option (class ``weight`` global ``(V,)``, ``ignore_index``,
      global label smoothing, ``reduction``, ``z_loss``, ``num_items_in_batch``);
    * ``logprobs = ls[y]``, ``lse = logsumexp(z)``, ``entropy = −Σ p·ls`` computed as
      ``r + Σ p (m − z)`` (every term ≥ 0), ``argmax`` the lowest global index of the raw logits' max;
    * ``kl`` against a teacher: this rank's rows of a teacher head (``teacher_hidden`` ``(..., Ht)``
      the same on every rank, ``teacher_weight`` ``(n, Ht)``, ``teacher_bias`` ``(n,)``), its
      logits for this rank's classes (``teacher_logits`` ``(..., n)``), or ``teacher_topk =
      (indices, logprobs)`` ``(..., k)`` with global indices, the same on every rank;
      ``divergence`` ``"kl"`` / ``"reverse_kl"`` / ``"jsd"`` (``beta``), ``teacher_temperature``,
      exactly as :func:`logitkit.linear_head` (the top-k formula included).

    Ignored tokens give 0 in every per-token field. Every output but ``argmax`` is differentiable
    with respect to ``hidden``, ``local_weight`` and ``local_bias`` for any cotangents, in one
    backward pass that recomputes this rank's logits chunk by chunk; no gradient reaches the teacher.

    Communication (``P`` ranks; float32 scalars for 16/32-bit inputs, float64 for float64, so
    bytes per token double there). Forward: the fixed-size header of
    :func:`vocab_parallel_cross_entropy` (``4·(20·P + 160)`` bytes per call, any ``N``), then one
    MAX and one SUM all-reduce of per-token scalars:

    - ``loss``, ``logprobs``, ``lse`` (any of them): MAX of 1 and SUM of 3 scalars (4 with label
      smoothing on the loss): 16 bytes per token (20), as :func:`vocab_parallel_linear_cross_entropy`;
    - ``entropy``: SUM +1, +4 bytes;
    - ``kl``, dense teacher, ``"kl"`` or ``"reverse_kl"``: MAX +1, SUM +2, +12 bytes;
    - ``kl``, dense teacher, ``"jsd"``: MAX +1, SUM +1, then a third all-reduce (SUM of 2): +16 bytes;
    - ``kl``, top-k teacher with k classes: SUM +k, +4·k bytes;
    - ``argmax``: MAX +1, then one more all-reduce (MAX of 1): +8 bytes.

    So ``("loss", "logprobs", "entropy")`` sends 20 bytes per token, every output with a dense
    forward-KL teacher 40 (44 with smoothing). The dense JSD also recomputes the logits of both heads once more in the forward
    (``log M`` needs the global statistics). Backward: one SUM all-reduce of ``d/d hidden`` in
    float32 (``4·H`` bytes per token; ``8·H`` for float64), none with ``reduce_hidden_grad=False``.

    Args:
      hidden: ``(..., H)``; local_weight: ``(n, H)``, same dtype; labels: ``hidden.shape[:-1]``
        global class indices, or ``None`` (then only entropy / lse / argmax / kl).
      group, vocab_start, weight, chunk_size, reduce_hidden_grad: as in
        :func:`vocab_parallel_linear_cross_entropy`; the default chunk is ``32 MiB // (40·n)``
        tokens (``// (64·n)`` with a dense teacher), sized above the ~16 (~38) bytes a logit
        measured for every output.
      Other options as in :func:`logitkit.linear_head`.

    Ranks must agree on every option, on the labels, on a per-token temperature and on a top-k
    teacher (hashed with the labels in the header), as on ``local_bias``/``teacher_bias`` being
    given: on CPU tensors a disagreement raises the same error on every rank before any per-token
    collective. ``hidden`` and ``teacher_hidden`` are not checked (as in
    :func:`vocab_parallel_linear_cross_entropy`). A row holding NaN gives NaN in its values (its
    argmax is the first NaN or ``+inf`` entry). JAX: :func:`jax_vocab_parallel_linear_head`
    inside ``shard_map``.

    Without a process group it is :func:`logitkit.linear_head` in one process:

    >>> import torch, logitkit
    >>> h, W = torch.randn(6, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    >>> y = torch.tensor([0, 3, 19, 7, -100, 5])
    >>> out = vocab_parallel_linear_head(h, W, y, outputs=("loss", "logprobs", "entropy", "argmax"))
    >>> ref = logitkit.linear_head(h, W, y, outputs=("loss", "logprobs", "entropy", "argmax"))
    >>> all(torch.allclose(a, b) for a, b in zip(out[:4], ref[:4]) if a is not None), torch.equal(out.argmax, ref.argmax)
    (True, True)

    On 2 ranks (``torchrun --nproc-per-node 2``; ``examples/vocab_parallel_head_torchrun.py``)::

        W_local = W.chunk(2)[rank].requires_grad_()
        out = vocab_parallel_linear_head(h, W_local, y, outputs=("logprobs", "entropy"))
        (-(adv * out.logprobs).mean() - 0.01 * out.entropy.mean()).backward()
    """
    if _is_jax(hidden, local_weight, labels):
        raise TypeError("hidden: got JAX arrays; vocab_parallel_linear_head is the torch.distributed binding: call "
                        "logitkit.distributed.jax_vocab_parallel_linear_head(hidden, local_weight, labels, axis_name, "
                        "...) inside shard_map")
    comm = TorchCollectives(group)
    st: dict = {}

    def check() -> None:
        for name, t in (("hidden", hidden), ("local_weight", local_weight)):
            _tensor(name, t)
            V.check_logits(name, t)
        if local_weight.ndim != 2 or local_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"local_weight: expected shape (n, {hidden.shape[-1]}) (n local classes, hidden size), "
                             f"got {tuple(local_weight.shape)}")
        if local_weight.dtype != hidden.dtype:
            raise TypeError(f"local_weight: expected hidden's dtype {dtype_name(hidden.dtype)}, got "
                            f"{dtype_name(local_weight.dtype)}")
        n = local_weight.shape[0]
        if local_bias is not None and (not isinstance(local_bias, torch.Tensor) or tuple(local_bias.shape) != (n,)
                                       or local_bias.dtype != hidden.dtype):
            raise ValueError(f"local_bias: expected shape ({n},) and hidden's dtype, got "
                             f"{tuple(local_bias.shape) if isinstance(local_bias, torch.Tensor) else type(local_bias).__name__}")
        if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
            raise TypeError(f"outputs: expected a tuple of names from {core_head.OUTPUTS}, got {outputs!r}")
        unknown = [x for x in outputs if x not in core_head.OUTPUTS]
        if unknown or not outputs or len(set(outputs)) != len(outputs):
            raise ValueError(f"outputs: expected distinct names from {core_head.OUTPUTS}, got {tuple(outputs)!r}")
        outs = tuple(x for x in core_head.OUTPUTS if x in outputs)
        lead = tuple(hidden.shape[:-1])
        if labels is None and ("loss" in outs or "logprobs" in outs):
            raise ValueError(f"labels: outputs {outs} need labels ('loss' and 'logprobs' do)")
        per_token = isinstance(temperature, torch.Tensor)
        if not per_token and not isinstance(temperature, (float, int)) and hasattr(temperature, "shape"):
            raise TypeError(f"temperature: expected a float or a torch tensor, got {type(temperature).__name__}")
        T = 1.0 if per_token else temperature
        if labels is not None:
            _check_common(labels, weight, lead, ignore_index, label_smoothing, reduction, z_loss, softcap, T,
                          vocab_start)
        else:
            V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                            temperature=T)
            fake = torch.zeros(lead, dtype=torch.int64)
            _check_common(fake, weight, lead, ignore_index, label_smoothing, reduction, z_loss, softcap, T,
                          vocab_start)
        temp = None
        if per_token:
            if not is_floating(temperature.dtype):
                raise TypeError(f"temperature: expected a floating dtype, got {dtype_name(temperature.dtype)}")
            if tuple(temperature.shape) != lead:
                raise ValueError(f"temperature: expected shape {lead} (hidden's shape without the last dimension), "
                                 f"got {tuple(temperature.shape)}")
            if temperature.device.type == "cpu" and temperature.numel():
                bad = ~(torch.isfinite(temperature) & (temperature > 0))
                if bool(bad.any()):
                    raise ValueError(f"temperature: expected finite values > 0 for every token, got "
                                     f"{float(temperature.reshape(-1)[bad.reshape(-1)][0])}")
            temp = temperature.detach().reshape(-1)
        bb, tt = divergence_options(divergence, beta, teacher_temperature)
        teacher = _check_teacher(outs, lead, n, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                                 teacher_topk)
        div = resolve_divergence(divergence, bb, teacher)
        num_items = None
        if num_items_in_batch is not None:
            if "loss" not in outs or reduction != "mean":
                raise ValueError("num_items_in_batch: applies to the 'loss' output with reduction='mean', got "
                                 f"outputs {outs} and reduction={reduction!r}")
            if isinstance(num_items_in_batch, bool):
                raise TypeError("num_items_in_batch: expected an int or a 0-d tensor, got a bool")
            if isinstance(num_items_in_batch, (int, float)):
                num_items = float(num_items_in_batch)
            elif isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.ndim == 0:
                num_items = num_items_in_batch if num_items_in_batch.device.type != "cpu" else float(num_items_in_batch)
            else:
                raise TypeError("num_items_in_batch: expected an int or a 0-d tensor, got "
                                f"{type(num_items_in_batch).__name__}")
            if isinstance(num_items, float) and not num_items > 0:
                raise ValueError(f"num_items_in_batch: expected a value > 0, got {num_items}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad: expected a bool, got {type(reduce_hidden_grad).__name__}")
        z = float(z_loss)
        spec = core_head.HeadSpec(outs, int(ignore_index), float(label_smoothing),
                                  None if softcap is None else float(softcap), float(T), labels is not None,
                                  "none" if teacher is None else ("topk" if teacher[0] == "topk" else "dense"),
                                  div, bb, tt, "loss" in outs and z != 0.0)
        st.update(spec=spec, temp=temp, teacher=teacher, num_items=num_items, lead=lead, z=z)

    ok_w = isinstance(local_weight, torch.Tensor) and local_weight.ndim == 2
    n = local_weight.shape[0] if ok_w else 0
    N = math.prod(hidden.shape[:-1]) if isinstance(hidden, torch.Tensor) and hidden.ndim else 0
    dev = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    lab_h = labels if labels is not None else torch.full((N,), int(ignore_index) if isinstance(ignore_index, int)
                                                         else -100, dtype=torch.int64, device=dev)

    def hash_extra() -> torch.Tensor:
        parts = [torch.zeros(0, dtype=torch.int64, device=dev)]
        if st.get("temp") is not None:
            parts.append(_float_bits(st["temp"]))
        t = st.get("teacher")
        if t is not None and t[0] == "topk":
            parts += [t[1].reshape(-1), _float_bits(t[2])]
        return torch.cat(parts)

    def extra_check(nV: int) -> None:
        t = st["teacher"]
        if t is not None and t[0] == "topk" and t[1].numel():
            bad = (t[1] < 0) | (t[1] >= nV)
            if bool(bad.any()):
                raise ValueError(f"teacher_topk indices: {int(t[1][bad][0])} is out of range [0, {nV}) (global "
                                 "class indices)")

    def kind() -> tuple:
        spec = st.get("spec")
        if spec is None:
            return ("head",)
        t = st["teacher"]
        return ("head", spec.outputs, spec.teacher, spec.divergence, spec.beta, spec.teacher_temperature,
                st["temp"] is not None, local_bias is None, t is not None and t[0] == "head" and t[3] is None,
                None if t is None or t[0] != "topk" else int(t[1].shape[-1]), bool(reduce_hidden_grad),
                labels is None)

    opts = {}

    def check_all() -> None:
        check()
        opts.update(_options("linear_head", label_smoothing, reduction, z_loss, softcap,
                             1.0 if isinstance(temperature, torch.Tensor) else temperature), kind=kind())

    # ``opts`` is filled by check_all, which _agree runs before it reads the options
    start, nV, tail = _agree(comm, check_all, x=hidden, labels=lab_h, n=n, vocab_start=vocab_start, weight=weight,
                             ignore_index=ignore_index, options=opts, hash_extra=hash_extra, extra_check=extra_check)
    spec = st["spec"]
    chunk = chunk_size if chunk_size is not None else _default_chunk(n, spec.teacher == "dense")
    acc = acc_dtype(get_namespace(TORCH), hidden.dtype)
    lab_flat = lab_h.reshape(-1).to(torch.int64)
    cfg = _Cfg(comm=comm, start=start, spec=spec, keys=stages.head_keys(spec), labels=lab_flat, temp=st["temp"],
               teacher=st["teacher"], weight=None if weight is None else weight.detach(),
               wl=_local_weight(weight, start, n, acc), chunk=chunk, reduce_hidden_grad=bool(reduce_hidden_grad),
               vocab_size=nV, tail=tail)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    res = _VocabParallelHead.apply(h2, local_weight, local_bias, cfg)
    vals = dict(zip(cfg.keys, res[:len(cfg.keys)]))
    if "argmax" in spec.outputs:
        vals["am"] = res[len(cfg.keys)]
    from .. import linear as _public

    a = _public.HeadArgs(spec=spec, shape=st["lead"], hidden=hidden, weight=cfg.weight, num_items=st["num_items"],
                         reduction=reduction, z_loss=st["z"])
    return _public.assemble_outputs(get_namespace(TORCH), a, vals, lab_flat)
