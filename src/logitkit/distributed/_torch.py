"""torch.distributed bindings of the vocabulary-parallel stages (autograd.Function, no logits gathered)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import _validate as V
from .._namespace import TORCH, acc_dtype, dtype_name, get_namespace, is_floating, is_integer
from ..core.logsumexp import transform
from . import stages

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "TorchCollectives"]

class TorchCollectives:
    """``all_reduce_max`` / ``all_reduce_sum`` over a process group, in place.

    Without an initialized default group (and ``group=None``) it is the single process: rank 0 of
    1 and both collectives are the identity, so the functions also run (and are tested) alone.
    """

    def __init__(self, group: Any = None) -> None:
        dist = torch.distributed
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active:
            if group is not None:
                raise ValueError("group: a process group was given but torch.distributed is not initialized")
            self.group, self.rank, self.size = None, 0, 1
        else:
            self.group = group
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            # Looked up at call time, so a test can count the calls by wrapping it.
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return t


@dataclass(frozen=True)
class _Cfg:
    comm: TorchCollectives
    start: int
    ignore_index: int
    label_smoothing: float
    reduction: str
    z_loss: float
    softcap: float | None
    temperature: float
    chunk: int = 0
    reduce_hidden_grad: bool = True
    vocab_size: int | None = None   # from the header on the host; None: read on the device (tail)


# ----------------------------------------------------------------------------------------------
# argument checks (identical on every rank, so raising before the collectives strands nobody)


def _check_common(labels: Any, weight: Any, batch_shape: tuple, ignore_index: int, label_smoothing: float,
                  reduction: str, z_loss: float, softcap: float | None, temperature: float,
                  vocab_start: Any) -> None:
    V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    temperature=temperature)
    if not isinstance(labels, torch.Tensor) or not is_integer(labels.dtype):
        raise TypeError("labels: expected an integer tensor of global class indices, got "
                        f"{dtype_name(labels.dtype) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"labels: expected shape {tuple(batch_shape)} (the logits' shape without the class "
                         f"axis), got {tuple(labels.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or not is_floating(weight.dtype):
            raise ValueError("weight: expected a 1-D floating tensor of global class weights (V,), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if vocab_start is not None and (not isinstance(vocab_start, int) or isinstance(vocab_start, bool)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_start: expected None or an int >= 0, got {vocab_start!r}")


def _local_weight(weight: Any, start: int, n: int, acc: Any) -> Any:
    """This shard's slice of the global class weights (the header checked its length)."""
    if weight is None:
        return None
    w = weight.detach().to(acc)[start:start + n]
    if w.shape[0] < n:  # device mode: a wrong length makes the loss NaN, never an index error
        w = torch.cat([w, w.new_zeros(n - w.shape[0])])
    return w


def _host_mode(x: Any) -> bool:
    """CPU tensors (gloo) read the header on the host and raise; other devices never synchronise,
    nor does anything under ``torch.compile`` (a host read would break the graph: there a failed
    check gives a NaN loss, as on CUDA)."""
    return (not isinstance(x, torch.Tensor) or x.device.type == "cpu") and not torch.compiler.is_compiling()


