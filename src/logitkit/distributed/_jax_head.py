"""JAX binding of the vocabulary-parallel fused head: :func:`jax_vocab_parallel_linear_head` under ``shard_map``."""

from __future__ import annotations

import math
from typing import Any

from .. import _validate as V
from .._namespace import dtype_name, is_floating, is_integer
from ..core import linear_head as core_head
from ..linear import divergence_options, resolve_divergence, teacher_form
from ..core.logsumexp import transform, transform_grad_factor
from . import stages

__all__ = ["jax_vocab_parallel_linear_head"]

_WORKSPACE_BYTES = 32 << 20
_STUDENT_BYTES, _TEACHER_BYTES = 40, 24


def jax_vocab_parallel_linear_head(hidden: Any, local_weight: Any, labels: Any, axis_name: Any, *,
                                   local_bias: Any = None, vocab_start: Any = None, vocab_size: int | None = None,
                                   outputs: Any = ("loss",), temperature: Any = 1.0, softcap: float | None = None,
                                   weight: Any = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                                   reduction: str = "mean", z_loss: float = 0.0, num_items_in_batch: Any = None,
                                   teacher_hidden: Any = None, teacher_weight: Any = None, teacher_bias: Any = None,
                                   teacher_logits: Any = None, teacher_topk: Any = None, divergence: str = "kl",
                                   beta: float = 0.5, teacher_temperature: float = 1.0,
                                   chunk_size: int | None = None, reduce_hidden_grad: bool = True) -> Any:
    r""":func:`logitkit.distributed.vocab_parallel_linear_head` for JAX, inside ``shard_map`` over ``axis_name``.

    Each device passes the same ``hidden`` ``(..., H)`` and ``labels`` (global class indices, or
    ``None``) and its rows of the head, ``local_weight`` ``(n, H)`` (``local_bias`` ``(n,)``);
    every device gets the :class:`logitkit.HeadOutput` of ``logitkit.linear_head`` on the whole
    head, with the same options and teacher forms (``teacher_weight`` / ``teacher_bias`` /
    ``teacher_logits`` hold this device's classes, ``teacher_topk`` global indices). A
    ``jax.custom_vjp`` gives the gradients with respect to ``hidden``, ``local_weight`` and
    ``local_bias`` (``d/d hidden`` summed over the axis by one ``lax.psum`` unless
    ``reduce_hidden_grad=False``); the chunks run in ``lax.scan``.

    The collectives are those of the torch binding (its docstring's table of bytes per token),
    with the header's table riding in the tail of the ``lax.pmax`` (no host check: labels or
    top-k classes out of range, or devices that disagree on labels, a per-token temperature or a
    top-k teacher, give NaN values, as in :func:`jax_vocab_parallel_cross_entropy`).

    Args:
      axis_name: the mesh axis over which the vocabulary is split.
      vocab_start: this device's first class (a scalar integer array); ``None``: ``axis_index·n``.
      vocab_size: the true ``V`` when the last shards are padded (``shard_map`` needs equal shapes:
        pad the head's rows to a multiple of the axis size); classes ``>= V`` take no part and get
        zero gradients. ``None``: ``axis_size · n``.
      Other arguments as in :func:`logitkit.distributed.vocab_parallel_linear_head`.

    >>> import jax, jax.numpy as jnp, logitkit
    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("v",), axis_types=(AxisType.Auto,))   # (4,) on 4 devices
    >>> h, W = jax.random.normal(jax.random.key(0), (5, 8)), jax.random.normal(jax.random.key(1), (12, 8))
    >>> y = jnp.array([0, 3, 11, 7, -100])
    >>> def f(h, w, y):
    ...     out = jax_vocab_parallel_linear_head(h, w, y, "v", outputs=("logprobs", "entropy"))
    ...     return out.logprobs.sum() + 0.1 * out.entropy.sum()
    >>> g = jax.shard_map(jax.grad(f, argnums=(0, 1)), mesh=mesh, in_specs=(P(), P("v"), P()), out_specs=(P(), P("v")))
    >>> gh, gw = jax.jit(g)(h, W, y)
    >>> ref = jax.grad(lambda h, w: (lambda o: o.logprobs.sum() + 0.1 * o.entropy.sum())(
    ...     logitkit.linear_head(h, w, y, outputs=("logprobs", "entropy"))), argnums=(0, 1))(h, W)
    >>> bool(jnp.allclose(gh, ref[0], atol=1e-5)), bool(jnp.allclose(gw, ref[1], atol=1e-5))
    (True, True)
    """
    import jax.numpy as jnp
    from jax import lax

    for name, t in (("hidden", hidden), ("local_weight", local_weight)):
        if not hasattr(t, "dtype") or not is_floating(t.dtype):
            raise TypeError(f"{name}: expected a floating JAX array, got "
                            f"{dtype_name(t.dtype) if hasattr(t, 'dtype') else type(t).__name__}")
    if hidden.ndim == 0:
        raise ValueError("hidden: expected at least 1 dimension (the hidden size), got a scalar")
    H = hidden.shape[-1]
    if local_weight.ndim != 2 or local_weight.shape[1] != H:
        raise ValueError(f"local_weight: expected shape (n, {H}) (n local classes, hidden size), got "
                         f"{tuple(local_weight.shape)}")
    if local_weight.dtype != hidden.dtype:
        raise TypeError(f"local_weight: expected hidden's dtype {dtype_name(hidden.dtype)}, got "
                        f"{dtype_name(local_weight.dtype)}")
    n = local_weight.shape[0]
    if local_bias is not None and (tuple(local_bias.shape) != (n,) or local_bias.dtype != hidden.dtype):
        raise ValueError(f"local_bias: expected shape ({n},) and hidden's dtype, got {tuple(local_bias.shape)}")
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs: expected a tuple of names from {core_head.OUTPUTS}, got {outputs!r}")
    if [x for x in outputs if x not in core_head.OUTPUTS] or not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs: expected distinct names from {core_head.OUTPUTS}, got {tuple(outputs)!r}")
    outs = tuple(x for x in core_head.OUTPUTS if x in outputs)
    lead = tuple(hidden.shape[:-1])
    N = math.prod(lead)
    if labels is None and ("loss" in outs or "logprobs" in outs):
        raise ValueError(f"labels: outputs {outs} need labels ('loss' and 'logprobs' do)")
    if labels is not None:
        if not hasattr(labels, "dtype") or not is_integer(labels.dtype):
            raise TypeError("labels: expected an integer array of global class indices")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels: expected shape {lead} (hidden's shape without the last dimension), got "
                             f"{tuple(labels.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    per_token = hasattr(temperature, "shape") and not isinstance(temperature, (float, int))
    T = 1.0 if per_token else temperature
    V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, temperature=T)
    if per_token:
        if not is_floating(temperature.dtype) or tuple(temperature.shape) != lead:
            raise ValueError(f"temperature: expected a float or a floating array of shape {lead}, got "
                             f"{dtype_name(temperature.dtype)} {tuple(temperature.shape)}")
    P = lax.axis_size(axis_name)
    if vocab_size is not None and (not isinstance(vocab_size, int) or not 0 < vocab_size <= P * n):
        raise ValueError(f"vocab_size: expected None or an int in [1, {P * n}] (axis size × local classes), "
                         f"got {vocab_size!r}")
    nV = P * n if vocab_size is None else vocab_size
    if weight is not None and (weight.ndim != 1 or weight.shape[0] != nV or not is_floating(weight.dtype)):
        raise ValueError(f"weight: expected floating global class weights of shape ({nV},), got {tuple(weight.shape)}")
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
            raise TypeError("num_items_in_batch: expected an int or a 0-d array, got a bool")
        if isinstance(num_items_in_batch, (int, float)):
            if not num_items_in_batch > 0:
                raise ValueError(f"num_items_in_batch: expected a value > 0, got {num_items_in_batch}")
            num_items = float(num_items_in_batch)
        elif hasattr(num_items_in_batch, "shape") and tuple(num_items_in_batch.shape) == ():
            num_items = num_items_in_batch
        else:
            raise TypeError("num_items_in_batch: expected an int or a 0-d array")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    z = float(z_loss)
    spec = core_head.HeadSpec(outs, int(ignore_index), float(label_smoothing),
                              None if softcap is None else float(softcap), float(T), labels is not None,
                              "none" if teacher is None else ("topk" if teacher[0] == "topk" else "dense"),
                              div, bb, tt, "loss" in outs and z != 0.0)
    dense = spec.teacher == "dense"
    chunk = chunk_size if chunk_size is not None else max(
        1, _WORKSPACE_BYTES // ((_STUDENT_BYTES + (_TEACHER_BYTES if dense else 0)) * max(n, 1)))
    chunk = max(1, min(chunk, max(N, 1)))
    keys = stages.head_keys(spec)
    o = dict(spec=spec, keys=keys, n=n, P=P, nV=nV, padded=vocab_size is not None, axis=axis_name, chunk=chunk,
             N=N, reduce_hidden_grad=bool(reduce_hidden_grad))
    lab = (labels.reshape(N) if labels is not None
           else jnp.full((N,), ignore_index, dtype=jnp.int32))
    temp = temperature.reshape(N) if per_token else None
    start = lax.axis_index(axis_name) * n if vocab_start is None else jnp.asarray(vocab_start)
    h2 = hidden.reshape(N, H)
    teach = None
    if teacher is not None:
        if teacher[0] == "head":
            teach = (teacher[1].reshape(N, -1), teacher[2], teacher[3])
        elif teacher[0] == "logits":
            teach = (teacher[1].reshape(N, n),)
        else:
            k = teacher[1].shape[-1]
            teach = (teacher[1].reshape(N, k), teacher[2].reshape(N, k))
    f = _head_fn(o)
    res = f(h2, local_weight, local_bias, lab, temp, teach, weight, start)
    vals = dict(zip(keys, res[:len(keys)]))
    if "argmax" in outs:
        vals["am"] = lax.stop_gradient(res[len(keys)]).astype(jnp.int32)
    from .. import linear as _public

    a = _public.HeadArgs(spec=spec, shape=lead, hidden=hidden, weight=weight, num_items=num_items,
                         reduction=reduction, z_loss=z)
    return _public.assemble_outputs(jnp, a, vals, lab)


def _check_teacher(outs, lead, n, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk):
    if teacher_form(outs, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
                    "device") is None:
        return None
    if teacher_hidden is not None:
        if not is_floating(teacher_hidden.dtype) or tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden: expected a floating array of leading shape {lead}, got "
                             f"{tuple(teacher_hidden.shape)}")
        Ht = teacher_hidden.shape[-1]
        if teacher_weight is None or tuple(teacher_weight.shape) != (n, Ht):
            raise ValueError(f"teacher_weight: expected this device's rows of the teacher head, shape ({n}, {Ht}), "
                             f"got {None if teacher_weight is None else tuple(teacher_weight.shape)}")
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise TypeError(f"teacher_weight: expected teacher_hidden's dtype {dtype_name(teacher_hidden.dtype)}")
        if teacher_bias is not None and (tuple(teacher_bias.shape) != (n,) or teacher_bias.dtype != teacher_hidden.dtype):
            raise ValueError(f"teacher_bias: expected shape ({n},) and dtype {dtype_name(teacher_hidden.dtype)}")
        return ("head", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_logits is not None:
        if not is_floating(teacher_logits.dtype) or tuple(teacher_logits.shape) != lead + (n,):
            raise ValueError(f"teacher_logits: expected this device's classes, a floating array of shape "
                             f"{lead + (n,)}, got {tuple(teacher_logits.shape)}")
        return ("logits", teacher_logits)
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk: expected a pair (indices, logprobs), each of shape (..., k)")
    idx, lp = teacher_topk
    if not is_integer(idx.dtype):
        raise TypeError(f"teacher_topk indices: expected integers, got {dtype_name(idx.dtype)}")
    if not is_floating(lp.dtype):
        raise TypeError(f"teacher_topk logprobs: expected a floating dtype, got {dtype_name(lp.dtype)}")
    if idx.ndim != len(lead) + 1 or tuple(idx.shape[:-1]) != lead or tuple(lp.shape) != tuple(idx.shape):
        raise ValueError(f"teacher_topk: expected indices and logprobs of shape {lead + ('k',)}, got "
                         f"{tuple(idx.shape)} and {tuple(lp.shape)}")
    return ("topk", idx, lp)


def _bits(jnp: Any, lax: Any, a: Any) -> Any:
    """Bit patterns of a floating array as int32 words (what the devices must agree on)."""
    a = a.reshape(-1)
    if a.dtype == jnp.float64:
        return lax.bitcast_convert_type(a, jnp.int32).reshape(-1)    # (M, 2) words
    if a.dtype.itemsize == 2:
        return lax.bitcast_convert_type(a, jnp.int16).astype(jnp.int32)
    return lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)


