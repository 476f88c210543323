"""Peak extra memory and time of cross-entropy forward+backward in PyTorch: torch eager against
logitkit.torch out of place and with ``inplace_backward=True``.

Each variant runs in a fresh Python process, so that one variant's allocations (and the
allocator's cached pages) cannot hide or inflate another's. In the child, the logits are made
first; the baseline is the resident set size after that; the peak is ``ru_maxrss`` after one
forward+backward. ``extra = peak - baseline`` is everything the loss needed beyond its inputs
(torch's allocator on CPU returns large blocks to the OS, so RSS sees them; tracemalloc does not).
Kernels are compiled on a small problem first so that JIT memory is not counted.

The logits come from an autograd function whose backward does nothing (a stand-in for a model's
head that needs no memory), so they are a non-leaf tensor as in training and in-place mode applies.

    python benchmarks/torch_memory.py                       # the ``llm`` workload, 4096 x 32000
    python benchmarks/torch_memory.py --n 1024 --v 128256   # ``llm3``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("torch", "logitkit", "logitkit-inplace")
WORKLOADS = {"llm": (4096, 32000), "llm3": (1024, 128256), "small": (256, 1000)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(variant: str, N: int, V: int, reps: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    import logitkit.torch as lt
    from logitkit.kernels import registry

    class Source(torch.autograd.Function):
        """Hands ``data`` on as a non-leaf tensor that requires grad; its backward costs nothing."""

        @staticmethod
        def forward(ctx, anchor, data):
            return data.view_as(data)

        @staticmethod
        def backward(ctx, grad):
            return None, None

    def loss_fn(x, y):
        if variant == "torch":
            return F.cross_entropy(x, y)
        return lt.cross_entropy(x, y, inplace_backward=variant == "logitkit-inplace")

    anchor = torch.zeros((), requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    # warm-up: compile the kernels and initialise torch's autograd on a small problem
    for _ in range(2):
        small = torch.randn(64, 1000, generator=gen)
        loss_fn(Source.apply(anchor, small), torch.randint(0, 1000, (64,), generator=gen)).backward()
    del small

    y = torch.randint(0, V, (N,), generator=gen)
    data = torch.randn(N, V, generator=gen)
    x = Source.apply(anchor, data)
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    loss_fn(x, y).backward()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = peak - baseline

    src = data.clone()  # after the measurement: in-place mode overwrites ``data`` every step
    times = []
    for _ in range(reps):
        data.copy_(src)
        x = Source.apply(anchor, data)
        t0 = time.perf_counter()
        loss_fn(x, y).backward()
        times.append(time.perf_counter() - t0)
    backend = registry.select("ce_backward", "numpy", data.numpy())[0] if variant != "torch" else "aten"
    return {"variant": variant, "N": N, "V": V, "logits_bytes": data.numel() * data.element_size(),
            "extra_bytes": extra, "first_s": first, "median_s": statistics.median(times), "reps": reps,
            "threads": torch.get_num_threads(), "backend": backend}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="llm")
    ap.add_argument("--n", type=int, help="rows (overrides the workload)")
    ap.add_argument("--v", type=int, help="classes (overrides the workload)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after the memory run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    N, V = WORKLOADS[args.workload]
    N, V = args.n or N, args.v or V
    if args.child:
        print(json.dumps(_child(args.child, N, V, args.reps)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            ap.error(f"--variants: unknown variant {variant!r}; expected some of {VARIANTS}")
        cmd = [sys.executable, __file__, "--child", variant, "--n", str(N), "--v", str(V), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mb = 1024 * 1024
    print(f"cross-entropy forward+backward, N={N} V={V} float32, logits {rows[0]['logits_bytes'] / mb:.0f} MiB, "
          f"{rows[0]['threads']} threads")
    print()
    print("| variant | kernels | peak extra memory (MiB) | × logits | median time (ms) | first call (ms) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['backend']} | {r['extra_bytes'] / mb:.1f} | {r['extra_bytes'] / r['logits_bytes']:.3f} "
              f"| {1e3 * r['median_s']:.0f} | {1e3 * r['first_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