def _agree(comm: TorchCollectives, check: Any, *, x: Any, labels: Any, n: Any, vocab_start: Any, weight: Any,
           ignore_index: Any, options: dict, hash_extra: Any = None,
           extra_check: Any = None) -> tuple[int, int | None, Any]:
    """Run the local checks and the header; return ``(start, V, tail)``.

    Host mode (CPU tensors): the header is the first collective, fixed-size, and every rank raises
    the same error after it when any rank's arguments failed or the ranks disagree (so no rank is
    left waiting in a later collective, and no collective ever sees buffers of different sizes).
    Device mode (CUDA): local checks raise at once, and the header table rides in the tail of the
    per-token MAX (``tail``), read on the device: a failed check gives a NaN loss, no host sync.
    ``hash_extra``: a callable returning a 1-D int64 tensor of more per-token data the ranks must
    agree on (hashed with the labels); ``extra_check(V)``: host-mode checks that need the global
    ``V`` (they raise the same error on every rank).
    """
    host = _host_mode(x)
    error, fields, start = None, None, None
    try:
        check()
        start = comm.rank * n if vocab_start is None else vocab_start
        if start >= stages._EXACT or n >= stages._EXACT:
            raise ValueError(f"vocab_start: expected the shard to start below 2^24, got {start}")
        wkey = None if weight is None else ("weight", int(weight.shape[0]))
        xp = get_namespace(TORCH)
        ids = None
        if hash_extra is not None:
            ids = torch.cat([labels.reshape(-1).to(torch.int64), hash_extra()])
        fields = stages.header_fields(xp, labels, start=start, size=n, dtype=dtype_name(x.dtype),
                                      ignore_index=ignore_index,
                                      options={**options, "ignore_index": ignore_index, "weight": wkey,
                                               "vocab_start": vocab_start is None}, hash_ids=ids)
    except (TypeError, ValueError) as exc:
        if not host:
            raise
        error = exc
    xp = get_namespace(TORCH)
    like = x if isinstance(x, torch.Tensor) else torch.zeros(0)
    buf = stages.encode_header(xp, rank=comm.rank, world_size=comm.size, fields=fields, error=error, like=like,
                               with_message=host)
    if not host:
        return start, None, buf
    buf = comm.all_reduce_max(buf)
    head = stages.decode_header(buf.numpy(), comm.size)
    hint = ("; with vocab_start=None every rank must hold the same number of classes (pass vocab_start for "
            "uneven shards)") if vocab_start is None else ""
    try:
        nV = stages.header_verdict(head, weight_len=None if weight is None else int(weight.shape[0]), hint=hint)
        # the labels are the same on every rank (checked above): the same message everywhere
        V.check_label_range(TORCH, labels, nV, ignore_index)
        if extra_check is not None:
            extra_check(nV)
    except (TypeError, ValueError) as exc:
        if error is not None:
            raise exc from error
        raise
    return start, nV, None


def _reduce(xp: Any, parts: stages.Partials, labels: torch.Tensor, weight: Any, cfg: _Cfg, tail: Any,
            n: int) -> tuple[stages.Reduced, Any]:
    """The per-token collectives; ``ok`` is a 0-d flag in device mode (None in host mode)."""
    P = cfg.comm.size
    F = len(stages.HEADER_FIELDS)
    ok_box: list = []

    def vocab(reduced_tail: Any) -> Any:
        ok, nV = stages.header_check(xp, reduced_tail[:F * P], P,
                                     weight_len=None if weight is None else int(weight.shape[0]))
        ok_box.append(ok)
        return nV.to(torch.float64)

    red = stages.reduce_rows(xp, parts, labels, all_reduce_max=cfg.comm.all_reduce_max,
                             all_reduce_sum=cfg.comm.all_reduce_sum,
                             vocab_size=cfg.vocab_size if tail is None else vocab,
                             weight=None if weight is None else weight.detach(), ignore_index=cfg.ignore_index,
                             label_smoothing=cfg.label_smoothing, temperature=cfg.temperature, max_tail=tail)
    return red, (ok_box[0] if ok_box else None)


