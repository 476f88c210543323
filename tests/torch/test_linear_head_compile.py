"""logitkit.torch.linear_head under torch.compile(fullgraph=True) (issue 14 item 2, issue 15).

Every call below: no graph break (``torch._dynamo.explain``), compiled values and gradients equal
to eager ones, and in the compiled graphs the chunk driver is one opaque operator forward and one
backward, with no host read of a tensor (``aten._local_scalar_dense``, ``nonzero``) around them.
New batch sizes do not recompile, under ``dynamic=True`` and under automatic dynamic shapes; the
value checks that eager mode runs at the call site still raise when the compiled code runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import logitkit  # noqa: E402
import logitkit.torch as lt  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
V, H, HT, K = 13, 4, 3, 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _head(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.3).requires_grad_()
    tW = torch.randn(V, HT, generator=g, dtype=dtype)
    return W, b, tW


W32, B32, TW32 = _head()


def _data(N=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100
    if N > 6:
        y[6] = -100
    tl = torch.randn(N, V, generator=g, dtype=dtype) * 1.5
    idx = tl.argsort(-1, descending=True)[:, :K]
    lpk = F.log_softmax(tl, -1).gather(-1, idx)
    return dict(h=h, y=y, temp=torch.rand(N, generator=g, dtype=dtype) + 0.5, tl=tl,
                th=torch.randn(N, HT, generator=g, dtype=dtype), idx=idx, lpk=lpk,
                A=torch.randn(N, generator=g, dtype=dtype))


def _sum(out, fields):
    return sum(getattr(out, f).sum() for f in fields)


def _grpo(D):
    """-(A · exp(logprobs - old).clamp(0.8, 1.2)).mean() - 0.01 · entropy.mean() over valid tokens."""
    out = lt.linear_head(D["h"], W32, D["y"], linear_bias=B32, outputs=("logprobs", "entropy"),
                         temperature=D["temp"])
    valid = (D["y"] != -100).to(out.logprobs.dtype)
    old = out.logprobs.detach() - 0.05
    ratio = torch.exp(out.logprobs - old).clamp(0.8, 1.2)
    n = valid.sum().clamp_min(1.0)
    loss = -(D["A"] * ratio * valid).sum() / n - 0.01 * (out.entropy * valid).sum() / n
    return loss, out.logprobs, out.entropy


def _kw(D, **kw):
    return lt.linear_head(D["h"], W32, D["y"], linear_bias=B32, **kw)


# each call: D -> (scalar objective, *tensors to compare)
CALLS = {
    "loss": lambda D: (_kw(D).loss,),
    "loss-logprobs-entropy": lambda D: (
        lambda o: (o.loss + 0.5 * o.logprobs.sum() - 0.1 * o.entropy.sum(), o.logprobs, o.entropy))(
        _kw(D, outputs=("loss", "logprobs", "entropy"), label_smoothing=0.1)),
    "lse-argmax": lambda D: (
        lambda o: (o.lse.sum(), o.lse, o.argmax))(_kw(D, outputs=("lse", "argmax"), softcap=3.0)),
    "lse-argmax-no-labels": lambda D: (
        lambda o: ((o.lse * D["A"]).sum(), o.lse, o.argmax))(
        lt.linear_head(D["h"], W32, None, outputs=("lse", "argmax"))),
    "kl-teacher-logits": lambda D: (
        lambda o: (o.kl.sum(), o.kl))(_kw(D, outputs=("kl",), teacher_logits=D["tl"], teacher_temperature=1.3)),
    "kl-teacher-head": lambda D: (
        lambda o: ((o.kl * D["A"]).sum(), o.kl))(
        _kw(D, outputs=("kl",), teacher_hidden=D["th"], teacher_weight=TW32, divergence="jsd", beta=0.3)),
    "kl-teacher-topk": lambda D: (
        lambda o: (o.kl.sum(), o.kl))(_kw(D, outputs=("kl",), teacher_topk=(D["idx"], D["lpk"]), divergence="jsd",
                                          beta=0.6)),
    "kl-reverse-with-loss": lambda D: (
        lambda o: (o.loss + o.kl.sum(), o.kl))(
        _kw(D, outputs=("loss", "kl"), teacher_logits=D["tl"], divergence="reverse_kl", z_loss=1e-2)),
    "per-token-temperature": lambda D: (
        lambda o: (o.loss - o.logprobs.sum() + o.entropy.sum(), o.logprobs, o.entropy))(
        _kw(D, outputs=("loss", "logprobs", "entropy"), temperature=D["temp"])),
    "per-token-temperature-loss-alone": lambda D: (
        _kw(D, temperature=D["temp"], weight=torch.linspace(0.5, 2, V)).loss,),
    "reduction-none": lambda D: (
        lambda o: ((o.loss * D["A"]).sum() + o.lse.sum(), o.loss, o.lse))(
        _kw(D, outputs=("loss", "lse"), reduction="none", z_loss=1e-3)),
    "reduction-sum": lambda D: (
        lambda o: (o.loss + o.entropy.sum(), o.entropy))(_kw(D, outputs=("loss", "entropy"), reduction="sum")),
    "reduction-mean-z-loss": lambda D: (
        lambda o: (o.loss + o.logprobs.sum(), o.logprobs))(
        _kw(D, outputs=("loss", "logprobs"), reduction="mean", z_loss=1e-2, chunk_size=4)),
    "reduction-sum-loss-alone": lambda D: (_kw(D, reduction="sum", z_loss=1e-2).loss,),
    "reduction-none-loss-alone": lambda D: (
        lambda o: ((o.loss * D["A"]).sum(), o.loss))(_kw(D, reduction="none", softcap=4.0)),
    "num-items-int": lambda D: (
        lambda o: (o.loss + o.entropy.sum(), o.entropy))(
        _kw(D, outputs=("loss", "entropy"), num_items_in_batch=23, z_loss=1e-2)),
    "num-items-tensor": lambda D: (
        lambda o: (o.loss + o.entropy.sum(), o.entropy))(
        _kw(D, outputs=("loss", "entropy"), num_items_in_batch=torch.tensor(23))),
    "num-items-tensor-loss-alone": lambda D: (_kw(D, num_items_in_batch=torch.tensor(23.0)).loss,),
    "grpo": _grpo,
    "every-output": lambda D: (
        lambda o: (o.loss + o.logprobs.sum() + o.entropy.sum() + o.lse.sum() + o.kl.sum(), o.logprobs, o.entropy,
                   o.lse, o.kl, o.argmax))(
        _kw(D, outputs=("loss", "logprobs", "entropy", "lse", "argmax", "kl"), teacher_logits=D["tl"],
            temperature=D["temp"], weight=torch.linspace(0.5, 2, V), label_smoothing=0.05, z_loss=1e-3)),
    "top-level-logitkit": lambda D: (
        lambda o: (o.logprobs.sum() + o.entropy.sum(), o.logprobs))(
        logitkit.linear_head(D["h"], W32, D["y"], outputs=("logprobs", "entropy"))),
}

PARAMS = lambda D: (D["h"], W32, B32)  # noqa: E731



def _check_equal(fn, D, compiled):
    got, want = compiled(D), fn(D)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        if e.dtype == torch.int64:
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a, e)
    gg = torch.autograd.grad(got[0], PARAMS(D), allow_unused=True)
    ge = torch.autograd.grad(want[0], PARAMS(D), allow_unused=True)
    for a, e, name in zip(gg, ge, ("hidden", "linear_weight", "linear_bias")):
        assert (a is None) == (e is None), name
        if a is not None:
            torch.testing.assert_close(a, e, msg=name)
    assert gg[0] is not None and gg[1] is not None


def _graph_capture():
    """An aot_eager-like backend that keeps the forward and backward FX graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")), graphs


