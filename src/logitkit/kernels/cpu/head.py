"""The fused LM head's row pass on NumPy arrays (numba; see :mod:`._head_kernels`).

:func:`head_rows` is what :class:`logitkit.core.linear_head.HeadRun` calls on each chunk of
logits (float32 / float64 rows, no softcap, no teacher or a dense teacher with any divergence):
every per-token statistic in one pass and, with cotangents, the gradient of the logits in place.
numba is imported on the first call.
"""
from __future__ import annotations

import functools

import numpy as np

from . import _apply_threads, _guarded, _layer_needs_guard

__all__ = ["head_rows", "supports", "STAT_NAMES", "COT_NAMES"]

# rows of the statistics array the kernel fills, and of the cotangents it reads
STAT_NAMES = ("m", "r", "ce", "lp", "ent", "kl", "am", "aux")
COT_NAMES = ("g_ce", "g_lse", "g_lp", "g_ent", "g_kl", "g_sq")

_mod = None


def _hk():
    global _mod
    if _mod is None:
        from . import _head_kernels

        _mod = _head_kernels
    return _mod


def supports(dtype) -> bool:
    """Logit dtypes the kernel computes natively."""
    return np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float64))


def _fn(threads: int):
    import logitkit.kernels.cpu as cpu  # the package's thread state

    hk = _hk()
    if cpu._serial_only or threads <= 1:
        return hk.head_rows_serial
    cpu._launched = True
    if not _layer_needs_guard():
        return hk.head_rows
    return functools.partial(_guarded, hk.head_rows, hk.head_rows_serial)


def head_rows(x: np.ndarray, labels, *, ignore_index: int, weight, label_smoothing: float, temps: np.ndarray,
              teacher=None, teacher_temperature: float = 1.0, want_ent: bool = False, want_am: bool = False,
              cots: dict | None = None, divergence: str = "kl",
              beta: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Statistics ``(8, n)`` float64 (rows :data:`STAT_NAMES`) and the ``special`` mask ``(n,)`` of
    rows left to the caller; with ``cots`` (any of :data:`COT_NAMES`, ``(n,)`` each) ``x`` is
    overwritten by the gradient of ``Σ cots · values`` (special rows untouched).

    ``x`` ``(n, V)`` C-contiguous, writeable, float32 or float64; ``labels`` int64 ``(n,)`` or
    ``None``; ``weight`` ``(V,)`` class weights or ``None``; ``temps`` float64 ``(n,)``;
    ``teacher`` ``(n, V)`` raw teacher logits (converted to ``x``'s dtype) or ``None``;
    ``divergence``: ``"kl"`` KL(teacher ‖ student), ``"reverse_kl"`` KL(student ‖ teacher) or
    ``"jsd"`` (generalized, weight ``beta`` in (0, 1)): the statistic ``kl``, its ``aux`` and ``g_kl``.
    """
    n, v = x.shape
    acc = x.dtype
    has_lab = labels is not None
    lab = np.ascontiguousarray(labels, dtype=np.int64) if has_lab else np.zeros(n, np.int64)
    if weight is None:
        w = np.ones(v, acc)
        wsum = float(v)
    else:
        w = np.ascontiguousarray(weight, dtype=acc)
        wsum = float(np.sum(np.asarray(weight, np.float64)))
    use_t = teacher is not None
    tx = np.ascontiguousarray(teacher, dtype=acc) if use_t else x[:0]
    want_grad = cots is not None
    c = np.zeros((len(COT_NAMES), n), np.float64)
    if want_grad:
        for k, name in enumerate(COT_NAMES):
            g = cots.get(name)
            if g is not None:
                c[k] = np.asarray(g, np.float64).reshape(n)
    st = np.zeros((8, n), np.float64)
    special = np.zeros(n, np.uint8)
    if n == 0:
        return st, special.astype(bool)
    fn = _fn(_apply_threads(x.size))
    div = {"kl": 0, "reverse_kl": 1, "jsd": 2}[divergence]
    fn(x, lab, has_lab, int(ignore_index), w, wsum, float(label_smoothing),
       np.ascontiguousarray(temps, dtype=np.float64), tx, use_t, div, float(beta), float(teacher_temperature),
       bool(want_ent), bool(want_am), c, want_grad, st, special)
    return st, special.astype(bool)
