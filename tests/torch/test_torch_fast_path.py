"""The small-call fast path of logitkit.torch.cross_entropy (issue 14) against F.cross_entropy.

The path takes torch's default options on 2-D float32/float64 CPU rows with int64 labels; below
``FUSED_MAX`` logits it makes the gradient in the forward pass. Each test runs on both sides of
that size, and checks the route was taken (the node's class), so a fallback cannot hide a bug.
"""

from __future__ import annotations

import numpy as np
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
    return getattr(loss.grad_fn, "_forward_cls", None) in (_eager.CrossEntropyIndex, _eager.CrossEntropySmall)


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


# ----------------------------------------------------------------------------------------------
# the serial route's compiled entry (logitkit.torch._entry): short rows against the kernel


def _special_rows(N, C, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C)) * rng.choice([0.5, 3.0, 20.0])).astype(dtype)
    y = rng.integers(0, C, N)
    x[0] = -np.inf                      # fully masked, not ignored: loss inf, never NaN
    x[1, 0] = np.nan                    # NaN row
    x[2, -1] = np.inf                   # +inf row
    x[3] = 5.0                          # every class tied
    x[4] += 1e4                         # a large shared offset
    x[5, y[5]] = 80.0 if dtype == np.float32 else 700.0  # confident row, loss ~1e-30
    if C > 1:
        x[6, (y[6] + 1) % C] = -np.inf  # one masked class
    y[7] = -100                         # ignored
    x[8] = -np.inf
    y[8] = -100                         # fully masked and ignored: 0, no NaN
    return x, y


def _entry_outputs(x, y, red, fused):
    from logitkit.torch import _entry

    N, C = x.shape
    is64 = x.dtype == np.float64
    loss = np.zeros(N if red == 2 else 1, x.dtype)
    g = np.zeros((N, C), x.dtype)
    m, r = np.zeros(N, x.dtype), np.zeros(N, x.dtype)
    yy = np.ascontiguousarray(y, np.int64)
    valid = _entry.ce_entry(is64)(x.ctypes.data, yy.ctypes.data, loss.ctypes.data, g.ctypes.data if fused else 0,
                                  m.ctypes.data, r.ctypes.data, N, C, -100, red, fused)
    return valid, loss, g, m, r


def _kernel_outputs(x, y, inv):
    from logitkit.kernels.cpu import _kernels as K

    N, C = x.shape
    ce, m, r = (np.empty(N, x.dtype) for _ in range(3))
    g = np.empty((N, C), x.dtype)
    K.ce_direct_serial(x, np.ascontiguousarray(y, np.int64), np.ones(C, x.dtype), float(C), -100, 0.0, 0.0,
                       np.full(N, inv), np.zeros(N), True, g, False, ce, m, r)
    return ce, g, m, r


