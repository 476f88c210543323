r"""Vocabulary-parallel cross-entropy stages, written once against ``xp`` with the collectives injected.

Each of ``P`` ranks holds the logits of the same ``N`` tokens for a contiguous slice
``[start, start + n)`` of the vocabulary, and the same labels (global class indices). With
``z = softcap·tanh(x/softcap)/T`` the global row statistics are ``m = max_c z_c`` and
``r = log Σ_c exp(z_c − m)``; the loss of one row is (see :mod:`logitkit.kernels`)::

    ce = (1−ε)·w_y·((m − z_y) + r) + ε/V·(Σ_c w_c·(m − z_c) + W·r)        W = Σ_c w_c

Forward, per rank (no logits leave the rank):

1. :func:`local_partials`: over the local slice, ``m_loc`` and ``t_loc``, the sum of
   ``exp(z − m_loc)`` over every entry but one maximal one (whose term is exactly 1; ties stay
   in as exact ones), ``c_loc = 1`` (0 for an empty or all ``−inf`` slice), the label logit
   ``z_y`` (only on the rank that owns ``y``), and with smoothing ``s_loc = Σ_c w_c (m_loc − z_c)``.
2. ``all_reduce_max`` of ``m_loc`` (N scalars, plus a 4-scalar tail for the checks below).
3. :func:`global_slots`: rescale to the global ``m`` with O(N) work — the rank that holds the
   maximum keeps ``(t_loc, c_loc)``, the others send ``exp(m_loc − m)·(t_loc + c_loc)``; the owner
   of the label sends ``m − z_y``; ``s = s_loc + (m − m_loc)·Σ_local w`` (a sum of non-negative
   terms, so a common offset of 1e4 cancels nothing).
4. ``all_reduce_sum`` of the stacked ``(k, N)`` slots, ``k = 3`` (4 with smoothing), plus a
   1-scalar tail.
5. :func:`finish`: ``r = log1p(T + (C − 1))`` with ``C`` the number of ranks holding the maximum:
   the core's log1p trick across ranks (``C − 1`` is exact, so a confident row keeps its ~1e-13
   loss wherever its maximum lies, tied across ranks or not), then the row losses.

So a forward pass is exactly one MAX and one SUM all-reduce: ``4·(1 + k)`` bytes per token for
16/32-bit inputs (scalars are float32; float64 for float64 inputs), 16 bytes, 20 with smoothing.
The slot ``C`` costs 4 of those bytes; it is what keeps the log1p trick exact when the maximum is
tied across ranks. Backward (:func:`local_grad`) needs no communication: every rank knows ``m``
and ``r`` and computes ``softmax − target`` on its own slice.

Checks that ride along for free (the tails): the shards must tile the vocabulary
(``max(start + n) == Σ n``), the labels must be identical on every rank (a 20-bit hash, whose
max and min must agree), and no rank may have found a local problem (an error code). Every rank sees the same reduced values, so every rank reaches the same
verdict and none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple

from .._namespace import acc_dtype
from ..core.logsumexp import transform, transform_grad_factor

__all__ = [
    "Partials", "Reduced", "local_partials", "global_slots", "finish", "reduce_rows", "local_grad",
    "label_hash", "n_slots", "cross_entropy_with_grad",
]

_HASH_MASK = (1 << 20) - 1  # 20-bit label hash: exact in float32


class Partials(NamedTuple):
    """Local row statistics of one shard, each ``(N, 1)`` in the accumulation dtype."""

    m: Any        # local max (−inf for an empty or fully masked shard)
    t: Any        # Σ exp(z − m_loc) over every entry but one maximal one
    c: Any        # 1 where a maximal entry was left out of t (0 when m_loc = −inf)
    zy: Any       # label logit where this rank owns the label, else 0
    own: Any      # bool: this rank owns the (non-ignored) label
    s: Any        # Σ_c w_c·(m_loc − z_c) (None without smoothing)
    wsum: Any     # Σ_c w_c over the local (unpadded) classes (None without smoothing)


class Reduced(NamedTuple):
    """Result of :func:`reduce_rows`: per-row ``(N,)`` arrays and the shared scalars."""

    ce: Any       # per-row smoothed, weighted cross-entropy (0 for ignored rows)
    m: Any        # global max of the transformed logits
    r: Any        # log Σ exp(z − m) over the whole vocabulary
    validf: Any   # 1.0 for rows that are not ignored
    wy: Any       # class weight of the label (0 for ignored rows)
    vocab_size: Any   # global vocabulary size V (0-d array)
    tiled: Any    # 0-d bool: the shards tile [0, Σ n) (max(start + n) == Σ n)
    shard_end: Any    # 0-d: max(start + n) over the ranks
    same_labels: Any  # 0-d bool: every rank passed the same labels
    local_error: Any  # 0-d: the largest error code any rank reported before the collectives


def n_slots(label_smoothing: float) -> int:
    """Scalars per token in the SUM all-reduce: T, C, m − z_y, and Σ w (m − z) with smoothing."""
    return 4 if label_smoothing > 0.0 else 3


# ----------------------------------------------------------------------------------------------
# small helpers over the three namespaces


def _lib(xp: Any) -> str:
    if hasattr(xp, "_t"):
        return "torch"
    return "jax" if getattr(xp, "__name__", "").startswith("jax") else "numpy"


def _quiet(xp: Any) -> Any:
    """NumPy warns on inf/NaN arithmetic that the masks then discard; silence only that."""
    if _lib(xp) == "numpy":
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def _cat(xp: Any, arrays: list) -> Any:
    lib = _lib(xp)
    if lib == "torch":
        return xp._t.cat(arrays)
    return xp.concatenate(arrays)


def _vec(xp: Any, values: list, dtype: Any, like: Any) -> Any:
    """A 1-D array of scalars (Python numbers or 0-d arrays) in ``dtype`` on ``like``'s device."""
    lib = _lib(xp)
    if lib == "torch":
        t = xp._t
        # torch.full, not torch.tensor: a fill kernel rather than a host-to-device copy, which
        # would synchronise with the host
        return t.stack([v.to(dtype).reshape(()) if isinstance(v, t.Tensor)
                        else t.full((), float(v), dtype=dtype, device=like.device) for v in values])
    return xp.stack([xp.asarray(v).astype(dtype).reshape(()) for v in values])


