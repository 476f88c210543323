"""The small-call fast path of logitkit.torch.cross_entropy (issue 14) against F.cross_entropy.

The path takes torch's default options on 2-D float32/float64 CPU rows with int64 labels; below
``FUSED_MAX`` logits it makes the gradient in the forward pass. Each test runs on both sides of
that size, and checks the route was taken (the node's class), so a fallback cannot hide a bug.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import logitkit  # noqa: E402
import logitkit.torch as lt  # noqa: E402
from logitkit.torch import _eager  # noqa: E402

pytestmark = pytest.mark.skipif(__import__("logitkit.kernels.registry", fromlist=["x"])._load("cpu") is None,
                                reason="needs the numba CPU kernels")

SIZES = [(6, 5), (40, 500)]  # fused (gradient in forward), and two passes


def _data(N, C, dtype=torch.float64, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    if ignore:
        y[1] = -100
    return x, y


def _fast(loss):
    return getattr(loss.grad_fn, "_forward_cls", None) is _eager.CrossEntropyIndex


@pytest.mark.parametrize("N,C", SIZES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_matches_torch(N, C, reduction, dtype):
    x, y = _data(N, C, dtype)
    loss = lt.cross_entropy(x, y, reduction=reduction)
    assert _fast(loss)
    ref = F.cross_entropy(x.double(), y, reduction=reduction)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(loss.double(), ref, **tol)
    assert loss.dtype == dtype
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (ours,) = torch.autograd.grad(loss, x, go.to(dtype))
    (exp,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(ours.double(), exp.double(), **tol)


@pytest.mark.parametrize("N,C", SIZES)
def test_fast_path_every_row_ignored_is_zero(N, C):
    x, _ = _data(N, C)
    loss = lt.cross_entropy(x, torch.full((N,), -100))
    assert _fast(loss) and float(loss.detach()) == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("N,C", SIZES)
def test_fast_path_retain_graph_and_second_backward(N, C):
    x, y = _data(N, C)
    loss = lt.cross_entropy(x, y)
    assert _fast(loss)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.0, x)
    torch.testing.assert_close(g2, 3.0 * g1)
    with pytest.raises(RuntimeError, match="second time|freed"):
        torch.autograd.grad(loss, x)


def test_fast_path_accumulates_into_grad():
    x, y = _data(6, 5)
    lt.cross_entropy(x, y).backward()
    lt.cross_entropy(x, y).backward()
    x2 = x.detach().clone().requires_grad_()
    (2 * F.cross_entropy(x2, y)).backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("N,C", SIZES)
def test_fast_path_double_backward(N, C):
    x, y = _data(N, C)
    (g,) = torch.autograd.grad(lt.cross_entropy(x, y), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), x)
    (gr,) = torch.autograd.grad(F.cross_entropy(x, y), x, create_graph=True)
    (ggr,) = torch.autograd.grad((gr * gr).sum(), x)
    torch.testing.assert_close(gg, ggr)


def test_fast_path_refuses_bad_labels_like_the_general_path():
    x, y = _data(6, 5)
    y[3] = 5
    with pytest.raises(ValueError, match="target: class index 5 at position 3"):
        lt.cross_entropy(x, y)
    y[3] = -7
    with pytest.raises(ValueError, match="target: class index -7 at position 3"):
        lt.cross_entropy(x, y)


def test_fast_path_not_taken_for_other_options():
    x, y = _data(6, 5)
    for kw in ({"label_smoothing": 0.1}, {"weight": torch.rand(5, dtype=torch.float64)}, {"temperature": 2.0},
               {"return_lse": True}, {"z_loss": 1e-3}):
        loss = lt.cross_entropy(x, y, **kw)
        loss = loss[0] if isinstance(loss, tuple) else loss
        assert not _fast(loss), kw
    assert not _fast(lt.cross_entropy(x.float().half().float()[:, ::1].t().contiguous().t(), y))  # strided


def test_top_level_cross_entropy_takes_the_fast_path():
    x, y = _data(6, 5)
    loss = logitkit.cross_entropy(x, y)
    assert _fast(loss)
    torch.testing.assert_close(loss, F.cross_entropy(x, y))
