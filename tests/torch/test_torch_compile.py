"""logitkit.torch under torch.compile: no graph break in the logitkit calls, same values and grads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import logitkit  # noqa: E402
import logitkit.torch as lt  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(N=8, C=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = -100
    return x, y


CALLS = {
    "ce-options": lambda x, y: lt.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                                temperature=0.9),
    "ce-none": lambda x, y: (lt.cross_entropy(x, y, reduction="none") * torch.arange(x.shape[0])).sum(),
    "ce-lse": lambda x, y: sum(t.sum() for t in lt.cross_entropy(x, y, return_lse=True)),
    "ce-prob": lambda x, y: lt.cross_entropy(x, torch.softmax(x.detach() * 2, 1)),
    "softmax": lambda x, y: (lt.softmax(x, 1) * lt.log_softmax(x, 0)).sum(),
    "module": lambda x, y: lt.CrossEntropyLoss(label_smoothing=0.05)(x, y),
    "ce-default": lambda x, y: lt.cross_entropy(x, y),  # the eager fast path's options
    "ce-top-level": lambda x, y: lt.cross_entropy(x, y, reduction="sum") + lt.softmax(x, -1, temperature=2.0).sum(),
    # logitkit.* (class axis -1) on torch tensors: the bridge is found without importlib
    "logitkit-top-level": lambda x, y: (logitkit.cross_entropy(x, y, label_smoothing=0.1)
                                        + logitkit.log_softmax(x, temperature=2.0).sum()
                                        + logitkit.logsumexp(x).sum()),
}

_HEAD_W = torch.randn(11, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
_HEAD_B = torch.randn(11, generator=torch.Generator().manual_seed(4), requires_grad=True)

# linear heads: x (N, 11) is used as its first 4 columns, the hidden states
HEAD_CALLS = {
    "linear-ce": lambda h, y: lt.linear_cross_entropy(h, _HEAD_W, y, linear_bias=_HEAD_B, label_smoothing=0.1,
                                                      z_loss=1e-3),
    "linear-ce-none": lambda h, y: (lt.linear_cross_entropy(h, _HEAD_W, y, reduction="none", softcap=4.0)
                                    * torch.arange(h.shape[0])).sum(),
    "linear-tiled": lambda h, y: lt.linear_cross_entropy(h, _HEAD_W, y, chunk_size=(3, 5)),
    "token-logprobs": lambda h, y: lt.linear_token_logprobs(h, _HEAD_W, y, temperature=0.7).sum(),
    "entropy": lambda h, y: lt.linear_entropy(h, _HEAD_W, linear_bias=_HEAD_B).sum(),
    "logitkit-linear-ce": lambda h, y: logitkit.linear_cross_entropy(h, _HEAD_W, y, linear_bias=_HEAD_B),
}


def _head_data(N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (N,), generator=g)
    y[1] = -100
    return h, y


@pytest.mark.parametrize("name", list(CALLS))
def test_no_graph_break(name):
    x, y = _data()
    explanation = torch._dynamo.explain(CALLS[name])(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", list(CALLS))
def test_compiled_matches_eager(name):
    x, y = _data()
    fn = CALLS[name]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x, y), fn(x, y)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(ref, x)[0])


def test_inplace_under_compile():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 3, generator=g, requires_grad=True)
    W = torch.randn(11, 3, generator=g)
    y = torch.randint(0, 11, (8,), generator=g)
    fn = torch.compile(lambda h, y: lt.cross_entropy(h @ W.T, y, inplace_backward=True), backend="aot_eager",
                       fullgraph=True)
    (ours,) = torch.autograd.grad(fn(h, y), h)
    (ref,) = torch.autograd.grad(F.cross_entropy(h @ W.T, y), h)
    torch.testing.assert_close(ours, ref)


def test_inductor_training_step():
    """A small model with an inductor-compiled step (fullgraph=False, as users run it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 13))
    ref_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 13))
    ref_model.load_state_dict(model.state_dict())
    loss_fn = lt.CrossEntropyLoss(label_smoothing=0.1, inplace_backward=True)

    def step(inp, tgt):
        return loss_fn(model(inp), tgt)

    compiled = torch.compile(step)
    inp, tgt = torch.randn(10, 6), torch.randint(0, 13, (10,))
    compiled(inp, tgt).backward()
    F.cross_entropy(ref_model(inp), tgt, label_smoothing=0.1).backward()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(HEAD_CALLS))
