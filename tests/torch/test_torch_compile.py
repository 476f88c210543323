"""logitkit.torch under torch.compile: no graph break in the logitkit calls, same values and grads."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import logitkit.torch as lt  # noqa: E402


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
}


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