def _same_values(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.array_equal(a[ok & np.isinf(a)], b[ok & np.isinf(a)])
    fin = np.isfinite(a)
    np.testing.assert_allclose(a[fin], b[fin], rtol=rtol, atol=0)


@pytest.mark.parametrize("C", [1, 2, 7, 32, 33, 200])  # up to SHORT_C the entry's own rows, above the kernel's
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_entry_rows_match_the_kernel(C, dtype):
    """Every row kind, per-row loss / statistics / gradient, against the kernel's ce_direct."""
    N = 12
    x, y = _special_rows(N, C, dtype, seed=C)
    valid, loss, g, m, r = _entry_outputs(x, y, 2, True)
    assert valid == N - 2
    ce_k, g_k, m_k, r_k = _kernel_outputs(x, y, 1.0)
    rtol = 4e-7 if dtype == np.float32 else 1e-15
    _same_values(loss, ce_k, rtol)
    _same_values(m, m_k, 0)
    _same_values(r, r_k, rtol)
    # red=2 writes no gradient scale: compare the fused gradient of the mean instead
    valid, mean, g, _, _ = _entry_outputs(x, y, 0, True)
    _, g_k, _, _ = _kernel_outputs(x, y, 1.0 / valid)
    _same_values(g, g_k, rtol)
    assert np.isnan(mean[0])  # the NaN and +inf rows make the mean NaN, as in torch


@pytest.mark.parametrize("C", [1, 3, 10, 32, 100])
def test_entry_float32_meets_the_contract(C):
    """Per-row loss within 2^-21 of the float64 value of the float32 inputs, confident rows included."""
    rng = np.random.default_rng(C)
    N = 64
    x = (rng.standard_normal((N, C)) * 4).astype(np.float32)
    y = rng.integers(0, C, N)
    x[: N // 4, :] -= 60.0
    x[np.arange(N // 4), y[: N // 4]] = 0.0  # confident rows: loss ~ C·exp(-60)
    x[N // 4: N // 2] += 1e4
    _, loss, g, _, _ = _entry_outputs(x, y, 2, False)
    x64 = torch.from_numpy(x.astype(np.float64))
    ref = F.cross_entropy(x64, torch.from_numpy(y), reduction="none").numpy()
    # float64 torch loses the confident rows' digits too (log(1 + 1e-26) = 0): those from log1p
    m = x.astype(np.float64).max(1, keepdims=True)
    e = np.exp(x.astype(np.float64) - m)
    top = np.argmax(x, 1)
    e[np.arange(N), top] = 0.0
    exact = np.log1p(e.sum(1)) - (x.astype(np.float64)[np.arange(N), y] - m[:, 0])
    conf = slice(0, N // 4)
    ref[conf] = exact[conf]
    if C == 1:
        assert np.all(loss == 0.0)
        return
    fin = ref > 1e-37  # float32's normal range
    rel = np.abs(loss.astype(np.float64)[fin] - ref[fin]) / ref[fin]
    assert rel.max() <= 2.0 ** -21, rel.max()


def test_entry_reports_the_first_bad_label():
    x = np.zeros((5, 4), np.float32)
    y = np.array([0, -100, 4, -1, 2])
    valid, loss, g, _, _ = _entry_outputs(x, y, 0, True)
    assert valid == -1 - 2


def test_no_grad_call_matches_torch():
    x, y = _data(50, 9, torch.float32)
    with torch.no_grad():
        loss = lt.cross_entropy(x, y)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), y), rtol=1e-6, atol=0)


@pytest.mark.parametrize("N,C", SIZES)
def test_double_backward_after_in_place_change_raises(N, C):
    x, y = _data(N, C)
    h = x * 1.0  # an intermediate, modified in place after the loss
    loss = lt.cross_entropy(h, y)
    assert _fast(loss)
    with torch.no_grad():
        h.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_two_pass_backward_after_in_place_change_raises():
    x, y = _data(40, 500)  # above FUSED_MAX: backward reads the logits
    h = x * 1.0
    loss = lt.cross_entropy(h, y)
    assert _fast(loss)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_backward_after_in_place_change_is_the_forward_gradient():
    """As torch's own loss (which saves its log-softmax, not the logits): the gradient of the values
    the forward saw."""
    x, y = _data(6, 5)
    h = x * 1.0
    loss = lt.cross_entropy(h, y)
    ref = F.cross_entropy(h, y)
    with torch.no_grad():
        h.mul_(3.0)
    (ours,) = torch.autograd.grad(loss, x, retain_graph=True)
    (exp,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(ours, exp)


@pytest.mark.parametrize("N,C", SIZES)
def test_saved_tensor_hooks_see_the_logits(N, C):
    """Offloading and checkpointing work through saved-tensor hooks: under them the route saves the
    logits with save_for_backward (and the hooks pack them), instead of holding them itself."""
    x, y = _data(N, C)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lt.cross_entropy(x, y)
    assert any(t.data_ptr() == x.data_ptr() for t in packed)
    (ours,) = torch.autograd.grad(loss, x)
    (exp,) = torch.autograd.grad(F.cross_entropy(x, y), x)
    torch.testing.assert_close(ours, exp)


def test_gradient_buffer_becomes_the_grad():
    """The fused gradient is handed to autograd, which keeps it as .grad without a copy."""
    x, y = _data(6, 5)
    loss = lt.cross_entropy(x, y)
    ptr = loss.grad_fn.s[0].data_ptr()  # no reference kept: autograd may take the buffer only when none is
    loss.backward()
    assert x.grad.data_ptr() == ptr
    assert loss.grad_fn.s is None  # released with the graph


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax on the small-call route


def _sm_fast(y):
    return getattr(y.grad_fn, "_forward_cls", None) is _eager.SoftmaxSmall


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, -1])
def test_fast_softmax_matches_torch(log, dtype, dim):
    x, _ = _data(30, 17, dtype)
    with torch.no_grad():
        x[0] = -float("inf")         # a fully masked row: softmax 0, log_softmax -inf (as logitkit's kernels)
        x[1, :5] = -float("inf")     # some classes masked
        x[2] += 1e4
    fn, ref_fn = (lt.log_softmax, F.log_softmax) if log else (lt.softmax, F.softmax)
    y = fn(x, dim)
    assert _sm_fast(y) and y.dtype == dtype
    ref = ref_fn(x.detach().double(), dim)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    ok = slice(1, None)  # torch gives NaN for the fully masked row
    torch.testing.assert_close(y[ok].double(), ref[ok], **tol)
    assert torch.all(y[0] == (-float("inf") if log else 0.0))
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (gx,) = torch.autograd.grad(y[ok], x, dy[ok].to(dtype))
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(ref_fn(xr, dim)[ok], xr, dy[ok])
    torch.testing.assert_close(gx[ok].double(), gr[ok], **tol)


@pytest.mark.parametrize("log", [False, True])
def test_fast_softmax_double_backward_and_no_grad(log):
    x, _ = _data(8, 6)
    fn, ref_fn = (lt.log_softmax, F.log_softmax) if log else (lt.softmax, F.softmax)
    y = fn(x, 1)
    assert _sm_fast(y)
    w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), x)
    (gr,) = torch.autograd.grad((ref_fn(x, 1) * w).sum(), x, create_graph=True)
    (ggr,) = torch.autograd.grad((gr * gr).sum(), x)
    torch.testing.assert_close(gg, ggr)
    with torch.no_grad():
        y0 = fn(x, 1)
    assert y0.grad_fn is None
    torch.testing.assert_close(y0, ref_fn(x.detach(), 1))


