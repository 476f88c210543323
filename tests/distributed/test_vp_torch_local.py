"""The torch bindings in one process (no process group: the collectives are the identity).

Argument errors, shapes and dtypes, and parity with float64 NumPy on the whole vocabulary.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from logitkit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402


def _xy(shape=(3, 5), V=11, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*shape, V)) * 2
    y = rng.integers(0, V, shape)
    return x, y


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
def test_batch_dims_dtypes_and_reduction_none(dtype, tol):
    x, y = _xy()
    y[0, 1] = -100
    xt = torch.tensor(x).to(dtype).requires_grad_()
    loss = vocab_parallel_cross_entropy(xt, torch.tensor(y), reduction="none", label_smoothing=0.1)
    assert loss.shape == (3, 5) and loss.dtype == dtype
    (loss * torch.arange(15.0).reshape(3, 5).to(dtype)).sum().backward()
    xr = xt.detach().double().numpy()
    ref = cross_entropy64(xr, y, reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(loss.detach().double().numpy(), ref, rtol=tol, atol=tol * 1e-2)
    # d/dx of Σ_i c_i·loss_i: the per-row gradient scaled by c_i
    g = cross_entropy_grad64(xr.reshape(15, -1), y.reshape(15), reduction="none", label_smoothing=0.1)
    g = (g * np.arange(15.0)[:, None]).reshape(x.shape)
    assert xt.grad.dtype == dtype
    np.testing.assert_allclose(xt.grad.double().numpy(), g, rtol=10 * tol, atol=tol * 1e-1)
    assert loss[0, 1] == 0 and torch.all(xt.grad[0, 1] == 0)


def test_empty_batch():
    xt = torch.zeros(0, 7, requires_grad=True)
    loss = vocab_parallel_cross_entropy(xt, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and xt.grad.shape == (0, 7)


def test_argument_errors_name_the_argument():
    x = torch.zeros(4, 6)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="local_logits: expected a floating dtype"):
        vocab_parallel_cross_entropy(torch.zeros(4, 6, dtype=torch.int64), y)
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        vocab_parallel_cross_entropy(x, y.float())
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        vocab_parallel_cross_entropy(x, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="vocab_start: expected None or an int >= 0"):
        vocab_parallel_cross_entropy(x, y, vocab_start=-1)
    with pytest.raises(ValueError, match="group: a process group was given"):
        vocab_parallel_cross_entropy(x, y, group=object())
    with pytest.raises(ValueError, match=r"labels: class index 6 at position 2 is out of range \[0, 6\)"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match=r"weight: expected the global class weights, shape \(6,\)"):
        vocab_parallel_cross_entropy(x, y, weight=torch.ones(5))
    with pytest.raises(ValueError, match="vocab_start: the shards do not tile"):
        vocab_parallel_cross_entropy(x, y, vocab_start=3)  # alone, the classes must start at 0
    with pytest.raises(ValueError, match=r"local_weight: expected shape \(n, 6\)"):
        vocab_parallel_linear_cross_entropy(torch.zeros(4, 6), torch.zeros(5, 3), y)
    with pytest.raises(ValueError, match=r"local_bias: expected shape \(5,\)"):
        vocab_parallel_linear_cross_entropy(torch.zeros(4, 6), torch.zeros(5, 6), y, local_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_linear_cross_entropy(torch.zeros(4, 6), torch.zeros(5, 6), y, chunk_size=0)


def test_linear_without_hidden_grad_needs_no_collective():
    rng = np.random.default_rng(3)
    h = torch.tensor(rng.normal(size=(9, 4)))
    w = torch.tensor(rng.normal(size=(7, 4)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 7, 9))
    loss = vocab_parallel_linear_cross_entropy(h, w, y, chunk_size=2, z_loss=1e-2)
    loss.backward()
    logits = h.numpy() @ w.detach().numpy().T
    np.testing.assert_allclose(loss.item(), cross_entropy64(logits, y.numpy(), z_loss=1e-2), rtol=1e-12)
    g = cross_entropy_grad64(logits, y.numpy(), z_loss=1e-2)
    np.testing.assert_allclose(w.grad.numpy(), g.T @ h.numpy(), rtol=1e-10, atol=1e-14)


def test_device_mode_header_in_the_max_tail(monkeypatch):
    """The path CUDA tensors take (no host synchronisation), forced on the CPU: the header table
    rides in the per-token MAX, a failed check gives NaN instead of raising."""
    from logitkit.distributed import _torch as vt
    from logitkit.distributed import stages

    monkeypatch.setattr(vt, "_host_mode", lambda x: False)
    calls = []
    monkeypatch.setattr(vt.TorchCollectives, "all_reduce_max", lambda self, t: calls.append(t.numel()) or t)
    x, y = _xy(shape=(6,), V=9, seed=4)
    y[2] = -100
    opts = {"label_smoothing": 0.1, "temperature": 0.5, "z_loss": 1e-3}
    xt = torch.tensor(x).requires_grad_()
    w = torch.tensor(np.random.default_rng(1).uniform(0.5, 2.0, 9))
    loss = vocab_parallel_cross_entropy(xt, torch.tensor(y), weight=w, **opts)
    loss.backward()
    assert calls == [6 + stages.header_size(1, with_message=False)]  # no separate header collective
    o = {**opts, "weight": w.numpy()}
    np.testing.assert_allclose(loss.item(), cross_entropy64(x, y, **o), rtol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), cross_entropy_grad64(x, y, **o), rtol=1e-10, atol=1e-15)
    bad = y.copy()
    bad[0] = 9
    assert torch.isnan(vocab_parallel_cross_entropy(torch.tensor(x), torch.tensor(bad)))
    assert torch.isnan(vocab_parallel_cross_entropy(torch.tensor(x), torch.tensor(y), weight=w[:5]))
    assert torch.isnan(vocab_parallel_cross_entropy(torch.tensor(x), torch.tensor(y), vocab_start=1))


@pytest.mark.parametrize("dtype,item,tol", [(torch.float64, 8, 1e-10), (torch.float32, 4, 1e-5),
                                            (torch.bfloat16, 4, 3e-2), (torch.float16, 4, 5e-3)])
def test_linear_hidden_grad_all_reduce_dtype_and_bytes(monkeypatch, dtype, item, tol):
    """The backward SUM carries d loss / d hidden in float32 for float32 and 16-bit inputs (4·H
    bytes a token), float64 for float64 (8·H): the collective wrapped, no process group."""
    from logitkit.distributed import _torch as vt

    calls = []
    real = vt.TorchCollectives.all_reduce_sum
    monkeypatch.setattr(vt.TorchCollectives, "all_reduce_sum",
                        lambda self, t: calls.append((t.dtype, t.numel(), t.numel() * t.element_size()))
                        or real(self, t))
    rng = np.random.default_rng(5)
    N, H, V = 10, 6, 13
    h = torch.tensor(rng.normal(size=(N, H))).to(dtype).requires_grad_()
    w = torch.tensor(rng.normal(size=(V, H)) * 0.5).to(dtype).requires_grad_()
    y = rng.integers(0, V, N)
    y[4] = -100
    loss = vocab_parallel_linear_cross_entropy(h, w, torch.tensor(y), chunk_size=3, label_smoothing=0.1)
    fwd = list(calls)
    del calls[:]
    loss.backward()
    assert calls == [(torch.float64 if dtype == torch.float64 else torch.float32, N * H, N * H * item)], calls
    assert len(fwd) == 1 and fwd[0][0] == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    # float64 references on the same rounded inputs, errors at the scale of Σ_c |g_c|·|W_c|
    h64, w64 = h.detach().double().numpy(), w.detach().double().numpy()
    g = cross_entropy_grad64(h64 @ w64.T, y, label_smoothing=0.1)
    np.testing.assert_allclose(loss.double().item(), cross_entropy64(h64 @ w64.T, y, label_smoothing=0.1), rtol=tol)
    err = np.abs(h.grad.double().numpy() - g @ w64)
    assert np.all(err <= tol * (np.abs(g) @ np.abs(w64))), float(np.max(err / (np.abs(g) @ np.abs(w64))))
    err_w = np.abs(w.grad.double().numpy() - g.T @ h64)
    assert np.all(err_w <= tol * (np.abs(g).T @ np.abs(h64)))


def test_linear_default_chunks_bound_the_workspace(monkeypatch):
    """Without chunk_size a chunk's logits are at most 32 MiB / 24 B (the measured workspace per
    logit) values, in forward and in backward, whatever N; the loss and gradients stay exact."""
    from logitkit.distributed import _torch as vt

    shapes = []
    real = vt._head_logits
    monkeypatch.setattr(vt, "_head_logits", lambda h, w, b: shapes.append(tuple(h.shape[:1]) + (w.shape[0],))
                        or real(h, w, b))
    rng = np.random.default_rng(6)
    N, H, V = 200, 3, 40000
    h = torch.tensor(rng.normal(size=(N, H)), dtype=torch.float32, requires_grad=True)
    w = torch.tensor(rng.normal(size=(V, H)), dtype=torch.float32, requires_grad=True)
    y = rng.integers(0, V, N)
    loss = vocab_parallel_linear_cross_entropy(h, w, torch.tensor(y))
    loss.backward()
    rows = [r for r, _ in shapes]
    assert sum(rows) == 2 * N and len(rows) > 2   # forward and backward, several chunks each
    assert max(rows) * V * 24 <= 32 << 20 and max(rows) == (32 << 20) // (24 * V)
    h64, w64 = h.detach().double().numpy(), w.detach().double().numpy()
    g = cross_entropy_grad64(h64 @ w64.T, y)
    np.testing.assert_allclose(loss.item(), cross_entropy64(h64 @ w64.T, y), rtol=2e-6)
    scale = np.abs(g) @ np.abs(w64)
    err = np.abs(h.grad.numpy() - g @ w64)
    # a float32 dot product over the V classes: |error| <= V·2^-24·Σ_c |g_c|·|W_c| (measured 1.8e-4 here,
    # as lt.linear_cross_entropy in one process and float32 g @ W give)
    assert np.all(err <= V * 2.0 ** -24 * scale), float(np.max(err / scale))
