"""Autograd behaviour of logitkit.torch: gradcheck, in-place backward and its refusals, saved-tensor
memory, grad_output, validation before any write, autocast, no_grad / inference mode, gradient
accumulation, non-contiguous input, modules and the top-level bridge."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import logitkit  # noqa: E402
import logitkit.torch as lt  # noqa: E402

from _torch_ref import ref_cross_entropy, transform64  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model_logits(N=6, C=7, H=4, dtype=torch.float32, seed=0):
    """Logits produced by a matmul (a non-leaf, as from a model's head) and its leaves."""
    g = _gen(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(C, H, generator=g, dtype=dtype, requires_grad=True)
    return h, W


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)

GRADCHECK_OPTS = [
    {},
    {"reduction": "sum", "label_smoothing": 0.2},
    {"reduction": "none", "z_loss": 0.05, "softcap": 2.0, "temperature": 0.7},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 3.0, "temperature": 1.3},
]


@pytest.mark.parametrize("opts", GRADCHECK_OPTS, ids=lambda o: ",".join(o) or "plain")
def test_gradcheck_class_indices(opts):
    g = _gen(1)
    x = torch.randn(4, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4], [1, -100], [3, 2], [4, 4]])
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(5, generator=g, dtype=torch.float64) + 0.3
    fn = lambda t: lt.cross_entropy(t, y, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_gradcheck_return_lse_both_outputs():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, -100, 2, 1])
    fn = lambda t: lt.cross_entropy(t, y, reduction="none", z_loss=0.1, softcap=2.0, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_probability_targets():
    g = _gen(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    fn = lambda a, b, c: lt.cross_entropy(a, b, weight=c, label_smoothing=0.1, z_loss=0.02, temperature=0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, t, w))
    assert torch.autograd.gradgradcheck(fn, (x, t, w))


@pytest.mark.parametrize("log", [False, True])
def test_gradcheck_softmax(log):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    fn = (lambda t: lt.log_softmax(t, 1, temperature=0.6)) if log else (lambda t: lt.softmax(t, 2, temperature=1.5))
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_lse_output_values():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3))
    loss, lse = lt.cross_entropy(x, y, softcap=4.0, temperature=2.0, return_lse=True)
    assert lse.shape == y.shape and lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(transform64(x, 4.0, 2.0), dim=1))
    lse32 = lt.cross_entropy(x.to(torch.bfloat16), y, return_lse=True)[1]
    assert lse32.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# grad_output


def test_grad_output_scalar_and_per_token():
    h, W = _model_logits()
    y = torch.tensor([0, 1, 2, -100, 4, 5])
    x = h @ W.T
    (g1,) = torch.autograd.grad(lt.cross_entropy(x, y), x, torch.tensor(3.7))
    (g2,) = torch.autograd.grad(F.cross_entropy(x, y), x, torch.tensor(3.7))
    torch.testing.assert_close(g1, g2)
    v = torch.linspace(-1.0, 2.0, 6)
    (g1,) = torch.autograd.grad(lt.cross_entropy(x, y, reduction="none"), x, v)
    (g2,) = torch.autograd.grad(F.cross_entropy(x, y, reduction="none"), x, v)
    torch.testing.assert_close(g1, g2)
    assert torch.equal(g1[3], torch.zeros(7))


# ----------------------------------------------------------------------------------------------
# in-place backward


def _inplace_vs_reference(make_logits, y, **kw):
    h, W = _model_logits()
    ref = torch.autograd.grad(F.cross_entropy(make_logits(h, W), y, **kw), (h, W))
    x = make_logits(h, W)
    seen = {}
    x.register_hook(lambda g: seen.__setitem__("ptr", g.data_ptr()))
    loss = lt.cross_entropy(x, y, inplace_backward=True, **kw)
    before = x.detach().clone()
    ours = torch.autograd.grad(loss, (h, W))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    return x, before, seen


