"""Fused CPU kernels (numba) for the stage contract of :mod:`logitkit.kernels`.

NumPy arrays in, NumPy arrays out.  Each row of ``x`` (N, V) is read from memory once and each
gradient / probability row written once; rows run in parallel on numba threads.  float32 and
float64 are computed natively; float16 and bfloat16 (``ml_dtypes``) are converted to float32 one
row at a time inside the kernel.  Statistics (``ce``, ``m``, ``r``, lse) come back in the
accumulation dtype: float64 for float64 input, float32 otherwise.

numba is imported on the first kernel call, never by ``import logitkit``.  The first call for a
dtype compiles (a few seconds); compiled code is cached on disk (``cache=True``).

Example::

    >>> import numpy as np
    >>> from logitkit.kernels import cpu
    >>> x = np.array([[2.0, 1.0, 0.1]], np.float32)
    >>> ce, m, r, g = cpu.ce_forward_backward(x, np.array([0]), 1.0, 0.0)
    >>> round(float(ce[0]), 6)            # -log softmax(x)[0]
    0.41703
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import threading
from numbers import Real

import numpy as np

__all__ = [
    "available", "set_num_threads", "get_num_threads",
    "ce_forward", "ce_backward", "ce_forward_backward",
    "softmax_forward", "log_softmax_forward", "logsumexp_forward",
    "softmax_backward", "log_softmax_backward",
]

_mod = None  # the numba module, once imported
_user_threads: int | None = None


def available() -> bool:
    """True when numba (and llvmlite) can be imported; nothing is imported to find out."""
    return (importlib.util.find_spec("numba") is not None
            and importlib.util.find_spec("llvmlite") is not None)


_launched = False   # a parallel kernel has run in this process
_serial_only = False  # forked from a process whose OpenMP pool is live: stay single-threaded


def _after_fork_in_child():
    global _serial_only
    if _launched and _mod is not None:
        import numba
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = None
        if layer == "omp":
            _serial_only = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _kernel(name, threads):
    """The compiled kernel ``name``: the parallel one for ``threads`` > 1, else the serial
    variant, which starts no parallel region (a pool wake-up costs more than a small input)."""
    global _launched
    k = _k()
    if _serial_only or threads <= 1:
        return k.serial(name)
    _launched = True
    if not _layer_needs_guard():
        return getattr(k, name)
    return functools.partial(_guarded, getattr(k, name), k.serial(name))


# numba's workqueue layer (what numba falls back to without TBB or OpenMP) aborts the process
# when two threads enter parallel regions at once.  Under it (or before the first parallel region,
# while the layer is not chosen yet) one caller at a time runs the parallel kernel; a concurrent
# caller runs the serial kernel instead of waiting, so threads still overlap.
_par_lock = threading.Lock()
_layer_safe = False  # a thread-safe layer (tbb, omp) is known to be the one in use


def _layer_needs_guard():
    global _layer_safe
    if _layer_safe:
        return False
    import numba
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return True
    if layer == "workqueue":
        return True
    _layer_safe = True
    return False


def _guarded(parallel, serial, *args):
    if _par_lock.acquire(blocking=False):
        try:
            return parallel(*args)
        finally:
            _par_lock.release()
    return serial(*args)


def _k():
    global _mod
    if _mod is None:
        if not available():
            raise ImportError("logitkit.kernels.cpu needs numba (pip install numba)")
        import importlib
        _mod = importlib.import_module(__name__ + "._kernels")
    return _mod


# ----------------------------------------------------------------------------- threads
def set_num_threads(n: int | None) -> None:
    """Threads used by the kernels; ``None`` restores the default (torch's thread count when torch
    is imported, else the CPUs this process may run on), capped at numba's pool size."""
    global _user_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int or None, got {n!r}")
    _user_threads = n


def get_num_threads() -> int:
    """The thread count the next kernel call uses."""
    if _user_threads is not None:
        n = _user_threads
    elif "torch" in sys.modules:  # share torch's budget rather than add to it
        n = int(sys.modules["torch"].get_num_threads())
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
    if "numba" in sys.modules:
        import numba
        n = min(n, numba.config.NUMBA_NUM_THREADS)
    return max(1, n)


