"""gloo rank processes for tests/distributed/test_vp_head.py (started by torch.multiprocessing).

Each rank runs every case of ``cases.pkl`` in order (outputs, gradients and the collectives of
forward and backward, counted by wrapping torch.distributed) and writes ``out{rank}.pkl``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import traceback


def _run_error(c, rank):
    """A case where ranks pass different arguments: every rank must raise, none may hang."""
    import torch

    from logitkit.distributed import vocab_parallel_linear_head

    s, e = c["bounds"][rank]
    mine = c["per_rank"][rank]
    try:
        vocab_parallel_linear_head(torch.tensor(c["h"]), torch.tensor(c["w"][s:e]), torch.tensor(c["y"]),
                                   vocab_start=s, **mine)
    except (ValueError, TypeError) as exc:
        return {"error": str(exc), "error_type": type(exc).__name__}
    return {"error": None}


def worker(rank: int, world: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    from _vp_head_cases import run_rank
    from _vp_workers import install_counters

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        log = install_counters(dist)
        with open(os.path.join(workdir, "cases.pkl"), "rb") as f:
            cases = pickle.load(f)
        results = []
        for c in cases:
            try:
                results.append(_run_error(c, rank) if c.get("kind") == "error" else run_rank(c, rank, None, log))
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
