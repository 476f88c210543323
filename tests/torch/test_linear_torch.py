"""logitkit.torch.linear_cross_entropy against torch's unfused computation in float64.

Reference: ``F.cross_entropy(transform(F.linear(h, W, b)), ...) + z-loss`` in float64 with torch's
own autograd (independent of logitkit), and torch 2.13's ``F.linear_cross_entropy`` for parity.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import logitkit  # noqa: E402
import logitkit.torch.linear as L  # noqa: E402


def ref_loss(h, W, b, y, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
             z_loss=0.0, softcap=None, temperature=1.0):
    """Unfused float64 loss (differentiable in h, W, b); an empty mean is 0."""
    z = F.linear(h.double(), W.double(), None if b is None else b.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), weight=w, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction="none")
    valid = (y.reshape(-1) != ignore_index).double()
    lse = torch.logsumexp(z.reshape(-1, z.shape[-1]), -1)
    zt = z_loss * lse ** 2 * valid
    if reduction == "none":
        return (ce + zt).reshape(y.shape)
    if reduction == "sum":
        return ce.sum() + zt.sum()
    wy = valid if w is None else w[torch.where(y.reshape(-1) == ignore_index, 0, y.reshape(-1))] * valid
    den_ce, den_z = wy.sum(), valid.sum()
    out = torch.where(den_ce > 0, ce.sum() / torch.where(den_ce > 0, den_ce, 1.0), 0.0)
    return out + torch.where(den_z > 0, zt.sum() / torch.where(den_z > 0, den_z, 1.0), 0.0)


def _problem(N=37, H=11, V=53, dtype=torch.float64, bias=True, ignore=(3, 10, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = (0.7 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[i for i in ignore if i < N]] = -100
    return h, W, b, y


def _params(h, W, b):
    return [t for t in (h, W, b) if t is not None]


def _grads(loss, params, go=None):
    return torch.autograd.grad(loss, params, go)


OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.15),
    dict(z_loss=1e-2),
    dict(softcap=4.0, temperature=0.7),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, temperature=1.3),
]


def _resolve(o, V):
    o = dict(o)
    if o.get("weight") is True:
        o["weight"] = torch.rand(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.25
    return o


@pytest.mark.parametrize("chunk", [None, 5, (7, 10)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS)
def test_options_float64(opts, reduction, chunk):
    h, W, b, y = _problem()
    o = _resolve(opts, W.shape[0])
    ref = ref_loss(h, W, b, y, reduction=reduction, **o)
    got = L.linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction, chunk_size=chunk, **o)
    assert got.shape == ref.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for a, e in zip(_grads(got, _params(h, W, b), go), _grads(ref, _params(h, W, b), go)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_signature_is_torchs_plus_keyword_extras():
    ours = inspect.signature(L.linear_cross_entropy).parameters
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch without F.linear_cross_entropy")
    theirs = inspect.signature(F.linear_cross_entropy).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].kind == p.kind and ours[name].default == p.default, name
    for name in list(ours)[len(theirs):]:
        assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY
    assert {"z_loss", "softcap", "temperature", "chunk_size"} <= set(ours)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch without F.linear_cross_entropy")
@pytest.mark.parametrize("case", [
    dict(),
    dict(ignore_index=5, label_smoothing=0.2, reduction="sum"),
    dict(weight=True, reduction="none"),
    dict(unbatched=True),
    dict(unbatched=True, reduction="none"),
])
def test_parity_with_torch_linear_cross_entropy(case):
    case = dict(case)
    unbatched = case.pop("unbatched", False)
    h, W, b, y = _problem(N=13, V=20, ignore=(2,))
    y = torch.where(y == -100, 5, y)
    if case.pop("weight", False):
        case["weight"] = torch.rand(20, dtype=torch.float64) + 0.5
    if unbatched:
        h, y = h[4].detach().requires_grad_(), y[4]
    theirs = F.linear_cross_entropy(h, W, y, linear_bias=b, **case)
    ours = L.linear_cross_entropy(h, W, y, linear_bias=b, **case)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    go = torch.rand(theirs.shape, dtype=torch.float64)
    for a, e in zip(_grads(ours, _params(h, W, b), go), _grads(theirs, _params(h, W, b), go)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"), reason="torch < 2.13")
def test_options_object_sets_the_chunk():
    h, W, b, y = _problem(N=30)
    opt = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7)
    got = L.linear_cross_entropy(h, W, y, linear_bias=b, options=opt)
    torch.testing.assert_close(got, ref_loss(h, W, b, y), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="options"):
        L.linear_cross_entropy(h, W, y, options=object())


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch without F.linear_cross_entropy")
def test_probability_targets_and_k_dim_weights_fall_back_exactly():
    h, W, b, y = _problem(N=6, V=8, ignore=())
    p = torch.softmax(torch.randn(6, 8, dtype=torch.float64), -1)
    torch.testing.assert_close(L.linear_cross_entropy(h, W, p, linear_bias=b, label_smoothing=0.1),
                               F.linear_cross_entropy(h, W, p, linear_bias=b, label_smoothing=0.1))
    Wk = torch.randn(8, 3, 11, dtype=torch.float64)
    yk = torch.randint(0, 8, (6, 3))
    torch.testing.assert_close(L.linear_cross_entropy(h, Wk, yk), F.linear_cross_entropy(h, Wk, yk))
    with pytest.raises(ValueError, match="ignore_index"):
        L.linear_cross_entropy(h, W, p, ignore_index=1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk", [None, (3, 4)])
def test_gradcheck_float64(reduction, chunk):
    h, W, b, y = _problem(N=5, H=3, V=7, ignore=(2,))
    h, W, b = (t.detach().requires_grad_() for t in (h, W, b))

    def f(h, W, b):
        return L.linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction, chunk_size=chunk,
                                      z_loss=0.01, softcap=3.0, label_smoothing=0.2, temperature=0.9)

    assert torch.autograd.gradcheck(f, (h, W, b))


def test_gradcheck_entropy_and_logprobs():
    h, W, b, y = _problem(N=5, H=3, V=7, ignore=(1,))
    h, W, b = (t.detach().requires_grad_() for t in (h, W, b))
    assert torch.autograd.gradcheck(lambda h, W, b: L.linear_entropy(h, W, linear_bias=b, softcap=2.0,
                                                                     chunk_size=(2, 3)), (h, W, b))
    assert torch.autograd.gradcheck(lambda h, W, b: L.linear_token_logprobs(h, W, y, linear_bias=b,
                                                                            temperature=1.5), (h, W, b))


def test_entropy_and_logprobs_match_reference():
    h, W, b, y = _problem(N=9, V=12, ignore=(4,))
    z = F.linear(h, W, b)
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    lp = torch.where(y != -100, logp.gather(-1, torch.where(y < 0, 0, y)[:, None])[:, 0], 0.0)
    for chunk in (None, (4, 5)):
        got_e = L.linear_entropy(h, W, linear_bias=b, chunk_size=chunk)
        got_l = L.linear_token_logprobs(h, W, y, linear_bias=b, chunk_size=chunk)
        torch.testing.assert_close(got_e, ent, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_l, lp, rtol=1e-12, atol=1e-12)
        gw = torch.randn(9, dtype=torch.float64)
        want = torch.autograd.grad((ent * gw).sum() + (lp * gw).sum(), (h, W, b), retain_graph=True)
        for a, e in zip(_grads((got_e * gw).sum() + (got_l * gw).sum(), (h, W, b)), want):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 4, (4, 7)])
def test_none_with_per_token_grad_output_and_ignore_index(chunk):
    """The three Liger-Kernel bugs: zero gradients, wrong ones with ignore_index, a scalar loss."""
    h, W, b, y = _problem(N=19, ignore=(0, 5, 6, 18))
    loss = L.linear_cross_entropy(h, W, y, linear_bias=b, reduction="none", chunk_size=chunk, z_loss=1e-3)
    assert loss.shape == (19,)
    assert torch.all(loss[[0, 5, 6, 18]] == 0)
    go = torch.randn(19, dtype=torch.float64)
    got = _grads(loss, (h, W, b), go)
    want = _grads(ref_loss(h, W, b, y, reduction="none", z_loss=1e-3), (h, W, b), go)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert torch.all(got[0][[0, 5, 6, 18]] == 0) and got[1].abs().max() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    h, W, b, y = _problem(N=7)
    y[:] = -100
    loss = L.linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction, z_loss=0.1)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(W.grad == 0) and torch.all(b.grad == 0)


@pytest.mark.parametrize("chunk", [None, (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype, chunk):
    h, W, b, y = _problem(N=33, H=16, V=40, dtype=dtype)
    loss = L.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1, chunk_size=chunk)
    assert loss.dtype == dtype
    ref = ref_loss(h, W, b, y, label_smoothing=0.1)
    got = _grads(loss, (h, W, b))
    want = _grads(ref, (h, W, b))
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
    assert abs(float(loss.detach()) - float(ref.detach())) <= tol * abs(float(ref.detach()))
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert float((a.double() - e).abs().max()) <= tol * float(e.abs().max()) * 2


def test_grad_output_scale_and_partial_requires_grad():
    h, W, b, y = _problem()
    W.requires_grad_(False)
    loss = L.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1)
    (3.5 * loss).backward()
    hh, bb = h.detach().requires_grad_(), b.detach().requires_grad_()
    rh, rb = _grads(3.5 * ref_loss(hh, W, bb, y, label_smoothing=0.1), (hh, bb))
    torch.testing.assert_close(h.grad, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, rb, rtol=1e-10, atol=1e-12)
    assert W.grad is None


def test_retain_graph_backward_twice():
    h, W, b, y = _problem()
    loss = L.linear_cross_entropy(h, W, y, linear_bias=b)
    g1 = torch.autograd.grad(loss, (h, W, b), retain_graph=True)
    g2 = torch.autograd.grad(2.0 * loss, (h, W, b))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(2.0 * a, c)


def test_no_grad_and_saved_nothing():
    h, W, b, y = _problem()
    with torch.no_grad():
        loss = L.linear_cross_entropy(h, W, y, linear_bias=b)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref_loss(h, W, b, y).detach(), rtol=1e-12, atol=1e-12)


class _SavedBytes:
    """Every tensor autograd saves for backward, by size (through saved_tensors_hooks)."""

    def __init__(self):
        self.numels = []

    def __enter__(self):
        def pack(t):
            self.numels.append((t.numel(), t.numel() * t.element_size()))
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *a):
        self._ctx.__exit__(*a)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saves_no_logits_sized_tensor(reduction):
    N, H, V = 256, 16, 2000
    h, W, b, y = _problem(N=N, H=H, V=V, dtype=torch.float32)
    with _SavedBytes() as eager:
        F.cross_entropy(F.linear(h, W, b), y, reduction=reduction)
    assert max(n for n, _ in eager.numels) >= N * V  # the counter sees what eager saves
    with _SavedBytes() as ours:
        loss = L.linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction)
    assert ours.numels, "nothing saved: the hook did not see the saved tensors"
    assert max(n for n, _ in ours.numels) < N * V
    inputs_and_grads = 2 * 4 * (N * H + V * H + V) + 8 * 4 * N
    assert sum(nb for _, nb in ours.numels) <= inputs_and_grads
    loss.sum().backward()


def test_module_matches_torch_module_and_state_dict():
    mod = L.LinearCrossEntropyLoss(11, 20, bias=True, dtype=torch.float64, label_smoothing=0.1)
    h, _, _, y = _problem(N=8, V=20, ignore=(1,))
    out = mod(h, y)
    ref = ref_loss(h, mod.linear.weight, mod.linear.bias, y, label_smoothing=0.1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    assert mod.linear.weight.grad is not None and mod.linear.bias.grad is not None
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        theirs = torch.nn.LinearCrossEntropyLoss(11, 20, bias=True, dtype=torch.float64, label_smoothing=0.1)
        theirs.load_state_dict(mod.state_dict())
        torch.testing.assert_close(theirs(h, y), out)
    extra = L.LinearCrossEntropyLoss(11, 20, z_loss=1e-3, softcap=5.0, chunk_size=(3, 7), dtype=torch.float64)
    torch.testing.assert_close(extra(h, y), ref_loss(h, extra.linear.weight, None, y, z_loss=1e-3, softcap=5.0))


def test_top_level_dispatch_and_batch_dims():
    h, W, b, y = _problem(N=24)
    h3, y3 = h.detach().reshape(2, 3, 4, 11).requires_grad_(), y.reshape(2, 3, 4)
    loss = logitkit.linear.linear_cross_entropy(h3, W, y3, linear_bias=b, reduction="none")
    assert isinstance(loss, torch.Tensor) and loss.shape == (2, 3, 4)
    torch.testing.assert_close(loss.reshape(-1), ref_loss(h, W, b, y, reduction="none"), rtol=1e-12, atol=1e-12)
    loss.sum().backward()
    assert h3.grad.shape == h3.shape


@pytest.mark.parametrize("kw, exc, match", [
    (dict(target=torch.tensor([0, 60, 1])), ValueError, "target: class index 60"),
    (dict(linear_weight=torch.zeros(53, 11, dtype=torch.float32)), TypeError, "linear_weight: expected input's dtype"),
    (dict(linear_weight=torch.zeros(53, 10, dtype=torch.float64)), ValueError, "linear_weight: expected shape"),
    (dict(linear_bias=torch.zeros(52, dtype=torch.float64)), ValueError, "linear_bias"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
])
def test_errors(kw, exc, match):
    args = dict(input=torch.zeros(3, 11, dtype=torch.float64), linear_weight=torch.zeros(53, 11, dtype=torch.float64),
                target=torch.tensor([0, 1, 2]))
    extra = {k: v for k, v in kw.items() if k not in args}
    args.update({k: v for k, v in kw.items() if k in args})
    with pytest.raises(exc, match=match):
        L.linear_cross_entropy(args["input"], args["linear_weight"], args["target"], **extra)