def _head_fn(o: dict) -> Any:
    import jax
    import jax.numpy as jnp
    from jax import lax

    spec, n, P, N, C = o["spec"], o["n"], o["P"], o["N"], o["chunk"]
    axis = o["axis"]
    outs = spec.outputs
    nchunks = max(1, -(-N // C))
    Np = nchunks * C
    eps = spec.label_smoothing if "loss" in outs else 0.0

    def acc_of(x: Any) -> Any:
        return jnp.float64 if x.dtype == jnp.float64 else jnp.float32

    def pad_rows(a: Any, fill: Any = 0) -> Any:
        if a is None or Np == N:
            return a
        return jnp.concatenate([a, jnp.full((Np - N,) + a.shape[1:], fill, a.dtype)])

    def chunked(a: Any, fill: Any = 0) -> Any:
        return None if a is None else pad_rows(a, fill).reshape((nchunks, C) + a.shape[1:])

    def unchunk(a: Any) -> Any:
        return a.reshape((Np,) + a.shape[2:])[:N]

    def col_mask_of(start: Any) -> Any:
        return (jnp.arange(n) + start) < o["nV"] if o["padded"] else None

    def local_w(w: Any, start: Any, acc: Any) -> Any:
        if w is None:
            return None
        return lax.dynamic_slice_in_dim(jnp.pad(w.astype(acc), (0, P * n)), start, n)

    def logits(hc: Any, w: Any, b: Any, acc: Any) -> Any:
        x = hc @ w.T
        if b is not None:
            x = x + b
        return x.astype(acc)

    def student(x: Any, tc: Any, cm: Any) -> Any:
        z = transform(jnp, x, spec.softcap, spec.temperature)
        if tc is not None:
            z = z / tc.astype(z.dtype)[:, None]
        return z if cm is None else jnp.where(cm, z, -jnp.inf)

    def teacher_z(teach: Any, tcs: Any, cm: Any, acc: Any) -> Any:
        if spec.teacher != "dense":
            return None
        if len(teach) == 3:
            zt = logits(tcs, teach[1], teach[2], acc)
        else:
            zt = tcs.astype(acc)
        if spec.teacher_temperature != 1.0:
            zt = zt / spec.teacher_temperature
        return zt if cm is None else jnp.where(cm, zt, -jnp.inf)

    def teacher_rows(teach: Any) -> Any:
        """The per-token part of a dense teacher (its hidden states or logits), chunked."""
        if spec.teacher != "dense":
            return None
        return chunked(teach[0])

    def fwd(h, w, b, y, temp, teach, wt, start):
        acc = acc_of(h)
        sdt = stages.stat_dtype(jnp, acc)
        cm = col_mask_of(start)
        wl = local_w(wt, start, acc)
        if cm is not None:
            wl = jnp.where(cm, jnp.ones((n,), acc) if wl is None else wl, 0.0)
        topk = teach[0] if spec.teacher == "topk" else None
        ign = spec.ignore_index

        def body(_, xs):
            hc, yc, tc, tcs, kc = xs
            x = logits(hc, w, b, acc)
            z = student(x, tc, cm)
            raw = None
            if "argmax" in outs:
                raw = x if cm is None else jnp.where(cm, x, -jnp.inf)
            hp = stages.head_local_partials(jnp, z, yc, start=start, ignore_index=ign, label_smoothing=eps,
                                            weight_local=wl, stat_dtype=sdt, entropy="entropy" in outs, raw=raw,
                                            zt=teacher_z(teach, tcs, cm, acc), divergence=spec.divergence, topk=kc,
                                            col_mask=cm)
            return None, hp

        xs = (chunked(h), chunked(y, ign), chunked(temp, 1), teacher_rows(teach), chunked(topk))
        _, hps = lax.scan(body, None, xs)
        ce = hps.ce
        hp = hps._replace(ce=ce._replace(**{f: unchunk(getattr(ce, f)) for f in ("m", "t", "c", "zy", "own")},
                                         s=None if ce.s is None else unchunk(ce.s),
                                         wsum=None if ce.wsum is None else ce.wsum[0]),
                          **{f: (None if getattr(hps, f) is None else unchunk(getattr(hps, f)))
                             for f in stages.HeadPartials._fields[1:]})
        # the header: what the devices must agree on, in the tail of the MAX (read on the device)
        ids = y.astype(jnp.int32).reshape(-1)
        extra = [ids]
        if temp is not None:
            extra.append(_bits(jnp, lax, temp))
        if topk is not None:
            extra += [topk.astype(jnp.int32).reshape(-1), _bits(jnp, lax, teach[1])]
        fields = stages.header_fields(jnp, y, start=start, size=n, dtype=str(h.dtype), ignore_index=ign, options={})
        fields.update(zip(("labels_a", "labels_b", "labels_c"), stages.label_hashes(jnp, jnp.concatenate(extra))))
        table = stages.encode_header(jnp, rank=lax.axis_index(axis), world_size=P, fields=fields, error=None, like=h,
                                     with_message=False)
        more = stages.head_max_values(jnp, hp)
        nm = len(more)

        def global_mt(tail: Any) -> Any:
            return tail[:N].reshape(N, 1) if hp.mt is not None else None

        red = stages.reduce_rows(jnp, hp.ce, y, all_reduce_max=lambda a: lax.pmax(a, axis),
                                 all_reduce_sum=lambda a: lax.psum(a, axis), vocab_size=o["nV"], weight=wt,
                                 ignore_index=ign, label_smoothing=eps, max_tail=jnp.concatenate(more + [table]),
                                 extra_slots=lambda m, tail: stages.head_slots(jnp, hp, m, global_mt(tail),
                                                                               spec.divergence))
        ok = stages.header_ok(jnp, red.tail[nm * N:], P, vocab_size=o["nV"])
        if topk is not None and topk.size:
            ok = ok & (jnp.min(topk) >= 0) & (jnp.max(topk) < o["nV"])
        mt = global_mt(red.tail)
        rows = stages.head_rows(jnp, red, entropy="entropy" in outs, teacher=spec.teacher,
                                divergence=spec.divergence, mt=None if mt is None else mt.reshape(N),
                                topk_logprobs=None if topk is None else teach[1].astype(sdt), spec=spec)
        rows.update(m=red.m, r=red.r, lse=red.lse, ce=red.ce, validf=red.validf, wy=red.wy)
        if "argmax" in outs:
            key = red.tail[(nm - 1) * N:nm * N]
            rows["am"] = -lax.pmax(stages.argmax_candidates(jnp, hp, key), axis)
        if spec.teacher == "dense" and spec.divergence == "jsd":
            def body2(_, xs):
                hc, tc, tcs, mc, rc, mtc, rtc = xs
                z = student(logits(hc, w, b, acc), tc, cm)
                return None, stages.head_jsd_partials(jnp, z, teacher_z(teach, tcs, cm, acc), mc, rc, mtc, rtc,
                                                      spec.beta, sdt)

            xs2 = (chunked(h), chunked(temp, 1), teacher_rows(teach), chunked(red.m), chunked(red.r),
                   chunked(rows["mt"]), chunked(rows["rt"]))
            _, cols = lax.scan(body2, None, xs2)
            sums = lax.psum(unchunk(cols).astype(acc), axis).astype(sdt)
            rows["kl"], rows["aux"] = stages.head_jsd_rows(jnp, sums, red.r, spec.beta)
        for k in ("ce", "lp", "ent", "kl", "lse"):
            if k in rows:
                rows[k] = jnp.where(ok, rows[k], jnp.nan)
        if spec.has_labels:
            valid = y != ign
            for k in ("lse", "lp", "ent", "kl", "aux"):
                if k in rows:
                    rows[k] = jnp.where(valid, rows[k], 0.0)
            if "am" in rows:
                rows["am"] = jnp.where(valid, rows["am"], 0.0)
        out = tuple(rows[k] for k in o["keys"]) + ((rows["am"],) if "am" in rows else ())
        saved = {k: rows[k] for k in ("m", "r", "validf", "wy", "ent", "aux", "mt", "rt", "G") if k in rows}
        return out, (h, w, b, y, temp, teach, wt, start, saved)

    def bwd(res, gs):
        h, w, b, y, temp, teach, wt, start, rows = res
        acc = acc_of(h)
        cm = col_mask_of(start)
        wl = local_w(wt, start, acc)
        if cm is not None and wl is not None:
            wl = jnp.where(cm, wl, 0.0)
        nV = float(o["nV"])
        wtotal = nV if wt is None else jnp.sum(wt.astype(rows["m"].dtype))
        topk = teach[0] if spec.teacher == "topk" else None
        cots = {"g_" + k: g for k, g in zip(o["keys"], gs[:len(o["keys"])])}
        ign = spec.ignore_index
        rkeys = tuple(rows)
        ckeys = tuple(cots)

        def body(carry, xs):
            dw, db = carry
            hc, yc, tc, tcs, kc, rc, cc = xs
            x = logits(hc, w, b, acc)
            z = student(x, tc, cm)
            dz = stages.head_local_grad(jnp, z, yc, dict(zip(rkeys, rc)), dict(zip(ckeys, cc)), start=start,
                                        ignore_index=ign, has_labels=spec.has_labels, vocab_size=nV, wtotal=wtotal,
                                        weight_local=wl, label_smoothing=spec.label_smoothing, teacher=spec.teacher,
                                        divergence=spec.divergence, beta=spec.beta,
                                        zt=teacher_z(teach, tcs, cm, acc), topk=kc, col_mask=cm)
            factor = transform_grad_factor(jnp, x, spec.softcap, spec.temperature)
            if factor is not None:
                dz = dz * factor
            if tc is not None:
                dz = dz / tc.astype(dz.dtype)[:, None]
            dl = dz.astype(h.dtype)
            dw = dw + (dl.T @ hc).astype(acc)
            if db is not None:
                db = db + jnp.sum(dl, axis=0, dtype=acc)
            return (dw, db), (dl @ w).astype(acc)

        xs = (chunked(h), chunked(y, ign), chunked(temp, 1), teacher_rows(teach), chunked(topk),
              tuple(chunked(rows[k]) for k in rkeys), tuple(chunked(cots[k]) for k in ckeys))
        # zeros with the weight's varying mesh axes (shard_map's types of a scan carry must match)
        init = (w.astype(acc) * 0, None if b is None else b.astype(acc) * 0)
        (dw, db), dhs = lax.scan(body, init, xs)
        dh = unchunk(dhs)
        if o["reduce_hidden_grad"]:
            dh = lax.psum(dh, axis)
        return (dh.astype(h.dtype), dw.astype(w.dtype), None if b is None else db.astype(b.dtype),
                None, None, None, None, None)

    @jax.custom_vjp
    def f(h, w, b, y, temp, teach, wt, start):
        return fwd(h, w, b, y, temp, teach, wt, start)[0]

    f.defvjp(fwd, bwd)
    return f
