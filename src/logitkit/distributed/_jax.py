"""JAX binding of the vocabulary-parallel stages: ``lax.pmax`` / ``lax.psum`` over a named mesh axis."""

from __future__ import annotations

from typing import Any

from .. import _validate as V
from .._namespace import dtype_name, is_floating, is_integer
from ..core.logsumexp import transform
from ..core.reduction import reduce_loss, row_scales
from . import stages

__all__ = ["jax_vocab_parallel_cross_entropy"]


def jax_vocab_parallel_cross_entropy(local_logits: Any, labels: Any, axis_name: Any, *, vocab_start: Any = None,
                                     vocab_size: int | None = None, weight: Any = None, ignore_index: int = -100,
                                     label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                                     softcap: float | None = None, temperature: float = 1.0) -> Any:
    r"""Cross-entropy over logits sharded along the vocabulary on the mesh axis ``axis_name``.

    Call it inside ``jax.shard_map`` (or any context where ``axis_name`` is bound): each device
    passes its slice ``local_logits`` ``(..., n)`` (class axis last) and the same ``labels``
    ``(...)`` of global class indices; every device gets the loss of
    ``logitkit.cross_entropy(full_logits, labels, ...)``. A ``jax.custom_vjp`` gives each device
    the gradient of its own slice with no collective in the backward pass.

    Args:
      axis_name: the mesh axis over which the vocabulary is split.
      vocab_start: this device's first global class, a scalar integer array (e.g. from
        ``lax.axis_index``); ``None``: equal shards, ``axis_index · n``.
      vocab_size: the true vocabulary size ``V`` when the last shards are padded (``shard_map``
        needs equal shapes: pad the vocabulary to a multiple of the axis size); classes ``>= V``
        take no part and get a zero gradient. ``None``: ``V = axis_size · n``.
      weight: global class weights ``(V,)``, replicated; not differentiated.
      Other options as in :func:`logitkit.cross_entropy`; label smoothing divides by the global ``V``.

    Forward: one ``lax.pmax`` of ``N + F·P`` scalars (the row maxima and the table of what the
    devices must agree on: labels by three 24-bit hashes, shard starts, label range; ``F = 20``
    fields) and one ``lax.psum`` of ``3N`` (``4N`` with smoothing), float32 (float64 for float64
    logits); row statistics in float64 when ``jax_enable_x64`` is on. Labels out of range, labels
    that differ between devices or shards that do not tile the vocabulary give a NaN loss (traced
    values cannot raise); a NaN logit on any device gives that row a NaN loss.

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("v",), axis_types=(AxisType.Auto,))   # (4,) on 4 devices
    >>> f = jax.shard_map(lambda x, y: jax_vocab_parallel_cross_entropy(x, y, "v"),
    ...                   mesh=mesh, in_specs=(P(None, "v"), P()), out_specs=P())
    >>> logits = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]])
    >>> labels = jnp.array([3, 0])
    >>> loss, grad = jax.jit(jax.value_and_grad(f))(logits, labels)
    >>> bool(jnp.allclose(loss, jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(2), labels])))
    True
    >>> grad.shape
    (2, 4)
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    if not hasattr(local_logits, "dtype") or not is_floating(local_logits.dtype):
        raise TypeError("local_logits: expected a floating JAX array, got "
                        f"{dtype_name(local_logits.dtype) if hasattr(local_logits, 'dtype') else type(local_logits).__name__}")
    if local_logits.ndim == 0:
        raise ValueError("local_logits: expected at least 1 dimension (the class axis), got a scalar")
    V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    temperature=temperature)
    if not hasattr(labels, "dtype") or not is_integer(labels.dtype):
        raise TypeError("labels: expected an integer array of global class indices")
    if tuple(labels.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(local_logits.shape[:-1])} (the logits' shape without "
                         f"the class axis), got {tuple(labels.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    n = local_logits.shape[-1]
    P = lax.axis_size(axis_name)
    if vocab_size is not None and (not isinstance(vocab_size, int) or not 0 < vocab_size <= P * n):
        raise ValueError(f"vocab_size: expected None or an int in [1, {P * n}] (axis size × local classes), "
                         f"got {vocab_size!r}")
    nV = P * n if vocab_size is None else vocab_size
    if weight is not None and (weight.ndim != 1 or weight.shape[0] != nV or not is_floating(weight.dtype)):
        raise ValueError(f"weight: expected floating global class weights of shape ({nV},), got "
                         f"{tuple(weight.shape)}")
    eps = float(label_smoothing)
    opts = dict(n=n, P=P, nV=nV, padded=vocab_size is not None, axis_name=axis_name, ignore_index=ignore_index,
                eps=eps, reduction=reduction, z_loss=float(z_loss), softcap=softcap, temperature=float(temperature))

    start = lax.axis_index(axis_name) * n if vocab_start is None else jnp.asarray(vocab_start)
    f = _loss_fn(jax, jnp, lax, opts)
    loss = f(local_logits.reshape(-1, n), labels.reshape(-1), weight, start)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def _loss_fn(jax: Any, jnp: Any, lax: Any, o: dict) -> Any:
    n, axis = o["n"], o["axis_name"]

    def acc_of(x: Any) -> Any:
        return jnp.float64 if x.dtype == jnp.float64 else jnp.float32

    def local_view(w: Any, start: Any, acc: Any) -> tuple[Any, Any]:
        col_mask = (jnp.arange(n) + start) < o["nV"] if o["padded"] else None
        wl = None
        if w is not None:
            # zero-padded so the slice never clamps, whatever the padding of the last shards
            wl = lax.dynamic_slice_in_dim(jnp.pad(w.astype(acc), (0, o["P"] * n)), start, n)
        return wl, col_mask

    def fwd(x: Any, y: Any, w: Any, start: Any) -> tuple[Any, Any]:
        acc = acc_of(x)
        sdt = stages.stat_dtype(jnp, acc)
        wl, col_mask = local_view(w, start, acc)
        u = transform(jnp, x.astype(acc), o["softcap"], 1.0)
        parts = stages.local_partials(jnp, u, y, start=start, ignore_index=o["ignore_index"],
                                      label_smoothing=o["eps"], weight_local=wl, col_mask=col_mask,
                                      temperature=o["temperature"], stat_dtype=sdt)
        # Shapes, dtypes and options are static and the same on every device of a shard_map; what
        # can differ is data: the labels and a traced vocab_start.
        fields = stages.header_fields(jnp, y, start=start, size=n, dtype=str(x.dtype), ignore_index=o["ignore_index"],
                                      options={})
        table = stages.encode_header(jnp, rank=lax.axis_index(axis), world_size=o["P"], fields=fields, error=None,
                                     like=x, with_message=False)
        red = stages.reduce_rows(jnp, parts, y, all_reduce_max=lambda a: lax.pmax(a, axis),
                                 all_reduce_sum=lambda a: lax.psum(a, axis), vocab_size=o["nV"], weight=w,
                                 ignore_index=o["ignore_index"], label_smoothing=o["eps"],
                                 temperature=o["temperature"], max_tail=table)
        ok = stages.header_ok(jnp, red.tail, o["P"], vocab_size=o["nV"])
        ce = jnp.where(ok, red.ce, jnp.nan)
        loss = reduce_loss(jnp, ce, red.lse, red.validf, red.wy, o["reduction"], o["z_loss"])
        wtotal = float(o["nV"]) if w is None else jnp.sum(w.astype(sdt))
        return loss.astype(x.dtype), (x, y, w, start, red.m, red.r, red.validf, red.wy, wtotal)

    def bwd(res: Any, g: Any) -> tuple:
        x, y, w, start, m, r, validf, wy, wtotal = res
        acc = acc_of(x)
        wl, col_mask = local_view(w, start, acc)
        g_ce, g_z = row_scales(jnp, validf, wy, o["reduction"], g.astype(validf.dtype))
        dx = stages.local_grad(jnp, x, y, m, r, g_ce, g_z, start=start, vocab_size=float(o["nV"]), wtotal=wtotal,
                               wy=wy, validf=validf, weight_local=wl, label_smoothing=o["eps"], z_loss=o["z_loss"],
                               softcap=o["softcap"], temperature=o["temperature"], col_mask=col_mask,
                               max_before_temperature=True)
        return dx, None, None, None

    @jax.custom_vjp
    def f(x: Any, y: Any, w: Any, start: Any) -> Any:
        return fwd(x, y, w, start)[0]

    f.defvjp(fwd, bwd)
    return f