def test_linear_heads_compile_fullgraph_and_match_eager(name):
    """fullgraph=True: no graph break (the chunk driver and numba stay inside custom ops)."""
    h, y = _head_data()
    fn = HEAD_CALLS[name]
    explanation = torch._dynamo.explain(fn)(h, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, ref = compiled(h, y), fn(h, y)
    torch.testing.assert_close(out, ref)
    params = [h, _HEAD_W, _HEAD_B]
    got = torch.autograd.grad(out, params, allow_unused=True)
    exp = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(got, exp):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dynamic", [True, None])
def test_new_batch_size_does_not_recompile(dynamic):
    """dynamic=True: one graph for every batch size; automatic dynamic shapes: one recompile at
    the second size (torch marks the dimension dynamic then), none after."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def step(h, y):
        x = h @ _HEAD_W.T
        return lt.linear_cross_entropy(h, _HEAD_W, y) + lt.cross_entropy(x, y) + lt.log_softmax(x, 1).sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=dynamic)
    counts = []
    for N in (5, 9, 17, 30):
        h, y = _head_data(N, seed=N)
        out = compiled(h, y)
        torch.testing.assert_close(out, step(h, y))
        out.backward()
        counts.append(counter.frame_count)
    settled = 0 if dynamic else 1  # the call after which nothing may compile again
    assert counts[settled:] == [counts[settled]] * (len(counts) - settled), counts


def test_compiled_label_check_still_raises():
    """No host read of the labels at trace time: the custom ops check them when they run."""
    h, y = _head_data()
    y[2] = 11
    for fn in (HEAD_CALLS["linear-ce"], CALLS["ce-default"]):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        with pytest.raises(ValueError, match="class index 11 at position 2"):
            compiled(h if fn is HEAD_CALLS["linear-ce"] else torch.randn(8, 11), y)


_FRESH = r"""
import torch, logitkit.torch as lt
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
head = torch.nn.Linear(16, 40, bias=False)
def step(x, y):
    return lt.linear_cross_entropy(model(x), head.weight, y, label_smoothing=0.1)
compiled = torch.compile(step, fullgraph=True)
for n in (8, 12, 20):
    x, y = torch.randn(n, 6), torch.randint(0, 40, (n,))
    loss = compiled(x, y)
    loss.backward()
    ref = torch.nn.functional.linear_cross_entropy(model(x), head.weight, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
print("ok")
"""


@pytest.mark.slow  # make test-slow (CI runs it after make test): a fresh process that imports torch and compiles
@pytest.mark.timeout(600)
def test_issue13_item10_compile_linear_cross_entropy_in_a_fresh_process():
    """The crash came from dynamo tracing numba's dispatcher in a fresh process (inductor here)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=580, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_top_level_compiles_when_first_called_inside_the_graph():
    """A fresh process whose first logitkit call on torch tensors is inside torch.compile(fullgraph=True):
    the bridge's first import and the torch namespace must not break the graph."""
    code = (
        "import torch, logitkit\n"
        "f = lambda x, y: logitkit.cross_entropy(x, y) + logitkit.softmax(x).sum()\n"
        "x = torch.randn(6, 9, requires_grad=True); y = torch.randint(0, 9, (6,))\n"
        "a = torch.compile(f, fullgraph=True, backend='eager')(x, y); b = f(x, y)\n"
        "torch.testing.assert_close(a, b)\n"
        "torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# the same on a GPU (issue 14: "a CUDA variant runs when a GPU is present"): inductor, fullgraph,
# CUDA tensors (the Triton stages inside the custom ops), compiled == eager


_CUDA_CALLS = {
    "ce-options": CALLS["ce-options"],
    "ce-default": CALLS["ce-default"],
    "softmax": CALLS["softmax"],
    "logitkit-top-level": CALLS["logitkit-top-level"],
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(_CUDA_CALLS) + ["linear-ce", "linear-head"])
def test_cuda_compiles_fullgraph_and_matches_eager(name):
    g = torch.Generator().manual_seed(5)
    dev = "cuda"
    W = torch.randn(11, 4, generator=g).to(dev).requires_grad_()
    if name == "linear-ce":
        x = torch.randn(8, 4, generator=g).to(dev).requires_grad_()

        def fn(x, y):
            return lt.linear_cross_entropy(x, W, y, label_smoothing=0.1)
    elif name == "linear-head":
        x = torch.randn(8, 4, generator=g).to(dev).requires_grad_()

        def fn(x, y):
            out = lt.linear_head(x, W, y, outputs=("loss", "logprobs", "entropy"))
            return out.loss + out.logprobs.sum() * 0.3 - out.entropy.sum() * 0.01
    else:
        x = torch.randn(8, 11, generator=g).to(dev).requires_grad_()
        fn = _CUDA_CALLS[name]
    y = torch.randint(0, 11, (8,), generator=g).to(dev)
    y[1] = -100
    explanation = torch._dynamo.explain(fn)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True)
    out, ref = compiled(x, y), fn(x, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = [x, W]
    got = torch.autograd.grad(out, params, allow_unused=True)
    exp = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(got, exp):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