def _finish_forward(xp: Any, ctx: Any, red: stages.Reduced, ok: Any, weight: Any, cfg: _Cfg,
                    out_dtype: Any) -> torch.Tensor:
    """The reduction of :func:`logitkit.core.reduction.reduce_loss` (same expressions, so the same
    values) with the mean's denominators formed once, and the per-row gradient scales of
    :func:`~logitkit.core.reduction.row_scales` but for ``grad_output`` kept for backward."""
    ce = red.ce if ok is None else torch.where(ok, red.ce, float("nan"))
    validf, wy = red.validf, red.wy
    zl = cfg.z_loss
    zterm = torch.where(validf > 0, zl * red.lse * red.lse, 0.0) if zl != 0.0 else None
    if cfg.reduction == "mean":
        # 1/Σ w_y and 1/count, 0 for a sum of 0 (as _safe_recip); one pair without class weights
        d = validf.sum() if wy is validf else torch.stack([wy, validf]).sum(-1)
        inv = torch.where(d != 0, d.reciprocal(), 0.0)
        inv_w, inv_n = (inv, inv) if wy is validf else (inv[0], inv[1])
        loss = ce.sum() * inv_w
        if zterm is not None:
            loss = loss + zterm.sum() * inv_n
        s_ce = validf * inv_w
        s_z = (s_ce if wy is validf else validf * inv_n) if zl != 0.0 else s_ce
    else:
        if cfg.reduction == "sum":
            loss = ce.sum() if zterm is None else ce.sum() + zterm.sum()
        else:
            loss = ce if zterm is None else ce + zterm
        s_ce = s_z = validf
    sdt = red.m.dtype
    Vt = float(cfg.vocab_size) if cfg.vocab_size is not None else red.vocab_size
    if weight is None:
        wtotal = Vt
    elif cfg.label_smoothing > 0.0:
        wtotal = red.wtotal if red.wtotal is not None else weight.detach().to(sdt).sum()
    else:
        wtotal = 0.0                 # read only with smoothing
    ctx.stats = (red.m, red.r, validf, wy, Vt, wtotal)
    ctx.scales = (s_ce, s_z)
    return loss.to(out_dtype)


def _grad_scales(xp: Any, ctx: Any, cfg: _Cfg, grad_output: torch.Tensor) -> tuple[Any, Any]:
    """``(g_ce, g_z)`` per row: the forward's scales times ``grad_output`` (``row_scales``' values:
    validf·(inv·g) with validf in {0, 1} is (validf·inv)·g)."""
    s_ce, s_z = ctx.scales
    g = grad_output.to(s_ce.dtype)
    g_ce = s_ce * g
    return g_ce, (g_ce if s_z is s_ce else s_z * g)


# ----------------------------------------------------------------------------------------------
# logits already sharded over the vocabulary