def test_inplace_writes_the_gradient_over_the_logits():
    y = torch.tensor([0, 1, 2, -100, 4, 5])
    x, before, seen = _inplace_vs_reference(lambda h, W: h @ W.T, y, label_smoothing=0.1)
    assert seen["ptr"] == x.data_ptr()  # the gradient handed to the matmul is the logits' memory
    expected = torch.autograd.grad(F.cross_entropy(before.requires_grad_(), y, label_smoothing=0.1), before)[0]
    torch.testing.assert_close(x.detach(), expected)


def test_inplace_forward_leaves_logits_untouched():
    h, W = _model_logits()
    x = h @ W.T
    before = x.detach().clone()
    lt.cross_entropy(x, torch.tensor([0, 1, 2, 3, 4, 5]), inplace_backward=True)
    assert torch.equal(x.detach(), before)


def test_inplace_non_contiguous_and_kdim_and_bf16():
    y = torch.tensor([0, 1, 2, -100, 4, 5])
    # transposed (non-contiguous) logits: the gradient is copied into their memory
    x, _, seen = _inplace_vs_reference(lambda h, W: (W @ h.T).t(), y, reduction="sum")
    assert not x.is_contiguous()
    # class dim 1 of a 3-D input: the kernel works on a row-major copy, still correct
    h, W = _model_logits(N=6, C=7)
    yk = torch.tensor([[0, 1, 2], [3, 4, -100]])
    mk = lambda h, W: (h @ W.T).reshape(2, 3, 7).permute(0, 2, 1)  # noqa: E731
    ref = torch.autograd.grad(F.cross_entropy(mk(h, W), yk), (h, W))
    ours = torch.autograd.grad(lt.cross_entropy(mk(h, W), yk, inplace_backward=True), (h, W))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    # bfloat16: in place equals out of place exactly
    hb, Wb = _model_logits(dtype=torch.bfloat16)
    g_in = torch.autograd.grad(lt.cross_entropy(hb @ Wb.T, y, inplace_backward=True), hb)[0]
    g_out = torch.autograd.grad(lt.cross_entropy(hb @ Wb.T, y), hb)[0]
    assert torch.equal(g_in, g_out)


def test_inplace_refuses_leaf_and_views_of_leaf():
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(lt.InplaceError, match="leaf"):
        lt.cross_entropy(x, y, inplace_backward=True)
    with pytest.raises(lt.InplaceError, match="leaf"):
        lt.cross_entropy(x[:, :], y, inplace_backward=True)
    with pytest.raises(lt.InplaceError, match="expanded"):
        lt.cross_entropy(torch.randn(1, 5, requires_grad=True).mul(2).expand(4, 5), y, inplace_backward=True)
    # without grad there is no backward, so nothing to refuse
    with torch.no_grad():
        lt.cross_entropy(x, y, inplace_backward=True)


@pytest.mark.parametrize("producer", ["sigmoid", "exp", "tanh-view"])
def test_inplace_refuses_logits_saved_by_their_producer(producer):
    h, W = _model_logits()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    z = h @ W.T
    x = {"sigmoid": lambda: torch.sigmoid(z), "exp": lambda: torch.exp(z),
         "tanh-view": lambda: torch.tanh(z.reshape(2, 21)).reshape(6, 7)}[producer]()
    before = x.detach().clone()
    with pytest.raises(lt.InplaceError, match="saved the logits"):
        lt.cross_entropy(x, y, inplace_backward=True)
    assert torch.equal(x.detach(), before)


