"""TensorFlow: logitkit against tf.nn.sparse_softmax_cross_entropy_with_logits, forward + backward.

Each variant runs in a fresh process (TensorFlow's allocator keeps memory, so peaks would mix):
median time of ``--repeat`` steps after a warm step, and the peak RSS growth of the process over
its inputs. Modes: eager, tf.function, tf.function(jit_compile=True).

    python benchmarks/tf_bench.py                 # llm: 4096 x 32000 float32
    python benchmarks/tf_bench.py --n 256 --v 1000
    python benchmarks/tf_bench.py --n 1024 --head 1024   # linear head: h (N, H), W (V, H)

With ``--head H`` the workload is the fused linear head: logitkit.linear_cross_entropy against
``tf.matmul`` then tf.nn's op (the (N, V) logits materialized), gradients for ``h`` and ``W``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

VARIANTS = [(peer, mode) for mode in ("eager", "function", "xla") for peer in ("tf.nn", "logitkit")]


def child(peer: str, mode: str, n: int, v: int, repeat: int, head: int = 0) -> dict:
    import resource
    import time

    import numpy as np

    import logitkit.tensorflow  # noqa: F401  (first: it loads Triton before TensorFlow)
    import tensorflow as tf

    import logitkit

    rng = np.random.default_rng(0)
    y = tf.constant(rng.integers(0, v, n))
    if head:
        x = (tf.constant(rng.standard_normal((n, head)).astype(np.float32)),
             tf.constant((rng.standard_normal((v, head)) / np.sqrt(head)).astype(np.float32)))

        def fn(labels, logits):
            h, W = logits
            if peer == "tf.nn":
                z = tf.matmul(h, W, transpose_b=True)
                return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=z))
            return logitkit.linear_cross_entropy(h, W, labels)
    else:
        x = tf.constant(rng.standard_normal((n, v)).astype(np.float32))
        op = (tf.nn.sparse_softmax_cross_entropy_with_logits if peer == "tf.nn"
              else logitkit.sparse_softmax_cross_entropy_with_logits)

        def fn(labels, logits):
            return tf.reduce_mean(op(labels=labels, logits=logits))

    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = fn(labels=b, logits=a)
        return loss, tape.gradient(loss, a)

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "xla"))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, g = step(x, y)
    float(tf.nest.flatten(g)[0][0, 0])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loss, g = step(x, y)
        float(tf.nest.flatten(g)[0][0, 0])
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peer": peer, "mode": mode, "ms": 1e3 * sorted(times)[len(times) // 2],
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "peak_growth_mb": (peak - base) / 1024, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--head", type=int, default=0, metavar="H", help="linear head with hidden size H")
    ap.add_argument("--child", nargs=2, metavar=("PEER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.n, args.v, args.repeat, args.head)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    what = f"linear head H={args.head}, " if args.head else ""
    print(f"# {what}{args.n} x {args.v} float32, forward + backward; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'mode':10s} {'peer':10s} {'ms':>9s} {'min-max ms':>15s} {'peak MB':>9s}")
    for peer, mode in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", peer, mode, "--n", str(args.n), "--v",
                              str(args.v), "--repeat", str(args.repeat), "--head", str(args.head)], capture_output=True, text=True, env=env)
        lines = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{mode:10s} {peer:10s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1][7:])
        spread = f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
        print(f"{mode:10s} {peer:10s} {r['ms']:9.1f} {spread:>15s} {r['peak_growth_mb']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
