"""Small-call latency of logitkit.torch against torch.nn.functional, forward + backward, on the CPU.

Every case alternates the two calls in one loop (``F`` then logitkit, repeat), so both see the
same machine load, and reports the median of each and the ratio of the medians (< 1: logitkit is
faster). ``--compile`` adds both functions under ``torch.compile`` (inductor, ``fullgraph=True``).

    python benchmarks/torch_latency.py                    # tiny, small, softmax at small
    python benchmarks/torch_latency.py --large --compile  # plus llm (4096 x 32000) and compiled
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import logitkit.torch as lt

CASES = {
    "tiny": (100, 10),
    "small": (256, 1000),
    "llm": (4096, 32000),
}


def _step(loss_fn, x, y, out_of_place=True):
    def run():
        loss = loss_fn(x, y)
        loss.backward()
        x.grad = None
    return run


def _interleaved(fns, repeats, warmup):
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _softmax_loss(fn):
    def loss(x, y):
        return (fn(x, 1) * y).sum()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also the llm workload (4096 x 32000)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile'd F and logitkit")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per function (small sizes)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; median of each, measured interleaved in one run")
    print(f"{'case':34s} {'torch us':>10s} {'logitkit us':>12s} {'ratio':>7s}")
    sizes = ["tiny", "small"] + (["llm"] if args.large else [])
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in sizes:
        N, V = CASES[name]
        x = torch.randn(N, V, generator=g, requires_grad=True)
        y = torch.randint(0, V, (N,), generator=g)
        reps = args.repeats if N * V < 1 << 22 else 20
        warm = 10 if N * V < 1 << 22 else 3
        pairs = [("cross_entropy", F.cross_entropy, lt.cross_entropy)]
        if name == "small":
            p = torch.randn(N, V, generator=g)
            pairs += [("softmax", _softmax_loss(F.softmax), _softmax_loss(lt.softmax)),
                      ("log_softmax", _softmax_loss(F.log_softmax), _softmax_loss(lt.log_softmax))]
        for fname, ref, ours in pairs:
            tgt = y if fname == "cross_entropy" else p
            variants = [("eager", ref, ours)]
            if args.compile:
                variants.append(("compiled", torch.compile(ref, fullgraph=True, dynamic=False),
                                 torch.compile(ours, fullgraph=True, dynamic=False)))
            for mode, r_fn, o_fn in variants:
                tr, to = _interleaved([_step(r_fn, x, tgt), _step(o_fn, x, tgt)], reps, warm)
                label = f"{fname} {N}x{V} {mode} fwd+bwd"
                rows.append((label, tr, to))
                print(f"{label:34s} {tr * 1e6:10.1f} {to * 1e6:12.1f} {to / tr:7.2f}", flush=True)


if __name__ == "__main__":
    main()