def test_inplace_refuses_a_graph_that_reuses_the_logits():
    """Liger-Kernel's failure: another op saved the logits and reads them after the loss's
    backward. We never hand it the gradient: the version check stops it with an error."""
    h, W = _model_logits()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    x = h @ W.T
    other = (x * x).sum()                    # saved x before the loss was built
    loss = other + lt.cross_entropy(x, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # the same graph out of place gives torch's gradients
    x = h @ W.T
    ours = torch.autograd.grad((x * x).sum() + lt.cross_entropy(x, y), (h, W))
    x = h @ W.T
    ref = torch.autograd.grad((x * x).sum() + F.cross_entropy(x, y), (h, W))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_inplace_second_backward_and_second_loss_are_refused():
    h, W = _model_logits()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = lt.cross_entropy(h @ W.T, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(lt.InplaceError, match="already wrote the gradient"):
        loss.backward()
    x = h @ W.T
    both = lt.cross_entropy(x, y, inplace_backward=True) + lt.cross_entropy(x, y, inplace_backward=True)
    with pytest.raises(lt.InplaceError):
        both.backward()
    loss = lt.cross_entropy(h @ W.T, y, inplace_backward=True)
    with pytest.raises(lt.InplaceError, match="higher-order"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_inplace_uses_after_the_loss_are_correct():
    # Ops built after the loss run their backward first, so they read the logits intact.
    h, W = _model_logits()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    x = h @ W.T
    ours = torch.autograd.grad(lt.cross_entropy(x, y, inplace_backward=True) + (x * x).sum(), (h, W))
    x = h @ W.T
    ref = torch.autograd.grad(F.cross_entropy(x, y) + (x * x).sum(), (h, W))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# memory: what forward saves


def _saved_bytes(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0, "temperature": 0.9},
                                  {"weight": True}, {"inplace_backward": True}, {"reduction": "none"}])
def test_forward_saves_no_n_by_v_buffer(opts):
    N, C = 64, 1000
    h, W = _model_logits(N=N, C=C, H=3)
    x = (h @ W.T).detach().requires_grad_(True) if not opts.get("inplace_backward") else h @ W.T
    y = torch.randint(0, C, (N,), generator=_gen(3))
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C)
    if kw.get("inplace_backward"):
        # Saved-tensor hooks refuse in-place (test_issue13_item6_...): read the loss node's own
        # saved tensors instead (the matmul before it saved only h and W).
        loss = lt.cross_entropy(x, y, **kw)
        saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    else:
        loss, saved = _saved_bytes(lambda: lt.cross_entropy(x, y, **kw))
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    x_bytes = x.numel() * x.element_size()
    small = y.numel() * 8 + 2 * N * 4 + (C * 4 if "weight" in kw else 0)
    assert nbytes <= x_bytes + small, (nbytes, x_bytes, small)
    big = [t for t in saved if t.numel() >= N * C]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # the input itself, no copy
    # the counting sees torch's own N×V log-softmax, which we do not keep
    _, torch_saved = _saved_bytes(lambda: F.cross_entropy(x, y))
    assert sum(t.numel() * t.element_size() for t in torch_saved) >= x_bytes + x_bytes


def test_softmax_saves_only_its_output():
    x = torch.randn(32, 100, requires_grad=True)
    y, saved = _saved_bytes(lambda: lt.softmax(x, 1))
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


# ----------------------------------------------------------------------------------------------
# validation before any write


BAD_CALLS = [
    (dict(target=torch.tensor([0, 1, 9, 2])), ValueError, "target.*class index 9 at position 2"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0, 3.0])), ValueError, "target"),
    (dict(target=torch.tensor([True, False, True, True])), TypeError, "target"),
    (dict(weight=torch.ones(3)), ValueError, "weight"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_CALLS, ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_bad_arguments_raise_before_anything_is_written(bad, exc, match):
    h, W = _model_logits(N=4, C=5)
    x = h @ W.T
    kw = dict(target=torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    kw.update(bad)
    target = kw.pop("target")
    before_x, before_t = x.detach().clone(), target.clone()
    with pytest.raises(exc, match=match):
        lt.cross_entropy(x, target, **kw)
    assert torch.equal(x.detach(), before_x) and torch.equal(target, before_t)


def test_bad_input_types():
    with pytest.raises(TypeError, match="input"):
        lt.cross_entropy([[0.0, 1.0]], torch.tensor([0]))
    with pytest.raises(TypeError, match="input"):
        lt.cross_entropy(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="input"):
        lt.softmax(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="dim"):
        lt.softmax(torch.zeros(2, 3), 2)


# ----------------------------------------------------------------------------------------------
# dtypes and modes


def test_autocast_cpu_bfloat16_matches_torch():
    g = _gen(4)
    x = torch.randn(8, 11, generator=g).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, 11, (8,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lt.cross_entropy(x, y, label_smoothing=0.1)
        ref = F.cross_entropy(x, y, label_smoothing=0.1)
        assert lt.softmax(x, 1).dtype == F.softmax(x, 1).dtype
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref)
    (g1,) = torch.autograd.grad(ours, x)
    (g2,) = torch.autograd.grad(ref, x)
    assert g1.dtype == torch.bfloat16
    torch.testing.assert_close(g1, g2, rtol=1e-2, atol=1e-3)


def test_half_precision_label_term_in_float32():
    # A confident row: p_y = 1 - tiny. In float32, p_y - 1 is exact enough that the label's
    # gradient is -2e-6, not 0 as it would be after rounding p_y to bfloat16 first.
    x = torch.tensor([[8.0, -6.0, -6.0]], dtype=torch.bfloat16, requires_grad=True)
    (g,) = torch.autograd.grad(lt.cross_entropy(x, torch.tensor([0])), x)
    x64 = x.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, torch.tensor([0])), x64)
    assert g[0, 0].item() != 0.0
    torch.testing.assert_close(g.double(), g64, rtol=2.0 ** -8, atol=0)


