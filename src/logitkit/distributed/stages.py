r"""Vocabulary-parallel cross-entropy stages, written once against ``xp`` with the collectives injected.

Each of ``P`` ranks holds the logits of the same ``N`` tokens for a contiguous slice
``[start, start + n)`` of the vocabulary, and the same labels (global class indices). With
``u = softcap·tanh(x/softcap)`` (or ``x``), temperature ``T`` and ``z = u/T``, the global row
statistics are ``m = max_c u_c`` and ``r = log Σ_c exp((u_c − m)/T)``; the loss of one row is
(see :mod:`logitkit.kernels`)::

    ce = (1−ε)·w_y·((m − u_y)/T + r) + ε/V·(Σ_c w_c·(m − u_c)/T + W·r)        W = Σ_c w_c

The temperature divides differences ``u − m`` only, never ``u`` itself: ``u/T − m/T`` would round
away a 1e4 offset's low bits (DESIGN.md's offset rows).

Forward, per rank (no logits leave the rank):

0. :func:`encode_header`: what the ranks must agree on (tokens, dtype, options, three 24-bit label
   hashes, shard start and size, the label range, a rank-local error and its message) in a
   fixed-size table of ``F·P (+ MSG_LEN)`` float32, reduced by MAX before anything whose size
   depends on it. :func:`header_verdict` (host: one clear error, the same on every rank) or
   :func:`header_ok` / :func:`header_check` (device: a 0-d flag, no host synchronisation) reads it.
   On a device the header is a few tens of small ops in all (issue 19: each is a kernel launch):
   the label fields come from one pass over the labels (:func:`label_digest`), the host-known
   ones from one cached constant, and the check compares whole rows of the reduced table.
1. :func:`local_partials`: over the local slice, ``m_loc`` and ``t_loc``, the sum of
   ``exp((u − m_loc)/T)`` over every entry but one maximal one (whose term is exactly 1; ties stay
   in as exact ones), ``c_loc = 1`` (0 for an empty or all ``−inf`` slice), the label logit
   ``u_y`` (only on the rank that owns ``y``), and with smoothing ``s_loc = Σ_c w_c (m_loc − u_c)/T``.
   ``t_loc`` and ``s_loc`` accumulate in ``stat_dtype`` (float64 in the bindings).
2. ``all_reduce_max`` of ``m_loc`` (N scalars; a NaN row sends ``−inf`` here, see 3).
3. :func:`global_slots`: rescale to the global ``m`` with O(N) work in ``stat_dtype`` — the rank
   that holds the maximum keeps ``(t_loc, c_loc)``, the others send ``exp((m_loc − m)/T)·(t_loc +
   c_loc)`` with the difference and the exp in float64 (a float32 ``m_loc − m`` is off by up to
   half an ulp of the difference, one coherent error for every term of the shard: the 1.1e-6 of
   issue 21); a row with NaN on this rank sends NaN, which the SUM cannot drop (a MAX can);
   the owner of the label sends ``(m − u_y)/T``; ``s = s_loc + (m − m_loc)/T·Σ_local w`` (a sum of
   non-negative terms, so a common offset of 1e4 cancels nothing).
4. ``all_reduce_sum`` of the stacked ``(k, N)`` slots, ``k = 3`` (4 with smoothing).
5. :func:`finish`: ``r = log1p(T + (C − 1))`` with ``C`` the number of ranks holding the maximum:
   the core's log1p trick across ranks (``C − 1`` is exact, so a confident row keeps its ~1e-13
   loss wherever its maximum lies, tied across ranks or not), then the row losses, in float64.

So a forward pass is one fixed-size MAX all-reduce of the header (``4·(F·P + MSG_LEN)`` bytes per
call, independent of ``N``), then one MAX and one SUM all-reduce of per-token scalars: ``4·(1 + k)``
bytes per token for 16/32-bit inputs (float32 scalars; float64 for float64 inputs), 16 bytes, 20
with smoothing. Where a host synchronisation is unwanted (CUDA tensors) the header table rides in
the tail of the per-token MAX instead (no message block) and a failed check makes the loss NaN.
Backward (:func:`local_grad`) needs no communication: every rank knows ``m`` and ``r`` and
computes ``softmax − target`` on its own slice.

>>> from logitkit.distributed import stages
>>> stages.n_slots(0.0), stages.n_slots(0.1)
(3, 4)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple

from .._namespace import acc_dtype
from ..core.logsumexp import _div_residual, transform, transform_grad_factor, two_diff

__all__ = [
    "Partials", "Reduced", "local_partials", "global_slots", "finish", "reduce_rows", "local_grad",
    "label_hashes", "label_range", "label_digest", "header_check", "n_slots", "cross_entropy_with_grad", "HEADER_FIELDS", "MSG_LEN",
    "header_size", "header_fields", "encode_header", "decode_header", "header_verdict", "header_ok",
    "Header", "option_code", "stat_dtype", "HeadPartials", "head_local_partials", "cat_head_partials",
    "head_max_values", "head_slots", "argmax_candidates", "head_rows", "head_jsd_partials", "head_jsd_rows",
    "head_local_grad", "head_keys", "NO_INDEX",
]


class Partials(NamedTuple):
    """Local row statistics of one shard, each ``(N, 1)`` in the accumulation dtype."""

    m: Any        # local max (−inf for an empty or fully masked shard)
    t: Any        # Σ exp(z − m_loc) over every entry but one maximal one
    c: Any        # 1 where a maximal entry was left out of t (0 when m_loc = −inf)
    zy: Any       # label logit where this rank owns the label, else 0
    own: Any      # bool: this rank owns the (non-ignored) label
    s: Any        # Σ_c w_c·(m_loc − z_c) (None without smoothing)
    wsum: Any     # Σ_c w_c over the local (unpadded) classes (None without smoothing)


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


def _nan_to(xp: Any, a: Any, value: float) -> Any:
    """``a`` with NaN replaced by ``value``, ±inf kept (one torch op)."""
    lib = _lib(xp)
    if lib == "torch":
        return xp._t.nan_to_num(a, nan=value, posinf=math.inf, neginf=-math.inf)
    return xp.where(xp.isnan(a), value, a)


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


def _host_vec(xp: Any, values: list, dtype: Any, like: Any) -> Any:
    """:func:`_vec` of Python numbers in one host array (torch CPU, NumPy); fills elsewhere."""
    lib = _lib(xp)
    if lib == "numpy":
        return xp.asarray(values, dtype=dtype)
    if lib == "torch" and like.device.type == "cpu":
        return xp._t.tensor(values, dtype=dtype)
    return _vec(xp, values, dtype, like)


_CONSTS: dict = {}
_CONSTS_MAX = 64


def _fill_const(xp: Any, values: list, dtype: Any, like: Any) -> Any:
    """A (nested) list of Python numbers as one fill per value, stacked: no host-to-device copy."""
    shape = [len(values)]
    flat = values
    while flat and isinstance(flat[0], (list, tuple)):
        shape.append(len(flat[0]))
        flat = [v for row in flat for v in row]
    if not flat:
        return _zeros(xp, tuple(shape), dtype, like)
    return _vec(xp, flat, dtype, like).reshape(tuple(shape))


def _host_const(xp: Any, values: list, dtype: Any, like: Any) -> Any:
    """:func:`_host_vec` of Python numbers; on a torch accelerator a cached device copy (one
    asynchronous host-to-device copy the first time, nothing after), per-value fills while a CUDA
    graph is being captured (no copy from host memory there) or torch.compile traces (inductor
    fuses them). Never written in place."""
    if _lib(xp) != "torch" or like.device.type == "cpu":
        return _host_vec(xp, values, dtype, like)
    t = xp._t
    key = (str(like.device), str(dtype), repr(values))
    hit = _CONSTS.get(key)
    if hit is not None:
        return hit
    if t.compiler.is_compiling() or (like.device.type == "cuda" and t.cuda.is_current_stream_capturing()):
        return _fill_const(xp, values, dtype, like)      # traced or captured: no cache, no host copy
    hit = t.tensor(values, dtype=dtype).to(like.device, non_blocking=True)
    if len(_CONSTS) >= _CONSTS_MAX:
        _CONSTS.pop(next(iter(_CONSTS)))
    _CONSTS[key] = hit
    return hit


# ----------------------------------------------------------------------------------------------
# what the ranks must agree on: a fixed-size header, reduced by MAX before any per-token collective

_M32 = 0xFFFFFFFF
_H24 = 0xFFFFFF
_EXACT = 1 << 24          # integers below this are exact in float32
_FILL = -2.0              # below every encoded value (all >= -1): a MAX leaves each rank's cell
# host-known fields first, then those computed on the device (label hashes and range), then the error
HEADER_FIELDS = ("start", "size", "rows_lo", "rows_hi", "dtype", "ignore_index", "label_smoothing",
                 "reduction", "z_loss", "softcap", "temperature", "weight", "vocab_start", "kind",
                 "labels_a", "labels_b", "labels_c", "label_min", "label_max", "error")
_N_HOST = 14
_FI = {f: i for i, f in enumerate(HEADER_FIELDS)}
_DEVICE_FIELDS = HEADER_FIELDS[_N_HOST:-1]
_OPTION_FIELDS = ("ignore_index", "label_smoothing", "reduction", "z_loss", "softcap", "temperature",
                  "weight", "vocab_start", "kind")
MSG_LEN = 160             # characters of a rank-local error message carried to every rank
_ERRORS = {1: ValueError, 2: TypeError}
_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SEEDS = ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))


def header_size(world_size: int, with_message: bool = True) -> int:
    """Scalars in the header: ``F·P`` table cells (plus ``MSG_LEN`` message characters)."""
    return len(HEADER_FIELDS) * world_size + (MSG_LEN if with_message else 0)


def option_code(value: Any) -> int:
    """A 24-bit code of a Python option value, exact in float32; the same on every rank.

    Ints by arithmetic, floats by arithmetic on ``floor(value · 1e9)``, tuples from their items'
    codes, anything else (strings, ``None``, bools) by FNV-1a over its ``repr``: plain Python that
    ``torch.compile`` traces, also when a size or an option is symbolic there (``dynamic=True``:
    a symbolic number has no ``repr`` at trace time, and hashlib is opaque to dynamo).
    """
    if isinstance(value, tuple):
        code = _fnv1a(b"()")
        for item in value:
            code = (code * 0x01000193 + option_code(item)) % (1 << 24)
        return code
    if isinstance(value, int) and not isinstance(value, bool):
        return (value * 0x9E3779B1 + 0x2545F491) % (1 << 24)
    if isinstance(value, float) and value - value == 0.0:  # finite: options that agree to 1e-9 agree
        return (math.floor(value * 1e9) * 0x9E3779B1 + 0x7F4A7C15) % (1 << 24)
    return _fnv1a(repr(value).encode()) & 0xFFFFFF


def _fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def _mix32(xp: Any, v: Any) -> Any:
    """A 32-bit finalizer (lowbias32) of values in ``[0, 2^32)``: int64 with wrap-around, uint32 in JAX."""
    if _lib(xp) == "jax":
        v = v ^ (v >> 16)
        v = v * xp.uint32(0x7FEB352D)
        v = v ^ (v >> 15)
        v = v * xp.uint32(0x846CA68B)
        return v ^ (v >> 16)
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


# the 64-bit hash of NumPy and torch (int64, products and sums wrapping modulo 2^64, arithmetic
# shifts): key = label·K + position·G, then two multiply / xorshift rounds (splitmix64's finalizer
# less its first xorshift, which the products of the key make redundant: every output bit still
# depends on every bit of the label and of the position). The three
# hashes are the same function on three disjoint blocks of positions: one (3, N) pass, one sum.
_HK = 0x5851F42D4C957F2D
_HG = 0x9E3779B97F                     # position step (an arange of 3N·G stays below 2^63)
_HM1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_HM2 = 0x94D049BB133111EB - (1 << 64)


def _hash64(xp: Any, ids: Any) -> Any:
    """``(3,)`` int64: the three 24-bit hashes of the 1-D integer ``ids`` (NumPy or torch)."""
    L = int(ids.shape[0])
    if _lib(xp) == "torch":
        t = xp._t
        ids = ids.to(t.int64)
        pos = t.arange(0, 3 * L * _HG, _HG, dtype=t.int64, device=ids.device).view(3, L)
        v = t.add(pos, ids, alpha=_HK)
    else:
        import numpy as np

        with np.errstate(over="ignore"):
            pos = np.arange(0, 3 * L * _HG, _HG, dtype=np.int64).reshape(3, L)
            v = pos + ids.astype(np.int64) * np.int64(_HK)
    with _quiet(xp):
        v = v * _HM1
        v = v ^ (v >> 27)
        v = v * _HM2
        v = v ^ (v >> 31)
        return v.sum(-1) & _H24


def label_hashes(xp: Any, labels: Any) -> list:
    """Three independent 24-bit hashes of the labels and their positions, each a 0-d integer array.

    Each label and its position go through a non-linear mixer before the sum, so no small edit of
    a few labels cancels (a position-weighted sum is linear: two edits can). NumPy and torch: one
    64-bit pass over a ``(3, N)`` block (:func:`_hash64`; the same values in both); JAX (no int64
    without x64): three 32-bit lowbias32 passes. Ranks compare hashes of one library only.
    """
    lib = _lib(xp)
    lab = labels.reshape(-1)
    if lib != "jax":
        h = _hash64(xp, lab)
        return [h[0], h[1], h[2]]
    lo = lab.astype(xp.uint32)
    hi = ((lab >> 31) >> 1).astype(xp.uint32)  # the sign word for 32-bit labels, as int64 has it
    pos = xp.arange(lab.shape[0], dtype=xp.uint32)
    out = []
    for s1, s2 in _SEEDS:
        k1, k2, mul = xp.uint32(s1), xp.uint32(s2), xp.uint32(0x9E3779B1)
        a = _mix32(xp, pos * mul + k1)
        h = _mix32(xp, _mix32(xp, lo ^ a) ^ hi ^ k2) & _H24
        out.append(xp.sum(h, dtype=xp.uint32) & xp.uint32(_H24))
    return out


def label_digest(xp: Any, labels: Any, ignore_index: int, hash_ids: Any = None) -> Any:
    """``(5,)`` int64 (NumPy, torch): the three label hashes of ``hash_ids`` (default: the labels),
    then the smallest and largest label not ignored, clipped to ``[-1, 2^24 − 1]``; ``(2^24 − 1,
    −1)`` when every label is ignored (the range checks pass either way). About twenty torch ops:
    the device fields of the header in one vector, no per-field scalars."""
    lab = labels.reshape(-1)
    ids = lab if hash_ids is None else hash_ids.reshape(-1)
    h = _hash64(xp, ids)
    hi = _EXACT - 1
    if _lib(xp) == "torch":
        t = xp._t
        lab = lab.to(t.int64)
        if lab.shape[0] == 0:
            rng = _host_const(xp, [hi, -1], t.int64, lab)
        else:
            # [−min, max] of the labels not ignored in one reduction: the labels times (−1, 1)
            sgn = _host_const(xp, [[-1], [1]], t.int64, lab)
            rng = t.where(lab != ignore_index, lab * sgn, -(1 << 62)).amax(-1) * sgn[:, 0]
        return t.cat([h, rng]).clamp_(-1, hi)
    import numpy as np

    lab = lab.astype(np.int64)
    valid = lab != ignore_index
    if not valid.any():
        rng = np.array([hi, -1], dtype=np.int64)
    else:
        rng = np.array([lab[valid].min(), lab[valid].max()], dtype=np.int64)
    return np.clip(np.concatenate([h, rng]), -1, hi)


def label_range(xp: Any, labels: Any, ignore_index: int) -> tuple[Any, Any]:
    """``(min, max)`` of the labels that are not ignored, clipped to ``[-1, 2^24 − 1]`` (exact in
    float32), as 0-d arrays; ``(0, −1)`` when every label is ignored."""
    lab = labels.reshape(-1)
    valid = lab != ignore_index
    hi = _EXACT - 1
    if _lib(xp) == "torch":
        c = lab.clamp(-1, hi).to(xp._t.int64)
    else:
        c = xp.clip(lab, -1, hi).astype("int64" if _lib(xp) == "numpy" else lab.dtype)
    if lab.shape[0] == 0:
        return 0, -1
    lo_ = -xp.max(-xp.where(valid, c, hi))
    hi_ = xp.max(xp.where(valid, c, -1))
    any_valid = xp.any(valid)
    return xp.where(any_valid, lo_, 0), xp.where(any_valid, hi_, -1)


def encode_header(xp: Any, *, rank: Any, world_size: int, fields: dict | None, error: BaseException | None,
                  like: Any, with_message: bool = True) -> Any:
    """This rank's header, a 1-D float32 array of :func:`header_size` scalars.

    ``fields`` maps each name of ``HEADER_FIELDS`` but ``error`` to an int or a 0-d array (``None``
    when this rank's arguments failed their checks and ``error`` holds the exception). Rank ``r``
    writes column ``r`` of the ``(F, P)`` table, every other cell is ``−2``, so a MAX over the ranks
    gathers the whole table on every rank. The message block carries the text of the lowest
    failing rank: ``char + 256·(P − rank)``, so that rank wins every position.
    """
    f32 = xp.float32
    P = world_size
    F = len(HEADER_FIELDS)
    code = 0
    if error is not None:
        code = 2 if isinstance(error, TypeError) else 1
    lib = _lib(xp)
    dig = None if fields is None else fields.get("_digest")
    if dig is not None and not all(fields[f] is v for f, v in zip(_DEVICE_FIELDS, dig[1])):
        dig = None          # a caller replaced some of the digest's fields: stack them one by one
    if lib == "torch" and isinstance(rank, int):
        # the (F, P) table of fills with this rank's host-known fields and error code: one
        # constant (cached on a device); the device fields copied into its column (the copy
        # converts): a clone and a copy
        tab = [[_FILL] * P for _ in range(F)]
        if fields is not None:
            for i, f in enumerate(HEADER_FIELDS[:_N_HOST]):
                tab[i][rank] = float(fields[f])
        tab[F - 1][rank] = float(code)
        tab = _host_const(xp, tab, f32, like).clone()     # the collectives may work in place
        if fields is not None:
            tab[_N_HOST:F - 1, rank].copy_(dig[0] if dig is not None
                                           else _vec(xp, [fields[f] for f in _DEVICE_FIELDS], f32, like))
        table = tab.reshape(-1)
    else:
        if fields is None:
            col = _host_vec(xp, [_FILL] * (F - 1) + [code], f32, like)
        elif lib == "jax":
            col = _vec(xp, [fields[f] for f in HEADER_FIELDS[:-1]] + [code], f32, like)
        else:
            dev = (_as(xp, dig[0], f32) if dig is not None
                   else _vec(xp, [fields[f] for f in _DEVICE_FIELDS], f32, like))
            col = _cat(xp, [_host_vec(xp, [fields[f] for f in HEADER_FIELDS[:_N_HOST]], f32, like), dev,
                            _host_vec(xp, [code], f32, like)])
        cols = xp.expand_dims(_iota(xp, P, like), 0) == rank
        table = xp.where(cols, xp.expand_dims(col, -1), _FILL).reshape(-1)
    if not with_message:
        return table
    text = [_FILL] * MSG_LEN
    if error is not None:
        msg = str(error).encode("ascii", "replace")[:MSG_LEN].ljust(MSG_LEN, b"\0")
        text = [float(b + 256 * (P - int(rank))) for b in msg]
    return _cat(xp, [table, _host_vec(xp, text, f32, table)])


class Header(NamedTuple):
    """The reduced header read on the host: one int64 column per rank for each field."""

    table: Any        # (F, P) NumPy int64
    message: str      # the lowest failing rank's message ('' if none)

    def field(self, name: str) -> Any:
        return self.table[_FI[name]]


def decode_header(buf: Any, world_size: int) -> Header:
    """:class:`Header` from the reduced header (a NumPy array, or anything ``numpy.asarray`` takes)."""
    import numpy as np

    a = np.asarray(buf, dtype=np.float64)
    F, P = len(HEADER_FIELDS), world_size
    table = a[:F * P].reshape(F, P).astype(np.int64)
    text = a[F * P:].astype(np.int64)
    msg = bytes(int(v) % 256 for v in text if v >= 0).rstrip(b"\0").decode("ascii", "replace")
    return Header(table, msg)


def header_verdict(h: Header, *, weight_len: int | None = None, hint: str = "") -> int:
    """Check the reduced header on the host; return the global ``V`` or raise the one error.

    Every rank holds the same table, so every rank raises the same exception with the same text
    (the rank with a local error raises it too, chained to its own). ``weight_len``: this rank's
    ``weight.shape[0]`` (ranks agree on it, it is in the table). Label range is left to the caller
    (``label_min``/``label_max`` of the table, or a precise check of the labels).
    """
    P = h.table.shape[1]
    err = h.field("error")
    if (err > 0).any():
        r = int((err > 0).argmax())
        raise _ERRORS.get(int(err[r]), ValueError)(
            f"{h.message} (found on rank {r} of {P}; every rank of the group raises this error)")
    rows = h.field("rows_lo") + h.field("rows_hi") * _EXACT
    if (rows != rows[0]).any():
        raise ValueError(f"labels: the ranks passed different numbers of tokens, {rows.tolist()} (rank 0, 1, ...); "
                         "every rank must pass the logits and labels of the same tokens")
    dt = h.field("dtype")
    if (dt != dt[0]).any():
        names = [_DTYPES[int(d)] if 0 <= d < len(_DTYPES) else "?" for d in dt]
        raise TypeError(f"local_logits: the ranks passed different dtypes, {names}; every rank must pass "
                        "the same dtype")
    for f in _OPTION_FIELDS:
        v = h.field(f)
        if (v != v[0]).any():
            what = {"weight": "weight (given on some ranks only, or of different lengths)",
                    "vocab_start": "vocab_start (None on some ranks only)",
                    "kind": "the function or the head's options (the logits or the linear head; local_bias "
                            "given or not; reduce_hidden_grad)"
                    }.get(f, f)
            raise ValueError(f"{f}: the ranks passed different values of {what}; every rank of the group must "
                             "pass the same options")
    for f in ("labels_a", "labels_b", "labels_c"):
        v = h.field(f)
        if (v != v[0]).any():
            raise ValueError("labels: the ranks passed different labels; every rank of the group must pass the "
                             "same labels (global class indices) for the same tokens (the fused head also hashes "
                             "a per-token temperature and a top-k teacher here)")
    starts, sizes = h.field("start"), h.field("size")
    V = int(sizes.sum())
    if not _tiles(starts, sizes):
        pairs = [(int(a), int(a + b)) for a, b in zip(starts, sizes)]
        raise ValueError(f"vocab_start: the shards do not tile the vocabulary [0, {V}) exactly once: the ranks "
                         f"hold the classes {pairs} (rank 0, 1, ...){hint}")
    if V >= _EXACT:
        raise ValueError(f"vocab_start: a vocabulary of {V} classes is more than the 2^24 the checks encode")
    if weight_len is not None and weight_len != V:
        raise ValueError(f"weight: expected the global class weights, shape ({V},), got shape ({weight_len},) "
                         "(on every rank)")
    return V


def _tiles(starts: Any, sizes: Any) -> bool:
    """The non-empty shards, sorted by start, follow each other from 0 (exact cover of [0, Σ n))."""
    nz = [(int(s), int(n)) for s, n in zip(starts, sizes) if n > 0]
    nz.sort()
    end = 0
    for s, n in nz:
        if s != end:
            return False
        end = s + n
    return True


def header_ok(xp: Any, table: Any, world_size: int, *, vocab_size: Any) -> Any:
    """The checks of :func:`header_verdict` as a 0-d bool array on the device (no host sync).

    ``table``: the reduced ``F·P`` table (no message block); ``vocab_size``: the global ``V``
    (``Σ n``, or the true ``V`` of a padded JAX vocabulary) for the label range. The weight's
    length is the caller's to compare (the ranks' lengths agree once this passes), or
    :func:`header_check`'s.
    """
    return header_check(xp, table, world_size, vocab_size=vocab_size)[0]


_SAME = (_FI["rows_lo"], _FI["labels_c"] + 1)   # the rows every rank must hold alike, contiguous


def header_check(xp: Any, table: Any, world_size: int, *, vocab_size: Any = None,
                 weight_len: int | None = None) -> tuple[Any, Any]:
    """``(ok, V)``: :func:`header_ok`'s flag and the global ``V = Σ n`` (a 0-d array in the table's
    dtype), from a handful of whole-table comparisons and one reduction (about fifteen torch ops).

    ``vocab_size``: the ``V`` of the label range (default ``Σ n``); ``weight_len``: this rank's
    ``weight.shape[0]``, which must equal ``Σ n`` (``None``: no class weights).
    """
    P = world_size
    t = table.reshape(len(HEADER_FIELDS), P)
    lib = _lib(xp)
    same = t[_SAME[0]:_SAME[1]]
    starts, sizes = t[_FI["start"]], t[_FI["size"]]
    # the shards tile [0, V): sorted by start, empty ones last (key 2^24, above every start), each
    # non-empty one starts where the previous ends (its end minus its own size, exact below 2^24);
    # min(key, V) makes an empty shard's check V == V, and fails a non-empty one starting at V or
    # beyond (its previous end is below V)
    key = xp.where(sizes > 0, starts, float(_EXACT))
    if lib == "torch":
        tt = xp._t
        key, order = tt.sort(key)
        n = sizes[order]
        ends = tt.cumsum(n, 0)
    else:
        order = xp.argsort(key)
        key, n = xp.take(key, order), xp.take(sizes, order)
        ends = xp.cumsum(n)
    V = ends[-1]
    Vr = V if vocab_size is None else vocab_size
    rng = t[_FI["label_min"]:_FI["label_max"] + 1, 0]
    flags = [xp.reshape(same == same[:, :1], (-1,)), t[_FI["error"]] <= 0,
             xp.minimum(key, V) == ends - n, rng[:1] >= 0, rng[1:] < Vr]
    if weight_len is not None:
        flags.append(xp.reshape(V == float(weight_len), (1,)))
    ok = _cat(xp, flags)
    return (ok.all() if lib == "torch" else xp.all(ok)), V


def header_fields(xp: Any, labels: Any, *, start: Any, size: int, dtype: str, ignore_index: int,
                  options: dict, hash_ids: Any = None) -> dict:
    """The header fields of one rank (labels flattened; ``options`` the Python option values).

    ``hash_ids``: a 1-D integer array hashed instead of the labels (the labels and more per-token
    data the ranks must agree on); the label range is always the labels'. NumPy and torch: the
    five device fields are views of one :func:`label_digest` vector, which :func:`encode_header`
    writes whole (replace them and it stacks the fields one by one, as for JAX).
    """
    N = int(labels.reshape(-1).shape[0])
    f = {"start": start, "size": size, "rows_lo": N % _EXACT, "rows_hi": N // _EXACT,
         "dtype": _DTYPES.index(dtype)}
    if _lib(xp) == "jax":
        ha, hb, hc = label_hashes(xp, labels if hash_ids is None else hash_ids)
        lo, hi = label_range(xp, labels, ignore_index)
        f.update(labels_a=ha, labels_b=hb, labels_c=hc, label_min=lo, label_max=hi)
    else:
        d = label_digest(xp, labels, ignore_index, hash_ids)
        views = [d[i] for i in range(5)]
        f.update(zip(_DEVICE_FIELDS, views))
        f["_digest"] = (d, views)
    for k in _OPTION_FIELDS:
        f[k] = option_code(options.get(k))
    return f


# ----------------------------------------------------------------------------------------------
# the stages


def _div_(xp: Any, a: Any, b: float) -> Any:
    """``a / b``, overwriting ``a`` (a fresh temporary) where the library allows."""
    lib = _lib(xp)
    if lib == "torch":
        return a.div_(b)
    if lib == "numpy":
        return xp.divide(a, b, out=a)
    return a / b


def _scalar(xp: Any, v: Any, dtype: Any) -> Any:
    """A Python number as is, a 0-d array in ``dtype`` (so that it does not promote an array)."""
    return v if isinstance(v, (int, float)) else _as(xp, v, dtype)


def stat_dtype(xp: Any, acc: Any) -> Any:
    """The dtype of the O(N) row statistics: float64 wherever the library has it (JAX: with x64)."""
    if _lib(xp) == "jax":
        import jax

        return xp.float64 if jax.config.jax_enable_x64 else acc
    return xp.float64


def _sum_to(xp: Any, a: Any, dtype: Any) -> Any:
    """Row sums ``(N, 1)`` accumulated in ``dtype`` (torch: summed in ``a``'s dtype, then converted)."""
    if _lib(xp) == "torch":
        # torch's sum(dtype=float64) converts the whole float32 array first (25x the time of the
        # sum); its float32 sum is a cascade whose rounding stays far below the contract.
        return a.sum(-1, keepdim=True).to(dtype)
    return xp.sum(a, axis=-1, keepdims=True, dtype=dtype)


def local_partials(xp: Any, z: Any, labels: Any, *, start: Any, ignore_index: int,
                   label_smoothing: float = 0.0, weight_local: Any = None, col_mask: Any = None,
                   temperature: float = 1.0, stat_dtype: Any = None) -> Partials:
    """Stage 1: statistics of this rank's slice (no communication).

    ``z``: ``(N, n)`` logits in the accumulation dtype, softcapped, and divided by the temperature
    unless ``temperature`` is given (then ``m`` is the max before the temperature and every
    difference ``z − m`` is divided by it, which keeps a large common offset exact); ``labels``:
    ``(N,)`` global class indices; ``start``: global index of local column 0 (int or 0-d integer
    array); ``weight_local``: ``(n,)`` class weights of the local columns or ``None``; ``col_mask``:
    ``(n,)`` bool, ``False`` for padding columns (they take no part), or ``None``; ``stat_dtype``:
    the dtype of the sums ``t`` and ``s`` (default: ``z``'s).
    """
    with _quiet(xp):
        return _local_partials(xp, z, labels, start, ignore_index, label_smoothing, weight_local, col_mask,
                               float(temperature), z.dtype if stat_dtype is None else stat_dtype)


def _local_partials(xp, z, labels, start, ignore_index, label_smoothing, weight_local, col_mask, T, sdt):
    neg_inf = -math.inf
    N, n = z.shape
    if col_mask is not None:
        z = xp.where(col_mask, z, neg_inf)
    valid = labels != ignore_index
    loc = labels - start
    own = valid & (loc >= 0) & (loc < n)
    if n == 0:
        m = _zeros(xp, (N, 1), z.dtype, z) + neg_inf
        zy = _zeros(xp, (N, 1), z.dtype, z)
        t = c = _zeros(xp, (N, 1), sdt, z)
        s = t if label_smoothing > 0.0 else None
        wsum = _zeros(xp, (), sdt, z) if label_smoothing > 0.0 else None
        return Partials(m, t, c, zy, xp.expand_dims(own, -1), s, wsum)
    m, imax = _max_argmax(xp, z)
    m0 = xp.where(xp.isfinite(m), m, 0.0)
    # d = (m_loc − z)/T ≥ 0 feeds the smoothing sum, and exp(−d) is e = exp((z − m_loc)/T). A
    # float32 difference is off by up to half an ulp of a gap of ~30: 1e-6 relative in each term
    # of a confident row, twice the contract; its error lo is carried (TwoSum, division residual).
    lo = None
    if "64" not in str(z.dtype):
        d, lo = two_diff(xp, m0, z)
        if T != 1.0:
            q = d / T
            lo = _div_residual(xp, d, T, q) + lo / T
            d = q
    else:
        d = m0 - z
        if T != 1.0:
            d = _div_(xp, d, T)
    s = wsum = None
    if label_smoothing > 0.0:
        wd = d if weight_local is None else weight_local * d
        if col_mask is not None:
            wd = xp.where(col_mask, wd, 0.0)
        s = _sum_to(xp, wd, sdt)
        w = _zeros(xp, (n,), z.dtype, z) + 1.0 if weight_local is None else weight_local
        if col_mask is not None:
            w = xp.where(col_mask, w, 0.0)
        wsum = xp.sum(_as(xp, w, sdt))
    e = _exp_(xp, _neg_(xp, d))
    if lo is not None:
        e = _submul_(xp, e, e, lo)  # exp(−d − lo) = exp(−d)·(1 − lo) to first order
    # Leave one maximal term out of the sum (its exp is exactly 1): the log1p trick. Ties on this
    # rank stay in as exact ones; c says whether this rank left one out.
    e = _set_at(xp, e, imax, 0.0)
    t = _sum_to(xp, e, sdt)
    c = _as(xp, xp.where(m == neg_inf, 0.0, xp.ones_like(m)), sdt)
    idx = xp.expand_dims(xp.where(own, loc, 0), -1)
    zy = xp.take_along_axis(z, idx, axis=-1)
    own = xp.expand_dims(own, -1)
    zy = xp.where(own, zy, 0.0)
    return Partials(m, t, c, zy, own, s, wsum)


def global_slots(xp: Any, p: Partials, m: Any, temperature: float = 1.0) -> list:
    """Stage 3: this rank's per-row contributions to the SUM all-reduce, given the global ``m``.

    Returns ``[t, c, d]`` (plus ``s`` with smoothing), each ``(N, 1)`` in ``p.t``'s dtype: summed
    over ranks they give ``T`` and ``C`` with ``T + C = Σ_c exp((z_c − m)/T)`` (``C``: the ranks
    that hold the maximum, each of which left one term of exactly 1 out of ``T``), ``(m − z_y)/T``
    and ``Σ_c w_c (m − z_c)/T``. A row whose local max is NaN sends ``T = NaN``.
    """
    with _quiet(xp):
        sdt = p.t.dtype
        pm, mg = _as(xp, p.m, sdt), _as(xp, m, sdt)
        keep = pm == mg
        q = None
        if "64" in str(sdt):
            # exp(pm − mg) as is: where either is infinite the difference is −inf (scale 0) or
            # NaN with keep true (−inf/−inf, +inf/+inf: t is this rank's own); a NaN pm makes the
            # scale NaN, and so t (mg never is NaN: the MAX saw −inf for NaN rows)
            q = pm - mg
            if temperature != 1.0:
                q = _div_(xp, q, temperature)
            t = xp.where(keep, p.t, _mul_(xp, xp.exp(q), p.t + p.c))
        else:
            # statistics in float32 (JAX without x64): the rounding of m_loc − m would be one
            # coherent error for every term of the shard (issue 21); TwoSum carries it
            both_finite = xp.isfinite(pm) & xp.isfinite(mg)
            diff = xp.where(both_finite, pm - mg, -math.inf)
            _, lo = two_diff(xp, pm, mg)
            lo = xp.where(both_finite, lo, 0.0)
            if temperature != 1.0:
                q = diff / temperature
                lo = xp.where(both_finite, _div_residual(xp, diff, temperature, q), 0.0) + lo / temperature
                diff = q
            scale = xp.exp(diff)
            scale = scale + scale * lo
            t = xp.where(keep, p.t, scale * (p.t + p.c))
            t = xp.where(xp.isnan(pm), math.nan, t)
        dy = mg - _as(xp, p.zy, sdt)
        if temperature != 1.0:
            dy = _div_(xp, dy, temperature)
        slots = [t, xp.where(keep, p.c, 0.0), xp.where(p.own, dy, 0.0)]
        if p.s is not None:
            fin = xp.abs(pm) < math.inf
            if q is not None:
                # (m − m_loc)/T is −q exactly, and s + (−q)·W is s − q·W
                slots.append(p.s - xp.where(fin, q * p.wsum, 0.0))
            else:
                shift = mg - pm
                if temperature != 1.0:
                    shift = _div_(xp, shift, temperature)
                slots.append(p.s + xp.where(fin, shift * p.wsum, 0.0))
        return slots


def finish(xp: Any, m: Any, sums: Any, validf: Any, wy: Any, *, vocab_size: Any, wtotal: Any,
           label_smoothing: float, valid: Any = None) -> tuple[Any, Any]:
    """Stage 5: ``(ce, r)`` per row from the global ``m`` and the summed slots ``(k, N)``.

    ``r = log1p(T + (C − 1))``; an all ``−inf`` row has ``r = 0`` and ``ce = inf`` (0 if ignored);
    ``m = +inf`` or a NaN anywhere in the row (``T`` or ``m`` NaN) gives NaN. ``valid``: the bool
    ``validf > 0`` when the caller has it.
    """
    with _quiet(xp):
        T, C, D = sums[0], sums[1], sums[2]
        r = xp.log1p(T + (C - 1.0))
        # all −inf (m = −inf, T not NaN) is exactly r = −inf: C, the ranks holding the maximum,
        # is 0 only where every rank's maximum is −inf, and every such rank sends T = 0; where
        # C >= 1, T + (C − 1) >= 0
        all_masked = r == -math.inf
        r = xp.where(all_masked, 0.0, xp.where(m < math.inf, r, math.nan))   # m = +inf or NaN: NaN
        nll = xp.where(all_masked, math.inf, D + r)
        eps = label_smoothing
        if eps == 0.0:
            ce = wy * nll                                           # (1 − 0)·w_y, exactly
        else:
            ce = (1.0 - eps) * wy * nll if eps != 1.0 else xp.zeros_like(nll)
        if eps > 0.0:
            smooth = xp.where(all_masked, math.inf, sums[3] + wtotal * r)
            ce = ce + (eps / vocab_size) * smooth
        ce = xp.where(validf > 0 if valid is None else valid, ce, 0.0)
        return ce, r


class Reduced(NamedTuple):
    """Result of :func:`reduce_rows`: per-row ``(N,)`` arrays in the statistics dtype."""

    ce: Any       # per-row smoothed, weighted cross-entropy (0 for ignored rows)
    m: Any        # global max of the (softcapped) logits, before the temperature
    r: Any        # log Σ exp((z − m)/T) over the whole vocabulary
    lse: Any      # m/T + r
    validf: Any   # 1.0 for rows that are not ignored
    wy: Any       # class weight of the label (0 for ignored rows)
    vocab_size: Any   # the global V used
    tail: Any     # the reduced extra scalars of the MAX all-reduce (``max_tail``), or None
    sums: Any = None    # the summed slots ``(k, N)`` of :func:`global_slots` (``T, C, (m − z_y)/T, ...``)
    extra: Any = None   # the summed ``extra_slots`` columns ``(N, j)``, or None
    wtotal: Any = None  # Σ_c w_c over the global classes (``vocab_size`` without class weights; None
                        # with class weights and no smoothing, where nothing uses it)


def reduce_rows(xp: Any, p: Partials, labels: Any, *, all_reduce_max: Callable[[Any], Any],
                all_reduce_sum: Callable[[Any], Any], vocab_size: Any, weight: Any, ignore_index: int,
                label_smoothing: float, temperature: float = 1.0, sum_dtype: Any = None,
                max_tail: Any = None, extra_slots: Callable[[Any, Any], Any] | None = None) -> Reduced:
    """Stages 2–5: the per-token collectives and the row losses, from one rank's :class:`Partials`.

    ``all_reduce_max(a)`` / ``all_reduce_sum(a)`` take a 1-D array and return the element-wise
    max / sum over the ranks (they may work in place). Called exactly once each: MAX of ``N``
    (+ ``max_tail``) scalars in ``p.m``'s dtype, SUM of ``k·N`` in ``sum_dtype`` (default
    ``p.m``'s). ``vocab_size``: the global ``V`` (from the header), or a function of the reduced
    ``max_tail`` that returns it (a header that rides in the tail). ``weight``: global ``(V,)``
    class weights or ``None``. ``p`` from :func:`local_partials` with the same ``temperature``.
    ``extra_slots(m, tail)``: more per-row columns ``(N, j)`` for the same SUM, computed from the
    global ``m`` ``(N, 1)`` and the reduced ``max_tail`` (the fused head's entropy and teacher
    terms, :func:`head_slots`); their sums come back in :attr:`Reduced.extra`.
    """
    acc = p.m.dtype
    sdt = p.t.dtype
    N = p.m.shape[0]
    # NaN must not ride in the MAX (gloo and XLA may drop it); its row sends NaN in the SUM instead
    mloc = _nan_to(xp, p.m, -math.inf).reshape(-1)
    if max_tail is not None:
        mloc = _cat(xp, [mloc, _as(xp, max_tail, acc)])
    buf = all_reduce_max(mloc)
    m = buf[:N].reshape(N, 1)
    tail = None if max_tail is None else buf[N:]
    m64 = _as(xp, m, sdt)
    slots = global_slots(xp, p, m64, temperature)
    k = len(slots)
    sd = acc if sum_dtype is None else sum_dtype
    flat = [s.reshape(-1) for s in slots]
    more = None if extra_slots is None else extra_slots(m, tail)
    j = 0 if more is None else more.shape[1]
    if j:
        flat.append(_as(xp, xp.moveaxis(more, 0, 1), sdt).reshape(-1))   # column by column
    stacked = _as(xp, _cat(xp, flat), sd)
    summed = _as(xp, all_reduce_sum(stacked), sdt)
    sums = summed[:k * N].reshape(k, N)
    extra = xp.moveaxis(summed[k * N:].reshape(j, N), 0, 1) if j else None
    valid = labels != ignore_index
    validf, wy = _row_weights(xp, labels, weight, ignore_index, sdt, valid=valid)
    V = vocab_size(tail) if callable(vocab_size) else vocab_size
    wtotal = V if weight is None else (xp.sum(_as(xp, weight, sdt)) if label_smoothing > 0.0 else None)
    m1 = m64.reshape(N)
    ce, r = finish(xp, m1, sums, validf, wy, vocab_size=V, wtotal=wtotal, label_smoothing=label_smoothing,
                   valid=valid)
    lse = (m1 if temperature == 1.0 else m1 / temperature) + r
    return Reduced(ce, m1, r, lse, validf, wy, V, tail, sums, extra, wtotal)


def _row_weights(xp: Any, labels: Any, weight: Any, ignore_index: int, acc: Any,
                 valid: Any = None) -> tuple[Any, Any]:
    """``(valid, w_y)`` as in :func:`logitkit.core.reduction.row_weights`, never indexing out of range.

    On devices that are not read by the host an out-of-range label reaches this point (its loss is
    made NaN by the caller); it must not crash one rank here and leave the others waiting.
    ``valid``: ``labels != ignore_index`` when the caller has it.
    """
    valid = labels != ignore_index if valid is None else valid
    validf = xp.astype(valid, acc)
    if weight is None:
        return validf, validf
    nw = weight.shape[0]
    if nw == 0:
        return validf, validf * 0.0
    if _lib(xp) == "torch":
        # in range exactly where clamping changes nothing; the gather reads the clamped index,
        # and where(ok, ·, 0) is already 0 wherever validf is (ok implies valid)
        lab = labels.clamp(0, nw - 1)
        wy = xp.astype(weight, acc)[lab]
        return validf, xp.where(valid & (lab == labels), wy, 0.0)
    ok = valid & (labels >= 0) & (labels < nw)
    lab = xp.where(ok, labels, 0)
    wy = xp.take_along_axis(xp.astype(weight, acc), lab.reshape(-1), axis=0).reshape(lab.shape)
    return validf, xp.where(ok, wy, 0.0) * validf


def local_grad(xp: Any, x: Any, labels: Any, m: Any, r: Any, g_ce: Any, g_z: Any, *, start: Any,
               vocab_size: Any, wtotal: Any, wy: Any, validf: Any, weight_local: Any = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
               temperature: float = 1.0, col_mask: Any = None, max_before_temperature: bool = False) -> Any:
    r"""Backward on one slice, no communication: ``d loss / d x`` for the local ``(N, n)`` logits.

    ``dz_c = g_ce·[(1−ε) w_y (p_c − [c = y]) + ε/V (W p_c − w_c)] + g_z·2ζ·lse·p_c`` with
    ``p_c = exp(z_c − m − r)`` from the global statistics, chained through softcap and temperature.
    ``max_before_temperature``: ``m`` is the max of the softcapped logits before the temperature
    (the vocabulary-parallel bindings), so ``p_c = exp((u_c − m)/T − r)``; otherwise ``m`` is the
    max of ``z``. ``g_ce``/``g_z``: per-row multipliers ``(N,)`` (reduction scale × grad_output).
    Ignored rows get an exact zero; the result has ``x``'s dtype, the label term subtracted in the
    accumulation dtype.
    """
    with _quiet(xp):
        acc = acc_dtype(xp, x.dtype)
        N, n = x.shape
        xa = _as(xp, x, acc)
        T = float(temperature)
        z = transform(xp, xa, softcap, 1.0 if max_before_temperature else T)
        if col_mask is not None:
            z = xp.where(col_mask, z, -math.inf)
        m2, r2 = xp.expand_dims(_as(xp, m, acc), -1), xp.expand_dims(_as(xp, r, acc), -1)
        lse2 = (m2 / T if max_before_temperature and T != 1.0 else m2) + r2
        # p = exp((z − m) − r); an all −inf row has z = −inf, so p = 0 with m0 = 0 and r = 0, and
        # a row with NaN or +inf has r = NaN, so p = NaN there: no extra masking pass is needed.
        p = z - xp.where(xp.isfinite(m2), m2, 0.0)
        if max_before_temperature and T != 1.0:
            p = _div_(xp, p, T)
        p = _exp_(xp, _sub_(xp, p, r2))
        eps = label_smoothing
        gce = xp.expand_dims(_as(xp, g_ce, acc), -1)
        c_label = gce * ((1.0 - eps) * xp.expand_dims(_as(xp, wy, acc), -1))   # weight of (p − onehot)
        coef = c_label
        if eps > 0.0:
            c_smooth = gce * (eps / _scalar(xp, vocab_size, acc))           # weight of (W·p − w)
            coef = coef + c_smooth * _scalar(xp, wtotal, acc)
        if z_loss != 0.0:
            coef = coef + xp.expand_dims(_as(xp, g_z, acc), -1) * (2.0 * z_loss) * lse2
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
                            all_reduce_sum: Callable[[Any], Any], rank: int, world_size: int,
                            vocab_start: Any = None, weight: Any = None, ignore_index: int = -100,
                            label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                            softcap: float | None = None, temperature: float = 1.0) -> tuple[Any, Any]:
    """``(loss, d loss / d x)`` for this rank's ``(N, n)`` slice of the logits, any array library.

    The framework-free driver of the stages: ``x`` holds classes ``[vocab_start, vocab_start + n)``
    (``None``: ``rank · n``), ``labels`` ``(N,)`` the global class indices (the same on every
    rank), ``weight`` the global ``(V,)`` class weights or ``None``. ``all_reduce_max`` /
    ``all_reduce_sum`` map a 1-D array to its element-wise max / sum over the ``world_size``
    ranks, e.g. with mpi4py::

        loss, g = cross_entropy_with_grad(
            x_local, y, all_reduce_max=lambda a: comm.allreduce(a, op=MPI.MAX),
            all_reduce_sum=lambda a: comm.allreduce(a, op=MPI.SUM), rank=comm.rank,
            world_size=comm.size)

    Three collectives: the fixed-size header (MAX), then MAX and SUM of per-token scalars; the
    gradient needs none. For ``reduction="none"`` the gradient is that of the summed row losses.
    Every check runs before any per-token collective; a failure on any rank (bad arguments, ranks
    that disagree on tokens, dtype, options or labels, shards that do not tile the vocabulary,
    labels out of range) raises the same ``ValueError``/``TypeError`` on every rank.

    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 3.0]])
    >>> same = lambda a: a                      # one rank: the collectives are the identity
    >>> loss, g = cross_entropy_with_grad(x, np.array([2]), all_reduce_max=same, all_reduce_sum=same,
    ...                                   rank=0, world_size=1)
    >>> round(float(loss), 6)
    0.407606
    """
    from .. import _validate as Vd
    from .._namespace import dtype_name, is_integer, namespace_of
    from ..core.reduction import reduce_loss, row_scales

    error, fields, xp, start = None, None, None, None
    try:
        lib, xp = namespace_of(x=x, labels=labels, weight=weight)
        Vd.check_logits("x", x)
        Vd.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         temperature=temperature)
        if not is_integer(labels.dtype):
            raise TypeError(f"labels: expected integer class indices, got dtype {dtype_name(labels.dtype)}")
        if x.ndim != 2 or tuple(labels.shape) != (x.shape[0],):
            raise ValueError(f"x, labels: expected shapes (N, n) and (N,), got {tuple(x.shape)} and "
                             f"{tuple(labels.shape)}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
        n = x.shape[1]
        start = rank * n if vocab_start is None else int(vocab_start)
        if not 0 <= start < _EXACT or n >= _EXACT:
            raise ValueError(f"vocab_start: expected a start in [0, 2^24), got {start}")
        wkey = None if weight is None else ("weight", int(weight.shape[0]))
        fields = header_fields(xp, labels, start=start, size=n, dtype=dtype_name(x.dtype), ignore_index=ignore_index,
                               options={"ignore_index": ignore_index, "label_smoothing": float(label_smoothing),
                                        "reduction": reduction, "z_loss": float(z_loss), "softcap": softcap,
                                        "temperature": float(temperature), "weight": wkey,
                                        "vocab_start": vocab_start is None, "kind": "stages"})
    except (TypeError, ValueError) as exc:
        error = exc
    if xp is None:
        import numpy as xp  # noqa: N813 - a rank with unusable arrays still takes part in the header
    like = x if error is None else xp.zeros(0)
    buf = all_reduce_max(encode_header(xp, rank=rank, world_size=world_size, fields=fields, error=error, like=like))
    head = decode_header(buf, world_size)
    try:
        nV = header_verdict(head, weight_len=None if weight is None else int(weight.shape[0]))
    except (TypeError, ValueError) as exc:
        if error is not None:
            raise exc from error
        raise
    Vd.check_label_range(lib, labels, nV, ignore_index)
    acc = acc_dtype(xp, x.dtype)
    sdt = stat_dtype(xp, acc)
    wl = None if weight is None else xp.astype(weight, acc)[start:start + n]
    u = transform(xp, _as(xp, x, acc), softcap, 1.0)
    parts = local_partials(xp, u, labels, start=start, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           weight_local=wl, temperature=temperature, stat_dtype=sdt)
    red = reduce_rows(xp, parts, labels, all_reduce_max=all_reduce_max, all_reduce_sum=all_reduce_sum,
                      vocab_size=nV, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                      temperature=temperature)
    loss = reduce_loss(xp, red.ce, red.lse, red.validf, red.wy, reduction, z_loss)
    g_ce, g_z = row_scales(xp, red.validf, red.wy, reduction)
    wtotal = float(nV) if weight is None else xp.sum(xp.astype(weight, sdt))
    dx = local_grad(xp, x, labels, red.m, red.r, g_ce, g_z, start=start, vocab_size=nV, wtotal=wtotal,
                    wy=red.wy, validf=red.validf, weight_local=wl, label_smoothing=label_smoothing, z_loss=z_loss,
                    softcap=softcap, temperature=temperature, max_before_temperature=True)
    return xp.astype(loss, x.dtype), dx


# ----------------------------------------------------------------------------------------------
# the fused head's statistics (vocab_parallel_linear_head): entropy, argmax, teacher divergences
#
# ``z`` here is the fully transformed logit (softcap, then the scalar and per-token temperatures,
# as :mod:`logitkit.core.linear_head` computes it), so the cross-entropy stages above run with
# ``temperature=1``. Each extra statistic is a sum over the classes of terms relative to the local
# maximum that a rank rescales to the global one with O(N) work once the MAX is known (as
# :func:`global_slots` does for ``Σ exp``), so it rides in the same two all-reduces:
#
#   entropy   H = r + E/S,   E = Σ_c e_c (m − z_c),  e_c = exp(z_c − m),  S = Σ_c e_c
#   kl        Σ q (lt − ls)  = Dk/St − rt + r,   Dk = Σ_c et_c ((zt_c − mt) − (z_c − m)),  St = Σ et
#   reverse   Σ p (ls − lt)  = Dr/S − r + rt,    Dr = Σ_c e_c ((z_c − m) − (zt_c − mt))
#
# (every E term is ≥ 0, so a confident row keeps its tiny entropy). The generalized JSD needs
# ``log M_c = log(β q_c + (1−β) p_c)``, which only the global statistics give: a second pass over
# the chunks and one more SUM (:func:`head_jsd_partials`). A top-k teacher needs the student's
# ``z`` at its k global classes: the rank that owns each sends ``m − z_I`` (k slots). The argmax
# is the lowest global index among the ranks whose local maximum of the raw logits equals the
# global one: its value rides in the MAX, the index needs one more (MAX of −index) all-reduce.

NO_INDEX = float(_EXACT)   # above every global class index (the header keeps V < 2^24)


def head_keys(spec: Any) -> tuple:
    """The differentiable per-row values a head call returns, in order (``lse`` also for the z-loss)."""
    o = spec.outputs
    return tuple(k for k, need in (("ce", "loss" in o), ("lse", "lse" in o or spec.need_lse),
                                   ("lp", "logprobs" in o), ("ent", "entropy" in o), ("kl", "kl" in o)) if need)


class HeadPartials(NamedTuple):
    """Local row statistics of one shard for the fused head (``(N, 1)`` each unless noted)."""

    ce: Partials              # the cross-entropy partials (:func:`local_partials`, temperature 1)
    ent: Any = None           # Σ e (m_loc − z), e = exp(z − m_loc)
    amv: Any = None           # local max of the raw logits (NaN → +inf), for the argmax
    ami: Any = None           # its global index (the first one), as a float; NO_INDEX for no class
    mt: Any = None            # the teacher's local max
    tt: Any = None            # Σ exp(zt − mt_loc)
    dk: Any = None            # kl: Σ et ((zt − mt_loc) − (z − m_loc)); reverse_kl: Σ e ((z − m_loc) − (zt − mt_loc))
    zk: Any = None            # (N, k) z at the teacher's top-k classes this rank owns (0 elsewhere)
    ownk: Any = None          # (N, k) bool: this rank owns that class


def _full(xp: Any, shape: tuple, value: float, dtype: Any, like: Any) -> Any:
    return _zeros(xp, shape, dtype, like) + value


def head_local_partials(xp: Any, z: Any, labels: Any, *, start: Any, ignore_index: int,
                        label_smoothing: float = 0.0, weight_local: Any = None, stat_dtype: Any = None,
                        entropy: bool = False, raw: Any = None, zt: Any = None, divergence: str = "kl",
                        topk: Any = None, col_mask: Any = None) -> HeadPartials:
    """Stage 1 of the fused head on one chunk of this rank's ``(N, n)`` slice (no communication).

    ``z``: transformed logits (accumulation dtype); ``raw``: the untransformed logits when the
    argmax is wanted; ``zt``: the teacher's logits of the same classes divided by its temperature
    (a dense teacher; ``divergence`` ``"kl"`` or ``"reverse_kl"`` adds ``dk``, ``"jsd"`` nothing
    here); ``topk``: ``(N, k)`` global class indices of a top-k teacher. Sums in ``stat_dtype``.
    ``col_mask``: ``(n,)`` bool, ``False`` for padding columns (a JAX vocabulary padded to the
    axis size): their ``z``, ``raw`` and ``zt`` must be ``−inf`` already (the caller's mask).
    """
    with _quiet(xp):
        sdt = z.dtype if stat_dtype is None else stat_dtype
        ce = local_partials(xp, z, labels, start=start, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            weight_local=weight_local, stat_dtype=sdt, col_mask=col_mask)
        N, n = z.shape
        m0 = xp.where(xp.isfinite(ce.m), ce.m, 0.0)
        out: dict = {}
        e = None
        if entropy or (zt is not None and divergence == "reverse_kl"):
            e = xp.exp(z - m0)
        if entropy:
            out["ent"] = _sum_to(xp, xp.where(e > 0, e * (m0 - z), 0.0), sdt)
        if raw is not None:
            if n == 0:
                out["amv"] = _full(xp, (N, 1), -math.inf, z.dtype, z)
                out["ami"] = _full(xp, (N, 1), NO_INDEX, z.dtype, z)
            else:
                v, i = _max_argmax(xp, raw)       # a NaN is the max (torch and NumPy agree)
                out["amv"] = _as(xp, xp.where(xp.isnan(v), math.inf, v), z.dtype)
                out["ami"] = _as(xp, i, z.dtype) + start
        if zt is not None:
            if n == 0:
                mt = _full(xp, (N, 1), -math.inf, z.dtype, z)
                out["mt"], out["tt"] = mt, _zeros(xp, (N, 1), sdt, z)
                if divergence != "jsd":
                    out["dk"] = _zeros(xp, (N, 1), sdt, z)
            else:
                mt = _max_argmax(xp, zt)[0]
                lt = zt - xp.where(xp.isfinite(mt), mt, 0.0)
                et = xp.exp(lt)
                out["mt"], out["tt"] = mt, _sum_to(xp, et, sdt)
                if divergence == "kl":
                    out["dk"] = _sum_to(xp, xp.where(et > 0, et * (lt - (z - m0)), 0.0), sdt)
                elif divergence == "reverse_kl":
                    out["dk"] = _sum_to(xp, xp.where(e > 0, e * ((z - m0) - lt), 0.0), sdt)
        if topk is not None:
            loc = topk - start
            own = (loc >= 0) & (loc < n)
            if n == 0:
                zk = _zeros(xp, tuple(topk.shape), z.dtype, z)
            else:
                zk = xp.where(own, xp.take_along_axis(z, xp.where(own, loc, 0), axis=-1), 0.0)
            out["zk"], out["ownk"] = zk, own
        return HeadPartials(ce, **out)


def cat_head_partials(xp: Any, pieces: list) -> HeadPartials:
    """Join the per-chunk :class:`HeadPartials` along the tokens (``wsum`` is per shard)."""
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    c0 = first.ce
    ce = Partials(*[_cat(xp, [getattr(p.ce, f) for p in pieces]) for f in ("m", "t", "c", "zy", "own")],
                  None if c0.s is None else _cat(xp, [p.ce.s for p in pieces]), c0.wsum)
    rest = {f: (None if getattr(first, f) is None else _cat(xp, [getattr(p, f) for p in pieces]))
            for f in HeadPartials._fields[1:]}
    return HeadPartials(ce, **rest)


def head_max_values(xp: Any, hp: HeadPartials) -> list:
    """What the head adds to the MAX all-reduce, ``(N,)`` each: the teacher's max (a NaN sends
    ``−inf``; its row sends NaN in the SUM instead), the argmax key."""
    out = []
    if hp.mt is not None:
        out.append(xp.where(xp.isnan(hp.mt), -math.inf, hp.mt).reshape(-1))
    if hp.amv is not None:
        out.append(hp.amv.reshape(-1))
    return out


def head_slots(xp: Any, hp: HeadPartials, m: Any, mt: Any = None, divergence: str = "kl") -> Any:
    """Stage 3 of the head: this rank's extra SUM columns ``(N, j)`` given the global maxima.

    Columns: ``E`` rescaled (entropy), then ``St`` and ``Dk``/``Dr`` (dense teacher; ``St``
    alone for the JSD), then ``m − z_I`` for the k top-k classes this rank owns. ``m``, ``mt``:
    the global student / teacher maxima ``(N, 1)``. ``None`` when the head adds nothing.
    """
    with _quiet(xp):
        p = hp.ce
        sdt = p.t.dtype
        pm, mg = _as(xp, p.m, sdt), _as(xp, m, sdt)
        fin = xp.isfinite(pm) & xp.isfinite(mg)
        pm0 = xp.where(xp.isfinite(pm), pm, 0.0)
        mg0 = xp.where(xp.isfinite(mg), mg, 0.0)
        s_scale = xp.where(fin, xp.exp(pm0 - mg0), 0.0)
        s_loc = p.t + p.c
        cols = []
        if hp.ent is not None:
            cols.append(xp.where(fin, s_scale * (hp.ent + (mg0 - pm0) * s_loc), 0.0))
        if hp.mt is not None:
            tm, tg = _as(xp, hp.mt, sdt), _as(xp, mt, sdt)
            tfin = xp.isfinite(tm) & xp.isfinite(tg)
            tm0 = xp.where(xp.isfinite(tm), tm, 0.0)
            tg0 = xp.where(xp.isfinite(tg), tg, 0.0)
            t_scale = xp.where(tfin, xp.exp(tm0 - tg0), 0.0)
            cols.append(xp.where(xp.isnan(tm), math.nan, t_scale * hp.tt))
            if hp.dk is not None:
                if divergence == "kl":
                    shift = (tm0 - tg0) - (pm0 - mg0)
                    cols.append(xp.where(tfin, t_scale * (hp.dk + shift * hp.tt), 0.0))
                else:
                    shift = (pm0 - mg0) - (tm0 - tg0)
                    cols.append(xp.where(fin, s_scale * (hp.dk + shift * s_loc), 0.0))
        if hp.zk is not None:
            cols.append(xp.where(hp.ownk, mg - _as(xp, hp.zk, sdt), 0.0))
        if not cols:
            return None
        return _cat_cols(xp, cols)


def _cat_cols(xp: Any, cols: list) -> Any:
    if _lib(xp) == "torch":
        return xp._t.cat(cols, dim=1)
    return xp.concatenate(cols, axis=1)


def argmax_candidates(xp: Any, hp: HeadPartials, key: Any) -> Any:
    """``(N,)`` for the MAX all-reduce of the argmax: ``−index`` where this rank holds the global
    key ``key`` ``(N,)``, ``−NO_INDEX`` elsewhere; the lowest index is ``−`` the reduced value."""
    amv = hp.amv.reshape(-1)
    return xp.where(amv == _as(xp, key, amv.dtype), -hp.ami.reshape(-1), -NO_INDEX)


def head_rows(xp: Any, red: Reduced, *, entropy: bool = False, teacher: str = "none",
              divergence: str = "kl", mt: Any = None, topk_logprobs: Any = None, spec: Any = None) -> dict:
    """Stage 5 of the head: per-row values ``(N,)`` in the statistics dtype from the reduced sums.

    ``lp`` (log p of the label; labels not ignored), ``ent``, and for a teacher ``kl`` / ``aux``
    (the divergence and what its gradient needs), ``mt`` / ``rt`` (the teacher's global max and
    log Σ exp(zt − mt)), ``G`` ``(N, k)`` (top-k: the per-class weights of the gradient, see
    :func:`head_local_grad`). A dense JSD's ``kl`` comes from :func:`head_jsd_rows` instead.
    ``spec``: the :class:`logitkit.core.linear_head.HeadSpec` (top-k maths are the core's).
    """
    with _quiet(xp):
        T, C, D = red.sums[0], red.sums[1], red.sums[2]
        r = red.r
        S = T + C
        all_masked = (red.m == -math.inf) & ~xp.isnan(T)
        nan = r - r
        out = {"lp": -xp.where(all_masked, math.inf, D + r)}
        j = 0
        if entropy:
            E = red.extra[:, j]
            j += 1
            out["ent"] = xp.where(all_masked, 0.0, r + E / S)
        if teacher == "dense":
            St = red.extra[:, j]
            j += 1
            tg = _as(xp, mt, r.dtype)
            t_masked = (tg == -math.inf) & ~xp.isnan(St)
            rt = xp.where(t_masked, 0.0, xp.log(St))
            out["mt"], out["rt"] = tg, rt
            if divergence != "jsd":
                Dk = red.extra[:, j]
                j += 1
                if divergence == "kl":
                    kl = xp.where(t_masked, 0.0, Dk / St - rt + r)
                else:
                    kl = xp.where(t_masked, math.inf, Dk / S - r + rt)
                kl = kl + nan
                out["kl"] = out["aux"] = kl
        elif teacher == "topk":
            from ..core import linear_head as core_head

            k = topk_logprobs.shape[-1]
            lsk = -red.extra[:, j:j + k] - xp.expand_dims(r, -1)     # log p at the k classes
            iota = xp.broadcast_to(xp.expand_dims(_iota(xp, k, lsk), 0), tuple(lsk.shape))
            teach = (iota, topk_logprobs)
            kl, aux = core_head._kl_terms(xp, lsk, None, teach, spec, lsk.dtype)
            out["kl"], out["aux"] = kl + nan, aux + nan
            # the core's top-k gradient with p = 0 leaves the per-class weights G: d/dz = scatter(G) − p·ΣG
            G = core_head._kl_grad(xp, lsk, xp.zeros_like(lsk), teach, spec, lsk.dtype, aux)
            out["G"] = G
        return out


def head_jsd_partials(xp: Any, z: Any, zt: Any, m: Any, r: Any, mt: Any, rt: Any, beta: float,
                      stat_dtype: Any) -> Any:
    """The dense JSD's second pass on one chunk: ``(N, 2)`` local ``[Σ q (lt − log M), Σ p (ls − log M)]``
    from the global statistics (``(N,)`` each), to be summed over the ranks."""
    from ..core import linear_head as core_head

    with _quiet(xp):
        ls, p, lt, q, lm = _jsd_terms(xp, z, zt, m, r, mt, rt, beta)
        a = _as(xp, core_head._plogq(xp, q, lt - lm), stat_dtype)
        d = _as(xp, core_head._plogq(xp, p, ls - lm), stat_dtype)
        return _cat_cols(xp, [xp.expand_dims(a, -1), xp.expand_dims(d, -1)])


def _jsd_terms(xp: Any, z: Any, zt: Any, m: Any, r: Any, mt: Any, rt: Any, beta: float) -> tuple:
    from ..core import linear_head as core_head

    acc = z.dtype
    col = lambda v: xp.expand_dims(_as(xp, v, acc), -1)  # noqa: E731
    ls = (z - col(xp.where(xp.isfinite(m), m, 0.0))) - col(r)
    lt = (zt - col(xp.where(xp.isfinite(mt), mt, 0.0))) - col(rt)
    lm = core_head._logaddexp(xp, lt + math.log(beta), ls + math.log1p(-beta))
    return ls, xp.exp(ls), lt, xp.exp(lt), lm


def head_jsd_rows(xp: Any, sums: Any, r: Any, beta: float) -> tuple:
    """``(jsd, aux)`` per row from the summed :func:`head_jsd_partials` ``(N, 2)``."""
    nan = r - r
    d = sums[:, 1] + nan
    return beta * sums[:, 0] + (1.0 - beta) * d, d


def head_local_grad(xp: Any, z: Any, labels: Any, rows: dict, cots: dict, *, start: Any, ignore_index: int,
                    has_labels: bool, vocab_size: Any = None, wtotal: Any = None, weight_local: Any = None,
                    label_smoothing: float = 0.0, teacher: str = "none", divergence: str = "kl",
                    beta: float = 0.5, zt: Any = None, topk: Any = None, col_mask: Any = None) -> Any:
    r"""``d/dz`` of ``Σ_i Σ_k cots[k]_i · value_k,i`` on this rank's ``(N, n)`` slice, no communication.

    ``z``: the transformed logits (the caller chains the softcap and temperatures); ``rows``: the
    global per-row ``m, r`` and, as needed, ``validf, wy`` (loss), ``ent``, ``aux``, ``mt, rt``
    (dense teacher), ``G`` (top-k); ``cots``: any of ``g_ce, g_lse, g_lp, g_ent, g_kl`` ``(N,)``.
    The terms are those of :func:`logitkit.core.linear_head.chunk_backward`:
    ``g_ce·dce + (g_lse − g_lp)·p + g_lp·onehot(y) − g_ent·p(ls + H) + g_kl·dkl`` with ``dkl`` =
    ``p − q`` (kl), ``p(ls − lt − K)`` (reverse_kl), ``(1−β)p(ls − log M − D)`` (jsd),
    ``scatter(G) − p·ΣG`` (top-k), the one-hot and scatter only where this rank owns the class.
    Ignored rows get an exact zero, and so do padding columns (``col_mask`` ``False``; their
    ``z`` and ``zt`` ``−inf`` already). Returns ``z``'s dtype.
    """
    with _quiet(xp):
        acc = z.dtype
        N, n = z.shape
        col = lambda v: xp.expand_dims(_as(xp, v, acc), -1)  # noqa: E731
        m, r = rows["m"], rows["r"]
        ls = (z - col(xp.where(xp.isfinite(m), m, 0.0))) - col(r)
        p = xp.exp(ls)
        dz = None

        def add(t: Any) -> None:
            nonlocal dz
            dz = t if dz is None else dz + t

        if cots.get("g_ce") is not None:
            add(local_grad(xp, z, labels, m, r, cots["g_ce"], _zeros(xp, (N,), acc, z), start=start,
                           vocab_size=vocab_size, wtotal=wtotal, wy=rows["wy"], validf=rows["validf"],
                           weight_local=weight_local, label_smoothing=label_smoothing, col_mask=col_mask))
        coef = None
        if cots.get("g_lse") is not None:
            coef = col(cots["g_lse"])
        if cots.get("g_lp") is not None:
            g = col(cots["g_lp"])
            coef = -g if coef is None else coef - g
            if n > 0:
                loc = labels - start
                own = xp.expand_dims((loc >= 0) & (loc < n) & (labels != ignore_index), -1)
                onehot = (xp.expand_dims(_iota(xp, n, z), 0) == xp.expand_dims(loc, -1)) & own
                add(xp.where(onehot, g, 0.0))
        if coef is not None:
            add(coef * p)
        if cots.get("g_ent") is not None:
            add(col(cots["g_ent"]) * xp.where(p > 0, -p * (ls + col(rows["ent"])), 0.0))
        if cots.get("g_kl") is not None:
            gk = col(cots["g_kl"])
            if teacher == "dense":
                lt = (zt - col(xp.where(xp.isfinite(rows["mt"]), rows["mt"], 0.0))) - col(rows["rt"])
                if divergence == "kl":
                    t = p - xp.exp(lt)
                elif divergence == "reverse_kl":
                    t = xp.where(p > 0, p * (ls - lt - col(rows["aux"])), 0.0)
                else:
                    lm = _jsd_terms(xp, z, zt, m, r, rows["mt"], rows["rt"], beta)[4]
                    t = (1.0 - beta) * xp.where(p > 0, p * (ls - lm - col(rows["aux"])), 0.0)
            else:
                G = _as(xp, rows["G"], acc)
                t = -p * xp.expand_dims(xp.sum(G, axis=-1), -1)
                if n > 0:
                    loc = topk - start
                    own = (loc >= 0) & (loc < n)
                    t = _scatter_cols(xp, t, xp.where(own, loc, 0), xp.where(own, G, 0.0))
            add(gk * t)
        if dz is None:
            return xp.zeros_like(z)
        if cots.get("g_ent") is not None or cots.get("g_kl") is not None:
            dz = dz + col(r - r)      # rows with NaN (dropped by the masks above) get NaN gradients
        if has_labels:
            dz = xp.where(xp.expand_dims(labels != ignore_index, -1), dz, 0.0)
        if col_mask is not None:
            dz = xp.where(col_mask, dz, 0.0)
        return dz


def _scatter_cols(xp: Any, a: Any, idx: Any, vals: Any) -> Any:
    """``a[i, idx[i, j]] += vals[i, j]`` (repeated indices add; ``a`` is a fresh temporary)."""
    lib = _lib(xp)
    if lib == "torch":
        return a.scatter_add_(-1, idx, vals.to(a.dtype))
    rows = xp.expand_dims(xp.arange(a.shape[0]), -1)
    if lib == "numpy":
        xp.add.at(a, (rows, idx), vals)
        return a
    return a.at[rows, idx].add(vals)
