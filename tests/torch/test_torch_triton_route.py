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
from logitkit.torch import _eager, _ops  # noqa: E402

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
    # CPU tensors in eager mode skip the operators (logitkit.torch._eager): send them there
    monkeypatch.setattr(_eager, "kernels_for", lambda x: None)
    monkeypatch.setattr(_eager, "fast_ce", lambda *args, **kw: None)
    # and the operators' own small-row bodies (one compiled call on CPU rows) to the stages
    for name in ("op_rows_stats", "op_rows_backward", "op_softmax", "op_softmax_backward"):
        monkeypatch.setattr(_eager, name, lambda *args, **kw: None)
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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_cross_entropy(dtype, inplace):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 16, generator=g).to("cuda", dtype).requires_grad_(True)
    W = torch.randn(3000, 16, generator=g).to("cuda", dtype)
    y = torch.randint(0, 3000, (64,), generator=g).cuda()
    y[::7] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, temperature=1.1)
    loss = lt.cross_entropy(h @ W.T, y, inplace_backward=inplace, **kw)
    assert loss.dtype == dtype
    h64 = h.detach().double().requires_grad_(True)
    ref = ref_cross_entropy(h64 @ W.double().T, y, **kw)
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.double(), ref, **tol)
    (gh,) = torch.autograd.grad(loss, h)
    (gref,) = torch.autograd.grad(ref, h64)
    torch.testing.assert_close(gh.double(), gref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@cuda
def test_cuda_softmax_and_autocast():
    x = torch.randn(32, 5000, device="cuda", requires_grad=True)
    for log in (False, True):
        ours = (lt.log_softmax if log else lt.softmax)(x, -1)
        ref = (F.log_softmax if log else F.softmax)(x, -1)
        torch.testing.assert_close(ours, ref)
        go = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(ours, x, go)[0], torch.autograd.grad(ref, x, go)[0])
    xb = x.detach().to(torch.bfloat16)
    y = torch.randint(0, 5000, (32,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert lt.cross_entropy(xb, y).dtype == F.cross_entropy(xb, y).dtype
        assert lt.softmax(xb, -1).dtype == F.softmax(xb, -1).dtype
