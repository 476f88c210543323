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
