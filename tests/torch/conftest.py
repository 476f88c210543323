"""Fixtures for the torch tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_kernel_thread():
    """Run the numba kernels on one thread here: these tests use tiny tensors, where waking a
    thread pool costs more than the work (each call would wait ~15 ms on this kind of machine).
    The kernels' own tests and the benchmarks cover the threaded path."""
    try:
        from logitkit.kernels import cpu
    except ImportError:
        yield
        return
    setter = getattr(cpu, "set_num_threads", None)
    if setter is None:
        yield
        return
    setter(1)
    try:
        yield
    finally:
        setter(None)
