"""The ``torch.ops.logitkit`` operators as registered by :mod:`logitkit.torch._library`: schema and
fake implementations (``torch.library.opcheck``), values against float64 torch, the small-row
compiled entries behind ``ce_forward`` / ``ce_backward``, and the refusal of a call that would
leave a gradient out."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import logitkit.torch  # noqa: E402,F401  (registers torch.ops.logitkit.*)
from logitkit.torch import _library  # noqa: E402

OPS = torch.ops.logitkit


def _rows(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def _ref64(x, y, ignore_index=-100):
    """Per-row cross-entropy, lse and the softmax - one-hot gradient in float64, ignored rows 0. The
    loss is ``log1p(Σ_{j≠max} exp(x_j - max)) + (max - x_y)``: exact in float64 for confident rows
    too, where ``lse - x_y`` would cancel."""
    x64 = x.double()
    mx = x64.max(-1, keepdim=True).values
    e = torch.exp(x64 - mx)
    first = torch.nn.functional.one_hot(x64.argmax(-1), x.shape[1]).bool()
    rest = torch.where(first, 0.0, e).sum(-1)
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    ce = torch.where(valid, torch.log1p(rest) + (mx[:, 0] - x64.gather(1, ys[:, None])[:, 0]), 0.0)
    lse = mx[:, 0] + torch.log1p(rest)
    p = e / (1.0 + rest)[:, None]
    onehot = torch.nn.functional.one_hot(ys, x.shape[1]).bool()
    # the label's p - 1 as -(the other classes' mass): no cancellation for confident rows
    # the other classes' mass: ``rest`` itself when the label is the first maximum (1 + rest - 1 would
    # cancel for a confident row)
    others = torch.where(ys == x64.argmax(-1), rest, 1.0 + rest - e.gather(1, ys[:, None])[:, 0])
    label = -others / (1.0 + rest)
    grad = torch.where(onehot, label[:, None], p)
    return ce, lse, torch.where(valid[:, None], grad, 0.0)


def _hard_rows(x, y):
    """Row 1 confident (loss ~1e-12), row 2 with a large shared offset, row 3 a tie for the maximum."""
    x[1] = 0.0
    x[1, 0] = 30.0
    y[1] = 0
    x[2] += 1e4
    x[3, :2] = x[3].max() + 1.0
    return x, y


def _tol(dtype):
    return 2.0 ** -21 if dtype == torch.float32 else 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(100, 10), (7, 33), (64, 1000)])
def test_ce_forward_and_backward_operators_against_float64(dtype, shape):
    n, c = shape
    x, y = _hard_rows(*_rows(n, c, dtype))
    y[::5] = -100
    with torch.no_grad():
        ce, m, r = OPS.ce_forward(x, y, None, -100, 0.0, None, 1.0)
        ref_ce, ref_lse, ref_grad = _ref64(x, y)
        rtol = _tol(dtype)
        torch.testing.assert_close(ce.double(), ref_ce, rtol=rtol, atol=0.0)  # the per-row contract
        valid = y != -100
        torch.testing.assert_close((m.double() + r.double())[valid], ref_lse[valid], rtol=rtol, atol=0.0)
        g_ce = torch.linspace(-1.0, 2.0, n, dtype=dtype)
        grad = OPS.ce_backward(x, y, m, r, g_ce, torch.zeros(n, dtype=dtype), None, -100, 0.0, 0.0, None, 1.0)
        assert grad.dtype == dtype and grad.shape == x.shape
        # every gradient entry to a few ulp (the confident row's ~1e-12 label entry included): float32
        # p = exp(z - m - r) carries the argument's rounding, |z - m - r| ulp, up to ~2^-18 for p ~ 1e-9
        want = ref_grad * g_ce.double()[:, None]
        gtol = 2.0 ** -18 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(grad.double(), want, rtol=gtol, atol=torch.finfo(dtype).tiny)
        torch.testing.assert_close(grad[1, 0].double(), want[1, 0], rtol=rtol, atol=0.0)  # the expm1 label term


def test_ce_backward_operator_takes_non_contiguous_and_other_dtype_multipliers():
    x, y = _rows(50, 12, torch.float32, seed=3)
    with torch.no_grad():
        ce, m, r = OPS.ce_forward(x, y, None, -100, 0.0, None, 1.0)
        g64 = torch.linspace(0.5, 1.5, 100, dtype=torch.float64)[::2]  # strided, float64
        grad = OPS.ce_backward(x, y, m, r, g64, torch.zeros(50), None, -100, 0.0, 0.0, None, 1.0)
    _, _, ref_grad = _ref64(x, y)
    torch.testing.assert_close(grad.double(), ref_grad * g64.float().double()[:, None], rtol=2.0 ** -19,
                               atol=torch.finfo(torch.float32).tiny)


def test_ce_forward_operator_names_a_bad_label():
    x, y = _rows(20, 10, torch.float32)
    y[7] = 10
    with torch.no_grad(), pytest.raises(ValueError, match="10"):
        OPS.ce_forward(x, y, None, -100, 0.0, None, 1.0)


def test_a_call_with_gradients_on_is_refused_not_silently_cut():
    x, y = _rows(4, 5, torch.float32)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        OPS.ce_forward(x, y, None, -100, 0.0, None, 1.0)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        OPS.softmax_forward(torch.nn.Parameter(x.detach().clone()), 1.0)
    with torch.no_grad():  # the same call with gradients off runs
        assert OPS.ce_forward(x, y, None, -100, 0.0, None, 1.0)[0].shape == (4,)
    # and the public functions built on the operators still differentiate
    loss = logitkit.torch.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _opcheck_cases():
    x, y = _rows(6, 9, torch.float32, seed=5)
    m = torch.zeros(6)
    r = torch.ones(6)
    g = torch.ones(6)
    z = torch.zeros(6)
    p = torch.softmax(x, -1)
    return [
        ("ce_forward", (x, y, None, -100, 0.0, None, 1.0)),
        ("ce_forward", (x, y, torch.rand(9), -100, 0.1, 30.0, 2.0)),
        ("ce_backward", (x, y, m, r, g, z, None, -100, 0.0, 0.0, None, 1.0)),
        ("softmax_forward", (x, 1.0)),
        ("log_softmax_forward", (x, 0.5)),
        ("softmax_backward", (p, torch.randn(6, 9))),
        ("log_softmax_backward", (p.log(), torch.randn(6, 9))),
        ("prob_forward", (x, p, None, 0.0, None, 1.0)),
        ("prob_backward", (x, p, m, r, g, z, None, 0.0, 0.0, None, 1.0)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_operators_pass_opcheck(name, args):
    op = getattr(OPS, name).default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_define_refuses_another_namespace():
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    with pytest.raises(ValueError, match="namespace"):
        _library.define("other::f")(f)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(100, 10), (300, 1000)])
def test_softmax_operators_against_float64(shape, dtype, threads):
    from logitkit.kernels import cpu

    x, _ = _rows(*shape, dtype, seed=11, scale=8.0)
    x[3, :5] = -torch.inf  # masked classes
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    cpu.set_num_threads(threads)
    try:
        with torch.no_grad():
            for log in (False, True):
                fwd = OPS.log_softmax_forward if log else OPS.softmax_forward
                bwd = OPS.log_softmax_backward if log else OPS.softmax_backward
                y = fwd(x, 1.0)
                x64 = x.double()
                ref = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
                tol = 2.0 ** -21 if dtype == torch.float32 else 1e-14
                fin = torch.isfinite(ref)
                assert torch.equal(torch.isfinite(y), fin)
                # float32 to the contract's relative 2^-21; float64 against torch's own float64 log_softmax,
                # whose values near 0 carry ~1e-16 of cancellation: absolute there
                torch.testing.assert_close(y.double()[fin], ref[fin], rtol=tol,
                                           atol=0.0 if dtype == torch.float32 else 1e-14)
                dx = bwd(y, dy)
                p = ref.exp() if log else ref
                d64 = dy.double()
                want = d64 - p * d64.sum(-1, keepdim=True) if log else p * (d64 - (p * d64).sum(-1, keepdim=True))
                torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-12)
    finally:
        cpu.set_num_threads(1)
