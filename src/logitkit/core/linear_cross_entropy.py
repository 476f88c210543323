r"""Fused linear + cross-entropy: the loss of ``z = hidden @ linear_weight.T + linear_bias``
without ever holding the ``(N, V)`` logits.

The rows of ``hidden`` that are not ignored are processed in chunks of ``rows`` tokens; each
chunk's logits live in one small workspace, and so does every gradient of it. Two layouts:

* **full rows** (``cols == V``): a chunk holds whole rows of logits, so the fused stages of
  :mod:`logitkit.kernels` (``ce_forward`` / ``ce_forward_backward`` / ``ce_backward``, numba on
  CPU, Triton on GPU, the core otherwise) run on it unchanged, in place.
* **vocabulary tiles** (``cols < V``, for vocabularies too wide for a useful number of whole rows):
  a chunk is cut into ``rows x cols`` tiles and the row statistics are merged online across tiles
  with the vocabulary-parallel stages of :mod:`logitkit.distributed.stages` (one tile = one shard):
  the running ``(m, t, c)`` keeps the ``log1p``-without-the-max trick of
  :func:`logitkit.core.logsumexp.row_stats` exact across tiles (``c`` counts the maximal entries).

Gradients, two strategies (the choice is explained at :func:`choose_strategy`):

* ``"fused"``: gradients computed during forward (three matrix products in all: the logits,
  ``dhidden = dz @ W`` and ``dW += dz.T @ hidden``), possible because the per-row multipliers
  ``g_ce, g_z`` of a ``mean`` or ``sum`` loss follow from the labels alone; backward only scales by
  the scalar ``grad_output``. Needs full rows (a row's softmax needs its final logsumexp).
* ``"recompute"``: forward keeps only ``m, r`` per row (one product), backward recomputes the
  logits (four products in all). Needed for ``reduction="none"`` (the per-token ``grad_output``
  enters ``dW = Σ_i g_i dz_i^T h_i`` and is unknown at forward time) and for vocabulary tiles.

``dW`` and ``dbias`` accumulate in float32 for float16/bfloat16 inputs (float64 for float64);
``dhidden`` of a full-row chunk is one product over the whole vocabulary.

The driver below runs on libraries with in-place updates (NumPy, torch) through a small ``ops``
object (:class:`NumpyOps` here, ``logitkit.torch.linear.TorchOps`` for torch); JAX reuses
:func:`plan_chunks`, :func:`merge_partials` and the stages inside ``lax.scan``.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from .._namespace import NUMPY, acc_dtype, dtype_name
from ..distributed import stages as vp
from ..kernels import registry
from .logsumexp import transform, transform_grad_factor
from .reduction import reduce_loss, row_scales, row_weights

__all__ = [
    "Plan", "plan_chunks", "choose_strategy", "merge_partials", "finish_partials", "tile_entropy",
    "merge_entropy", "entropy_finish", "entropy_grad", "NumpyOps", "Head", "DEFAULT_WORKSPACE",
]

# Bytes of chunk workspace (logits and what is computed from them) per call. 24 MiB holds 192
# float32 rows of a 32k vocabulary: each weight row loaded from memory serves 192 tokens and
# ``dW += dz.T @ h`` has an inner dimension of 192. Head workload, CPU, one process, alternating
# (fwd + bwd, eager torch 4.37 s): 64 rows 5.5 s, 128 rows 4.40 s, 192 rows 4.29 s, 256 rows
# 4.18 s; 192 rows keep the peak beyond the gradients under the 32 MB.
DEFAULT_WORKSPACE = 24 << 20
# Fewer whole rows than this per chunk and the products degenerate into matrix-vector work that
# re-reads the whole weight for every few tokens: cut the vocabulary into tiles instead.
MIN_FULL_ROWS = 64
# Narrowest vocabulary tile: below this the per-tile overheads dominate.
MIN_COLS = 128
# Temporaries of the namespace-level stages (core or distributed.stages) per logit, relative to
# one accumulation-dtype copy: they are written with whole-array operations.
CORE_TEMPS = 8


class Plan(NamedTuple):
    """How a call is chunked: ``rows`` tokens per chunk, ``cols`` classes per tile."""

    rows: int
    cols: int
    full_rows: bool  # cols == V: a chunk holds whole rows of logits


def plan_chunks(n_rows: int, V: int, *, bytes_per_logit: int, chunk_size: Any = None,
                workspace: int = DEFAULT_WORKSPACE) -> Plan:
    """Chunk sizes for ``n_rows`` tokens (those not ignored) and ``V`` classes.

    ``bytes_per_logit``: workspace bytes one logit costs on this path (its buffer plus temporaries).
    ``chunk_size``: ``None`` (automatic), an int (tokens per chunk, whole rows) or a pair
    ``(rows, cols)`` (``cols < V`` cuts the vocabulary into tiles).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, (tuple, list)):
            rows, cols = int(chunk_size[0]), int(chunk_size[1])
        else:
            rows, cols = int(chunk_size), V
        rows = max(1, min(rows, max(n_rows, 1)))
        cols = max(1, min(cols, max(V, 1)))
        return Plan(rows, cols, cols >= V)
    per_row = max(1, V * bytes_per_logit)
    n = max(n_rows, 1)
    rows = max(1, workspace // per_row)
    if rows >= min(n, MIN_FULL_ROWS) or V <= MIN_COLS:
        return Plan(min(rows, n), V, True)
    # Tiles: as many rows as the BLAS likes (a tile's products then reuse each weight row
    # ``rows`` times), then as many classes as the workspace allows.
    rows = min(n, 512)
    cols = workspace // (rows * bytes_per_logit)
    if cols < MIN_COLS:
        cols = MIN_COLS
        rows = max(1, workspace // (cols * bytes_per_logit))
    return Plan(rows, min(cols, V), cols >= V)


def choose_strategy(reduction: str, plan: Plan, grad_output_known: bool) -> str:
    """``"fused"`` or ``"recompute"`` for a call that needs gradients.

    Fused costs three matrix products, recompute four: the logits product is as expensive as each
    gradient product (all are ``2·N·H·V`` flops), so recompute costs ~4/3 the time (head
    workload, CPU: variants "logitkit" and "logitkit recompute" of benchmarks/linear_bench.py).
    Fused holds the gradients from forward to backward, which costs nothing extra at the loss of
    a model: they are allocated either way and backward follows at once. So fused whenever it is
    possible: the per-row multipliers must be known at forward time (``mean``/``sum``, or an
    explicit per-row ``grad_output``) and a chunk must hold whole rows (a row's softmax needs its
    final logsumexp before any gradient of it exists).

    ``LOGITKIT_LCE_STRATEGY=recompute`` forces recomputation (the benchmark measures both).
    """
    if os.environ.get("LOGITKIT_LCE_STRATEGY", "").lower() == "recompute":
        return "recompute"
    if plan.full_rows and (reduction != "none" or grad_output_known):
        return "fused"
    return "recompute"


# ----------------------------------------------------------------------------------------------
# online statistics across vocabulary tiles (any namespace; JAX uses these inside lax.scan)


def merge_partials(xp: Any, a: vp.Partials, b: vp.Partials) -> vp.Partials:
    """Partials of the union of two disjoint sets of classes (same rows).

    Rescales both to the common maximum with :func:`logitkit.distributed.stages.global_slots` (the
    side that holds the maximum keeps its exact ``(t, c)``), so the sum of the non-maximal terms
    stays a separate number from the count of maximal ones, as in the core's ``row_stats``.
    """
    m = xp.maximum(a.m, b.m)
    sa = vp.global_slots(xp, a, m)
    sb = vp.global_slots(xp, b, m)
    s = wsum = None
    if a.s is not None:
        s = sa[3] + sb[3]
        wsum = a.wsum + b.wsum
    return vp.Partials(m, sa[0] + sb[0], sa[1] + sb[1], xp.where(b.own, b.zy, a.zy),
                       xp.logical_or(a.own, b.own), s, wsum)


def finish_partials(xp: Any, p: vp.Partials, labels: Any, *, V: int, weight: Any, ignore_index: int,
                    label_smoothing: float, acc: Any) -> tuple[Any, Any, Any]:
    """``(ce, m, r)`` per row ``(n,)`` from the partials of the whole vocabulary."""
    n = p.m.shape[0]
    m = xp.reshape(p.m, (n,))
    slots = vp.global_slots(xp, p, p.m)
    sums = [xp.reshape(s, (n,)) for s in slots]
    validf, wy = row_weights(xp, labels, weight, ignore_index, acc)
    wtotal = float(V) if weight is None else xp.sum(xp.astype(weight, acc))
    ce, r = vp.finish(xp, m, sums, validf, wy, vocab_size=V, wtotal=wtotal,
                      label_smoothing=label_smoothing)
    return ce, m, r


# Entropy H = r + A / S with A = Σ_c e_c (m − z_c), e_c = exp(z_c − m), S = Σ_c e_c = 1 + t:
# every term of A is ≥ 0, so a common offset of the logits cancels nothing.

def tile_entropy(xp: Any, z: Any) -> tuple[Any, Any, Any, Any]:
    """``(m, t, c, A)`` of one tile of transformed logits ``z`` (n, cols), each ``(n, 1)``."""
    with np.errstate(all="ignore") if xp is np else _null():
        m = xp.max(z, axis=-1, keepdims=True)
        m0 = xp.where(xp.isfinite(m), m, 0.0)
        e = xp.exp(z - m0)
        is_max = z == m
        c = xp.where(m == -math.inf, 0.0, xp.sum(xp.astype(is_max, z.dtype), axis=-1, keepdims=True))
        t = xp.sum(xp.where(is_max, 0.0, e), axis=-1, keepdims=True)
        a = xp.sum(xp.where(e > 0, e * (m0 - z), 0.0), axis=-1, keepdims=True)
        return m, t, c, a


def merge_entropy(xp: Any, p: tuple, q: tuple) -> tuple:
    """Merge two :func:`tile_entropy` results over disjoint classes."""
    with np.errstate(all="ignore") if xp is np else _null():
        m = xp.maximum(p[0], q[0])
        out_t, out_c, out_a = 0.0, 0.0, 0.0
        for mk, tk, ck, ak in (p, q):
            keep = mk == m
            fin = xp.isfinite(mk) & xp.isfinite(m)
            d = xp.where(fin, m - mk, 0.0)
            scale = xp.exp(xp.where(fin, mk - m, -math.inf))
            out_t = out_t + xp.where(keep, tk, scale * (tk + ck))
            out_c = out_c + xp.where(keep, ck, 0.0)
            # A' = exp(mk − m)·(A + (m − mk)·S) with S = t + c
            out_a = out_a + xp.where(keep, ak, scale * (ak + d * (tk + ck)))
        return m, out_t, out_c, out_a


def entropy_finish(xp: Any, p: tuple) -> Any:
    """Entropy per row ``(n,)`` from merged ``(m, t, c, A)``: ``r + A / (t + c)``."""
    m, t, c, a = p
    with np.errstate(all="ignore") if xp is np else _null():
        r = xp.log1p(t + (c - 1.0))
        h = r + a / (t + c)
        h = xp.where(m == -math.inf, 0.0, xp.where(m == math.inf, math.nan, h))
        return xp.reshape(h, (h.shape[0],))


def entropy_grad(xp: Any, x: Any, m: Any, r: Any, ent: Any, g: Any, softcap: float | None,
                 temperature: float) -> Any:
    """``d (Σ_i g_i H_i) / d x`` for one tile of logits ``x`` (n, cols), from the row's ``m, r, H``.

    ``dH/dz_c = −p_c (log p_c + H)``, chained through softcap and temperature; classes with
    ``p_c = 0`` (masked) get 0. Returns ``x``'s dtype.
    """
    acc = acc_dtype(xp, x.dtype)
    xa = xp.astype(x, acc)
    z = transform(xp, xa, softcap, temperature)
    with np.errstate(all="ignore") if xp is np else _null():
        m2, r2 = xp.expand_dims(m, -1), xp.expand_dims(r, -1)
        finite = xp.isfinite(m2)
        logp = (z - xp.where(finite, m2, 0.0)) - r2
        p = xp.where(finite, xp.exp(logp), xp.where(m2 == -math.inf, 0.0, math.nan))
        dz = xp.where(p > 0, -p * (logp + xp.expand_dims(ent, -1)), xp.where(p == 0, 0.0, p))
        dz = dz * xp.expand_dims(xp.astype(g, acc), -1)
        factor = transform_grad_factor(xp, xa, softcap, temperature)
        if factor is not None:
            dz = dz * factor
    return xp.astype(dz, x.dtype)


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# NumPy operations used by the driver (torch has the same methods in logitkit.torch.linear)


class NumpyOps:
    """In-place array operations for :class:`Head` on NumPy arrays.

    Low-precision NumPy arrays (ml_dtypes bfloat16, float16) have no BLAS: the weight is converted
    to float32 once (a copy of its size) and chunks on the fly; the logits are float32.
    """

    lib = NUMPY
    xp = np

    def __init__(self, hidden: Any, linear_weight: Any, linear_bias: Any) -> None:
        self.dtype = hidden.dtype
        self.acc = np.dtype(acc_dtype(np, hidden.dtype))
        self.low = self.acc != self.dtype
        self.W = linear_weight.astype(self.acc) if self.low else linear_weight
        self.b = None if linear_bias is None else linear_bias.astype(self.acc)
        self.logit_dtype = self.acc
        self.logit_bytes = self.acc.itemsize  # the chunk's logits, overwritten by their gradient

    # -- allocation
    def empty(self, shape: tuple, dtype: Any) -> Any:
        return np.empty(shape, dtype)

    def zeros(self, shape: tuple, dtype: Any) -> Any:
        return np.zeros(shape, dtype)

    def index(self, idx: np.ndarray) -> Any:
        return idx

    # -- rows
    def rows(self, x: Any, sel: Any) -> Any:
        out = x[sel]
        return out.astype(self.acc) if self.low and out.dtype != self.acc else out

    def put_rows(self, dst: Any, sel: Any, src: Any) -> None:
        dst[sel] = src

    # -- products
    def logits(self, h_c: Any, c0: int, c1: int, out: Any) -> Any:
        w = self.W[c0:c1]
        np.matmul(h_c, w.T, out=out)
        if self.b is not None:
            out += self.b[c0:c1]
        return out

    def dh(self, dz: Any, c0: int, c1: int, out: Any = None, accumulate: bool = False) -> Any:
        """``dz @ W[c0:c1]`` into ``out`` (or added to it)."""
        w = self.W[c0:c1]
        dz = dz.astype(w.dtype, copy=False)
        if accumulate:
            out += dz @ w
            return out
        if out is not None and out.dtype == w.dtype and out.flags.c_contiguous:
            np.matmul(dz, w, out=out)
            return out
        res = dz @ w
        if out is None:
            return res
        out[...] = res
        return out

    def add_dw(self, dw: Any, dz: Any, h_c: Any, c0: int, c1: int) -> None:
        """``dw[c0:c1] += dz.T @ h_c`` without a temporary of ``dw``'s size."""
        _addmm_t(dw[c0:c1], dz.astype(dw.dtype, copy=False), h_c.astype(dw.dtype, copy=False))

    def add_db(self, db: Any, dz: Any, c0: int, c1: int) -> None:
        db[c0:c1] += dz.sum(axis=0, dtype=db.dtype)

    # -- stages on full rows (registry: numba kernels when present, the core otherwise)
    def stage(self, name: str, x2: Any) -> tuple[str, Any]:
        return registry.select(name, NUMPY, x2)

    def kernel_labels(self, labels: Any) -> Any:
        return labels

    def to_out(self, x: Any, dtype: Any) -> Any:
        return x if x.dtype == dtype else x.astype(dtype)


def _addmm_t(c: Any, dz: Any, h: Any) -> None:
    """``c += dz.T @ h`` in place (``c``: (v, H) C-contiguous).

    NumPy's matmul cannot accumulate into its output, so the product goes through a bounded
    block of ``c``'s rows at a time: the extra memory is a few MB whatever the vocabulary.
    With SciPy present, BLAS gemm accumulates directly (beta = 1, no temporary).
    """
    gemm = _gemm_for(c.dtype)
    if gemm is not None and c.flags.c_contiguous and c.size:
        # c.T is Fortran-ordered (H, v): c.T += h.T @ dz, all operands passed without copies.
        gemm(1.0, h.T, dz.T, beta=1.0, c=c.T, trans_b=1, overwrite_c=1)
        return
    rows = max(1, (4 << 20) // max(1, c.shape[1] * c.itemsize))
    tmp = np.empty((min(rows, c.shape[0]), c.shape[1]), c.dtype)
    for v0 in range(0, c.shape[0], rows):
        v1 = min(c.shape[0], v0 + rows)
        t = tmp[: v1 - v0]
        np.matmul(dz[:, v0:v1].T, h, out=t)
        c[v0:v1] += t


_GEMM: dict = {}


def _gemm_for(dtype: Any) -> Any:
    key = np.dtype(dtype).name
    if key not in _GEMM:
        fn = None
        try:
            from scipy.linalg import blas

            fn = {"float32": blas.sgemm, "float64": blas.dgemm}.get(key)
        except ImportError:  # SciPy is optional: the blocked path above needs only NumPy
            fn = None
        _GEMM[key] = fn
    return _GEMM[key]


# ----------------------------------------------------------------------------------------------
# the driver


class Head:
    """One fused linear + cross-entropy problem, ready to run chunk by chunk.

    ``hidden`` ``(N, H)``, ``linear_weight`` ``(V, H)``, ``labels`` ``(N,)`` (validated), in the
    library of ``ops``. ``opts``: ``weight, ignore_index, label_smoothing, z_loss, softcap,
    temperature``. Rows with ``ignore_index`` never enter a product.
    """

    def __init__(self, ops: Any, hidden: Any, linear_weight: Any, labels: Any, linear_bias: Any,
                 opts: dict, chunk_size: Any = None, workspace: int = DEFAULT_WORKSPACE,
                 kernels: bool = True) -> None:
        self.ops, self.xp = ops, ops.xp
        self.h, self.W, self.labels, self.bias = hidden, linear_weight, labels, linear_bias
        self.N, self.H = hidden.shape
        self.V = linear_weight.shape[0]
        self.opts = opts
        self.acc = acc_dtype(self.xp, hidden.dtype)
        xp = self.xp
        self.validf, self.wy = row_weights(xp, labels, opts["weight"], opts["ignore_index"], self.acc)
        valid = _host_bool(labels != opts["ignore_index"])
        idx = np.flatnonzero(valid)
        self.n_valid = int(idx.size)
        probe = ops.empty((1, max(self.V, 1)), ops.logit_dtype)
        self.backend = ops.stage("ce_forward", probe)[0] if self.V and kernels else "core"
        xp_bpl = CORE_TEMPS * _itemsize(self.acc)  # namespace-level stages: whole-array temporaries
        bpl = ops.logit_bytes if self.backend != "core" else max(ops.logit_bytes, xp_bpl)
        self.plan = plan_chunks(self.n_valid, self.V, bytes_per_logit=bpl, chunk_size=chunk_size,
                                workspace=workspace)
        if not self.plan.full_rows and chunk_size is None and bpl < xp_bpl:
            # Tiles run distributed.stages (whole-array temporaries): re-plan with those counted.
            self.plan = plan_chunks(self.n_valid, self.V, bytes_per_logit=xp_bpl, workspace=workspace)
        self.chunks = [(s if isinstance(s, slice) else ops.index(s), n)
                       for s, n in _chunk_selections(idx, self.N, self.plan.rows)]

    # -- helpers
    def _stat_arrays(self) -> tuple[Any, Any, Any]:
        z = self.ops.zeros((self.N,), self.acc)
        return z, self.ops.zeros((self.N,), self.acc), self.ops.zeros((self.N,), self.acc)

    def _opts(self, *names: str) -> dict:
        return {k: self.opts[k] for k in names}

    def _grad_buffers(self, need: tuple[bool, bool, bool]) -> tuple[Any, Any, Any]:
        ops = self.ops
        dh = ops.zeros((self.N, self.H), self.h.dtype) if need[0] else None
        wacc = acc_dtype(self.xp, self.W.dtype)
        dw = ops.zeros((self.V, self.H), wacc) if need[1] else None
        db = ops.zeros((self.V,), wacc) if need[2] and self.bias is not None else None
        return dh, dw, db

    def _finish_grads(self, dh: Any, dw: Any, db: Any) -> tuple[Any, Any, Any]:
        ops = self.ops
        if dw is not None:
            dw = ops.to_out(dw, self.W.dtype)
        if db is not None:
            db = ops.to_out(db, self.bias.dtype)
        return dh, dw, db

    # -- passes
    def forward(self, g_ce: Any = None, g_z: Any = None, need: tuple = (False, False, False)):
        """Row statistics ``(ce, m, r)`` ``(N,)``; with ``g_ce`` given (fused strategy) also the
        gradients ``(dh, dw, db)`` of ``Σ g_ce·ce + g_z·z_loss·lse²`` (``None`` where not needed).
        """
        ce, m, r = self._stat_arrays()
        grads = self._grad_buffers(need) if g_ce is not None else (None, None, None)
        if not self.n_valid or not self.V:
            return (ce, m, r) + (self._finish_grads(*grads) if g_ce is not None else ())
        if self.plan.full_rows:
            self._full_rows(ce, m, r, g_ce, g_z, None, grads)
        else:
            if g_ce is not None:
                raise ValueError("the fused strategy needs whole rows per chunk (chunk_size cols == V)")
            self._tiled_forward(ce, m, r)
        if g_ce is not None:
            return (ce, m, r) + self._finish_grads(*grads)
        return ce, m, r

    def backward(self, m: Any, r: Any, g_ce: Any, g_z: Any, need: tuple = (True, True, True)):
        """Gradients ``(dh, dw, db)`` recomputing the logits from the saved ``m, r``."""
        grads = self._grad_buffers(need)
        if not self.n_valid or not self.V:
            return self._finish_grads(*grads)
        if self.plan.full_rows:
            self._full_rows(None, None, None, g_ce, g_z, (m, r), grads)
        else:
            self._tiled_backward(m, r, g_ce, g_z, grads)
        return self._finish_grads(*grads)

    # -- whole rows: the registry's fused stages, in place on the chunk's logits
    def _full_rows(self, ce, m, r, g_ce, g_z, saved, grads) -> None:
        ops = self.ops
        dh, dw, db = grads
        buf = ops.empty((self.plan.rows, self.V), ops.logit_dtype)
        fwd_opts = self._opts("weight", "ignore_index", "label_smoothing", "softcap", "temperature")
        bwd_opts = dict(fwd_opts, z_loss=self.opts["z_loss"])
        kname = "ce_forward" if g_ce is None else ("ce_backward" if saved is not None else "ce_forward_backward")
        _, stage = ops.stage(kname, buf)
        for sel, n in self.chunks:
            z = buf[:n]
            h_c = ops.rows(self.h, sel)
            ops.logits(h_c, 0, self.V, z)
            lab = ops.kernel_labels(self.labels[sel])
            if g_ce is None:
                c_, m_, r_ = stage(z, lab, **fwd_opts)
            elif saved is None:
                c_, m_, r_, _ = stage(z, lab, g_ce[sel], g_z[sel], out=z, **bwd_opts)
            else:
                stage(z, lab, saved[0][sel], saved[1][sel], g_ce[sel], g_z[sel], out=z, **bwd_opts)
            if ce is not None:
                ops.put_rows(ce, sel, c_)
                ops.put_rows(m, sel, m_)
                ops.put_rows(r, sel, r_)
            if g_ce is not None:
                self._chunk_grads(z, h_c, sel, n, dh, dw, db)

    def _chunk_grads(self, dz, h_c, sel, n, dh, dw, db, c0=0, c1=None, dh_acc=None) -> None:
        ops = self.ops
        c1 = self.V if c1 is None else c1
        if dh is not None:
            if dh_acc is not None:
                ops.dh(dz, c0, c1, out=dh_acc, accumulate=True)
            elif isinstance(sel, slice):
                ops.dh(dz, c0, c1, out=dh[sel])
            else:
                ops.put_rows(dh, sel, ops.to_out(ops.dh(dz, c0, c1), dh.dtype))
        if dw is not None:
            ops.add_dw(dw, dz, h_c, c0, c1)
        if db is not None:
            ops.add_db(db, dz, c0, c1)

    # -- vocabulary tiles: distributed.stages, one tile = one shard, merged online
    def _tile_iter(self):
        ops, V, cols = self.ops, self.V, self.plan.cols
        buf = ops.empty((self.plan.rows, min(cols, V)), ops.logit_dtype)
        for sel, n in self.chunks:
            h_c = ops.rows(self.h, sel)
            tiles = []
            for c0 in range(0, V, cols):
                c1 = min(V, c0 + cols)
                tiles.append((c0, c1))
            yield sel, n, h_c, buf, tiles

    def _weight_tile(self, c0: int, c1: int) -> Any:
        w = self.opts["weight"]
        return None if w is None else self.xp.astype(w[c0:c1], self.acc)

    def _tiled_forward(self, ce, m, r) -> None:
        xp, ops, o = self.xp, self.ops, self.opts
        for sel, n, h_c, buf, tiles in self._tile_iter():
            lab = self.labels[sel]
            run = None
            for c0, c1 in tiles:
                zt = ops.logits(h_c, c0, c1, buf[:n, : c1 - c0])
                zt = transform(xp, xp.astype(zt, self.acc), o["softcap"], o["temperature"])
                p = vp.local_partials(xp, zt, lab, start=c0, ignore_index=o["ignore_index"],
                                      label_smoothing=o["label_smoothing"], weight_local=self._weight_tile(c0, c1))
                run = p if run is None else merge_partials(xp, run, p)
            c_, m_, r_ = finish_partials(xp, run, lab, V=self.V, weight=o["weight"],
                                         ignore_index=o["ignore_index"],
                                         label_smoothing=o["label_smoothing"], acc=self.acc)
            ops.put_rows(ce, sel, c_)
            ops.put_rows(m, sel, m_)
            ops.put_rows(r, sel, r_)

    def _tiled_backward(self, m, r, g_ce, g_z, grads) -> None:
        xp, ops, o = self.xp, self.ops, self.opts
        dh, dw, db = grads
        wtotal = float(self.V) if o["weight"] is None else xp.sum(xp.astype(o["weight"], self.acc))
        for sel, n, h_c, buf, tiles in self._tile_iter():
            lab = self.labels[sel]
            dh_acc = ops.zeros((n, self.H), self.acc) if dh is not None else None
            for c0, c1 in tiles:
                zt = ops.logits(h_c, c0, c1, buf[:n, : c1 - c0])
                dz = vp.local_grad(xp, zt, lab, m[sel], r[sel], g_ce[sel], g_z[sel], start=c0,
                                   vocab_size=self.V, wtotal=wtotal, wy=self.wy[sel], validf=self.validf[sel],
                                   weight_local=self._weight_tile(c0, c1),
                                   label_smoothing=o["label_smoothing"], z_loss=o["z_loss"],
                                   softcap=o["softcap"], temperature=o["temperature"])
                self._chunk_grads(dz, h_c, sel, n, None, dw, db, c0, c1)
                if dh_acc is not None:
                    ops.dh(dz, c0, c1, out=dh_acc, accumulate=True)
            if dh is not None:
                ops.put_rows(dh, sel, ops.to_out(dh_acc, dh.dtype))

    # -- entropy (forward only; its gradient is in the framework adapters)
    def entropy(self) -> tuple[Any, Any, Any]:
        """``(H, m, r)`` per row ``(N,)``: the entropy of softmax of the transformed logits and
        the row statistics its gradient needs (``H = 0`` for rows without classes)."""
        xp, ops, o = self.xp, self.ops, self.opts
        out, m, r = self._stat_arrays()
        if not self.n_valid or not self.V:
            return out, m, r
        for sel, n, h_c, buf, tiles in self._tile_iter():
            run = None
            for c0, c1 in tiles:
                zt = ops.logits(h_c, c0, c1, buf[:n, : c1 - c0])
                zt = transform(xp, xp.astype(zt, self.acc), o["softcap"], o["temperature"])
                p = tile_entropy(xp, zt)
                run = p if run is None else merge_entropy(xp, run, p)
            ops.put_rows(out, sel, entropy_finish(xp, run))
            with np.errstate(all="ignore") if xp is np else _null():
                m_ = xp.reshape(run[0], (n,))
                r_ = xp.where(m_ == -math.inf, 0.0, xp.reshape(xp.log1p(run[1] + (run[2] - 1.0)), (n,)))
            ops.put_rows(m, sel, m_)
            ops.put_rows(r, sel, r_)
        return out, m, r

    def entropy_backward(self, ent: Any, m: Any, r: Any, g: Any, need: tuple = (True, True, True)):
        """Gradients ``(dh, dw, db)`` of ``Σ_i g_i H_i``, recomputing the logits tile by tile."""
        xp, ops, o = self.xp, self.ops, self.opts
        dh, dw, db = self._grad_buffers(need)
        if self.n_valid and self.V:
            for sel, n, h_c, buf, tiles in self._tile_iter():
                dh_acc = ops.zeros((n, self.H), self.acc) if dh is not None else None
                for c0, c1 in tiles:
                    zt = ops.logits(h_c, c0, c1, buf[:n, : c1 - c0])
                    dz = entropy_grad(xp, zt, m[sel], r[sel], ent[sel], g[sel], o["softcap"], o["temperature"])
                    self._chunk_grads(dz, h_c, sel, n, None, dw, db, c0, c1)
                    if dh_acc is not None:
                        ops.dh(dz, c0, c1, out=dh_acc, accumulate=True)
                if dh is not None:
                    ops.put_rows(dh, sel, ops.to_out(dh_acc, dh.dtype))
        return self._finish_grads(dh, dw, db)

    # -- reductions, from per-row quantities only
    def loss(self, ce: Any, m: Any, r: Any, reduction: str) -> Any:
        return reduce_loss(self.xp, ce, m + r, self.validf, self.wy, reduction, self.opts["z_loss"])

    def scales(self, reduction: str, grad_output: Any = 1.0) -> tuple[Any, Any]:
        return row_scales(self.xp, self.validf, self.wy, reduction, grad_output)


def _chunk_selections(idx: np.ndarray, N: int, rows: int) -> list:
    """``(selection, n)`` per chunk of the valid rows: a slice when the rows are contiguous."""
    out = []
    for s in range(0, idx.size, rows):
        part = idx[s:s + rows]
        n = int(part.size)
        if n and int(part[-1]) - int(part[0]) == n - 1:
            out.append((slice(int(part[0]), int(part[0]) + n), n))
        else:
            out.append((part, n))
    return out


def _host_bool(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy().astype(bool).reshape(-1)
    return np.asarray(a, dtype=bool).reshape(-1)


def _itemsize(dtype: Any) -> int:
    name = dtype_name(dtype)
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(name, 4)
