"""Fixtures for the JAX tests: skip without jax, and a float64 mode that is always restored."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")


@pytest.fixture
def x64():
    """Enable ``jax_enable_x64`` for one test and restore the previous setting afterwards."""
    before = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


# The parity and accuracy modules run twice: through the numba kernels (XLA FFI custom calls,
# the default on the CPU) and through the XLA route (``use_core``), which other platforms and
# class masks take.
_BOTH_ROUTES = {"test_accuracy", "test_cross_entropy", "test_grads", "test_optax_parity"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rsplit(".", 1)[-1] in _BOTH_ROUTES:
        metafunc.parametrize("jax_route", ["kernels", "xla"], indirect=True)


@pytest.fixture(autouse=True)
def jax_route(request):
    """"kernels" (default) or "xla": the route class-index losses take while the test traces."""
    route = getattr(request, "param", "kernels")
    if route == "xla":
        from logitkit.kernels.registry import use_core

        with use_core():
            yield route
    else:
        yield route
