r"""The numba CPU kernels as XLA custom calls (typed FFI) for JAX arrays on the CPU.

XLA on the CPU makes one pass over memory per row reduction and per elementwise output, so
cross-entropy forward + backward reads a 128 KB row from DRAM three times and writes it once. The
numba kernels of :mod:`logitkit.kernels.cpu` read each row from DRAM once per stage and keep the
rest in cache; through ``jax.ffi.ffi_call`` they read XLA's input buffers and write its output
buffers in place (no copy, no Python, no GIL: the handlers are ``numba.cfunc`` C functions,
compiled on first use and cached on disk).

Used by :mod:`logitkit.jax._rows` (``index_rows``, ``prob_rows``, last-axis ``softmax`` and
``log_softmax``) when :func:`usable` says so: no class mask, float16/bfloat16/float32/float64
logits, JAX's default backend is the CPU with one device (or the code runs inside a ``shard_map``,
see :func:`_per_device`), numba importable, and kernels not switched off
(``LOGITKIT_KERNELS=core`` or :func:`logitkit.kernels.registry.use_core` while the function is
traced). Each call still carries an XLA fallback (``lax.platform_dependent``) for arrays placed
on another platform.

Under ``vmap`` the loss calls fold the mapped axis into their rows (:func:`_row_batched`): a
per-example loss vmapped over a batch is one kernel call, not one per example.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from .._namespace import acc_dtype, dtype_name

__all__ = ["usable", "ce_forward", "ce_backward", "prob_forward", "prob_backward",
           "softmax_forward", "softmax_backward"]

_DTYPES = ("float32", "float64", "float16", "bfloat16")
_lock = threading.Lock()
_handlers: dict[tuple[str, str], Any] = {}  # keeps the compiled handlers (their code) alive


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    from ..kernels import cpu

    if not (cpu.available() and hasattr(jax, "ffi") and hasattr(jax.ffi, "ffi_call")):
        return False
    import sys

    # the handlers' byte offsets assume 8-byte pointers and size_t
    return sys.maxsize > 2 ** 32 and _ffi_api_major() == 0


def _ffi_api_major() -> int:
    """XLA FFI's major API version from the header jaxlib ships (0 if it cannot be read).

    The handlers read XLA's call frame at the byte offsets of API 0.x, which minor versions keep;
    a major version would change them, so the kernels are not used under one."""
    import os
    import re

    try:
        with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
            m = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", f.read())
    except (OSError, AttributeError):
        return 0
    return int(m.group(1)) if m else 0


_FAMILIES = {"ce": ("ce_forward", "ce_backward"), "prob": ("prob_forward", "prob_backward"),
             "softmax": ("softmax_forward", "softmax_backward")}
_broken: dict[tuple[str, str], str] = {}  # (family, dtype) -> why its handlers are unusable


def usable(x: Any, family: str) -> bool:
    """True when ``family`` ("ce", "prob", "softmax") can run on the numba kernels for ``x``.

    The family's two handlers are compiled (or loaded from numba's cache) and registered here, at
    trace time; if that fails (an unusual platform, a broken toolchain) the reason is warned once
    and the XLA route is used instead.
    """
    from ..kernels import registry

    dtype = dtype_name(x.dtype)
    if registry._forced_core[0] or dtype not in _DTYPES:
        return False
    if x.ndim < 1 or x.shape[-1] == 0 or x.shape[-1] >= 2 ** 31:
        return False
    if jax.default_backend() != "cpu" or not _importable() or (family, dtype) in _broken:
        return False
    if not _per_device():
        return False
    try:
        for kind in _FAMILIES[family]:
            _target(kind, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the XLA route
        _broken[(family, dtype)] = repr(exc)
        import warnings

        warnings.warn(f"logitkit.jax: the CPU kernels for {family} ({dtype}) are unavailable, using "
                      f"XLA instead: {exc!r}", RuntimeWarning, stacklevel=3)
        return False
    return True


def _per_device() -> bool:
    """True when the custom call sees whole, unsharded operands: a single device, or the body of a
    ``shard_map`` whose mesh axes are all manual.

    XLA's SPMD partitioner knows no sharding rule for these custom calls: under ``jit`` over several
    devices it would all-gather sharded logits onto every device and return a replicated gradient.
    With automatic sharding the placement is unknown at trace time, so any multi-device ``jit``
    outside ``shard_map`` keeps the XLA route, which XLA partitions.
    """
    if jax.device_count() == 1:
        return True
    try:
        mesh = jax.sharding.get_abstract_mesh()
        return (not mesh.empty) and bool(mesh.are_all_axes_manual)
    except AttributeError:  # an older JAX without abstract meshes
        return False


def _target(kind: str, dtype: str) -> str:
    name = f"logitkit_{kind}_{dtype}"
    with _lock:
        if (kind, dtype) not in _handlers:
            from ..kernels import cpu

            handler = cpu._k().ffi_handler(kind, dtype)
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.ctypes), platform="cpu")
            _handlers[(kind, dtype)] = handler
    return name


def _threads(size: int) -> int:
    """1 (serial kernels) for small inputs, a forked child or numba's workqueue layer (which must
    not be entered from two XLA threads at once); otherwise the kernel thread budget."""
    from ..kernels import cpu

    if cpu._serial_only:
        return 1
    import numba

    try:
        if numba.threading_layer() == "workqueue":
            return 1
    except ValueError:  # no parallel region has run yet; the layer is chosen on the first one
        pass
    n = max(1, min(cpu.get_num_threads(), size // cpu._MIN_PER_THREAD))
    if n > 1:
        cpu._launched = True  # the fork guard must know a pool may be live
    return n


def _params(opts: Any, size: int) -> np.ndarray:
    cap = opts.softcap
    return np.array([opts.label_smoothing, opts.temperature, 1.0 if cap is None else cap,
                     0.0 if cap is None else 1.0, _threads(size)], np.float64)


def _weight(weight: Any, acc: Any) -> Any:
    return jnp.zeros((0,), acc) if weight is None else weight.astype(acc)  # (0,): no weight


def _varying_axes(args: Any) -> tuple[str, ...]:
    """The ``shard_map`` mesh axes over which any of ``args`` varies (empty outside one)."""
    axes: set[str] = set()
    for a in args:
        t = jax.typeof(a)
        mat = getattr(t, "manual_axis_type", None)
        axes |= set(mat.varying) if mat is not None else set(getattr(t, "vma", ()))
    return tuple(sorted(axes))


def _call(kind: str, x: Any, out: Any, vmap_method: str, *args: Any, params: np.ndarray) -> Any:
    """The custom call ``kind`` for ``x``'s dtype on ``args``, results of type ``out``.

    XLA gives custom-call results no ``shard_map`` axis types; inside one they vary over the
    axes their operands vary over (each device computes its own rows), so they are cast to that.
    """
    call = jax.ffi.ffi_call(_target(kind, dtype_name(x.dtype)), out, vmap_method=vmap_method)
    res = call(*args, params=params)
    axes = _varying_axes(args)
    if axes:
        res = jax.tree_util.tree_map(lambda o: jax.lax.pcast(o, axes, to="varying"), res)
    return res


def _row_batched(kinds: str, impl: Any) -> Any:
    """``impl`` with a vmap rule that folds the mapped axis into the rows.

    ``kinds`` has one letter per argument: ``x`` for arrays shaped like the logits (..., V), ``r``
    for per-row arrays (...), ``w`` for the class weight (V,) or (0,). The kernels treat every
    leading axis as rows, so a ``vmap`` over the logits is one kernel call on ``(B·N, V)`` instead
    of ``B`` calls in a loop (a per-example loss under ``vmap`` is the common JAX idiom). Per-row
    arguments that are not mapped are broadcast (they are small). When the weight is mapped, or a
    logits-shaped argument is not (broadcasting it would copy the logits), the batch runs one
    call per element (``lax.map``).
    """
    f = jax.custom_batching.custom_vmap(impl)

    @f.def_vmap
    def _rule(axis_size: int, in_batched: Any, *args: Any) -> tuple[Any, Any]:
        if any(b for b, k in zip(in_batched, kinds) if k == "w") or not all(
                b for b, k in zip(in_batched, kinds) if k == "x"):
            mapped = [i for i, b in enumerate(in_batched) if b]

            def one(vals: Any) -> Any:
                full = list(args)
                for i, v in zip(mapped, vals):
                    full[i] = v
                return f(*full)

            out = jax.lax.map(one, [args[i] for i in mapped])
        else:
            out = f(*(a if b or k != "r" else jnp.broadcast_to(a, (axis_size,) + a.shape)
                      for a, b, k in zip(args, in_batched, kinds)))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return f


def _loss_call(kind: str, kinds: str, opts: Any, x: Any, rows_out: int, *args: Any) -> Any:
    """The loss kernel ``kind`` on logits ``x`` and ``args`` (their kinds after ``x`` in
    ``kinds``, see :func:`_row_batched`): ``rows_out`` per-row results in the accumulation dtype,
    or for ``rows_out=0`` the gradient (x's shape and dtype)."""
    acc = acc_dtype(jnp, x.dtype)

    def impl(x: Any, *a: Any) -> Any:
        out = ((jax.ShapeDtypeStruct(x.shape[:-1], acc),) * rows_out if rows_out
               else jax.ShapeDtypeStruct(x.shape, x.dtype))
        res = _call(kind, x, out, "sequential", x, *a, params=_params(opts, x.size))
        return tuple(res) if rows_out else res

    return _row_batched(kinds, impl)(x, *args)


def ce_forward(opts: Any, x: Any, lab: Any, weight: Any) -> tuple[Any, Any, Any]:
    """``(ce, m, r)`` per row (accumulation dtype) of logits ``x`` (..., V) and int32 labels
    ``lab`` (...) coded -1 ignored, outside [0, V) bad (NaN row)."""
    return _loss_call("ce_forward", "xrw", opts, x, 3, lab, _weight(weight, acc_dtype(jnp, x.dtype)))


def ce_backward(opts: Any, x: Any, lab: Any, m: Any, r: Any, weight: Any, g_ce: Any, g_lse: Any) -> Any:
    """``d(Σ g_ce·ce + g_lse·lse)/dx`` from the forward's ``m, r``; 0 on ignored rows, NaN on bad."""
    acc = acc_dtype(jnp, x.dtype)
    return _loss_call("ce_backward", "xrrrrrw", opts, x, 0, lab, m, r, g_ce.astype(acc),
                      g_lse.astype(acc), _weight(weight, acc))


def prob_forward(opts: Any, x: Any, y: Any, weight: Any) -> tuple[Any, Any, Any, Any]:
    """``(ce, m, r, mass)`` per row for probability labels ``y`` (x's shape); ``mass = Σ_c t_c``
    with ``t = ((1-eps)·y + eps/V)·w``."""
    acc = acc_dtype(jnp, x.dtype)
    return _loss_call("prob_forward", "xxw", opts, x, 4, y.astype(acc), _weight(weight, acc))


def prob_backward(opts: Any, x: Any, y: Any, m: Any, r: Any, mass: Any, weight: Any, g_ce: Any,
                  g_lse: Any) -> Any:
    """``dx = (p·(g_ce·mass + g_lse) - g_ce·t)·dz/dx`` from the forward's ``m, r, mass``."""
    acc = acc_dtype(jnp, x.dtype)
    return _loss_call("prob_backward", "xxrrrrrw", opts, x, 0, y.astype(acc), m, r, mass,
                      g_ce.astype(acc), g_lse.astype(acc), _weight(weight, acc))


def softmax_forward(x: Any, log: bool, temperature: float) -> Any:
    """Softmax (or log-softmax) of ``x / temperature`` over the last axis, in x's dtype."""
    return _call("softmax_forward", x, jax.ShapeDtypeStruct(x.shape, x.dtype), "broadcast_all", x,
                 params=np.array([1.0 if log else 0.0, temperature, _threads(x.size)], np.float64))


def softmax_backward(y: Any, dy: Any, log: bool) -> Any:
    """``y·(dy - Σ y·dy)`` (softmax) or ``dy - exp(y)·Σ dy`` (log-softmax) over the last axis."""
    return _call("softmax_backward", y, jax.ShapeDtypeStruct(y.shape, y.dtype), "broadcast_all",
                 y, dy.astype(y.dtype),
                 params=np.array([1.0 if log else 0.0, _threads(y.size)], np.float64))
