"""Small-call latency of logitkit.torch against torch.nn.functional, forward + backward, on the CPU.

Every case alternates the calls in one loop (``F`` then logitkit, repeat), so all see the same
machine load, and reports the median of each and the ratios of the medians (< 1: logitkit is
faster). ``--compile`` adds both functions under ``torch.compile`` (inductor, ``fullgraph=True``)
and the ratios issue 14 asks about: compiled logitkit to its own eager (ltc/ltE) and to compiled
F (ltc/Fc), with compiled F to F's own eager (Fc/FE). ``floor/F`` times a
``torch.autograd.Function`` that does no work at all against F: the least any loss defined in
Python costs in eager autograd, so a ratio lt/F below it cannot exist.

    python benchmarks/torch_latency.py --threads 1          # tiny, small, softmax at small
    python benchmarks/torch_latency.py --large --compile    # plus llm (4096 x 32000) and compiled
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


class _Floor(torch.autograd.Function):
    """The least any loss written as a ``torch.autograd.Function`` costs: forward returns a
    preallocated loss, backward a preallocated gradient (no arithmetic at all)."""

    @staticmethod
    def forward(ctx, x, loss, grad):
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, g):
        return ctx.grad, None, None


def _floor_loss(like):
    loss, grad = torch.zeros(()), torch.zeros_like(like)

    def run(x, y):
        return _Floor.apply(x, loss, grad)
    return run


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
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; median of each (microseconds), measured interleaved in one "
          "run; ratios < 1: logitkit faster")
    # "floor/F": a torch.autograd.Function that does no work (see _Floor), against F: the least
    # any Python-defined loss can cost in eager autograd.
    cols = (["F eager", "lt eager", "lt/F", "floor/F"]
            + (["F comp", "lt comp", "ltc/ltE", "ltc/Fc", "Fc/FE"] if args.compile else []))
    print(f"{'case':30s} " + " ".join(f"{c:>9s}" for c in cols), flush=True)
    sizes = ["tiny", "small"] + (["llm"] if args.large else [])
    g = torch.Generator().manual_seed(0)
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
            label = f"{fname} {N}x{V} fwd+bwd"
            if args.only and args.only not in label:
                continue
            tgt = y if fname == "cross_entropy" else p
            fns = [ref, ours, _floor_loss(x)]
            if args.compile:
                torch._dynamo.reset()
                fns += [torch.compile(ref, fullgraph=True, dynamic=False),
                        torch.compile(ours, fullgraph=True, dynamic=False)]
            t = _interleaved([_step(f, x, tgt) for f in fns], reps, warm)
            row = [t[0], t[1], t[1] / t[0], t[2] / t[0]]
            if args.compile:
                row += [t[3], t[4], t[4] / t[1], t[4] / t[3], t[3] / t[0]]
            cells = [f"{v * 1e6:9.1f}" if i in (0, 1, 4, 5) else f"{v:9.2f}" for i, v in enumerate(row)]
            print(f"{label:30s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
