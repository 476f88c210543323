"""Shared fixtures: hypothesis profile, kernel choice, RNG."""

from __future__ import annotations

import os

# Triton's kernel tests run in its CPU interpreter, which must be chosen before Triton is first
# imported: the TensorFlow/Keras conftests import Triton at collection (before TensorFlow, against
# an LLVM clash), earlier than tests/kernels/triton/conftest.py would set it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Not JAX_DISABLE_MOST_OPTIMIZATIONS, though it cuts the JAX tests' compile time by a third: at
# LLVM level 0, XLA CPU (jaxlib 0.10.2) computed linear_head's loss + logprobs with a temperature
# 4% off (a pure-XLA program, no custom call; right at the default level), and tests must run the
# program users get.

import numpy as np  # noqa: E402
import pytest

try:
    from hypothesis import HealthCheck, settings

    # Bounded and deadline-free: JIT warm-up (numba, XLA) must not count as a slow example.
    settings.register_profile("logitkit", max_examples=40, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "logitkit"))
except ImportError:  # hypothesis is a test extra; property tests skip without it
    pass


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


@pytest.fixture(params=["kernels", "core"])
def kernels(request):
    """Run a NumPy test once through the registry (fused CPU kernels when present) and once
    through the core, which is the reference every kernel must match."""
    from logitkit.kernels import registry

    if request.param == "core":
        with registry.use_core():
            yield "core"
    else:
        yield "kernels"
