"""jit(value_and_grad) of logitkit.jax against optax, on CPU (or whatever JAX's default device is).

    .venv/bin/python benchmarks/jax_bench.py                      # llm: 4096 x 32000 float32
    .venv/bin/python benchmarks/jax_bench.py --workload small --repeats 21
    .venv/bin/python benchmarks/jax_bench.py --rss                # also each step's peak RSS growth

Every case is ``jax.jit(jax.value_and_grad(lambda x: loss(x, labels).mean()))``, compiled
before timing. Repetitions are interleaved (case A, case B, case A, ...) so that a machine whose
load drifts penalizes every case alike; each timed call follows an untimed call of the same case
(as in a training loop), so that no case pays for the previous one's teardown. The table gives
the median and the minimum. Memory:
XLA's own account of the compiled program (``memory_analysis()``: temporaries, and outputs),
and with ``--rss`` the growth of a fresh process's peak resident set during one step, after the
inputs are built and the step compiled and run once (outputs and temporaries, as the OS sees
them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOADS = {"llm": (4096, 32000), "llm3": (1024, 128256), "small": (256, 1000)}


def _cases():
    import jax
    import optax

    import logitkit.jax as lj

    def onehot(y, V):
        return jax.nn.one_hot(y, V, dtype=jax.numpy.float32)

    return {
        "optax.softmax_cross_entropy_with_integer_labels":
            lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(),
        "logitkit.jax.softmax_cross_entropy_with_integer_labels":
            lambda x, y: lj.softmax_cross_entropy_with_integer_labels(x, y).mean(),
        "logitkit.jax.cross_entropy":
            lambda x, y: lj.cross_entropy(x, y),
        "optax.softmax_cross_entropy (one-hot)":
            lambda x, y: optax.softmax_cross_entropy(x, onehot(y, x.shape[-1])).mean(),
        "logitkit.jax.softmax_cross_entropy (one-hot)":
            lambda x, y: lj.softmax_cross_entropy(x, onehot(y, x.shape[-1])).mean(),
        # probabilities given as an input (not built in the step): the loss itself
        "optax.softmax_cross_entropy (probabilities input)":
            lambda x, p: optax.softmax_cross_entropy(x, p).mean(),
        "logitkit.jax.softmax_cross_entropy (probabilities input)":
            lambda x, p: lj.softmax_cross_entropy(x, p).mean(),
        # optax's batch-shaped `where`: padding positions (every 7th row) left out
        "optax.softmax_cross_entropy_with_integer_labels (padding where)":
            lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y, where=_padding(x)).mean(),
        "logitkit.jax.softmax_cross_entropy_with_integer_labels (padding where)":
            lambda x, y: lj.softmax_cross_entropy_with_integer_labels(x, y, where=_padding(x)).mean(),
        # the per-example idiom: a loss of one row, vmapped over the batch
        "optax.softmax_cross_entropy_with_integer_labels (per-example vmap)":
            lambda x, y: jax.vmap(optax.softmax_cross_entropy_with_integer_labels)(x, y).mean(),
        "logitkit.jax.softmax_cross_entropy_with_integer_labels (per-example vmap)":
            lambda x, y: jax.vmap(lj.softmax_cross_entropy_with_integer_labels)(x, y).mean(),
    }


def _padding(x):
    import jax.numpy as jnp

    return jnp.arange(x.shape[0]) % 7 != 0


def _second_input(name, y, x):
    """The case's second argument: labels, or (for "probabilities input") a softmax of noise."""
    if "probabilities input" not in name:
        return y
    import jax
    import numpy as np

    rng = np.random.default_rng(1)
    return jax.nn.softmax(jax.numpy.asarray(rng.standard_normal(x.shape, dtype=np.float32)), axis=-1)


def _inputs(N: int, V: int, seed: int = 0, dtype: str = "float32"):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, V), dtype=np.float32))
    if dtype != "float32":  # astype copies even to the same dtype: keep RSS comparable
        x = x.astype(dtype)
    y = jnp.asarray(rng.integers(0, V, N).astype(np.int32))
    return x, y


def _compiled(fn, x, y):
    import jax

    step = jax.jit(jax.value_and_grad(fn))
    compiled = step.lower(x, y).compile()
    return step, compiled


