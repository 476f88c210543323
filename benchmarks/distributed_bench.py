"""Vocabulary-parallel cross-entropy on the CPU: time and bytes per token against the alternatives.

    python benchmarks/distributed_bench.py                 # llm workload: N=4096, V=32000, float32
    python benchmarks/distributed_bench.py --N 1024 --V 128256 --smoothing 0.1
    python benchmarks/distributed_bench.py --device cuda --ranks 1   # single-GPU overhead only

Rows (forward + backward of the mean loss, median of ``--repeats`` after one warm-up):
- one process, whole vocabulary: ``torch.nn.functional.cross_entropy`` and
  ``logitkit.distributed.vocab_parallel_cross_entropy`` with no process group (the identity
  collectives), at 1 thread and at ``--ranks`` threads;
- ``--ranks`` processes (gloo, ``file://`` rendezvous, 1 thread each), each with ``V/ranks``
  classes: ``vocab_parallel_cross_entropy``, and gathering the logits (``all_gather``) then
  ``F.cross_entropy`` on the whole vocabulary.
Bytes per token are counted by wrapping ``torch.distributed``'s collectives: the payload of each
all-reduce, and for the gather what each rank receives, ``(P−1)/P·V·4``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import statistics
import sys
import tempfile
import time


def _timeit(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _data(N: int, V: int, dtype: str, device: str = "cpu"):
    import torch

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 2).to(getattr(torch, dtype)).to(device)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    return x, y


def single_process(args) -> list:
    import torch
    import torch.nn.functional as F

    from logitkit.distributed import vocab_parallel_cross_entropy

    rows = []
    x, y = _data(args.N, args.V, args.dtype, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    threads = sorted({1, args.ranks}) if args.device == "cpu" else [torch.get_num_threads()]
    for nt in threads:
        torch.set_num_threads(nt)
        for name, fn in (("torch F.cross_entropy", F.cross_entropy),
                         ("logitkit vocab_parallel (no group)", vocab_parallel_cross_entropy)):
            def step(fn=fn):
                xx = x.detach().requires_grad_()
                fn(xx, y, label_smoothing=args.smoothing).backward()

            rows.append((name, 1, nt, _timeit(step, args.repeats, sync), 0.0))
    return rows


def _rank(rank: int, world: int, workdir: str, args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from logitkit.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rdzv')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        log: list = []
        for name in ("all_reduce", "all_gather"):
            orig = getattr(dist, name)

            def wrapped(*a, __orig=orig, __name=name, **k):
                t = a[1] if __name == "all_gather" else a[0]
                log.append((__name, t.numel() * t.element_size()))
                return __orig(*a, **k)

            setattr(dist, name, wrapped)
        x, y = _data(args.N, args.V, args.dtype)
        n = args.V // world
        local = x[:, rank * n:(rank + 1) * n].contiguous()

        def vp():
            xx = local.detach().requires_grad_()
            vocab_parallel_cross_entropy(xx, y, label_smoothing=args.smoothing).backward()

        def gather():
            xx = local.detach().requires_grad_()
            parts = [torch.empty_like(xx) for _ in range(world)]
            dist.all_gather(parts, xx.detach())
            parts[rank] = xx  # the local slice keeps its autograd edge
            F.cross_entropy(torch.cat(parts, dim=-1), y, label_smoothing=args.smoothing).backward()

        out = []
        for name, fn in (("logitkit vocab_parallel", vp), ("gather logits + F.cross_entropy", gather)):
            dist.barrier()
            del log[:]
            fn()
            per_call = list(log)
            ms = _timeit(lambda fn=fn: (dist.barrier(), fn()), args.repeats)
            if name.startswith("gather"):  # each rank receives the other ranks' slices
                nbytes = sum(b for _, b in per_call) * (world - 1)
            else:  # all-reduce payload
                nbytes = sum(b for _, b in per_call)
            out.append((name, world, 1, ms, nbytes / args.N))
        t = torch.tensor([r[3] for r in out], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            rows = [(r[0], r[1], r[2], float(t[i]), r[4]) for i, r in enumerate(out)]
            with open(os.path.join(workdir, "rows.pkl"), "wb") as f:
                pickle.dump(rows, f)
    finally:
        dist.destroy_process_group()


def multi_process(args) -> list:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_rank, args=(args.ranks, d, args), nprocs=args.ranks, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {args.timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(os.path.join(d, "rows.pkl"), "rb") as f:
            return pickle.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    if args.V % args.ranks:
        p.error("--V must divide by --ranks")
    rows = single_process(args)
    if args.device == "cpu" and args.ranks > 1:
        rows += multi_process(args)
    itemsize = {"float32": 4, "bfloat16": 2, "float64": 8}[args.dtype]
    print(f"N={args.N} V={args.V} {args.dtype} label_smoothing={args.smoothing} device={args.device}; "
          f"gathering would move (P-1)/P*V*{itemsize} = {(args.ranks - 1) / args.ranks * args.V * itemsize:.0f} "
          "bytes per token")
    print("| method | processes | threads each | fwd+bwd ms | bytes per token communicated |")
    print("| --- | --- | --- | --- | --- |")
    for name, procs, nt, ms, bpt in rows:
        print(f"| {name} | {procs} | {nt} | {ms:.1f} | {bpt:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
