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

    python benchmarks/distributed_bench.py --dtensor       # DTensor head: N=2048, H=512, V=32000

``--dtensor`` compares, on a ``ColwiseParallel``-style head (weight DTensor ``Shard(0)`` over
``--ranks`` gloo processes, hidden states replicated), forward + backward of the mean loss:
``logitkit.torch.linear_cross_entropy(hidden, W)`` (vocabulary-parallel, no logits), logits
``hidden @ W.T`` (a ``Shard(1)`` DTensor) with ``logitkit.torch.cross_entropy``, the same logits
under torch's ``loss_parallel()`` + ``F.cross_entropy``, and ``full_tensor()`` of the logits
(gathered) + ``F.cross_entropy``. Each method runs in fresh processes: the peak extra memory per
rank is the peak resident set of one step (``VmHWM``, reset through ``/proc/self/clear_refs``
just before) minus the resident set before it, inputs excluded (the slowest / largest rank is
reported); bytes per token count both ``torch.distributed`` and the functional collectives that
DTensor uses, forward and backward.
"""

from __future__ import annotations

import argparse
import datetime
import gc
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


DTENSOR_METHODS = ("logitkit linear_cross_entropy (DTensor head)", "logits DTensor + logitkit cross_entropy",
                   "logits DTensor + torch loss_parallel", "logits full_tensor() + F.cross_entropy")


def _count_collectives(log: list) -> None:
    """Wrap the collectives DTensor and torch.distributed use; log (name, bytes moved per rank)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    def size(t):
        return t.numel() * t.element_size() if hasattr(t, "numel") else 0

    def wrap(mod, name, nbytes):
        orig = getattr(mod, name, None)
        if orig is None:
            return

        def wrapped(*a, **k):
            log.append((name, nbytes(a, k)))
            return orig(*a, **k)

        setattr(mod, name, wrapped)

    world = dist.get_world_size()
    wrap(dist, "all_reduce", lambda a, k: size(a[0]))
    wrap(funcol, "all_reduce", lambda a, k: size(a[0]))
    wrap(dist, "all_gather", lambda a, k: size(a[1]) * (world - 1))
    wrap(dist, "all_gather_into_tensor", lambda a, k: size(a[1]) * (world - 1))
    wrap(funcol, "all_gather_single", lambda a, k: size(a[0]) * (world - 1))
    wrap(funcol, "all_gather_tensor", lambda a, k: size(a[0]) * (world - 1))
    wrap(funcol, "reduce_scatter_tensor", lambda a, k: size(a[0]) * (world - 1) // world)


def _reset_peak() -> int:
    """Reset the kernel's peak resident set (VmHWM) to the current one; return it (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _hwm()


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _dtensor_rank(rank: int, world: int, workdir: str, args, method: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import logitkit.torch as lt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rdzv')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        N, H, V = args.N, args.H, args.V
        h = torch.randn(N, H, generator=g)
        W = (torch.randn(V, H, generator=g) * 0.05)
        y = torch.randint(0, V, (N,), generator=g)
        Wl = W.chunk(world)[rank].contiguous()
        del W

        def step():
            hh = h.detach().requires_grad_()
            Wd = DTensor.from_local(Wl.detach().requires_grad_(), mesh, [Shard(0)])
            if method == DTENSOR_METHODS[0]:
                lt.linear_cross_entropy(hh, Wd, y, label_smoothing=args.smoothing).backward()
                return
            logits = DTensor.from_local(hh, mesh, [Replicate()]) @ Wd.T  # Shard(1), as ColwiseParallel
            if method == DTENSOR_METHODS[1]:
                lt.cross_entropy(logits, y, label_smoothing=args.smoothing).backward()
            elif method == DTENSOR_METHODS[2]:
                with loss_parallel():  # torch refuses label smoothing here
                    F.cross_entropy(logits, y).backward()
            else:
                F.cross_entropy(logits.full_tensor(), y, label_smoothing=args.smoothing).backward()

        log: list = []
        _count_collectives(log)
        step()  # warm-up: imports, kernels and DTensor's caches are not the loss's memory
        gc.collect()
        dist.barrier()
        del log[:]
        base = _reset_peak()
        step()
        peak = _hwm()
        nbytes = sum(b for _, b in log)
        ms = _timeit(lambda: (dist.barrier(), step()), args.repeats)
        t = torch.tensor([ms, max(0, peak - base) / 2**20], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest / largest rank
        if rank == 0:
            with open(os.path.join(workdir, "rows.pkl"), "wb") as f:
                pickle.dump([(method, world, 1, float(t[0]), nbytes / N, float(t[1]))], f)
    finally:
        dist.destroy_process_group()


def dtensor_rows(args) -> list:
    import torch.multiprocessing as mp

    rows = []
    for method in DTENSOR_METHODS:
        with tempfile.TemporaryDirectory() as d:
            ctx = mp.start_processes(_dtensor_rank, args=(args.ranks, d, args, method), nprocs=args.ranks,
                                     join=False, start_method="spawn")
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
                rows += pickle.load(f)
    return rows


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
    p.add_argument("--dtensor", action="store_true", help="the DTensor head comparison (see above)")
    p.add_argument("--H", type=int, default=512, help="hidden size (--dtensor)")
    args = p.parse_args(argv)
    if args.V % args.ranks:
        p.error("--V must divide by --ranks")
    if args.dtensor:
        if argv is None and "--N" not in sys.argv:
            args.N = 2048
        rows = dtensor_rows(args)
        print(f"N={args.N} H={args.H} V={args.V} float32 label_smoothing={args.smoothing}, {args.ranks} gloo "
              f"ranks x 1 thread, head weight Shard(0); peak = extra resident memory per rank")
        print("| method | fwd+bwd ms | peak extra MiB per rank | bytes per token communicated (fwd+bwd) |")
        print("| --- | ---: | ---: | ---: |")
        for name, procs, nt, ms, bpt, mib in rows:
            print(f"| {name} | {ms:.0f} | {mib:.0f} | {bpt:,.0f} |")
        sys.stdout.flush()
        return
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