SYNC = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
        "aten._assert_async.msg", "aten.equal.default"}


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", list(CALLS))
def test_no_graph_break(name):
    D = _data()
    fn = lambda h, y: CALLS[name](dict(D, h=h, y=y))  # noqa: E731
    explanation = torch._dynamo.explain(fn)(D["h"], D["y"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", list(CALLS))
def test_compiled_matches_eager_and_no_host_sync(name):
    D = _data()
    fn = CALLS[name]
    backend, graphs = _graph_capture()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    _check_equal(fn, D, compiled)
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1, graphs
    fw, bw = _targets(graphs["fw"][0]), _targets(graphs["bw"][0])
    for targets in (fw, bw):
        assert not SYNC.intersection(targets), SYNC.intersection(targets)
    ops = [t for t in fw + bw if t.startswith("logitkit.")]
    if ops and any(t.startswith("logitkit.linear_head") for t in ops):
        # the fused head: one opaque forward and one backward, nothing of the chunk loop traced
        assert fw.count("logitkit.linear_head_forward.default") == 1, fw
        assert bw.count("logitkit.linear_head_backward.default") == 1, bw
    else:  # ("loss",) with a scalar temperature is linear_cross_entropy's operator
        assert any(t.startswith("logitkit.linear_ce") for t in ops), ops


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_matches_eager_other_dtypes(dtype):
    W, b, tW = _head(dtype)
    D = _data(dtype=dtype)

    def fn(D):
        o = lt.linear_head(D["h"], W, D["y"], linear_bias=b, outputs=("loss", "logprobs", "entropy", "kl"),
                           teacher_hidden=D["th"], teacher_weight=tW, temperature=D["temp"])
        return o.loss + o.logprobs.sum() + o.entropy.sum() + o.kl.sum(), o.logprobs, o.kl

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(D), fn(D)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e)
    ga = torch.autograd.grad(got[0], (D["h"], W, b))
    ge = torch.autograd.grad(want[0], (D["h"], W, b))
    for a, e in zip(ga, ge):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e)


