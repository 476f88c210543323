"""TensorFlow: logitkit against tf.nn.sparse_softmax_cross_entropy_with_logits, forward + backward.

Each variant runs in a fresh process (TensorFlow's allocator keeps memory, so peaks would mix):
median time of ``--repeat`` steps after a warm step, and the peak RSS growth of the process over
its inputs. Modes: eager, tf.function, tf.function(jit_compile=True).

    python benchmarks/tf_bench.py                 # llm: 4096 x 32000 float32
    python benchmarks/tf_bench.py --n 256 --v 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

VARIANTS = [(peer, mode) for mode in ("eager", "function", "xla") for peer in ("tf.nn", "logitkit")]


def child(peer: str, mode: str, n: int, v: int, repeat: int) -> dict:
    import resource
    import time

    import numpy as np
    import tensorflow as tf

    import logitkit

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((n, v)).astype(np.float32))
    y = tf.constant(rng.integers(0, v, n))
    fn = (tf.nn.sparse_softmax_cross_entropy_with_logits if peer == "tf.nn"
          else logitkit.sparse_softmax_cross_entropy_with_logits)

    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = tf.reduce_mean(fn(labels=b, logits=a))
        return loss, tape.gradient(loss, a)

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "xla"))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, g = step(x, y)
    float(g[0, 0])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loss, g = step(x, y)
        float(g[0, 0])
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peer": peer, "mode": mode, "ms": 1e3 * sorted(times)[len(times) // 2],
            "peak_growth_mb": (peak - base) / 1024, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("PEER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.n, args.v, args.repeat)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    print(f"# {args.n} x {args.v} float32, forward + backward; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'mode':10s} {'peer':10s} {'ms':>9s} {'peak MB':>9s}")
    for peer, mode in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", peer, mode, "--n", str(args.n), "--v",
                              str(args.v), "--repeat", str(args.repeat)], capture_output=True, text=True, env=env)
        lines = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{mode:10s} {peer:10s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1][7:])
        print(f"{mode:10s} {peer:10s} {r['ms']:9.1f} {r['peak_growth_mb']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
