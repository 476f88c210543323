"""Rank processes for the torch.distributed (gloo) tests; started by torch.multiprocessing.

Each rank reads the cases from a pickle, runs them in order and writes its results to
``out{rank}.pkl``. Every torch.distributed communication function is wrapped to count the calls
(and bytes) of each forward and each backward.
"""

from __future__ import annotations

import datetime
import os
import pickle
import traceback

import numpy as np

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "reduce",
               "gather", "scatter", "barrier")


def install_counters(dist) -> list:
    log: list = []
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, __fn=fn, __name=name, **kwargs):
            t = args[0] if args and hasattr(args[0], "numel") else kwargs.get("tensor")
            op = kwargs.get("op", args[1] if len(args) > 1 and __name == "all_reduce" else None)
            numel = int(t.numel()) if t is not None else 0
            nbytes = numel * t.element_size() if t is not None else 0
            opname = "SUM" if op is None else next(
                (k for k in ("MAX", "SUM", "MIN", "PRODUCT", "AVG") if op == getattr(dist.ReduceOp, k)), str(op))
            log.append((__name, opname, numel, nbytes))
            return __fn(*args, **kwargs)

        setattr(dist, name, wrapped)
    return log


def megatron_forward(x_local, y, start, eps, dist):
    """Megatron-Core's vocab-parallel forward with its per-partition label smoothing (test only).

    A documented counter-example (Megatron-LM issue #737): ``mean(log p)`` is taken over the local
    partition and ``smoothing = eps·K/(K−1)`` uses the local partition size ``K``.
    """
    import torch

    m = x_local.max(-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = x_local - m[:, None]
    loc = y - start
    own = (loc >= 0) & (loc < x_local.shape[1])
    predicted = torch.where(own, shifted.gather(1, loc.clamp(0, x_local.shape[1] - 1)[:, None])[:, 0], 0.0)
    dist.all_reduce(predicted)
    sum_exp = shifted.exp().sum(-1)
    dist.all_reduce(sum_exp)
    loss = sum_exp.log() - predicted
    K = x_local.shape[1]
    log_probs = shifted - sum_exp.log()[:, None]
    smoothing = eps * K / (K - 1)
    return (1.0 - smoothing) * loss - smoothing * log_probs.mean(-1)


def _run_case(case, rank, dist, log):
    import time

    import torch

    from logitkit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    s, e = case["bounds"][rank]
    dtype = getattr(torch, case.get("dtype", "float64"))
    dev = torch.device(case.get("device", "cpu"))
    opts = dict(case.get("opts", {}))
    if opts.get("weight") is not None:
        opts["weight"] = torch.tensor(opts["weight"], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                      device=dev)
    y = torch.tensor(case["y"], device=dev)
    start = None if case.get("equal") else s
    out = {}
    if case["kind"] == "megatron":
        x = torch.tensor(case["x"][:, s:e])
        out["loss"] = megatron_forward(x, y, s, case["eps"], dist).numpy()
        return out
    if case["kind"] == "error":
        # per-rank overrides: one rank's mistake must make every rank raise the same error, promptly
        mine = dict(case.get("per_rank", [{}] * (rank + 1))[rank]) if "per_rank" in case else {}
        s, e = mine.get("bounds", (s, e))
        rows = mine.get("rows", case["x"].shape[0])
        xdt = getattr(torch, mine.get("dtype", "float64"))
        x = torch.tensor(case["x"][:rows, s:e]).to(xdt).to(dev)
        yy = torch.tensor(case["y_per_rank"][rank], device=dev) if "y_per_rank" in case else y
        if "y" in mine:
            yy = torch.tensor(mine["y"], device=dev)
        o = {**opts, **mine.get("opts", {})}
        start_arg = mine.get("vocab_start", None if case.get("equal") else s)
        t0 = time.monotonic()
        try:
            if case.get("linear"):
                h = torch.tensor(case["h"][:rows]).to(xdt)
                loss = vocab_parallel_linear_cross_entropy(h, torch.tensor(case["w"][s:e]).to(xdt), yy,
                                                           vocab_start=start_arg, **o)
            else:
                loss = vocab_parallel_cross_entropy(x, yy, vocab_start=start_arg, **o)
            out["loss"] = loss.detach().cpu().double().numpy()  # non-CPU devices: NaN, no exception
        except (ValueError, TypeError) as exc:
            out["error"] = str(exc)
            out["error_type"] = type(exc).__name__
        out["seconds"] = time.monotonic() - t0
        return out
    if case["kind"] in ("logits", "contract", "nan"):
        x = torch.tensor(case["x"][:, s:e]).to(dtype).to(dev).requires_grad_()
        del log[:]
        loss = vocab_parallel_cross_entropy(x, y, vocab_start=start, **opts)
        out["fwd"] = list(log)
        del log[:]
        loss.sum().backward()
        out["bwd"] = list(log)
        out["loss"] = loss.detach().cpu().double().numpy()
        out["grad"] = x.grad.cpu().double().numpy()
        return out
    # linear head
    h = torch.tensor(case["h"]).to(dtype).requires_grad_()
    w = torch.tensor(case["w"][s:e]).to(dtype).requires_grad_()
    b = torch.tensor(case["b"][s:e]).to(dtype).requires_grad_()
    del log[:]
    loss = vocab_parallel_linear_cross_entropy(h, w, y, local_bias=b, vocab_start=start,
                                               chunk_size=case["chunk"],
                                               reduce_hidden_grad=case.get("reduce_hidden_grad", True), **opts)
    out["fwd"] = list(log)
    del log[:]
    loss.sum().backward()
    out["bwd"] = list(log)
    out["loss"] = loss.detach().double().numpy()
    out["dh"], out["dw"], out["db"] = (t.grad.double().numpy() for t in (h, w, b))
    return out


def worker(rank: int, world: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        log = install_counters(dist)
        with open(os.path.join(workdir, "cases.pkl"), "rb") as f:
            cases = pickle.load(f)
        results = []
        for case in cases:
            try:
                results.append(_run_case(case, rank, dist, log))
            except Exception:  # noqa: BLE001 - reported to the parent test
                results.append({"exception": traceback.format_exc()})
                break  # the group may be out of step now; stop rather than hang
        with open(os.path.join(workdir, f"out{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


def launch(world: int, workdir: str, cases: list, timeout: float = 150.0) -> list:
    """Spawn ``world`` gloo ranks on ``cases``; return each rank's results. Kills them on timeout."""
    import time

    import torch.multiprocessing as mp

    with open(os.path.join(workdir, "cases.pkl"), "wb") as f:
        pickle.dump(cases, f)
    ctx = mp.start_processes(worker, args=(world, workdir), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gloo ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for r in range(world):
        with open(os.path.join(workdir, f"out{r}.pkl"), "rb") as f:
            out.append(pickle.load(f))
    return out