def _mem(compiled) -> tuple[float, float]:
    ma = compiled.memory_analysis()
    if ma is None:
        return float("nan"), float("nan")
    return ma.temp_size_in_bytes / 2**20, ma.output_size_in_bytes / 2**20


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child(name: str, N: int, V: int, dtype: str) -> None:
    """In this fresh process: build the inputs, compile and run the case once, then print the
    growth of the peak resident set during one more step (Linux: ``/proc/self/clear_refs`` resets
    the peak), i.e. the step's own outputs and temporaries beyond the inputs, in MiB."""
    import gc

    import jax

    x, y = _inputs(N, V, dtype=dtype)
    y = _second_input(name, y, x)
    step, _ = _compiled(_cases()[name], x, y)
    jax.block_until_ready(step(x, y))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_kib("VmRSS")
    out = step(x, y)
    jax.block_until_ready(out)
    print(json.dumps({"peak_extra_mib": (_vm_kib("VmHWM") - base) / 1024}))


def _peak_rss(name: str, N: int, V: int, dtype: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--shape", f"{N}x{V}",
                          "--dtype", dtype],
                         capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="llm")
    ap.add_argument("--shape", help="N x V, e.g. 4096x32000 (overrides --workload)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per case (median of these)")
    ap.add_argument("--cases", default="",
                    help="comma-separated substrings selecting cases (one ending in $: that exact name)")
    ap.add_argument("--rss", action="store_true",
                    help="also measure each step's peak RSS growth, one fresh child per case (Linux)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the logits")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    N, V = (map(int, args.shape.lower().split("x")) if args.shape else WORKLOADS[args.workload])
    if args.child:
        _child(args.child, N, V, args.dtype)
        return 0

    import jax
    import numpy as np

    if args.repeats < 1:
        ap.error("--repeats: expected at least 1")
    cases = _cases()
    if args.cases:
        keys = [k for k in cases if any(k == s[:-1] if s.endswith("$") else s in k
                                        for s in args.cases.split(","))]
        cases = {k: cases[k] for k in keys}
    x, y = _inputs(N, V, dtype=args.dtype)
    probs = None
    steps, mem, second = {}, {}, {}
    for name, fn in cases.items():
        if "probabilities input" in name:
            probs = _second_input(name, y, x) if probs is None else probs
        second[name] = probs if "probabilities input" in name else y
        steps[name], compiled = _compiled(fn, x, second[name])
        mem[name] = _mem(compiled)
        jax.block_until_ready(steps[name](x, second[name]))  # warm-up
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            # One untimed call first, so that the timed one follows the same step, as in a
            # training loop. Without it the case after another pays for the other's teardown
            # (GBs of 4 KiB pages released while it runs) and, on this VM, for memory that the
            # host reclaimed while idle and faults back in: 2-8x, whichever case it is.
            jax.block_until_ready(step(x, second[name]))
            t0 = time.perf_counter()
            out = step(x, second[name])
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
            del out
    rss = {k: _peak_rss(k, N, V, args.dtype) for k in steps} if args.rss else {}

    dev = jax.devices()[0]
    print(f"jit(value_and_grad(loss.mean())), {N} x {V} {args.dtype}, {dev.platform} ({dev.device_kind}), "
          f"jax {jax.__version__}, {os.cpu_count()} CPUs, {args.repeats} interleaved runs per case\n")
    head = "| case | median ms | min ms | XLA temp MiB | XLA output MiB |" + (" step peak RSS growth MiB |" if rss else "")
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for name in steps:
        med, mn = np.median(times[name]) * 1e3, np.min(times[name]) * 1e3
        tmp, out = mem[name]
        line = f"| {name} | {med:.1f} | {mn:.1f} | {tmp:.1f} | {out:.1f} |"
        if rss:
            line += f" {rss[name]:.0f} |"
        print(line)
    pairs = [("optax.softmax_cross_entropy_with_integer_labels",
              "logitkit.jax.softmax_cross_entropy_with_integer_labels"),
             ("optax.softmax_cross_entropy (one-hot)", "logitkit.jax.softmax_cross_entropy (one-hot)"),
             ("optax.softmax_cross_entropy (probabilities input)",
              "logitkit.jax.softmax_cross_entropy (probabilities input)"),
             ("optax.softmax_cross_entropy_with_integer_labels (padding where)",
              "logitkit.jax.softmax_cross_entropy_with_integer_labels (padding where)"),
             ("optax.softmax_cross_entropy_with_integer_labels (per-example vmap)",
              "logitkit.jax.softmax_cross_entropy_with_integer_labels (per-example vmap)")]
    print()
    for a, b in pairs:
        if a in times and b in times:
            print(f"speed-up of {b.split('.', 2)[-1]} over optax: median "
                  f"{np.median(times[a]) / np.median(times[b]):.2f}x, min {np.min(times[a]) / np.min(times[b]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
