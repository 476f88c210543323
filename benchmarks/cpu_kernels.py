"""Time the numba CPU kernels against the memory-copy limits and torch eager.

Usage: ``python benchmarks/cpu_kernels.py [--workload llm llm3] [--repeat 5] [--threads N]``

For each workload (DESIGN.md: ``llm`` 4096 x 32000, ``llm3`` 1024 x 128256, float32) it prints the
median of ``--repeat`` runs of

* ``np.copyto(dst, x)`` (one read, one write into an existing array: the in-place limit) and
  ``np.copy(x)`` (into fresh pages: the limit for a new output);
* ``ce_forward_backward`` in place (``out=x``) and into a fresh gradient;
* ``softmax_forward`` into an existing array and into a fresh one;
* torch eager ``F.cross_entropy`` + ``backward`` (when torch is installed),

and the ratios the issue targets (in place <= 1.5x copyto, fresh <= 1.2x copy, softmax <= 1.3x
copyto / <= 1.1x copy).  Copies and kernels run in the same process, one after another.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

WORKLOADS = {"llm": (4096, 32000), "llm3": (1024, 128256), "small": (256, 1000)}


MINS = {}


def timeit(fn, repeat, setup=None, key=None):
    """Median wall time in ms of ``fn()`` over ``repeat`` runs after one warm-up (the minimum is
    kept in ``MINS[key]``: on a shared machine it shows the cost without interference)."""
    times = []
    for i in range(repeat + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if i:
            times.append((t1 - t0) * 1e3)
    if key is not None:
        MINS[key] = min(times)
    return statistics.median(times)


def run(name, repeat, with_torch=True):
    from logitkit.kernels import cpu

    n, v = WORKLOADS[name]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((n, v), dtype=np.float32)
    labels = rng.integers(0, v, n)
    x = x0.copy()
    dst = np.empty_like(x0)
    g = 1.0 / n
    res = {}

    def t(key, fn, setup=None):
        res[key] = timeit(fn, repeat, setup=setup, key=key)

    restore = lambda: np.copyto(x, x0)  # noqa: E731  (in-place runs overwrite x)
    t("np.copyto", lambda: np.copyto(dst, x0))
    t("np.copy", lambda: np.copy(x0))
    t("ce fwd+bwd in place", lambda: cpu.ce_forward_backward(x, labels, g, None, out=x), restore)
    t("ce fwd+bwd fresh", lambda: cpu.ce_forward_backward(x0, labels, g, None))
    t("ce fwd+bwd out=", lambda: cpu.ce_forward_backward(x0, labels, g, None, out=dst))
    t("softmax into existing", lambda: cpu.softmax_forward(x0, out=dst))
    t("softmax fresh", lambda: cpu.softmax_forward(x0))
    t("softmax in place", lambda: cpu.softmax_forward(x, out=x), restore)
    t("ce forward only", lambda: cpu.ce_forward(x0, labels))
    if with_torch:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None
        if torch is not None:
            tl = torch.from_numpy(labels)

            def torch_step():
                tx = torch.from_numpy(x0).requires_grad_(True)
                F.cross_entropy(tx, tl).backward()
            t("torch eager CE+backward", torch_step)
    cpy, cp = res["np.copyto"], res["np.copy"]
    print(f"\n== {name}: {n} x {v} float32, threads={cpu.get_num_threads()}, median of {repeat}")
    for k, t in res.items():
        print(f"{k:28s} {t:9.1f} ms (min {MINS[k]:7.1f})  {t / cpy:5.2f}x copyto   "
              f"{t / cp:5.2f}x copy")
    print("targets: in place %.2fx copyto (<=1.5), fresh %.2fx copy (<=1.2), softmax existing "
          "%.2fx copyto (<=1.3), softmax fresh %.2fx copy (<=1.1)" % (
              res["ce fwd+bwd in place"] / cpy, res["ce fwd+bwd fresh"] / cp,
              res["softmax into existing"] / cpy, res["softmax fresh"] / cp))
    if "torch eager CE+backward" in res:
        te = res["torch eager CE+backward"]
        print("vs torch eager: in place %.1fx faster, fresh %.1fx faster" % (
            te / res["ce fwd+bwd in place"], te / res["ce fwd+bwd fresh"]))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", nargs="+", default=["llm", "llm3"], choices=sorted(WORKLOADS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args(argv)
    from logitkit.kernels import cpu
    if a.threads:
        cpu.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cpu.ce_forward_backward(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), 1.0, None)
    cpu.softmax_forward(np.zeros((2, 3), np.float32))
    print(f"first call (compile or load from cache): {time.perf_counter() - t0:.2f} s")
    for w in a.workload:
        run(w, a.repeat, not a.no_torch)


if __name__ == "__main__":
    main()
