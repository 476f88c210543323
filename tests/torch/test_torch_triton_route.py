"""The CUDA route of logitkit.torch (its Triton stages) run in Triton's CPU interpreter.

On a machine with a GPU, CUDA tensors reach these kernels through the registry; here the stage
selection is pointed at them for CPU tensors, which the interpreter accepts, so the adapter's
argument passing, ``out``/in-place handling and autograd wiring around Triton are checked
without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is defined (tests/kernels/triton does the same).
    # Never on a GPU machine: there the real kernels run and this module's tests skip.
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402

import logitkit.torch as lt  # noqa: E402
from logitkit.torch import _ops  # noqa: E402

from _torch_ref import ref_cross_entropy  # noqa: E402


@pytest.fixture
def triton_route(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) on a machine without CUDA")
    from logitkit.kernels import triton as tk

    used = []

    def select(stage, x):
        used.append(stage)
        return False, getattr(tk, stage)

    monkeypatch.setattr(_ops, "_select", select)
    return used


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_through_triton(triton_route, inplace):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 8, -100, 4])
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    kw = dict(weight=w, label_smoothing=0.1, z_loss=0.01, softcap=3.0, temperature=0.8)
    loss = lt.cross_entropy(h @ W.T, y, inplace_backward=inplace, **kw)
    ref = ref_cross_entropy(h @ W.T, y, **kw)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref, h)[0])
    assert {"ce_forward", "ce_backward"} <= set(triton_route)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_through_triton(triton_route, log):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ours = (lt.log_softmax if log else lt.softmax)(x, 1, temperature=1.5)
    ref = (F.log_softmax if log else F.softmax)(x / 1.5, 1)
    torch.testing.assert_close(ours, ref)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ours, x, go)[0], torch.autograd.grad(ref, x, go)[0])
    assert len(triton_route) == 2