def _zeros(xp: Any, shape: tuple, dtype: Any, like: Any) -> Any:
    if _lib(xp) == "torch":
        return xp._t.zeros(shape, dtype=dtype, device=like.device)
    return xp.zeros(shape, dtype=dtype)


def _iota(xp: Any, n: int, like: Any) -> Any:
    if _lib(xp) == "torch":
        return xp._t.arange(n, device=like.device)
    return xp.arange(n)


def _exp_(xp: Any, a: Any) -> Any:
    """``exp(a)``, overwriting ``a`` (a fresh temporary) where the library allows."""
    lib = _lib(xp)
    if lib == "torch":
        return a.exp_()
    if lib == "numpy":
        return xp.exp(a, out=a)
    return xp.exp(a)


def _neg_(xp: Any, a: Any) -> Any:
    lib = _lib(xp)
    if lib == "torch":
        return a.neg_()
    if lib == "numpy":
        return xp.negative(a, out=a)
    return -a


def _sub_(xp: Any, a: Any, b: Any) -> Any:
    lib = _lib(xp)
    if lib == "torch":
        return a.sub_(b)
    if lib == "numpy":
        return xp.subtract(a, b, out=a)
    return a - b


def _mul_(xp: Any, a: Any, b: Any) -> Any:
    lib = _lib(xp)
    if lib == "torch":
        return a.mul_(b)
    if lib == "numpy":
        return xp.multiply(a, b, out=a)
    return a * b


def _submul_(xp: Any, a: Any, b: Any, c: Any) -> Any:
    """``a -= b * c`` with broadcasting, without an ``a``-sized temporary for torch."""
    lib = _lib(xp)
    if lib == "torch":
        return a.addcmul_(b, c, value=-1.0)
    if lib == "numpy":
        return xp.subtract(a, b * c, out=a)
    return a - b * c


def _zero_rows_(xp: Any, a: Any, keep: Any) -> Any:
    """Zero the rows of ``a`` where ``keep`` ``(N, 1)`` is false (NaN rows too)."""
    lib = _lib(xp)
    if lib == "torch":
        return a.masked_fill_(~keep, 0.0)
    if lib == "numpy":
        a[~keep[:, 0]] = 0.0
        return a
    return xp.where(keep, a, 0.0)


