"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set before jax loads).

Reads ``cases.pkl`` from the directory in argv[1] and writes ``results.pkl``: loss, gradient and
the collectives found in the jaxprs of the forward pass and of value_and_grad.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

COLLECTIVE_PRIMS = ("psum", "pmax", "pmin", "all_gather", "ppermute", "all_to_all", "psum_scatter",
                    "reduce_scatter", "pbroadcast", "all_reduce")


def collectives(closed_jaxpr) -> list:
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if any(name.startswith(p) for p in COLLECTIVE_PRIMS):
                aval = eqn.invars[0].aval
                found.append((name, tuple(aval.shape), str(aval.dtype)))
            for v in eqn.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def main(workdir: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    from logitkit.distributed import jax_vocab_parallel_cross_entropy

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    with open(os.path.join(workdir, "cases.pkl"), "rb") as f:
        cases = pickle.load(f)
    results = []
    for case in cases:
        # cases without x64 (float32 row statistics) come last; the flag is read at trace time
        jax.config.update("jax_enable_x64", case.get("x64", True))
        dtype = getattr(jnp, case["dtype"])
        opts = dict(case["opts"])
        if opts.get("weight") is not None:
            opts["weight"] = jnp.asarray(opts["weight"], dtype=jnp.float64 if dtype == jnp.float64 else jnp.float32)
        n = case["x_dev"].shape[1] // 4
        reverse = case.get("reverse", False)
        starts = case.get("starts")              # per-device vocab_start (e.g. shards that do not tile)
        per_device_labels = "y_dev" in case      # (4, N): device i gets row i (labels that differ)

        def body(xl, yl, opts=opts, n=n, reverse=reverse, starts=starts, per_device_labels=per_device_labels):
            i = jax.lax.axis_index("v")
            start = (3 - i) * n if reverse else None
            if starts is not None:
                start = jnp.asarray(starts)[i]
            if per_device_labels:
                yl = yl[0]
            return jax_vocab_parallel_cross_entropy(xl, yl, "v", vocab_start=start, **opts)

        y_spec = P("v", None) if per_device_labels else P()
        # labels that vary between devices make the loss vary too (that is the point: it is NaN)
        f = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "v"), y_spec), out_specs=P(),
                          check_vma=not per_device_labels)
        x = jnp.asarray(case["x_dev"], dtype=dtype)
        y = jnp.asarray(case["y_dev"] if per_device_labels else case["y"])

        def total(a, f=f, y=y):
            return jnp.sum(f(a, y)).astype(jnp.float64)

        if case.get("loss_only"):  # one compilation: the loss is all these cases check
            results.append({"loss": np.asarray(jax.jit(f)(x, y), np.float64)})
            continue
        loss = jax.jit(f)(x, y)
        _, grad = jax.jit(jax.value_and_grad(total))(x)
        results.append({"loss": np.asarray(loss, np.float64), "grad": np.asarray(grad.astype(jnp.float64)),
                        "fwd": collectives(jax.make_jaxpr(f)(x, y)),
                        "fwd_bwd": collectives(jax.make_jaxpr(jax.value_and_grad(total))(x))})
    with open(os.path.join(workdir, "results.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
