"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set before jax loads).

Reads ``cases.pkl`` (cases of ``_vp_head_cases.make_case`` with 4 equal shards, the last rows
of the head possibly padding: ``pad`` rows) from the directory in argv[1]; runs
``jax_vocab_parallel_linear_head`` under ``shard_map`` and ``jax.jit(jax.value_and_grad)`` with
the cases' objective, and writes ``results.pkl``: the outputs, the gradients (padding rows
dropped, and their gradients, which must be 0, under ``pad_dw``/``pad_db``), and the collectives
of the forward jaxpr.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

PER_TOKEN = ("logprobs", "entropy", "lse", "kl")


def main(workdir: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    from _vp_jax_child import collectives

    from logitkit.distributed import jax_vocab_parallel_linear_head

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    with open(os.path.join(workdir, "cases.pkl"), "rb") as f:
        cases = pickle.load(f)
    results = []
    for c in cases:
        dt = getattr(jnp, c["dtype"])
        pad = c.get("pad", 0)
        V = c["w"].shape[0]

        def padded(a, fill=0.0, axis=0, pad=pad):
            if not pad:
                return a
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, pad)
            return np.pad(a, widths, constant_values=fill)

        o = dict(c["opts"])
        if o.get("weight") is not None:
            o["weight"] = jnp.asarray(o["weight"], dt if dt == jnp.float64 else jnp.float32)
        if pad:
            o["vocab_size"] = V
        args = {"h": jnp.asarray(c["h"], dt), "w": jnp.asarray(padded(c["w"]), dt),
                "b": jnp.asarray(padded(c["b"]), dt), "y": jnp.asarray(c["y"])}
        specs = {"h": P(), "w": P("v"), "b": P("v"), "y": P()}
        if "temp" in c:
            args["temp"], specs["temp"] = jnp.asarray(c["temp"], dt), P()
        t = c["teacher"]
        if t == "head":
            args.update(th=jnp.asarray(c["th"], dt), tw=jnp.asarray(padded(c["tw"]), dt),
                        tb=jnp.asarray(padded(c["tb"]), dt))
            specs.update(th=P(), tw=P("v"), tb=P("v"))
        elif t == "logits":
            lead = len(c["lead"])
            args["tl"] = jnp.asarray(padded(c["tl"], axis=lead), dt)
            specs["tl"] = P(*([None] * lead), "v")
        elif t == "topk":
            args.update(ti=jnp.asarray(c["tk_idx"]), tp=jnp.asarray(c["tk_lp"], dt))
            specs.update(ti=P(), tp=P())
        names = tuple(args)
        cot = {k: jnp.asarray(v) for k, v in c["cot"].items()}

        def f(h, w, b, *rest, names=names, c=c, o=o, cot=cot, t=t):
            a = dict(zip(names[3:], rest))
            kw = dict(o)
            if "temp" in a:
                kw["temperature"] = a["temp"]
            if t == "head":
                kw.update(teacher_hidden=a["th"], teacher_weight=a["tw"], teacher_bias=a["tb"])
            elif t == "logits":
                kw["teacher_logits"] = a["tl"]
            elif t == "topk":
                kw["teacher_topk"] = (a["ti"], a["tp"])
            out = jax_vocab_parallel_linear_head(h, w, a["y"] if c["labels"] else None, "v", local_bias=b,
                                                 outputs=c["outputs"], chunk_size=c["chunk"], **kw)
            tot = jnp.zeros((), jnp.float64)
            if out.loss is not None:
                tot = tot + jnp.sum(out.loss.astype(jnp.float64) * (cot["loss"] if out.loss.ndim else 1.0))
            for k in PER_TOKEN:
                v = getattr(out, k)
                if v is not None:
                    tot = tot + jnp.sum(v.astype(jnp.float64) * cot[k])
            return tot, out

        in_specs = tuple(specs[k] for k in names)
        g = jax.shard_map(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True), mesh=mesh, in_specs=in_specs,
                          out_specs=((P(), P()), (P(), P("v"), P("v"))))
        vals = [args[k] for k in names]
        (_, out), (dh, dw, db) = jax.jit(g)(*vals)
        fwd = jax.shard_map(lambda *a: f(*a)[1], mesh=mesh, in_specs=in_specs, out_specs=P())
        res = {k: (None if v is None else np.asarray(v.astype(jnp.float64) if k != "argmax" else v))
               for k, v in out._asdict().items()}
        dw, db = np.asarray(dw, np.float64), np.asarray(db, np.float64)
        res.update(dh=np.asarray(dh, np.float64), dw=dw[:V], db=db[:V], pad_dw=dw[V:], pad_db=db[V:],
                   fwd=collectives(jax.make_jaxpr(fwd)(*vals)))
        results.append(res)
    with open(os.path.join(workdir, "results.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