def _as(xp: Any, x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``, without a copy when it already is."""
    lib = _lib(xp)
    if lib == "torch":
        return x.to(dtype)
    if lib == "numpy":
        return x.astype(dtype, copy=False)
    return x.astype(dtype)


def _max_argmax(xp: Any, z: Any) -> tuple[Any, Any]:
    """Row max and the index of one maximal entry, each ``(N, 1)``, in one pass where possible."""
    if _lib(xp) == "torch":
        m, idx = xp._t.max(z, dim=-1, keepdim=True)
        return m, idx
    idx = xp.expand_dims(xp.argmax(z, axis=-1), -1)
    return xp.take_along_axis(z, idx, axis=-1), idx


def _set_at(xp: Any, a: Any, idx: Any, value: float) -> Any:
    """``a[i, idx[i]] = value`` for every row (``a`` is a fresh temporary)."""
    lib = _lib(xp)
    if lib == "torch":
        return a.scatter_(-1, idx, value)
    if lib == "numpy":
        xp.put_along_axis(a, idx, value, axis=-1)
        return a
    rows = xp.arange(a.shape[0])
    return a.at[rows, idx[:, 0]].set(value)


def _add_at(xp: Any, a: Any, idx: Any, values: Any) -> Any:
    """``a[i, idx[i]] += values[i]`` for every row (``a`` is a fresh temporary)."""
    lib = _lib(xp)
    if lib == "torch":
        return a.scatter_add_(-1, idx, values.to(a.dtype))
    rows = xp.arange(a.shape[0])
    if lib == "numpy":
        a[rows, idx[:, 0]] += values[:, 0]
        return a
    return a.at[rows, idx[:, 0]].add(values[:, 0])


def label_hash(xp: Any, labels: Any, dtype: Any) -> Any:
    """A 20-bit position-weighted hash of the labels, as a 0-d ``dtype`` array (exact in float32).

    Integer overflow wraps identically on every rank, so equal labels give equal hashes.
    """
    lab = labels.reshape(-1)
    pos = _iota(xp, lab.shape[0], lab)
    if _lib(xp) != "torch":
        pos = pos.astype(lab.dtype)
    else:
        pos = pos.to(lab.dtype)
    h = xp.asarray(xp.sum(lab * (pos * 2 + 1) + pos) & _HASH_MASK)
    return xp.astype(h, dtype)


# ----------------------------------------------------------------------------------------------
# the stages


def local_partials(xp: Any, z: Any, labels: Any, *, start: Any, ignore_index: int,
                   label_smoothing: float = 0.0, weight_local: Any = None, col_mask: Any = None) -> Partials:
    """Stage 1: statistics of this rank's slice (no communication).

    ``z``: ``(N, n)`` transformed logits in the accumulation dtype; ``labels``: ``(N,)`` global
    class indices; ``start``: global index of local column 0 (int or 0-d integer array);
    ``weight_local``: ``(n,)`` class weights of the local columns or ``None``; ``col_mask``:
    ``(n,)`` bool, ``False`` for padding columns (they take no part), or ``None``.
    """
    with _quiet(xp):
        return _local_partials(xp, z, labels, start, ignore_index, label_smoothing, weight_local, col_mask)


def _local_partials(xp, z, labels, start, ignore_index, label_smoothing, weight_local, col_mask):
    neg_inf = -math.inf
    N, n = z.shape
    if col_mask is not None:
        z = xp.where(col_mask, z, neg_inf)
    valid = labels != ignore_index
    loc = labels - start
    own = valid & (loc >= 0) & (loc < n)
    if n == 0:
        m = _zeros(xp, (N, 1), z.dtype, z) + neg_inf
        t = c = zy = _zeros(xp, (N, 1), z.dtype, z)
        s = t if label_smoothing > 0.0 else None
        wsum = _zeros(xp, (), z.dtype, z) if label_smoothing > 0.0 else None
        return Partials(m, t, c, zy, xp.expand_dims(own, -1), s, wsum)
    m, imax = _max_argmax(xp, z)
    m0 = xp.where(xp.isfinite(m), m, 0.0)
    s = wsum = None
    if label_smoothing > 0.0:
        # d = m_loc − z ≥ 0 feeds the smoothing sum, and exp(−d) is the same e = exp(z − m_loc)
        d = m0 - z
        wd = d if weight_local is None else weight_local * d
        if col_mask is not None:
            wd = xp.where(col_mask, wd, 0.0)
        s = xp.sum(wd, axis=-1, keepdims=True)
        w = _zeros(xp, (n,), z.dtype, z) + 1.0 if weight_local is None else weight_local
        if col_mask is not None:
            w = xp.where(col_mask, w, 0.0)
        wsum = xp.sum(w)
        e = _exp_(xp, _neg_(xp, d))
    else:
        e = _exp_(xp, z - m0)
    # Leave one maximal term out of the sum (its exp is exactly 1): the log1p trick. Ties on this
    # rank stay in as exact ones; c says whether this rank left one out.
    e = _set_at(xp, e, imax, 0.0)
    t = xp.sum(e, axis=-1, keepdims=True)
    c = xp.where(m == neg_inf, 0.0, xp.ones_like(m))
    idx = xp.expand_dims(xp.where(own, loc, 0), -1)
    zy = xp.take_along_axis(z, idx, axis=-1)
    own = xp.expand_dims(own, -1)
    zy = xp.where(own, zy, 0.0)
    return Partials(m, t, c, zy, own, s, wsum)


def global_slots(xp: Any, p: Partials, m: Any) -> list:
    """Stage 3: this rank's per-row contributions to the SUM all-reduce, given the global ``m``.

    Returns ``[t, c, d]`` (plus ``s`` with smoothing), each ``(N, 1)``: summed over ranks they give
    ``T`` and ``C`` with ``T + C = Σ_c exp(z_c − m)`` (``C``: the ranks that hold the maximum,
    each of which left one term of exactly 1 out of ``T``), ``m − z_y`` and ``Σ_c w_c (m − z_c)``.
    """
    with _quiet(xp):
        keep = p.m == m
        both_finite = xp.isfinite(p.m) & xp.isfinite(m)
        scale = xp.exp(xp.where(both_finite, p.m - m, -math.inf))
        slots = [xp.where(keep, p.t, scale * (p.t + p.c)), xp.where(keep, p.c, 0.0),
                 xp.where(p.own, m - p.zy, 0.0)]
        if p.s is not None:
            slots.append(p.s + xp.where(xp.isfinite(p.m), (m - p.m) * p.wsum, 0.0))
        return slots


def finish(xp: Any, m: Any, sums: Any, validf: Any, wy: Any, *, vocab_size: Any, wtotal: Any,
           label_smoothing: float) -> tuple[Any, Any]:
    """Stage 5: ``(ce, r)`` per row from the global ``m`` and the summed slots ``(k, N)``.

    ``r = log1p(T + (C − 1))``; an all ``−inf`` row has ``r = 0`` and ``ce = inf`` (0 if ignored);
    ``m = +inf`` gives NaN.
    """
    with _quiet(xp):
        T, C, D = sums[0], sums[1], sums[2]
        all_masked = m == -math.inf
        r = xp.log1p(T + (C - 1.0))
        r = xp.where(all_masked, 0.0, xp.where((m == math.inf) | xp.isnan(m), math.nan, r))
        nll = xp.where(all_masked, math.inf, D + r)
        eps = label_smoothing
        ce = (1.0 - eps) * wy * nll if eps != 1.0 else xp.zeros_like(nll)
        if eps > 0.0:
            smooth = xp.where(all_masked, math.inf, sums[3] + wtotal * r)
            ce = ce + (eps / vocab_size) * smooth
        ce = xp.where(validf > 0, ce, 0.0)
        return ce, r


def reduce_rows(xp: Any, p: Partials, labels: Any, *, all_reduce_max: Callable[[Any], Any],
                all_reduce_sum: Callable[[Any], Any], start: Any, size: int, weight: Any,
                ignore_index: int, label_smoothing: float, vocab_size: Any = None,
                local_error: int = 0) -> Reduced:
    """Stages 2–5: the two collectives and the row losses, from one rank's :class:`Partials`.

    ``all_reduce_max(a)`` / ``all_reduce_sum(a)`` take a 1-D array and return the element-wise
    max / sum over the ranks (they may work in place). Called exactly once each.
    ``weight``: global ``(V,)`` class weights or ``None``. ``vocab_size``: the global ``V`` when
    the slices carry padding columns (``col_mask``); ``None``: ``V = Σ n`` over the ranks.
    ``local_error``: a code > 0 when this rank found a problem before the collectives (so every
    rank can raise together afterwards).
    """
    acc = p.m.dtype
    N = p.m.shape[0]
    like = p.m
    h = label_hash(xp, labels, acc)
    tail_max = _vec(xp, [start + size, h, -h, local_error], acc, like)
    buf = all_reduce_max(_cat(xp, [p.m.reshape(-1), tail_max]))
    m = buf[:N].reshape(N, 1)
    tmax = buf[N:]
    slots = global_slots(xp, p, m)
    k = len(slots)
    stacked = _cat(xp, [s.reshape(-1) for s in slots] + [_vec(xp, [size], acc, like)])
    sbuf = all_reduce_sum(stacked)
    sums = sbuf[: k * N].reshape(k, N)
    total = sbuf[k * N]
    V = total if vocab_size is None else _vec(xp, [vocab_size], acc, like)[0]
    validf, wy = _row_weights(xp, labels, weight, ignore_index, acc)
    wtotal = V if weight is None else xp.sum(xp.astype(weight, acc))
    m1 = m.reshape(N)
    ce, r = finish(xp, m1, sums, validf, wy, vocab_size=V, wtotal=wtotal, label_smoothing=label_smoothing)
    return Reduced(ce, m1, r, validf, wy, V, tmax[0] == total, tmax[0], tmax[1] == -tmax[2], tmax[3])


def _row_weights(xp: Any, labels: Any, weight: Any, ignore_index: int, acc: Any) -> tuple[Any, Any]:
    """``(valid, w_y)`` as in :func:`logitkit.core.reduction.row_weights`, never indexing out of range.

    Labels are validated only after the collectives (when ``V`` is known on every rank), so a bad
    label must not crash one rank here and leave the others waiting.
    """
    valid = labels != ignore_index
    validf = xp.astype(valid, acc)
    if weight is None:
        return validf, validf
    nw = weight.shape[0]
    ok = valid & (labels >= 0) & (labels < nw)
    lab = xp.where(ok, labels, 0)
    if nw == 0:
        return validf, validf * 0.0
    wy = xp.take_along_axis(xp.astype(weight, acc), lab.reshape(-1), axis=0).reshape(lab.shape)
    return validf, xp.where(ok, wy, 0.0) * validf


def local_grad(xp: Any, x: Any, labels: Any, m: Any, r: Any, g_ce: Any, g_z: Any, *, start: Any,
               vocab_size: Any, wtotal: Any, wy: Any, validf: Any, weight_local: Any = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
               temperature: float = 1.0, col_mask: Any = None) -> Any:
    r"""Backward on one slice, no communication: ``d loss / d x`` for the local ``(N, n)`` logits.

    ``dz_c = g_ce·[(1−ε) w_y (p_c − [c = y]) + ε/V (W p_c − w_c)] + g_z·2ζ·lse·p_c`` with
    ``p_c = exp(z_c − m − r)`` from the global statistics, chained through softcap and temperature.
    ``g_ce``/``g_z``: per-row multipliers ``(N,)`` (reduction scale × grad_output). Ignored rows get
    an exact zero; the result has ``x``'s dtype, the label term subtracted in the accumulation dtype.
    """
    with _quiet(xp):
        acc = acc_dtype(xp, x.dtype)
        N, n = x.shape
        xa = _as(xp, x, acc)
        z = transform(xp, xa, softcap, temperature)
        if col_mask is not None:
            z = xp.where(col_mask, z, -math.inf)
        m2, r2 = xp.expand_dims(m, -1), xp.expand_dims(r, -1)
        # p = exp((z − m) − r); an all −inf row has z = −inf, so p = 0 with m0 = 0 and r = 0, and
        # a row with NaN or +inf has r = NaN, so p = NaN there: no extra masking pass is needed.
        p = z - xp.where(xp.isfinite(m2), m2, 0.0)
        p = _exp_(xp, _sub_(xp, p, r2))
        eps = label_smoothing
        gce = xp.expand_dims(xp.astype(g_ce, acc), -1)
        c_label = gce * ((1.0 - eps) * xp.expand_dims(wy, -1))   # weight of (p − onehot)
        coef = c_label
        if eps > 0.0:
            c_smooth = gce * (eps / vocab_size)                    # weight of (W·p − w)
            coef = coef + c_smooth * wtotal
        if z_loss != 0.0:
            coef = coef + xp.expand_dims(xp.astype(g_z, acc), -1) * (2.0 * z_loss) * (m2 + r2)
        dz = _mul_(xp, p, coef)
        if eps > 0.0:
            w = _zeros(xp, (n,), z.dtype, z) + 1.0 if weight_local is None else weight_local
            if col_mask is not None:
                w = xp.where(col_mask, w, 0.0)
            dz = _submul_(xp, dz, c_smooth, w)
        if n > 0:
            loc = labels - start
            own = xp.expand_dims((loc >= 0) & (loc < n) & (validf > 0), -1)
            idx = xp.expand_dims(xp.where(own[:, 0], loc, 0), -1)
            dz = _add_at(xp, dz, idx, xp.where(own, -c_label, 0.0))
        factor = transform_grad_factor(xp, xa, softcap, temperature)
        if factor is not None:
            dz = _mul_(xp, dz, factor)
        # ignored rows: an exact zero even where the row holds NaN
        dz = _zero_rows_(xp, dz, xp.expand_dims(validf, -1) > 0)
        return _as(xp, dz, x.dtype)


# ----------------------------------------------------------------------------------------------
# a complete forward + backward for any namespace (NumPy with mpi4py, or a custom transport)


def cross_entropy_with_grad(x: Any, labels: Any, *, all_reduce_max: Callable[[Any], Any],
                            all_reduce_sum: Callable[[Any], Any], vocab_start: Any, weight: Any = None,
                            ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                            z_loss: float = 0.0, softcap: float | None = None,
                            temperature: float = 1.0) -> tuple[Any, Any]:
    """``(loss, d loss / d x)`` for this rank's ``(N, n)`` slice of the logits, any array library.

    The framework-free driver of the stages: ``x`` holds classes ``[vocab_start, vocab_start + n)``,
    ``labels`` ``(N,)`` the global class indices (the same on every rank), ``weight`` the global
    ``(V,)`` class weights or ``None``. ``all_reduce_max`` / ``all_reduce_sum`` map a 1-D array to
    its element-wise max / sum over the ranks, e.g. with mpi4py::

        amax = lambda a: comm.allreduce(a, op=MPI.MAX)
        loss, g = cross_entropy_with_grad(x_local, y, all_reduce_max=amax,
                                          all_reduce_sum=lambda a: comm.allreduce(a, op=MPI.SUM),
                                          vocab_start=rank * x_local.shape[1])

    Each collective is called once; the gradient needs none. For ``reduction="none"`` the
    gradient is that of the summed row losses. Raises ``ValueError`` (on every rank alike) when the
    shards do not tile the vocabulary, the labels differ between ranks or are out of range.
    """
    from .. import _validate as Vd
    from .._namespace import namespace_of
    from ..core.reduction import reduce_loss, row_scales

    lib, xp = namespace_of(x=x, labels=labels, weight=weight)
    Vd.check_logits("x", x)
    Vd.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                     temperature=temperature)
    if x.ndim != 2 or tuple(labels.shape) != (x.shape[0],):
        raise ValueError(f"x, labels: expected shapes (N, n) and (N,), got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    acc = acc_dtype(xp, x.dtype)
    n = x.shape[1]
    start = int(vocab_start)
    wl, err = None, 0
    if weight is not None:
        wl = xp.astype(weight, acc)[start:start + n]
        if wl.shape[0] < n:
            err = 1
            wl = _cat(xp, [wl, _zeros(xp, (n - wl.shape[0],), acc, x)])
    z = transform(xp, _as(xp, x, acc), softcap, temperature)
    parts = local_partials(xp, z, labels, start=start, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, weight_local=wl)
    red = reduce_rows(xp, parts, labels, all_reduce_max=all_reduce_max, all_reduce_sum=all_reduce_sum,
                      start=start, size=n, weight=weight, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, local_error=err)
    nV = int(red.vocab_size)
    if float(red.local_error) > 0 or (weight is not None and weight.shape[0] != nV):
        raise ValueError(f"weight: expected the global class weights, shape ({nV},) (on every rank)")
    if not bool(red.tiled):
        raise ValueError(f"vocab_start: the shards do not tile the vocabulary: the largest vocab_start + n is "
                         f"{int(red.shard_end)} but the ranks hold {nV} classes in all")
    if not bool(red.same_labels):
        raise ValueError("labels: the ranks passed different labels; every rank must pass the same labels")
    Vd.check_label_range(lib, labels, nV, ignore_index)
    loss = reduce_loss(xp, red.ce, red.m + red.r, red.validf, red.wy, reduction, z_loss)
    g_ce, g_z = row_scales(xp, red.validf, red.wy, reduction)
    wtotal = red.vocab_size if weight is None else xp.sum(xp.astype(weight, acc))
    dx = local_grad(xp, x, labels, red.m, red.r, g_ce, g_z, start=start, vocab_size=red.vocab_size,
                    wtotal=wtotal, wy=red.wy, validf=red.validf, weight_local=wl,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, temperature=temperature)
    return xp.astype(loss, x.dtype), dx