def _vp_kernels(x: torch.Tensor) -> Any:
    """The Triton local stages of :class:`_VocabParallelCE` for ``x`` (module
    :mod:`logitkit.kernels.triton.vp`), or ``None``: the xp stages on torch ops.

    CUDA tensors with Triton available, unless the kernels are forced off (``LOGITKIT_KERNELS=core``).
    Every option of :func:`vocab_parallel_cross_entropy` takes the kernels. Tests monkeypatch this
    to send CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    if not (isinstance(x, torch.Tensor) and x.is_cuda):
        return None
    from ..kernels import registry
    from ..kernels import triton as tk

    if registry._forced_core[0] or not tk.available():
        return None
    try:
        from ..kernels.triton import vp
    except Exception:  # no usable triton toolchain: the stages on torch ops
        return None
    return vp


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, labels: torch.Tensor, weight: Any, cfg: _Cfg, tail: Any) -> torch.Tensor:
        xp = get_namespace(TORCH)
        acc = acc_dtype(xp, x.dtype)
        n = x.shape[-1]
        wl = _local_weight(weight, cfg.start, n, acc)
        kern = _vp_kernels(x)
        if kern is not None:      # one Triton pass over the slice (kernels/triton/vp.py)
            parts = kern.vp_partials(x, labels, start=cfg.start, ignore_index=cfg.ignore_index,
                                     label_smoothing=cfg.label_smoothing, weight_local=wl, softcap=cfg.softcap,
                                     temperature=cfg.temperature)
        else:
            u = transform(xp, x.to(acc), cfg.softcap, 1.0)
            parts = stages.local_partials(xp, u, labels, start=cfg.start, ignore_index=cfg.ignore_index,
                                          label_smoothing=cfg.label_smoothing, weight_local=wl,
                                          temperature=cfg.temperature, stat_dtype=torch.float64)
            del u
        red, ok = _reduce(xp, parts, labels, weight, cfg, tail, n)
        loss = _finish_forward(xp, ctx, red, ok, weight, cfg, x.dtype)
        ctx.save_for_backward(x, labels)
        ctx.cfg, ctx.wl, ctx.kern = cfg, wl, kern
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        xp = get_namespace(TORCH)
        x, labels = ctx.saved_tensors
        cfg = ctx.cfg
        m, r, validf, wy, Vt, wtotal = ctx.stats
        g_ce, g_z = _grad_scales(xp, ctx, cfg, grad_output)
        if ctx.kern is not None:  # one Triton pass: read the slice, write its gradient
            dx = ctx.kern.vp_grad(x, labels, m, r, g_ce, g_z, start=cfg.start, vocab_size=Vt, wtotal=wtotal,
                                  wy=wy, validf=validf, weight_local=ctx.wl,
                                  label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss, softcap=cfg.softcap,
                                  temperature=cfg.temperature)
            return dx, None, None, None, None
        dx = stages.local_grad(xp, x, labels, m, r, g_ce, g_z, start=cfg.start, vocab_size=Vt,
                               wtotal=wtotal, wy=wy, validf=validf, weight_local=ctx.wl,
                               label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss, softcap=cfg.softcap,
                               temperature=cfg.temperature, max_before_temperature=True)
        return dx, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, *, group: Any = None,
                                 vocab_start: int | None = None, weight: torch.Tensor | None = None,
                                 ignore_index: int = -100, label_smoothing: float = 0.0,
                                 reduction: str = "mean", z_loss: float = 0.0, softcap: float | None = None,
                                 temperature: float = 1.0) -> torch.Tensor:
    r"""Cross-entropy over logits sharded along the vocabulary, without gathering them.

    Every rank of ``group`` passes its slice ``local_logits`` of shape ``(..., n)`` (class axis
    last, the classes ``[vocab_start, vocab_start + n)``) and the *same* ``labels`` ``(...)`` of
    global class indices; every rank gets the same loss, equal to
    ``logitkit.cross_entropy(full_logits, labels, **options)`` on the gathered logits, and the
    gradient of its own slice.

    Args:
      group: the process group over which the vocabulary is split (``None``: the default group;
        with ``torch.distributed`` not initialized the call is the single-process loss).
      vocab_start: global index of this rank's first class. ``None``: equal shards,
        ``rank · n``. Uneven shards pass it; the shards must tile ``[0, V)``.
      weight: *global* class weights ``(V,)``, the same tensor on every rank (each rank slices its
        classes; the mean divides by ``Σ w_y`` as torch does). Not differentiated.
      ignore_index, label_smoothing, reduction, z_loss, softcap, temperature: as in
        :func:`logitkit.cross_entropy`; smoothing divides by the *global* ``V`` and sums over
        every shard.

    Communication, forward: a fixed-size MAX all-reduce of the header (float32, ``20·P + 160``
    scalars for ``P`` ranks, independent of ``N``: what the ranks must agree on), then one MAX
    all-reduce of ``N`` scalars and one SUM all-reduce of ``3N`` (``4N`` with smoothing), float32
    (float64 for float64 logits): 16 (20) bytes per token; backward, none.
    CPU tensors (gloo): every check runs before any per-token collective, and a mistake on any
    rank (bad arguments, ranks that disagree on tokens, dtype, options or labels, shards that do
    not tile ``[0, V)``, labels out of range) raises the same ``ValueError``/``TypeError`` on every
    rank. Other devices never synchronise with the host: the header rides in the per-token MAX
    and a failed check gives a NaN loss; argument errors raise on the rank that has them. Under
    ``torch.compile`` (no graph break, ``fullgraph=True``) every device checks that way.

    Example (``torchrun --nproc-per-node 2``)::

        local = full_logits.chunk(world_size, dim=-1)[rank].requires_grad_()
        loss = vocab_parallel_cross_entropy(local, labels, label_smoothing=0.1)
        loss.backward()          # local.grad is this rank's slice of the full gradient

    Without a process group it is the one-process loss:

    >>> import torch
    >>> logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], requires_grad=True)
    >>> labels = torch.tensor([3, 0])
    >>> loss = vocab_parallel_cross_entropy(logits, labels, label_smoothing=0.1)
    >>> bool(torch.isclose(loss, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)))
    True
    """
    comm = TorchCollectives(group)

    def check() -> None:
        if not isinstance(local_logits, torch.Tensor):
            raise TypeError(f"local_logits: expected a torch tensor, got {type(local_logits).__name__}")
        V.check_logits("local_logits", local_logits)
        _check_common(labels, weight, tuple(local_logits.shape[:-1]), ignore_index, label_smoothing, reduction,
                      z_loss, softcap, temperature, vocab_start)

    n = local_logits.shape[-1] if isinstance(local_logits, torch.Tensor) and local_logits.ndim else 0
    start, nV, tail = _agree(comm, check, x=local_logits, labels=labels, n=n, vocab_start=vocab_start,
                             weight=weight, ignore_index=ignore_index,
                             options=_options("logits", label_smoothing, reduction, z_loss, softcap, temperature))
    cfg = _Cfg(comm, start, ignore_index, float(label_smoothing), reduction, float(z_loss), softcap,
               float(temperature), vocab_size=nV)
    x2 = local_logits.reshape(-1, n)
    loss = _VocabParallelCE.apply(x2, labels.reshape(-1), weight, cfg, tail)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def _options(kind: str, label_smoothing: Any, reduction: Any, z_loss: Any, softcap: Any, temperature: Any) -> dict:
    """The options every rank must pass alike, as they enter the header (validated already)."""
    return {"kind": kind, "label_smoothing": float(label_smoothing), "reduction": reduction,
            "z_loss": float(z_loss), "softcap": None if softcap is None else float(softcap),
            "temperature": float(temperature)}


# ----------------------------------------------------------------------------------------------
# hidden states and a vocabulary-sharded head


# Default chunk workspace of the fused head. Its whole-array stages hold several arrays of a
# chunk's (chunk, n) logits at once: measured on the CPU (N=2048, H=512, n=16000, peak resident
# memory beyond the gradients against the chunk size), forward about 24 bytes a logit for float32
# and bfloat16 (the logits, the TwoSum difference and its error, exp, ...), 16 for float64;
# backward 8-16. Chunks are sized on 24 bytes a logit so that the workspace stays within 32 MiB.
_WORKSPACE_BYTES = 32 << 20
_WORKSPACE_BYTES_PER_LOGIT = 24


def _default_chunk(n: int) -> int:
    """Tokens per chunk that keep the chunk workspace within ``_WORKSPACE_BYTES`` (at least 1)."""
    return max(1, _WORKSPACE_BYTES // (_WORKSPACE_BYTES_PER_LOGIT * max(n, 1)))


def _chunks(N: int, chunk: int):
    if N == 0:
        yield 0, 0
        return
    for i in range(0, N, chunk):
        yield i, min(N, i + chunk)


def _head_logits(h: torch.Tensor, w: torch.Tensor, b: Any) -> torch.Tensor:
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


def _cat_partials(pieces: list) -> stages.Partials:
    """Join the per-chunk partials along the tokens (``wsum`` is the same for every chunk)."""
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    fields = [torch.cat([getattr(p, f) for p in pieces]) for f in ("m", "t", "c", "zy", "own")]
    s = None if first.s is None else torch.cat([p.s for p in pieces])
    return stages.Partials(*fields, s, first.wsum)


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: Any, labels: torch.Tensor, weight: Any,
                cfg: _Cfg, tail: Any) -> torch.Tensor:
        xp = get_namespace(TORCH)
        acc = acc_dtype(xp, h.dtype)
        n = w.shape[0]
        wl = _local_weight(weight, cfg.start, n, acc)
        pieces = []
        for i0, i1 in _chunks(h.shape[0], cfg.chunk):
            u = transform(xp, _head_logits(h[i0:i1], w, b).to(acc), cfg.softcap, 1.0)
            pieces.append(stages.local_partials(xp, u, labels[i0:i1], start=cfg.start,
                                                ignore_index=cfg.ignore_index,
                                                label_smoothing=cfg.label_smoothing, weight_local=wl,
                                                temperature=cfg.temperature, stat_dtype=torch.float64))
            del u
        parts = _cat_partials(pieces)
        red, ok = _reduce(xp, parts, labels, weight, cfg, tail, n)
        loss = _finish_forward(xp, ctx, red, ok, weight, cfg, h.dtype)
        ctx.save_for_backward(h, w, b, labels)
        ctx.cfg, ctx.wl = cfg, wl
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        xp = get_namespace(TORCH)
        h, w, b, labels = ctx.saved_tensors
        cfg = ctx.cfg
        m, r, validf, wy, Vt, wtotal = ctx.stats
        g_ce, g_z = _grad_scales(xp, ctx, cfg, grad_output)
        # The gradients accumulate in the input's accumulation dtype (float32 for float32 and 16-bit
        # inputs, float64 for float64), not in the float64 of the row statistics: d loss / d hidden
        # is all-reduced in it (4·H bytes a token for float32, as documented), and dW/db are summed
        # over the chunks in place, with no float64 buffer or temporary of the weight's size.
        acc = acc_dtype(xp, h.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if (need_b and b is not None) else None
        for i0, i1 in _chunks(h.shape[0], cfg.chunk):
            if i1 == i0:
                continue
            hc = h[i0:i1]
            dlog = stages.local_grad(xp, _head_logits(hc, w, b), labels[i0:i1], m[i0:i1], r[i0:i1],
                                     g_ce[i0:i1], g_z[i0:i1], start=cfg.start, vocab_size=Vt, wtotal=wtotal,
                                     wy=wy[i0:i1], validf=validf[i0:i1], weight_local=ctx.wl,
                                     label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                                     softcap=cfg.softcap, temperature=cfg.temperature,
                                     max_before_temperature=True)
            if dh is not None:
                dh[i0:i1] = dlog @ w
            if dw is not None:
                if dlog.dtype == acc:
                    dw.addmm_(dlog.t(), hc)          # in place: no temporary of dw's size
                else:                                # 16-bit: the product in its dtype, summed in float32
                    dw += dlog.t() @ hc
            if db is not None:
                db += dlog.sum(0, dtype=acc)
            del dlog
        if dh is not None and cfg.reduce_hidden_grad:
            # Each rank holds the part of dL/dh that flows through its classes: the one collective
            # of the backward pass (what a column-parallel head's backward all-reduce does).
            dh = cfg.comm.all_reduce_sum(dh)
        return (None if dh is None else dh.to(h.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype), None, None, None, None)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, local_weight: torch.Tensor, labels: torch.Tensor, *,
                                        local_bias: torch.Tensor | None = None, group: Any = None,
                                        vocab_start: int | None = None, weight: torch.Tensor | None = None,
                                        ignore_index: int = -100, label_smoothing: float = 0.0,
                                        reduction: str = "mean", z_loss: float = 0.0,
                                        softcap: float | None = None, temperature: float = 1.0,
                                        chunk_size: int | None = None,
                                        reduce_hidden_grad: bool = True) -> torch.Tensor:
    r"""Fused head + cross-entropy with the head weight sharded over the vocabulary.

    ``logits = hidden @ local_weight.T + local_bias`` for this rank's classes, computed ``chunk_size``
    tokens at a time and never stored whole; neither the weight nor the logits are gathered. The
    loss equals ``logitkit.cross_entropy(hidden @ W.T + b, labels, ...)`` with ``W`` the
    concatenated shards.

    Args:
      hidden: ``(..., H)``, the same on every rank (tensor parallelism replicates it).
      local_weight: ``(n, H)`` rows ``[vocab_start, vocab_start + n)`` of the head; ``local_bias``
        ``(n,)`` or ``None``. ``labels``: ``hidden.shape[:-1]`` global class indices.
      weight: global class weights ``(V,)`` (same on every rank), as in
        :func:`vocab_parallel_cross_entropy`; the other options likewise.
      chunk_size: tokens per chunk; a chunk's logits are ``(chunk_size, n)`` values. Default: as
        many tokens as keep the chunk's workspace (its logits and the whole-array temporaries
        computed from them, about 24 bytes a logit measured for float32 and bfloat16, 16 for
        float64) within 32 MiB, i.e. ``32 MiB // (24 · n)`` tokens (87 for ``n = 16000``), and
        at least one. Memory beyond the inputs is then that workspace plus the gradients; 16-bit
        inputs also hold a float32 ``dW`` accumulator of the local weight's shape (and, per
        chunk, the 16-bit product added to it).
      reduce_hidden_grad: all-reduce (SUM) ``d loss / d hidden`` over the group in backward, so
        every rank gets the full gradient. That is the one collective of the backward pass. Pass
        ``False`` when the caller's own column-parallel layer does that all-reduce (Megatron's
        ``copy_to_tensor_model_parallel_region``); each rank then gets its partial sum.

    Communication: forward, the header and one MAX and one SUM all-reduce (as the logits
    version); backward, one SUM all-reduce of ``N × H`` in float32 for float32, bfloat16 and
    float16 inputs (``4·H`` bytes a token), float64 for float64 inputs (``8·H``); none with
    ``reduce_hidden_grad=False``. Summing the ``P`` partial gradients in float32 adds at most
    about ``(P − 1)·2^-24`` of ``Σ_c |dz_c|·|W_c|`` to each element, below the rounding of the
    float32 products that form each partial.
    Ranks must agree on ``local_bias`` being given and on ``reduce_hidden_grad`` (checked).

    >>> import torch
    >>> h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    >>> y = torch.tensor([0, 3, 10, 7, -100])
    >>> loss = vocab_parallel_linear_cross_entropy(h, w, y, chunk_size=2)   # no process group
    >>> bool(torch.isclose(loss, torch.nn.functional.cross_entropy(h @ w.T, y)))
    True
    """
    comm = TorchCollectives(group)

    def check() -> None:
        for name, t in (("hidden", hidden), ("local_weight", local_weight)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
            V.check_logits(name, t)
        if local_weight.ndim != 2 or local_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"local_weight: expected shape (n, {hidden.shape[-1]}) (n local classes, hidden size), "
                             f"got {tuple(local_weight.shape)}")
        if local_weight.dtype != hidden.dtype:
            raise TypeError(f"local_weight: expected hidden's dtype {dtype_name(hidden.dtype)}, got "
                            f"{dtype_name(local_weight.dtype)}")
        n = local_weight.shape[0]
        if local_bias is not None and (not isinstance(local_bias, torch.Tensor) or tuple(local_bias.shape) != (n,)):
            raise ValueError(f"local_bias: expected shape ({n},), got "
                             f"{tuple(local_bias.shape) if isinstance(local_bias, torch.Tensor) else type(local_bias).__name__}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
        _check_common(labels, weight, tuple(hidden.shape[:-1]), ignore_index, label_smoothing, reduction,
                      z_loss, softcap, temperature, vocab_start)

    ok_w = isinstance(local_weight, torch.Tensor) and local_weight.ndim == 2
    n = local_weight.shape[0] if ok_w else 0
    start, nV, tail = _agree(comm, check, x=hidden, labels=labels, n=n, vocab_start=vocab_start, weight=weight,
                             ignore_index=ignore_index,
                             options={**_options("linear", label_smoothing, reduction, z_loss, softcap, temperature),
                                      # a rank that skips the backward all-reduce would strand the others
                                      "kind": ("linear", local_bias is None, bool(reduce_hidden_grad))})
    chunk = chunk_size if chunk_size is not None else _default_chunk(n)
    cfg = _Cfg(comm, start, ignore_index, float(label_smoothing), reduction, float(z_loss), softcap,
               float(temperature), chunk, bool(reduce_hidden_grad), vocab_size=nV)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    loss = _VocabParallelLinearCE.apply(h2, local_weight, local_bias, labels.reshape(-1), weight, cfg, tail)
    return loss.reshape(labels.shape) if reduction == "none" else loss
