"""logitkit.torch under torch.func transforms (issue 14 item 3), against F.cross_entropy under the same ones.

Under a transform the autograd functions cannot run (their kernels read tensor memory that a
transform's wrapped tensors do not have); logitkit's core runs on differentiable torch ops
instead, so every transform torch supports for its own loss works here too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
from torch.func import grad, jacfwd, jacrev, jvp, vmap  # noqa: E402

import logitkit.torch as lt  # noqa: E402


def _data(N=8, C=5, B=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, C) if B is None else (B, N, C)
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C, shape[:-1], generator=g)
    y[..., 1] = -100
    return x, y


OPTIONS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
           {"weight": "w"}, {"ignore_index": 2}]


def _kw(opts, C, y):
    kw = dict(opts)
    if "ignore_index" in kw:
        y[y == -100] = kw["ignore_index"]  # torch refuses -100 when it is not the ignore_index
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 1.5, C, dtype=torch.float64)
    return kw


def _scalar(fn, kw):
    """A scalar of the loss for transforms that need one (``none`` summed with distinct weights)."""
    def f(x, y):
        out = fn(x, y, **kw)
        if out.ndim:
            out = (out * torch.arange(1, out.numel() + 1, dtype=out.dtype).reshape(out.shape)).sum()
        return out
    return f


@pytest.mark.parametrize("opts", OPTIONS)
def test_grad(opts):
    x, y = _data()
    kw = _kw(opts, 5, y)
    torch.testing.assert_close(grad(_scalar(lt.cross_entropy, kw))(x, y), grad(_scalar(F.cross_entropy, kw))(x, y))


@pytest.mark.parametrize("opts", OPTIONS)
def test_vmap_over_a_batch_of_losses(opts):
    x, y = _data(B=3)
    kw = _kw(opts, 5, y)
    ours = vmap(lambda a, b: lt.cross_entropy(a, b, **kw))(x, y)
    ref = vmap(lambda a, b: F.cross_entropy(a, b, **kw))(x, y)
    torch.testing.assert_close(ours, ref)
    # and the same as one call per batch element, outside any transform
    torch.testing.assert_close(ours, torch.stack([lt.cross_entropy(a, b, **kw) for a, b in zip(x, y)]))


def test_vmap_of_grad_per_example_gradients():
    x, y = _data(B=4)
    torch.testing.assert_close(vmap(grad(lt.cross_entropy))(x, y), vmap(grad(F.cross_entropy))(x, y))


def test_vmap_with_unbatched_labels_and_in_dims():
    x, y = _data(B=3)
    ours = vmap(lt.cross_entropy, in_dims=(0, None))(x, y[0])
    ref = vmap(F.cross_entropy, in_dims=(0, None))(x, y[0])
    torch.testing.assert_close(ours, ref)


def test_jacrev_jacfwd_jvp():
    x, y = _data()
    t = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    f_ours = lambda a: lt.cross_entropy(a, y, reduction="none")  # noqa: E731
    f_ref = lambda a: F.cross_entropy(a, y, reduction="none")  # noqa: E731
    torch.testing.assert_close(jacrev(f_ours)(x), jacrev(f_ref)(x))
    torch.testing.assert_close(jacfwd(f_ours)(x), jacfwd(f_ref)(x))
    (o1, t1), (o2, t2) = jvp(f_ours, (x,), (t,)), jvp(f_ref, (x,), (t,))
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(t1, t2)


def test_hessian_matches_torch():
    x, y = _data(N=3, C=4)
    h_ours = jacfwd(jacrev(lt.cross_entropy))(x, y)
    h_ref = jacfwd(jacrev(F.cross_entropy))(x, y)
    torch.testing.assert_close(h_ours, h_ref)


def test_probability_targets_grad_in_both_arguments():
    x, _ = _data()
    p = torch.softmax(torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7)), 1)
    got = grad(lt.cross_entropy, argnums=(0, 1))(x, p)
    exp = grad(F.cross_entropy, argnums=(0, 1))(x, p)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def test_class_dim_1_with_extra_dims_under_vmap():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)  # vmapped over 2: (N=4, C=5, d=3)
    y = torch.randint(0, 5, (2, 4, 3), generator=g)
    torch.testing.assert_close(vmap(lt.cross_entropy)(x, y), vmap(F.cross_entropy)(x, y))


@pytest.mark.parametrize("log", [False, True])
def test_softmax_under_vmap_and_grad(log):
    x, _ = _data(B=3)
    fn, ref = (lt.log_softmax, F.log_softmax) if log else (lt.softmax, F.softmax)
    torch.testing.assert_close(vmap(lambda a: fn(a, -1))(x), vmap(lambda a: ref(a, -1))(x))
    w = torch.randn(x.shape[1:], dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    g1 = vmap(grad(lambda a: (fn(a, 0) * w).sum()))(x)
    g2 = vmap(grad(lambda a: (ref(a, 0) * w).sum()))(x)
    torch.testing.assert_close(g1, g2)


def test_module_under_grad():
    x, y = _data()
    loss = lt.CrossEntropyLoss(label_smoothing=0.05)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    torch.testing.assert_close(grad(lambda a: loss(a, y))(x), grad(lambda a: ref(a, y))(x))


def test_float32_confident_rows_stay_exact_under_vmap():
    """The contract (float32 per-row loss within 2^-21, confident rows included) holds under a
    transform too: the core's log1p formulation, not torch's float32 log-softmax."""
    C = 6
    x = np.full((2, 4, C), -30.0, np.float32)
    y = np.zeros((2, 4), np.int64)
    x[..., 0] = 0.0  # loss = log1p(5 e^-30) ~ 4.7e-13
    x[1] += 1e4
    ours = vmap(lambda a, b: lt.cross_entropy(a, b, reduction="none"))(torch.from_numpy(x), torch.from_numpy(y))
    x64 = x.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    exact = np.log1p(np.exp(x64[..., 1:] - m).sum(-1)) - (x64[..., 0] - m[..., 0])
    rel = np.abs(ours.numpy().astype(np.float64) - exact) / exact
    assert rel.max() <= 2.0 ** -21, rel.max()
    torch_rel = np.abs(vmap(lambda a, b: F.cross_entropy(a, b, reduction="none"))(
        torch.from_numpy(x), torch.from_numpy(y)).numpy() - exact) / exact
    assert torch_rel.max() > 2.0 ** -21  # (what the contract is for: torch's float32 loss is not exact here)


def test_masked_logits_under_grad_no_nan():
    x, y = _data()
    x[:, 3] = -math.inf
    y[y == 3] = 0
    g1 = grad(lt.cross_entropy)(x, y)
    g2 = grad(F.cross_entropy)(x, y)
    assert not torch.isnan(g1).any()
    torch.testing.assert_close(g1, g2)


def test_refusals_name_the_transform_and_argument():
    x, y = _data()
    with pytest.raises(ValueError, match="inplace_backward=True: not supported under torch.func transforms"):
        grad(lambda a: lt.cross_entropy(a * 2, y, inplace_backward=True))(x)
    w = torch.rand(5, dtype=x.dtype)
    with pytest.raises(ValueError, match="not differentiable with respect to weight"):
        grad(lambda ww: lt.cross_entropy(x, y, weight=ww))(w)


def test_bad_label_raises_under_grad():
    x, y = _data()
    y[3] = 5
    with pytest.raises(ValueError, match="class index 5 at position 3"):
        grad(lt.cross_entropy)(x, y)


def test_batched_bad_label_raises():
    """Labels batched by vmap are read under the wrapper (the whole batch at once)."""
    x, y = _data(B=2)
    y[1, 3] = 9
    with pytest.raises(ValueError, match=r"class index 9 at position \(1, 3\)"):
        vmap(lambda a, b: lt.cross_entropy(a, b, reduction="none"))(x, y)