def test_no_grad_and_inference_mode():
    x = torch.randn(5, 6, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        a = lt.cross_entropy(x, y, inplace_backward=True)
        s = lt.softmax(x, 1)
    assert not a.requires_grad and not s.requires_grad
    torch.testing.assert_close(a, F.cross_entropy(x.detach(), y))
    with torch.inference_mode():
        xi = torch.randn(5, 6)
        b = lt.cross_entropy(xi, y, reduction="none")
        li = lt.log_softmax(xi, -1)
    assert b.is_inference() and li.is_inference()
    torch.testing.assert_close(b, F.cross_entropy(xi, y, reduction="none"))
    torch.testing.assert_close(li, F.log_softmax(xi, -1))


def test_gradient_accumulation_over_micro_batches():
    g = _gen(5)
    W_ours = torch.randn(7, 4, generator=g, requires_grad=True)
    W_ref = W_ours.detach().clone().requires_grad_(True)
    for step in range(3):
        h = torch.randn(5, 4, generator=g)
        y = torch.randint(0, 7, (5,), generator=g)
        lt.cross_entropy(h @ W_ours.T, y, inplace_backward=step % 2 == 1).backward()
        F.cross_entropy(h @ W_ref.T, y).backward()
    torch.testing.assert_close(W_ours.grad, W_ref.grad)


def test_non_contiguous_and_channels_last_inputs():
    g = _gen(6)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64).t().requires_grad_(True)  # column-major
    assert not x.is_contiguous()
    y = torch.tensor([0, 6, 3, -100, 1])
    ours, ref = lt.cross_entropy(x, y, label_smoothing=0.2), F.cross_entropy(x, y, label_smoothing=0.2)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
    img = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    img.requires_grad_(True)
    yi = torch.randint(0, 5, (2, 3, 4), generator=g)
    ours, ref = lt.cross_entropy(img, yi), F.cross_entropy(img, yi)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, img)[0], torch.autograd.grad(ref, img)[0])
    torch.testing.assert_close(lt.log_softmax(img, 1), F.log_softmax(img, 1))


# ----------------------------------------------------------------------------------------------
# legacy arguments, modules, top level


@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True), (False, False),
                                                 (None, True)])