def test_fast_softmax_output_changed_in_place_raises():
    x, _ = _data(8, 6)
    y = lt.softmax(x, 1)
    assert _sm_fast(y)
    y.mul_(2.0)  # the saved output: torch's version check refuses, as for its own softmax
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_fast_softmax_not_taken_elsewhere():
    x, _ = _data(8, 6)
    assert not _sm_fast(lt.softmax(x, 0))
    assert not _sm_fast(lt.softmax(x, 1, temperature=2.0))
    assert not _sm_fast(lt.softmax(x, 1, dtype=torch.float32))
    assert not _sm_fast(lt.softmax(x.t(), 1))  # strided
    assert not _sm_fast(lt.softmax(x.reshape(2, 4, 6), -1))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_softmax_parallel_range(log, dtype, monkeypatch):
    """Above the kernels' parallel bound, on two threads, the fast path runs the parallel kernels
    (after a first general-route call has chosen numba's threading layer) and matches float64 torch,
    masked and extreme rows included; on one thread it stays on the serial entries."""
    k = _eager._cpu[0] if _eager._cpu else _eager._load_cpu()
    N, C = 70, (2 * k._MIN_PER_THREAD) // 70 + 1
    x, _ = _data(N, C, dtype)
    with torch.no_grad():
        x[0] = -float("inf")
        x[1, :50] = -float("inf")
        x[2] += 1e4
        x[3, 7] += 60.0  # a confident row: log_softmax at the label ~ -1e-26 keeps its digits
    fn, ref_fn = (lt.log_softmax, F.log_softmax) if log else (lt.softmax, F.softmax)
    monkeypatch.setattr(k, "get_num_threads", lambda: 2)
    with torch.no_grad():  # a parallel region through the general route: the threading layer is chosen
        k.softmax_forward(x.detach().numpy()[:, :].copy())
    if k._serial_only or k._layer_needs_guard():
        pytest.skip("numba's threading layer is not thread-safe here (workqueue)")
    calls = []
    real = k._apply_threads
    monkeypatch.setattr(k, "_apply_threads", lambda size=None: calls.append(size) or real(size))
    y = fn(x, 1)
    assert _sm_fast(y) and calls == [N * C]
    ref = ref_fn(x.detach().double(), 1)
    ok = slice(1, None)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y[ok].double(), ref[ok], **tol)
    assert torch.all(y[0] == (-float("inf") if log else 0.0))
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (gx,) = torch.autograd.grad(y[ok], x, dy[ok].to(dtype))
    assert calls == [N * C, N * C]  # backward ran in parallel too
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(ref_fn(xr, 1)[ok], xr, dy[ok])
    # float32 log_softmax backward, dy - exp(y) sum(dy), cancels at sum(dy) ~ sqrt(C): absolute
    gtol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else tol
    torch.testing.assert_close(gx[ok].double(), gr[ok], **gtol)
    monkeypatch.setattr(k, "get_num_threads", lambda: 1)
    calls.clear()
    y1 = fn(x, 1)
    assert _sm_fast(y1) and calls == []
    torch.testing.assert_close(y1[ok], y[ok], rtol=0, atol=0)
