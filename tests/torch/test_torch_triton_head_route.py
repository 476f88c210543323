"""The CUDA route of logitkit.torch.linear_head (its Triton kernels) run in Triton's CPU interpreter.

On a GPU, CUDA tensors reach ``kernels/triton/linear_head.py`` and ``linear_ce.py`` from inside the
``logitkit::linear_head_forward/_backward`` operators (``logitkit.torch.head._triton_head``); here
that selector is pointed at the kernels for CPU tensors, which the interpreter accepts, so the
routing, the loss's decomposition over the head kernel's cotangents, the ignored rows, the deferred
label check and the fallback to the chunk driver are checked without a GPU, against float64 torch
on the materialized logits.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

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
from logitkit import _validate  # noqa: E402
from logitkit.torch import head  # noqa: E402

from _torch_ref import ref_cross_entropy, transform64  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

KERNELS = ("linear_head_forward", "linear_head_backward", "linear_ce_forward", "linear_ce_backward")


@pytest.fixture
def route(monkeypatch):
    """Calls of the Triton kernels (names, in order); ``route.off = True`` sends calls to the driver."""
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) on a machine without CUDA")
    from logitkit.kernels.triton import _labels
    from logitkit.kernels.triton import linear_head as LH

    # 16-wide tiles and 32-class backward chunks: several tiles, vocabulary slices and chunks
    monkeypatch.setenv("LOGITKIT_LCE_TILES", "16,16,16,16")
    monkeypatch.setenv("LOGITKIT_LCE_CHUNK", "32")
    state = SimpleNamespace(calls=[], selected=[], off=False)

    def recorded(name):
        fn = getattr(LH, name)

        def call(*args, **kw):
            state.calls.append(name)
            return fn(*args, **kw)

        return call

    proxy = SimpleNamespace(**{n: recorded(n) for n in KERNELS})

    def select(h2, W, spec, kind, temp):  # the real support rule, minus "is this a CUDA tensor"
        ok = not state.off and head._triton_supported(h2, W, spec, kind, temp)
        state.selected.append(ok)
        return proxy if ok else None

    monkeypatch.setattr(head, "_triton_head", select)
    for st in _labels._STATES.values():
        _labels._clear(st)
    yield state
    for st in _labels._STATES.values():
        _labels._clear(st)


def _problem(N=11, H=16, V=40, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = -100
    y[7] = -100
    return h, W, b, y


def _leaves(h, W, b, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (h, W, b)]


def _grads(obj, ts):
    return torch.autograd.grad(obj, [t for t in ts if t is not None])


def _ref(h, W, b, y, *, outputs, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
         softcap=None, temperature=1.0, reduction="mean"):
    """float64 outputs (differentiable in the returned leaves) on the materialized logits."""
    h64, W64, b64 = _leaves(h, W, b, torch.float64)
    x = h64 @ W64.T + (b64 if b64 is not None else 0.0)
    T = temperature[:, None].double() if isinstance(temperature, torch.Tensor) else temperature
    z = transform64(x, softcap, T)
    keep = y != ignore_index
    ls = torch.log_softmax(z, -1)
    out = {}
    if "loss" in outputs:
        out["loss"] = ref_cross_entropy(x, y, weight=None if weight is None else weight.double(),
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                        temperature=T)
    if "logprobs" in outputs:
        out["logprobs"] = torch.where(keep, ls.gather(1, torch.where(keep, y, 0)[:, None])[:, 0], 0.0)
    if "entropy" in outputs:
        out["entropy"] = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
    if "lse" in outputs:
        out["lse"] = torch.where(keep, torch.logsumexp(z, -1), 0.0)
    return out, (h64, W64, b64)


def _objective(out, cot):
    """``loss + Σ cot_k · output_k`` (per-token cotangents, as an RL objective gives them)."""
    obj = 0.0
    for k, v in out.items():
        if v is None:
            continue
        obj = obj + (v.sum() if k == "loss" and v.ndim == 0 else (cot[k].to(v.dtype) * v).sum())
    return obj


def _cotangents(N, seed=9):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(N, generator=g, dtype=torch.float64) for k in ("loss", "logprobs", "entropy", "lse")}


TOL = dict(rtol=2e-5, atol=2e-6)
GTOL = dict(rtol=1e-4, atol=2e-5)


def _check(h, W, b, y, outputs, **kw):
    """Run lt.linear_head (grads on h, W, b), compare with float64; returns (outputs, grads)."""
    hh, WW, bb = _leaves(h, W, b)
    res = lt.linear_head(hh, WW, y, linear_bias=bb, outputs=outputs, **kw)
    got = {k: getattr(res, k) for k in outputs}
    want, leaves = _ref(h, W, b, y, outputs=outputs, **kw)
    cot = _cotangents(h.shape[0])
    for k in outputs:
        assert got[k].dtype == h.dtype
        torch.testing.assert_close(got[k].double(), want[k], **TOL)
    gg = _grads(_objective(got, cot), (hh, WW, bb))
    gw = _grads(_objective(want, cot), leaves)
    for a, w in zip(gg, gw):
        torch.testing.assert_close(a.double(), w, **GTOL)
    return got, gg


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_loss_alone_runs_the_loss_kernels(route, z_loss):
    """outputs=("loss",) reaches the head only with per-token temperatures (lt.linear_head sends
    the rest to linear_cross_entropy): drive head_values directly, as that path would."""
    h, W, b, y = _problem()
    w = torch.rand(W.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    kw = dict(weight=w, label_smoothing=0.1, softcap=4.0, temperature=0.8)
    spec = head._spec("loss", -100, 0.1, 4.0, 0.8, True, "none", "kl", 0.5, 1.0, z_loss > 0)
    hh, WW, bb = _leaves(h, W, b)
    vals = head.head_values(hh, WW, bb, y, None, w, None, spec, None)
    assert set(vals) == ({"ce", "lse"} if z_loss else {"ce"})
    want, leaves = _ref(h, W, b, y, outputs=("loss", "lse"), reduction="none", **kw)
    torch.testing.assert_close(vals["ce"].double(), want["loss"], **TOL)
    cot = _cotangents(h.shape[0])["loss"]
    obj = (cot * vals["ce"]).sum() + (z_loss * (vals["lse"] ** 2).sum() if z_loss else 0.0)
    wobj = (cot * want["loss"]).sum() + z_loss * (want["lse"] ** 2).sum()
    for a, ww in zip(_grads(obj, (hh, WW, bb)), _grads(wobj, leaves)):
        torch.testing.assert_close(a.double(), ww, **GTOL)
    # the loss alone: the loss kernels; with z-loss the head kernel's backward (g_lse arrives too)
    back = "linear_head_backward" if z_loss else "linear_ce_backward"
    assert route.calls == ["linear_ce_forward", back]


def test_logprobs_and_entropy_grpo_style(route):
    h, W, b, y = _problem(seed=1)
    y[y == -100] = -1  # a custom ignore_index
    y[4] = -1
    got, _ = _check(h, W, b, y, ("logprobs", "entropy"), temperature=0.7, ignore_index=-1)
    assert route.calls == ["linear_head_forward", "linear_head_backward"]
    assert got["logprobs"][4] == 0 and got["entropy"][4] == 0
    # GRPO: -(A · exp(lp - lp_old)) + 0.01 · entropy; gradients through lp and entropy only
    hh, WW, bb = _leaves(h, W, b)
    res = lt.linear_head(hh, WW, y, linear_bias=bb, outputs=("logprobs", "entropy"), temperature=0.7,
                         ignore_index=-1)
    adv = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(4))
    ratio = torch.exp(res.logprobs - res.logprobs.detach())
    gh = torch.autograd.grad((-(adv * ratio) - 0.01 * res.entropy).sum(), hh)[0]
    want, (h64, _, _) = _ref(h, W, b, y, outputs=("logprobs", "entropy"), temperature=0.7, ignore_index=-1)
    wr = torch.exp(want["logprobs"] - want["logprobs"].detach())
    gw = torch.autograd.grad((-(adv.double() * wr) - 0.01 * want["entropy"]).sum(), h64)[0]
    torch.testing.assert_close(gh.double(), gw, **GTOL)
    assert (gh[2] == 0).all() and (gh[4] == 0).all()


@pytest.mark.parametrize("smooth", [False, True], ids=["weights", "weights-smoothing"])
def test_loss_logprobs_entropy_lse_softcap_temperature(route, smooth):
    h, W, b, y = _problem(seed=2)
    w = torch.rand(W.shape[0], generator=torch.Generator().manual_seed(5)) + 0.5
    kw = dict(weight=w, z_loss=1e-2, softcap=5.0, temperature=0.8, label_smoothing=0.1 if smooth else 0.0)
    outputs = ("loss", "logprobs", "entropy", "lse")
    got, grads = _check(h, W, b, y, outputs, **kw)
    # unsmoothed: one forward launch (the loss is -w_y logprobs); smoothed: the loss kernel too
    fwd = ["linear_ce_forward", "linear_head_forward"] if smooth else ["linear_head_forward"]
    assert route.calls == fwd + ["linear_head_backward"]
    for k in ("logprobs", "entropy", "lse"):
        assert got[k][2] == 0 and got[k][7] == 0  # ignored rows
    assert (grads[0][2] == 0).all() and (grads[0][7] == 0).all()
    # the same values, dtypes and gradients as the chunk driver
    route.off = True
    drv, dgrads = _check(h, W, b, y, outputs, **kw)
    assert route.calls == fwd + ["linear_head_backward"]  # nothing more ran on Triton
    for k in outputs:
        assert drv[k].dtype == got[k].dtype
        torch.testing.assert_close(got[k], drv[k], rtol=1e-5, atol=1e-6)
    for a, d in zip(grads, dgrads):
        assert a.dtype == d.dtype
        torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-5)


def test_sum_reduction_lse_alone_and_no_labels(route):
    h, W, b, y = _problem(seed=6, bias=False)
    _check(h, W, b, y, ("loss", "lse"), reduction="sum", softcap=3.0)
    assert route.calls == ["linear_ce_forward", "linear_head_backward"]
    route.calls.clear()
    hh, WW, _ = _leaves(h, W, None)
    res = lt.linear_head(hh, WW, None, outputs=("entropy", "lse"), temperature=1.3)
    x = h.double() @ W.double().T / 1.3
    ls = torch.log_softmax(x, -1)
    torch.testing.assert_close(res.lse.double(), torch.logsumexp(x, -1), **TOL)
    torch.testing.assert_close(res.entropy.double(), -(ls.exp() * ls).sum(-1), **TOL)
    (res.entropy.sum() + res.lse.sum()).backward()
    assert route.calls == ["linear_head_forward", "linear_head_backward"]


def test_bad_label_raises_through_the_deferred_check(route, monkeypatch):
    # CUDA labels are not read on the host: skip the host-side check as it is skipped there
    monkeypatch.setattr(_validate, "check_label_range", lambda *a, **k: None)
    h, W, b, y = _problem(seed=7)
    y[5] = W.shape[0] + 3
    res = lt.linear_head(h, W, y, linear_bias=b, outputs=("logprobs", "entropy"))
    assert res.logprobs[5].isnan() and res.logprobs[0].isfinite() and res.entropy.isfinite().all()
    assert route.calls == ["linear_head_forward"]
    with pytest.raises(ValueError, match=r"1 row\(s\) hold a class index outside \[0, 40\)"):
        lt.linear_head(h, W, torch.zeros_like(y), linear_bias=b, outputs=("logprobs", "entropy"))
    # raised before launching anything; the flag is clear afterwards
    assert route.calls == ["linear_head_forward"]
    lt.linear_head(h, W, torch.zeros_like(y), linear_bias=b, outputs=("logprobs", "entropy"))


def test_unsupported_combinations_fall_back_to_the_driver(route):
    h, W, b, y = _problem(seed=8, N=8)
    g = torch.Generator().manual_seed(11)
    temps = torch.rand(h.shape[0], generator=g) + 0.5
    # per-token temperature (the loss alone reaches the head this way), and with other outputs
    _check(h, W, b, y, ("loss",), temperature=temps)
    _check(h, W, b, y, ("logprobs", "entropy"), temperature=temps)
    # a teacher, and argmax
    tlog = torch.randn(h.shape[0], W.shape[0], generator=g)
    out = lt.linear_head(h, W, y, linear_bias=b, outputs=("logprobs", "kl"), teacher_logits=tlog)
    z = h.double() @ W.double().T + b.double()
    keep = y != -100
    kl = (F.softmax(tlog.double(), -1) * (F.log_softmax(tlog.double(), -1) - F.log_softmax(z, -1))).sum(-1)
    torch.testing.assert_close(out.kl.double(), torch.where(keep, kl, 0.0), **TOL)
    am = lt.linear_head(h, W, y, linear_bias=b, outputs=("logprobs", "argmax")).argmax
    assert torch.equal(am[keep], z.argmax(-1)[keep])
    assert route.calls == [] and route.selected and not any(route.selected)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_head_runs_triton(monkeypatch, dtype):
    """On a GPU: the real selector picks the kernels, and the outputs match float64."""
    picked = []
    real = head._triton_head

    def select(*args):
        picked.append(real(*args) is not None)
        return real(*args)

    monkeypatch.setattr(head, "_triton_head", select)
    g = torch.Generator().manual_seed(12)
    N, H, V = 96, 64, 3000
    h = torch.randn(N, H, generator=g).to("cuda", dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) / H**0.5).to("cuda", dtype).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g).cuda()
    y[::9] = -100
    kw = dict(z_loss=1e-3, softcap=20.0, temperature=0.9)
    outputs = ("loss", "logprobs", "entropy", "lse")
    res = lt.linear_head(h, W, y, outputs=outputs, **kw)
    want, leaves = _ref(h, W, None, y, outputs=outputs, **kw)
    tol = dict(rtol=2e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for k in outputs:
        torch.testing.assert_close(getattr(res, k).double(), want[k], **tol)
    cot = {k: v.cuda() for k, v in _cotangents(N).items()}
    gh = torch.autograd.grad(_objective({k: getattr(res, k) for k in outputs}, cot), (h, W))
    gw = _grads(_objective(want, cot), leaves)
    for a, w in zip(gh, gw):
        torch.testing.assert_close(a.double(), w, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    assert picked and all(picked)