def test_legacy_size_average_reduce(size_average, reduce):
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 4])
    with pytest.warns(UserWarning, match="size_average and reduce"):
        ours = lt.cross_entropy(x, y, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.cross_entropy(x, y, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(ours, ref)


def test_modules_are_drop_ins():
    g = _gen(7)
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    ours = lt.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (4, 3), generator=g)
    a, b = ours(x, y), ref(x, y)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
    with pytest.warns(UserWarning):
        legacy = lt.CrossEntropyLoss(reduce=False)
    assert legacy.reduction == "none"
    z = lt.CrossEntropyLoss(z_loss=0.1, return_lse=True)
    loss, lse = z(x, y)
    assert lse.shape == y.shape and "z_loss=0.1" in repr(z)
    for mod, ref_mod in ((lt.Softmax(dim=1), torch.nn.Softmax(dim=1)), (lt.LogSoftmax(dim=2), torch.nn.LogSoftmax(dim=2))):
        assert isinstance(mod, type(ref_mod))
        torch.testing.assert_close(mod(x), ref_mod(x))
    torch.testing.assert_close(lt.Softmax(1, temperature=2.0)(x), F.softmax(x / 2.0, 1))


def test_top_level_functions_use_the_fused_path():
    g = _gen(8)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (3, 4), generator=g)
    loss = logitkit.cross_entropy(x, y, z_loss=0.01)
    assert type(loss.grad_fn).__name__.startswith("CrossEntropyIndex")
    ref = ref_cross_entropy(x.movedim(-1, 1), y, z_loss=0.01)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref, x)[0])
    assert logitkit.cross_entropy(x, y, reduction="none").shape == (3, 4)
    p = logitkit.softmax(x, axis=1, temperature=0.5)
    ref_p = F.softmax(x / 0.5, 1)
    torch.testing.assert_close(p, ref_p)
    go = torch.randn(p.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(p, x, go)[0], torch.autograd.grad(ref_p, x, go)[0])
    torch.testing.assert_close(logitkit.log_softmax(x, axis=0), F.log_softmax(x, 0))


@pytest.mark.parametrize("where", ["fresh", "in-place", "strided-out"])
def test_bridge_run_stage_forward_backward(where):
    from logitkit.reference import cross_entropy64, cross_entropy_grad64
    from logitkit.torch._bridge import run_stage

    g = _gen(9)
    x = torch.randn(6, 8, generator=g)
    y = torch.tensor([0, 7, -100, 3, 3, 1])
    kw = dict(weight=None, ignore_index=-100, label_smoothing=0.1, z_loss=0.0, softcap=None, temperature=1.0)
    scale = torch.full((6,), 1 / 5.0)
    scale[2] = 0.0
    out = {"fresh": None, "in-place": x.clone(), "strided-out": torch.empty(8, 6).t()}[where]
    src = x if where != "in-place" else out
    ce, m, r, grad = run_stage("ce_forward_backward", src, y, scale, scale, out=out, **kw)
    if out is not None:
        assert grad is out
    want = cross_entropy64(x.numpy(), y.numpy(), label_smoothing=0.1)
    assert abs(float(ce.double().sum()) / 5 - want) <= 1e-6 * abs(want)
    want_g = torch.from_numpy(cross_entropy_grad64(x.numpy(), y.numpy(), label_smoothing=0.1))
    torch.testing.assert_close(grad.double(), want_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 5.0, "reduction": "sum"}])
def test_float16_logits(opts):
    g = _gen(10)
    x = (torch.randn(6, 9, generator=g) * 3).half().requires_grad_(True)
    y = torch.tensor([0, 8, -100, 4, 4, 2])
    loss = lt.cross_entropy(x, y, **opts)
    assert loss.dtype == torch.float16
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_cross_entropy(x64, y, **opts)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=1e-4)
    (gx,) = torch.autograd.grad(loss, x)
    (gref,) = torch.autograd.grad(ref, x64)
    assert gx.dtype == torch.float16
    torch.testing.assert_close(gx.double(), gref, rtol=2e-3, atol=2e-3 * float(gref.abs().max()))


def test_inplace_probability_targets_and_lse_gradient():
    y = torch.tensor([0, 1, 2, -100, 4, 5])
    t = torch.softmax(torch.randn(6, 7, generator=_gen(11)), 1)
    for target, extra in ((t, {}), (y, {"return_lse": True})):
        grads = []
        for inplace in (False, True):
            h, W = _model_logits()
            out = lt.cross_entropy(h @ W.T, target, inplace_backward=inplace, label_smoothing=0.1, **extra)
            loss = out[0] + 0.3 * out[1].square().sum() if extra else out
            grads.append(torch.autograd.grad(loss, (h, W)))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