# Elements per thread (~25 us of float32 CE forward+backward).  Below 2 * _MIN_PER_THREAD the
# serial kernels run and no parallel region starts.  A parallel call first pays the pool's wake-up:
# tens of microseconds on a quiet machine, 4-9 ms on a loaded one (torch's threaded ops pay the same).
# Quiet 2-core machine, torch.cross_entropy drop-in at 256 x 1000 forward+backward against F on
# torch's 2 threads, five interleaved rounds: serial (the old 1 << 17) 1.30x F's time, two
# threads 1.01x; at 160 x 1000, 1.19x and 1.14x.  Smaller sizes (64-128 x 1000) stay serial: there
# the two measured within their noise of each other.
_MIN_PER_THREAD = 1 << 16


def _apply_threads(size=None):
    """Threads for the next call: the budget, fewer for small arrays; numba's count is set only
    when it is above 1 (one thread runs the serial kernels, which need no pool)."""
    n = get_num_threads()
    if size is not None:
        n = max(1, min(n, size // _MIN_PER_THREAD))
    if n > 1:
        import numba
        numba.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- argument handling
class _Alias:
    """Holds a read-only array alive while a writeable alias of its memory is in use."""

    def __init__(self, a):
        self._a = a
        iface = dict(a.__array_interface__)
        iface["data"] = (iface["data"][0], False)
        self.__array_interface__ = iface


def _readable(a):
    """``a``, or a writeable alias of a read-only ``a`` (no copy).

    numba types a read-only array separately and refuses to compile the kernels' in-place
    branches for it (a TypingError), although no input is ever written unless ``out`` is that
    very input, which :class:`_Out` refuses for a read-only array first.
    """
    if a.flags.writeable:
        return a
    return np.asarray(_Alias(a))


def _storage(x, name):
    """(storage view for numba, accumulation dtype).  float16 -> int16 view, bfloat16 -> uint16."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, V) array, got shape {x.shape}")
    dt = x.dtype
    if dt == np.float32 or dt == np.float64:
        v, acc = x, dt
    elif dt == np.float16:
        v, acc = x.view(np.int16), np.dtype(np.float32)
    elif dt.name == "bfloat16":
        v, acc = x.view(np.uint16), np.dtype(np.float32)
    else:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {dt}")
    return _readable(v), np.dtype(acc)


def _contig(a):
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class _Out:
    """Where a kernel writes: the caller's ``out`` itself when it is C-contiguous and either is
    ``x`` or does not overlap it, otherwise a temporary copied into ``out`` afterwards."""

    def __init__(self, x, out, name="out"):
        self.user = out
        if out is None:
            self.target = np.empty(x.shape, x.dtype)
            self.inplace = False
            return
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"{name}: expected shape {x.shape}, got {out.shape}")
        if out.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype}, got {out.dtype}")
        if not out.flags.writeable:
            raise ValueError(f"{name}: array is read-only")
        same = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                and out.strides == x.strides)
        if out.flags.c_contiguous and x.flags.c_contiguous and same:
            self.target, self.inplace = out, True
        elif out.flags.c_contiguous and not np.shares_memory(out, x):
            self.target, self.inplace = out, False
        else:
            self.target, self.inplace = np.empty(x.shape, x.dtype), False

    def finish(self):
        if self.user is not None and self.target is not self.user:
            np.copyto(self.user, self.target)
            return self.user
        return self.target


def _labels(labels, n, v, ignore_index):
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels: expected integer class indices, got dtype {lab.dtype}")
    if lab.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {lab.shape}")
    lab = np.ascontiguousarray(lab, dtype=np.int64)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= v))
    if bad.any():
        pos = int(np.argmax(bad))
        raise ValueError(f"labels: class index {int(lab[pos])} at position {pos} is outside "
                         f"[0, {v}) and is not ignore_index={ignore_index}")
    return _readable(lab)


def _real(v, name):
    if isinstance(v, bool) or not isinstance(v, (Real, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a real number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    return v


def _options(v, acc, weight, ignore_index, label_smoothing, z_loss, softcap, temperature):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    eps = _real(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {eps}")
    zl = _real(z_loss, "z_loss")
    t = _real(temperature, "temperature")
    if t <= 0.0:
        raise ValueError(f"temperature: expected a positive number, got {t}")
    cap = None if softcap is None else _real(softcap, "softcap")
    if cap is not None and cap <= 0.0:
        raise ValueError(f"softcap: expected a positive number or None, got {cap}")
    if weight is None:
        w = np.ones(v, acc)
        wsum = float(v)
    else:
        w = np.asarray(weight)
        if w.shape != (v,):
            raise ValueError(f"weight: expected shape ({v},), got {w.shape}")
        if w.dtype.kind not in "fiu" and w.dtype.name != "bfloat16":
            raise TypeError(f"weight: expected a real array, got dtype {w.dtype}")
        w = _readable(np.ascontiguousarray(w, dtype=acc))
        wsum = float(np.sum(w, dtype=np.float64))
    return w, wsum, int(ignore_index), eps, zl, t, cap


def _per_row(g, n, name):
    if g is None:
        return np.zeros(n, np.float64)
    a = np.asarray(g, dtype=np.float64)
    if a.ndim == 0:
        return np.full(n, float(a))
    if a.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or shape ({n},), got {a.shape}")
    return _readable(np.ascontiguousarray(a))


def _direct(xs, cap, temp):
    # T != 1 goes through the row buffer: z = x / T is then rounded once per element
    return cap is None and temp == 1.0 and xs.dtype in (np.float32, np.float64)


# ----------------------------------------------------------------------------- cross-entropy
def _ce(x, labels, g_ce, g_z, want_grad, weight, ignore_index, label_smoothing, z_loss, softcap,
        temperature, out):
    xs, acc = _storage(x, "x")
    n, v = x.shape
    w, wsum, ii, eps, zl, temp, cap = _options(v, acc, weight, ignore_index, label_smoothing,
                                                z_loss, softcap, temperature)
    lab = _labels(labels, n, v, ii)
    gce = _per_row(g_ce, n, "g_ce")
    gz = _per_row(g_z, n, "g_z")
    o = _Out(x, out) if want_grad else None
    ce = np.empty(n, acc)
    m = np.empty(n, acc)
    r = np.empty(n, acc)
    if n:
        xk = xs if xs.flags.c_contiguous else np.ascontiguousarray(xs)
        if want_grad:
            ok = o.target.view(xs.dtype)
        else:  # never written: an (N, 0) array keeps the compiled signature
            ok = np.empty((n, 0), xs.dtype)
        nt = _apply_threads(x.size)
        nchunk = min(n, nt)
        if _direct(xs, cap, temp):
            _kernel("ce_direct", nt)(xk, lab, w, wsum, ii, eps, zl, gce, gz, want_grad, ok,
                                 want_grad and o.inplace, ce, m, r)
        else:
            _kernel("ce_buffered", nt)(xk, lab, w, wsum, ii, eps, zl, temp,
                                   1.0 if cap is None else cap, cap is not None, gce, gz,
                                   want_grad, ok, ce, m, r, np.empty(0, acc), nchunk)
    if want_grad:
        return ce, m, r, o.finish()
    return ce, m, r


def ce_forward(x, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0, softcap=None,
               temperature=1.0):
    """Per-row cross-entropy and row statistics ``(ce, m, r)``, each of shape (N,).

    ``z = softcap*tanh(x/softcap)`` (if set) ``/ temperature``; ``m = max z``,
    ``r = log sum exp(z - m)``; ``ce = (1-eps) w[y] (m - z[y] + r) + eps/V sum_c w[c](m - z[c] + r)``
    and 0 where ``labels == ignore_index``.  ``x``: (N, V) float array; ``labels``: (N,) ints.

    >>> ce, m, r = ce_forward(np.zeros((1, 4), np.float32), np.array([1]))
    >>> float(ce[0]) == float(np.float32(np.log(4)))
    True
    """
    return _ce(x, labels, None, None, False, weight, ignore_index, label_smoothing, 0.0, softcap,
               temperature, None)


def ce_forward_backward(x, labels, g_ce, g_z, *, weight=None, ignore_index=-100,
                        label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0, out=None):
    """``ce_forward`` and ``ce_backward`` in one pass over ``x``: returns ``(ce, m, r, out)``.

    ``g_ce``/``g_z``: scalars or (N,) per-row multipliers of the cross-entropy and z-loss terms
    (``g_z`` may be None).  ``out``: None (fresh array), an array of x's shape and dtype, or ``x``
    itself for an in-place gradient.  Ignored rows get an exact zero gradient.

    >>> x = np.log(np.array([[0.5, 0.25, 0.25]]))
    >>> ce, m, r, g = ce_forward_backward(x, np.array([0]), 1.0, None)
    >>> np.round(g, 6).tolist()                        # softmax - onehot
    [[-0.5, 0.25, 0.25]]
    """
    return _ce(x, labels, g_ce, g_z, True, weight, ignore_index, label_smoothing, z_loss, softcap,
               temperature, out)


def ce_backward(x, labels, m, r, g_ce, g_z, *, weight=None, ignore_index=-100,
                label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0, out=None):
    """Gradient of ``g_ce*ce + g_z*z_loss*(m+r)**2`` w.r.t. ``x`` from saved row stats ``m``, ``r``
    (one read of ``x``, one write of ``out``; ``p = exp(z - m - r)``)::

        dz_c = g_ce [(1-eps) w[y] (p_c - [c==y]) + eps/V (W p_c - w[c])] + g_z 2 z_loss (m+r) p_c
        dx_c = dz_c / temperature * (1 - tanh(x_c/softcap)**2)

    >>> x = np.zeros((1, 2)); ce, m, r = ce_forward(x, np.array([1]))
    >>> ce_backward(x, np.array([1]), m, r, 1.0, None).tolist()
    [[0.5, -0.5]]
    """
    xs, acc = _storage(x, "x")
    n, v = x.shape
    w, wsum, ii, eps, zl, temp, cap = _options(v, acc, weight, ignore_index, label_smoothing,
                                                z_loss, softcap, temperature)
    lab = _labels(labels, n, v, ii)
    mm = _per_row(m, n, "m")
    rr = _per_row(r, n, "r")
    gce = _per_row(g_ce, n, "g_ce")
    gz = _per_row(g_z, n, "g_z")
    o = _Out(x, out)
    if n:
        xk = xs if xs.flags.c_contiguous else np.ascontiguousarray(xs)
        nt = _apply_threads(x.size)
        nchunk = min(n, nt)
        _kernel("ce_backward", nt)(xk, lab, mm, rr, gce, gz, w, wsum, ii, eps, zl, temp,
                               1.0 if cap is None else cap, cap is not None,
                               o.target.view(xs.dtype), o.inplace, np.empty(0, acc), nchunk)
    return o.finish()


# ----------------------------------------------------------------------------- softmax family
def _softmax_family(x, mode, temperature, softcap, out):
    xs, acc = _storage(x, "x")
    n, v = x.shape
    t = _real(temperature, "temperature")
    if t <= 0.0:
        raise ValueError(f"temperature: expected a positive number, got {t}")
    cap = None if softcap is None else _real(softcap, "softcap")
    if cap is not None and cap <= 0.0:
        raise ValueError(f"softcap: expected a positive number or None, got {cap}")
    o = _Out(x, out) if mode != 2 else None
    m = np.empty(n, acc)
    r = np.empty(n, acc)
    if n:
        xk = xs if xs.flags.c_contiguous else np.ascontiguousarray(xs)
        ok = o.target.view(xs.dtype) if o is not None else np.empty((n, 0), xs.dtype)
        nt = _apply_threads(x.size)
        nchunk = min(n, nt)
        if _direct(xs, cap, t):
            _kernel("softmax_direct", nt)(xk, mode, ok, o is not None and o.inplace, m, r)
        else:
            _kernel("softmax_buffered", nt)(xk, mode, t, 1.0 if cap is None else cap,
                                        cap is not None, ok, m, r, np.empty(0, acc), nchunk)
    if mode == 2:
        with np.errstate(invalid="ignore"):
            return (m.astype(np.float64) + r).astype(acc)
    return o.finish()


def softmax_forward(x, *, temperature=1.0, softcap=None, out=None):
    """Row softmax ``exp(z - m - r)`` of ``z = x / temperature`` (softcap first, if set).

    All ``-inf`` rows give 0; a NaN or +inf in a row gives a NaN row.  ``out`` may be ``x``.

    >>> softmax_forward(np.log(np.array([[1.0, 3.0]]))).tolist()
    [[0.25, 0.75]]
    """
    return _softmax_family(x, 0, temperature, softcap, out)


def log_softmax_forward(x, *, temperature=1.0, softcap=None, out=None):
    """Row log-softmax ``(z - m) - r``; all ``-inf`` rows give ``-inf``.  ``out`` may be ``x``.

    >>> log_softmax_forward(np.zeros((1, 2))).tolist() == [[-np.log(2)] * 2]
    True
    """
    return _softmax_family(x, 1, temperature, softcap, out)


def logsumexp_forward(x, *, temperature=1.0, softcap=None):
    """Row ``lse = m + r`` of shape (N,) in the accumulation dtype (``-inf`` for all ``-inf`` rows).

    >>> logsumexp_forward(np.zeros((1, 4))).tolist() == [np.log(4)]
    True
    """
    return _softmax_family(x, 2, temperature, softcap, None)


def _same(a, b):
    return (a.flags.c_contiguous and b.flags.c_contiguous and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _backward(y, dy, out, log):
    ys, _ = _storage(y, "y")
    ds, _ = _storage(dy, "dy")
    if dy.shape != y.shape:
        raise ValueError(f"dy: expected shape {y.shape}, got {dy.shape}")
    if dy.dtype != y.dtype:
        raise TypeError(f"dy: expected dtype {y.dtype}, got {dy.dtype}")
    # out may be y or dy itself (in place); any other overlap goes through a temporary
    if out is not None:
        _Out(y, out)  # validates type, shape, dtype and writeability
    target, alias = None, 0
    if out is not None and out.flags.c_contiguous:
        if _same(out, y) and not np.shares_memory(out, dy):
            target, alias = out, 1
        elif _same(out, dy) and not np.shares_memory(out, y):
            target, alias = out, 2
        elif not np.shares_memory(out, y) and not np.shares_memory(out, dy):
            target = out
    if target is None:
        target = np.empty(y.shape, y.dtype)
    n = y.shape[0]
    if n:
        nt = _apply_threads(y.size)
        _kernel("softmax_bwd", nt)(_contig(ys), _contig(ds), target.view(ys.dtype), log, alias)
    if out is not None and target is not out:
        np.copyto(out, target)
        return out
    return target


def softmax_backward(y, dy, out=None):
    """Softmax vector-Jacobian product ``y * (dy - sum(y * dy))`` per row; ``y`` = softmax output.

    ``out`` may be ``y`` or ``dy`` (in place).

    >>> softmax_backward(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]])).tolist()
    [[0.25, -0.25]]
    """
    return _backward(y, dy, out, False)


def log_softmax_backward(y, dy, out=None):
    """Log-softmax vector-Jacobian product ``dy - exp(y) * sum(dy)``; ``y`` = log_softmax output.

    >>> log_softmax_backward(np.log(np.array([[0.5, 0.5]])), np.array([[1.0, 0.0]])).tolist()
    [[0.5, -0.5]]
    """
    return _backward(y, dy, out, True)
