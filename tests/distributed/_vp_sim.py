"""In-process stand-in for a process group: P threads, collectives through a barrier.

Used to test the collective-agnostic stages with NumPy, without processes. Every call is recorded
(op, element count, bytes) so tests can count the collectives of a forward pass.
"""

from __future__ import annotations

import threading

import numpy as np


class ThreadGroup:
    """``drop_nan``: the MAX ignores NaN (``fmax``), as gloo's and XLA's all-reduces may."""

    def __init__(self, size: int, timeout: float = 30.0, drop_nan: bool = False) -> None:
        self.size = size
        self.drop_nan = drop_nan
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list = [None] * size
        self.calls: list = []  # (op, numel, nbytes) recorded once per collective (by rank 0)

    def _collective(self, rank: int, op: str, a: np.ndarray) -> np.ndarray:
        self.slots[rank] = np.array(a, copy=True)
        self.barrier.wait()
        stacked = np.stack(self.slots)
        if op == "max":
            out = np.fmax.reduce(stacked, axis=0) if self.drop_nan else stacked.max(axis=0)
        else:
            out = np.add.reduce(stacked, axis=0)
        if rank == 0:
            self.calls.append((op, a.size, a.nbytes))
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out.astype(a.dtype)

    def collectives(self, rank: int) -> dict:
        return {"all_reduce_max": lambda a: self._collective(rank, "max", a),
                "all_reduce_sum": lambda a: self._collective(rank, "sum", a)}


def run_ranks(size: int, fn, drop_nan: bool = False) -> list:
    """Run ``fn(rank, group)`` on ``size`` threads; return the results, re-raising the first error."""
    group = ThreadGroup(size, drop_nan=drop_nan)
    results: list = [None] * size
    errors: list = [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, group)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors[rank] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in errors:
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise e
    for e in errors:
        if e is not None:
            raise e
    return results, group


def shard_bounds(sizes: list) -> list:
    """``[(start, end)]`` of consecutive shards of the given sizes."""
    out, s = [], 0
    for n in sizes:
        out.append((s, s + n))
        s += n
    return out
