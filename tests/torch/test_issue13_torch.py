"""Regression tests of issue 13 for the PyTorch adapter (items 6, 7, 10, 12 and 14).

References are torch's own functions (F.cross_entropy, F.linear_cross_entropy, torch.softmax) in
float64, never logitkit's code.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import logitkit  # noqa: E402
import logitkit.torch as lt  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# item 6: in-place backward under saved-tensor hooks


def _two_consumers(loss_fn):
    """``loss_fn(z) + (z*z).sum()``: the second consumer saves z for its own backward."""
    a = torch.randn(4, 5, generator=_gen(6), dtype=torch.float64, requires_grad=True)
    z = a * 2
    return a, z, loss_fn(z) + (z * z).sum()


@pytest.mark.parametrize("hooks", ["save_on_cpu", "saved_tensors_hooks"])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_issue13_item6_inplace_backward_under_saved_tensor_hooks(hooks, target):
    y = torch.tensor([0, 1, 2, 3]) if target == "index" else torch.softmax(torch.randn(4, 5, generator=_gen(1),
                                                                                      dtype=torch.float64), 1)
    ctx = (torch.autograd.graph.save_on_cpu() if hooks == "save_on_cpu"
           else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    with ctx, pytest.raises(lt.InplaceError, match="saved-tensor hooks"):
        _two_consumers(lambda z: lt.cross_entropy(z, y, inplace_backward=True))
    with ctx:  # out of place stays correct under the hooks
        a, _, loss = _two_consumers(lambda z: lt.cross_entropy(z, y))
    (ours,) = torch.autograd.grad(loss, a)
    a2, _, ref = _two_consumers(lambda z: F.cross_entropy(z, y))
    (expected,) = torch.autograd.grad(ref, a2)
    torch.testing.assert_close(ours, expected)


def test_issue13_item6_inplace_backward_without_hooks_still_in_place():
    a, z, loss = _two_consumers(lambda z: lt.cross_entropy(z.exp().log() * 1.0, torch.tensor([0, 1, 2, 3]),
                                                           inplace_backward=True))
    (ours,) = torch.autograd.grad(loss, a)
    a2, _, ref = _two_consumers(lambda z: F.cross_entropy(z.exp().log() * 1.0, torch.tensor([0, 1, 2, 3])))
    (expected,) = torch.autograd.grad(ref, a2)
    torch.testing.assert_close(ours, expected)


# ----------------------------------------------------------------------------------------------
# item 7: a class weight that requires grad


def _weighted(seed=7):
    g = _gen(seed)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, generator=g, dtype=torch.float64).requires_grad_()
    return x, torch.tensor([0, 1, 3]), w


@pytest.mark.parametrize("call", ["lt.cross_entropy", "logitkit.cross_entropy", "CrossEntropyLoss",
                                  "lt.linear_cross_entropy", "logitkit.linear_cross_entropy"])
def test_issue13_item7_weight_requiring_grad_is_refused_with_class_indices(call):
    x, y, w = _weighted()
    W = torch.randn(5, 4, generator=_gen(2), dtype=torch.float64)
    w5 = torch.rand(5, dtype=torch.float64).requires_grad_()
    calls = {
        "lt.cross_entropy": lambda: lt.cross_entropy(x, y, weight=w),
        "logitkit.cross_entropy": lambda: logitkit.cross_entropy(x, y, weight=w),
        "CrossEntropyLoss": lambda: lt.CrossEntropyLoss(weight=w)(x, y),
        "lt.linear_cross_entropy": lambda: lt.linear_cross_entropy(x, W, y, weight=w5),
        "logitkit.linear_cross_entropy": lambda: logitkit.linear_cross_entropy(x, W, y, weight=w5),
    }
    with pytest.raises(RuntimeError, match="not differentiable"):  # torch refuses as well
        F.cross_entropy(x, y, weight=w)
    with pytest.raises(ValueError, match="weight: .*not differentiable"):
        calls[call]()
    with torch.no_grad():  # nothing to differentiate: accepted, as in torch
        calls[call]()
    # a detached weight gives torch's value
    ref = F.cross_entropy(x.detach() @ W.T if call.endswith("linear_cross_entropy") else x.detach(), y,
                          weight=(w5 if call.endswith("linear_cross_entropy") else w).detach())
    kw = {"weight": (w5 if call.endswith("linear_cross_entropy") else w).detach()}
    fn = {"lt.cross_entropy": lambda: lt.cross_entropy(x, y, **kw),
          "logitkit.cross_entropy": lambda: logitkit.cross_entropy(x, y, **kw),
          "CrossEntropyLoss": lambda: lt.CrossEntropyLoss(**kw)(x, y),
          "lt.linear_cross_entropy": lambda: lt.linear_cross_entropy(x, W, y, **kw),
          "logitkit.linear_cross_entropy": lambda: logitkit.linear_cross_entropy(x, W, y, **kw)}[call]
    torch.testing.assert_close(fn().detach(), ref)


def test_issue13_item7_weight_gradient_with_probability_targets():
    """Probability targets are differentiable in weight, in torch and here: the gradient arrives."""
    x, _, w = _weighted(8)
    p = torch.softmax(torch.randn(3, 4, generator=_gen(3), dtype=torch.float64), 1)
    (ours,) = torch.autograd.grad(lt.cross_entropy(x, p, weight=w), w)
    (ref,) = torch.autograd.grad(F.cross_entropy(x, p, weight=w), w)
    torch.testing.assert_close(ours, ref)


# ----------------------------------------------------------------------------------------------
# item 12: empty class axis, empty batch, hidden size 0


@pytest.mark.parametrize("shape,dim", [((5, 0, 0), -1), ((3, 0), -1), ((3, 0), 0), ((0, 4), 1), ((2, 0, 3), 1)])
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_issue13_item12_softmax_of_empty_axis(shape, dim, fn):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = getattr(torch, fn)(x, dim)
    for out in (getattr(lt, fn)(x, dim), getattr(logitkit, fn)(x, axis=dim),
                getattr(lt, fn)(x, dim, temperature=2.0)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.shape == x.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("entry", ["lt", "logitkit"])
def test_issue13_item12_cross_entropy_without_classes_every_label_ignored(reduction, entry):
    x = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
    y = torch.full((3,), -100)
    if entry == "lt":
        loss = lt.cross_entropy(x, y, reduction=reduction, z_loss=1e-3)
    else:
        loss = logitkit.cross_entropy(x, y, reduction=reduction, z_loss=1e-3)
    expected = torch.zeros(3 if reduction == "none" else (), dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), expected)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.shape == (3, 0)
    # the lse of an empty row is log(0) = -inf
    _, lse = lt.cross_entropy(x, y, return_lse=True)
    assert torch.equal(lse, torch.full((3,), -math.inf, dtype=torch.float64))
    # a label that is not ignored is out of range [0, 0): refused (torch: IndexError)
    with pytest.raises(ValueError, match="out of range"):
        lt.cross_entropy(x, torch.zeros(3, dtype=torch.int64))


def test_issue13_item12_probability_targets_without_classes():
    x = torch.randn(2, 0, dtype=torch.float64, requires_grad=True)
    p = torch.empty(2, 0, dtype=torch.float64)
    loss = lt.cross_entropy(x, p, reduction="sum")
    torch.testing.assert_close(loss.detach(), F.cross_entropy(x.detach(), p, reduction="sum"))
    (g,) = torch.autograd.grad(loss, x)
    assert g.shape == (2, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_issue13_item12_cross_entropy_of_empty_batch(reduction):
    x = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64)
    for loss in (lt.cross_entropy(x, y, reduction=reduction), logitkit.cross_entropy(x, y, reduction=reduction)):
        expected = torch.zeros(0 if reduction == "none" else (), dtype=torch.float64)
        torch.testing.assert_close(loss.detach(), expected)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert g.shape == (0, 5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_issue13_item12_linear_head_with_hidden_size_zero(bias, reduction):
    h = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=_gen(12), dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.tensor([0, 4, -100])
    params = [t for t in (h, W, b) if t is not None]
    ref = F.linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction)
    ref_g = torch.autograd.grad(ref.sum(), params)
    for fn in (lt.linear_cross_entropy, logitkit.linear_cross_entropy):
        loss = fn(h, W, y, linear_bias=b, reduction=reduction)
        torch.testing.assert_close(loss, ref)
        for got, exp in zip(torch.autograd.grad(loss.sum(), params), ref_g):
            torch.testing.assert_close(got, exp)


# ----------------------------------------------------------------------------------------------
# item 14: torch's refusals


@pytest.mark.parametrize("ignore_index", [0, 1])
def test_issue13_item14_ignore_index_with_probability_targets_is_refused(ignore_index):
    x = torch.randn(3, 4, generator=_gen(14))
    p = torch.softmax(torch.randn(3, 4, generator=_gen(15)), 1)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(x, p)
    with pytest.raises(ValueError, match="ignore_index: .*probability targets"):
        lt.CrossEntropyLoss(ignore_index=ignore_index)(x, p)
    with pytest.raises(ValueError, match="ignore_index: .*probability targets"):
        lt.cross_entropy(x, p, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_issue13_item14_negative_ignore_index_with_probability_targets_matches_torch(ignore_index):
    x = torch.randn(3, 4, generator=_gen(16), dtype=torch.float64)
    p = torch.softmax(torch.randn(3, 4, generator=_gen(17), dtype=torch.float64), 1)
    ref = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(x, p)
    torch.testing.assert_close(lt.CrossEntropyLoss(ignore_index=ignore_index)(x, p), ref)


@pytest.mark.parametrize("target_shape", [(4,), (2, 4)])
def test_issue13_item14_unbatched_input_with_k_dimensional_weight_is_refused(target_shape):
    h = torch.randn(8, generator=_gen(18))
    W = torch.randn(2, 4, 8, generator=_gen(19))
    t = torch.randint(0, 2, target_shape, generator=_gen(20))
    with pytest.raises(RuntimeError, match="requires batched input"):
        F.linear_cross_entropy(h, W, t)
    with pytest.raises(ValueError, match="batched input"):
        lt.linear_cross_entropy(h, W, t)
    # batched input with the K-dimensional weight still matches torch
    hb = torch.randn(3, 8, generator=_gen(21), dtype=torch.float64)
    tb = torch.randint(0, 2, (3, 4), generator=_gen(22))
    torch.testing.assert_close(lt.linear_cross_entropy(hb, W.double(), tb),
                               F.linear_cross_entropy(hb, W.double(), tb))