def test_compiled_matches_the_float64_reference():
    """Compiled and eager agreeing is not enough: both against the materialized logits."""
    W, b, tW = _head(torch.float64)
    D = _data(dtype=torch.float64)

    def fn(h):
        o = lt.linear_head(h, W, D["y"], linear_bias=b, outputs=("loss", "logprobs", "entropy", "kl"),
                           teacher_logits=D["tl"], temperature=D["temp"], label_smoothing=0.1)
        return o.loss + (o.logprobs * D["A"]).sum() + o.entropy.sum() + o.kl.sum()

    def ref(h):
        z = F.linear(h, W, b) / D["temp"][:, None]
        ls = F.log_softmax(z, -1)
        valid = D["y"] != -100
        safe = torch.where(valid, D["y"], 0)
        loss = F.cross_entropy(z, D["y"], label_smoothing=0.1)
        lp = torch.where(valid, ls.gather(-1, safe[:, None])[:, 0], 0.0)
        ent = torch.where(valid, -(ls.exp() * ls).sum(-1), 0.0)
        lt_ = F.log_softmax(D["tl"], -1)
        kl = torch.where(valid, (lt_.exp() * (lt_ - ls)).sum(-1), 0.0)
        return loss + (lp * D["A"]).sum() + ent.sum() + kl.sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(D["h"]), ref(D["h"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (ga,), (ge,) = torch.autograd.grad(got, (D["h"],)), torch.autograd.grad(want, (D["h"],))
    torch.testing.assert_close(ga, ge, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dynamic", [True, None])
def test_new_batch_size_does_not_recompile(dynamic):
    """dynamic=True: one graph for every batch size; automatic dynamic shapes: one recompile at
    the second size (torch marks the dimension dynamic then), none after. Every per-token input
    (labels, temperatures, the teacher's logits, hidden states and top-k) changes size with N."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def step(D):
        a = lt.linear_head(D["h"], W32, D["y"], linear_bias=B32, outputs=("loss", "logprobs", "entropy", "kl"),
                           teacher_logits=D["tl"], temperature=D["temp"], num_items_in_batch=D["n"])
        c = lt.linear_head(D["h"], W32, D["y"], outputs=("lse", "argmax", "kl"), teacher_hidden=D["th"],
                           teacher_weight=TW32)
        d = lt.linear_head(D["h"], W32, None, outputs=("kl",), teacher_topk=(D["idx"], D["lpk"]))
        return (a.loss + a.logprobs.sum() + a.entropy.sum() + a.kl.sum() + c.lse.sum() + c.kl.sum()
                + d.kl.sum() + c.argmax.sum() * 0)

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=dynamic)
    counts = []
    for N in (5, 9, 17, 30):
        D = _data(N, seed=N)
        D["n"] = torch.tensor(N + 3)
        out = compiled(D)
        ref = step(D)
        torch.testing.assert_close(out, ref)
        (g,), (e,) = torch.autograd.grad(out, (D["h"],)), torch.autograd.grad(ref, (D["h"],))
        torch.testing.assert_close(g, e)
        counts.append(counter.frame_count)
    settled = 0 if dynamic else 1  # the call after which nothing may compile again
    assert counts[settled:] == [counts[settled]] * (len(counts) - settled), counts
    assert counts[-1] == (1 if dynamic else 2), counts


def test_top_level_linear_head_with_symbolic_float_options():
    """``logitkit.linear_head`` (the framework-agnostic entry) under dynamic=True, with float
    options that dynamo makes symbolic (an attribute, a default): one graph for every batch size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    class Head(torch.nn.Module):
        T = 1.3

        def forward(self, h, y):
            o = logitkit.linear_head(h, W32, y, outputs=("loss", "logprobs", "entropy"), temperature=self.T,
                                     label_smoothing=0.05)
            return o.loss + o.logprobs.sum() + o.entropy.sum()

    m = Head()
    compiled = torch.compile(m, backend=counter, fullgraph=True, dynamic=True)
    counts = []
    for N in (5, 9, 17):
        D = _data(N, seed=N)
        torch.testing.assert_close(compiled(D["h"], D["y"]), m(D["h"], D["y"]))
        counts.append(counter.frame_count)
    assert counts == [counts[0]] * 3 and counts[0] >= 1, counts  # nothing compiles after the first size


@pytest.mark.parametrize("chunk_size", [None, 4, (4, V), (4, 5)])
def test_linear_entropy_runs_the_heads_operators_for_whole_rows(chunk_size):
    """lt.linear_entropy and logitkit.linear_entropy on torch tensors: whole rows are the fused
    head's operators, vocabulary tiles (4, 5) the online merge's; values and gradients against the
    materialized logits, eager and compiled."""
    W, b, _ = _head(torch.float64)
    D = _data(dtype=torch.float64)

    def fn(h):
        e1 = lt.linear_entropy(h, W, linear_bias=b, temperature=0.8, softcap=3.0, chunk_size=chunk_size)
        e2 = logitkit.linear_entropy(h, W, linear_bias=b, chunk_size=chunk_size)
        return (e1 * D["A"]).sum() + e2.sum(), e1, e2

    def ref(h):
        x = F.linear(h, W, b)
        out = []
        for z in (3.0 * torch.tanh(x / 3.0) / 0.8, x):
            ls = F.log_softmax(z, -1)
            out.append(-(ls.exp() * ls).sum(-1))
        return (out[0] * D["A"]).sum() + out[1].sum(), out[0], out[1]

    backend, graphs = _graph_capture()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for f in (fn, compiled):
        got, want = f(D["h"]), ref(D["h"])
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        for a, e in zip(torch.autograd.grad(got[0], (D["h"], W, b)), torch.autograd.grad(want[0], (D["h"], W, b))):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    fw, bw = _targets(graphs["fw"][0]), _targets(graphs["bw"][0])
    tiles = isinstance(chunk_size, tuple) and chunk_size[1] < V
    name = "linear_entropy" if tiles else "linear_head"
    assert fw.count(f"logitkit.{name}_forward.default") == 2, fw
    assert bw.count(f"logitkit.{name}_backward.default") == 2, bw


def test_dtensor_check_does_not_guard_on_its_cache(monkeypatch):
    """The entry's DTensor check caches the DTensor class in a global once torch.distributed.tensor
    is imported; a compiled graph that read that cache recompiled once it was filled."""
    pytest.importorskip("torch.distributed.tensor")
    from torch._dynamo.testing import CompileCounterWithBackend

    import logitkit.torch._dtensor as dt

    monkeypatch.setattr(dt, "_DTENSOR", [None])
    counter = CompileCounterWithBackend("aot_eager")

    def step(D):
        o = lt.linear_head(D["h"], W32, D["y"], outputs=("logprobs", "entropy"))
        return o.logprobs.sum() + o.entropy.sum() + lt.linear_cross_entropy(D["h"], W32, D["y"])

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    D = _data()
    torch.testing.assert_close(compiled(D), step(D))
    frames = counter.frame_count
    assert not dt.is_dtensor(torch.zeros(1), object())  # a non-plain argument: the cache is filled
    assert dt._DTENSOR[0] is not None
    D = _data(12, seed=1)
    torch.testing.assert_close(compiled(D), step(D))
    assert counter.frame_count == frames


def test_grpo_backward_compiled_with_inductor():
    """The default backend (inductor) on a GRPO step, two batch sizes: values and gradients."""
    compiled = torch.compile(_grpo, fullgraph=True)
    for N in (9, 14):
        D = _data(N, seed=N)
        _check_equal(_grpo, D, compiled)


def test_compiled_value_checks_still_raise():
    """The checks that read tensors are skipped at the compiled call site and run in the operator."""
    cases = [
        (dict(y=lambda D: D["y"].index_fill(0, torch.tensor([2]), V)), {}, "class index 13 at position 2"),
        (dict(temp=lambda D: D["temp"].index_fill(0, torch.tensor([3]), 0.0)), {},
         "temperature: expected finite values > 0 for every token, got 0.0"),
        (dict(idx=lambda D: D["idx"].index_fill(1, torch.tensor([1]), 0).index_fill(1, torch.tensor([0]), 0)), {},
         "repeats a class"),
        (dict(idx=lambda D: D["idx"].index_fill(1, torch.tensor([0]), V + 4)), {}, "17 is out of range"),
        (dict(n=lambda D: torch.tensor(0)), {}, "num_items_in_batch: expected a value > 0, got 0.0"),
    ]

    def fn(D):
        a = lt.linear_head(D["h"], W32, D["y"], outputs=("loss", "logprobs"), temperature=D["temp"],
                           num_items_in_batch=D["n"])
        b = lt.linear_head(D["h"], W32, None, outputs=("kl",), teacher_topk=(D["idx"], D["lpk"]))
        return a.loss + b.kl.sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    good = dict(_data(), n=torch.tensor(7))
    torch.testing.assert_close(compiled(good), fn(good))
    for change, _, msg in cases:
        D = dict(good)
        for k, f in change.items():
            D[k] = f(D)
        with pytest.raises(ValueError, match=msg):
            fn(D)  # eager: at the call site
        with pytest.raises(ValueError, match=msg):
            compiled(D)  # compiled: when the operator runs


def test_eager_and_compiled_run_the_same_functions():
    """Eager calls skip the dispatcher, compiled ones go through it: the same Python functions."""
    import logitkit.torch.head as head
    import logitkit.torch.linear as lin

    assert lin._OPS["linear_head_forward"] is head._head_forward
    assert lin._OPS["linear_head_backward"] is head._head_backward
    D = _data()
    out = torch.ops.logitkit.linear_head_forward(
        D["h"].detach(), W32.detach(), None, D["y"], None, None, None, None, None, None,
        "logprobs,entropy", -100, 0.0, None, 1.0, "none", "kl", 0.5, 1.0, False, 0, 0, False)
    want = lt.linear_head(D["h"], W32, D["y"], outputs=("logprobs", "entropy"))
    assert len(out) == 9 and out[0].shape == (9,) and out[2].numel() == 0
    torch.testing.assert_close(out[4].to(torch.float32), want.logprobs)
    torch.testing.assert_close(out[5].to(torch.float32), want.entropy)


def test_operators_pass_torch_library_opcheck():
    """Schema, fake implementation and dispatcher registration agree with the real function."""
    D = _data()
    h, W = D["h"].detach(), W32.detach()
    args = (h, W, B32.detach(), D["y"], D["temp"], None, D["tl"], None, None, None,
            "loss,logprobs,entropy,lse,argmax,kl", -100, 0.1, None, 1.0, "logits", "jsd", 0.4, 1.2, True, 4, 0,
            True)
    torch.library.opcheck(torch.ops.logitkit.linear_head_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    fw = torch.ops.logitkit.linear_head_forward(*args)
    g = torch.ones(9)
    bargs = (h, W, B32.detach(), D["y"], D["temp"], None, D["tl"], None, None, fw[0], fw[1], fw[5], fw[7], g, g, g,
             g, g, "loss,logprobs,entropy,lse,argmax,kl", -100, 0.1, None, 1.0, "logits", "jsd", 0.4, 1.2, True,
             4, 0, True, True, True)
    torch.library.opcheck(torch.ops.logitkit.linear_head_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


_FRESH = r"""
import torch, logitkit.torch as lt
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
head = torch.nn.Linear(16, 40, bias=False)
teacher = torch.nn.Linear(16, 40, bias=False)
def step(x, y, temp):
    h = model(x)
    o = lt.linear_head(h, head.weight, y, outputs=("loss", "logprobs", "entropy", "kl"), temperature=temp,
                       teacher_hidden=h.detach(), teacher_weight=teacher.weight.detach())
    return o.loss + 0.1 * o.kl.mean() - 0.01 * o.entropy.mean(), o.logprobs
compiled = torch.compile(step, fullgraph=True)
for n in (8, 12, 20):
    x, y, temp = torch.randn(n, 6), torch.randint(0, 40, (n,)), torch.rand(n) + 0.5
    loss, lp = compiled(x, y, temp)
    loss.backward()
    g = [p.grad.clone() for p in model.parameters()] + [head.weight.grad.clone()]
    for p in list(model.parameters()) + [head.weight]:
        p.grad = None
    ref, ref_lp = step(x, y, temp)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lp, ref_lp)
    for a, p in zip(g, list(model.parameters()) + [head.weight]):
        torch.testing.assert_close(a, p.grad)
        p.grad = None
print("ok")
"""


@pytest.mark.slow  # make test-slow (CI runs it after make test): a fresh process that imports torch and compiles
@pytest.mark.timeout(600)
def test_compile_linear_head_with_inductor_in_a_fresh_process():
    """No crash when dynamo first meets the head (and numba) in a fresh process, with inductor."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=580, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
