"""logitkit.torch.linear_head: values and gradients of every output and combination.

References, all torch float64 on the materialized logits with torch's own autograd: ``F.linear``,
``F.cross_entropy`` (weights, smoothing, ignore_index), ``log_softmax``; the teacher divergences as
TRL's ``generalized_jsd_loss`` (GKD) writes them with ``F.kl_div`` and as Liger-Kernel's JSD kernel
writes them elementwise; the top-k form from its documented formula. Finite differences by
``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import logitkit  # noqa: E402
import logitkit.torch as lt  # noqa: E402

ALL = ("loss", "logprobs", "entropy", "lse", "argmax", "kl")
DIFF = ("loss", "logprobs", "entropy", "lse", "kl")


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (per token: summed over the vocabulary)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum(-1)


def liger_jsd(X, Y, beta):
    """Liger-Kernel's JSD kernel, elementwise: X student, Y teacher log-probabilities."""
    if beta == 0.0:
        return (Y.exp() * (Y - X)).sum(-1)
    if beta == 1.0:
        return (X.exp() * (X - Y)).sum(-1)
    P, Q = Y.exp(), X.exp()
    M = beta * P + (1 - beta) * Q
    log_M = torch.log(M)
    return (beta * P * Y + (1 - beta) * Q * X - M * log_M).sum(-1)


def ref(h, W, b, y, *, temperature=1.0, softcap=None, weight=None, ignore_index=-100, label_smoothing=0.0,
        reduction="mean", z_loss=0.0, num_items_in_batch=None, teacher=None, divergence="kl", beta=0.5,
        teacher_temperature=1.0):
    """Every HeadOutput field, differentiable, from the full float64 logits."""
    x = F.linear(h.double(), W.double(), None if b is None else b.double())
    V = x.shape[-1]
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    t = torch.as_tensor(temperature, dtype=torch.float64)
    z = z / (t[..., None] if t.ndim else t)
    ls = F.log_softmax(z, -1)
    valid = torch.ones(z.shape[:-1], dtype=torch.bool) if y is None else y != ignore_index
    out = {}
    lse = torch.logsumexp(z, -1)
    if y is not None:
        w = None if weight is None else weight.double()
        ce = F.cross_entropy(z.reshape(-1, V), y.reshape(-1), weight=w, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction="none").reshape(y.shape)
        zt = torch.where(valid, z_loss * lse ** 2, 0.0)
        if reduction == "none":
            out["loss"] = ce + zt
        elif reduction == "sum" or num_items_in_batch is not None:
            out["loss"] = ce.sum() + zt.sum()
            if num_items_in_batch is not None:
                out["loss"] = out["loss"] / num_items_in_batch
        else:
            safe = torch.where(valid, y, 0)
            wy = valid.double() if w is None else w[safe] * valid
            out["loss"] = ce.sum() / wy.sum() + zt.sum() / valid.sum()
        safe = torch.where(valid, y, 0)
        out["logprobs"] = torch.where(valid, ls.gather(-1, safe[..., None])[..., 0], 0.0)
    out["entropy"] = torch.where(valid, -(ls.exp() * ls).sum(-1), 0.0)
    out["lse"] = torch.where(valid, lse, 0.0)
    out["argmax"] = torch.where(valid, x.argmax(-1), 0)
    if teacher is not None and teacher[0] == "dense":
        tl = F.log_softmax(teacher[1].double() / teacher_temperature, -1)
        if divergence == "jsd":
            kl = liger_jsd(ls, tl, beta)
        elif divergence == "kl":
            kl = liger_jsd(ls, tl, 0.0)
        else:
            kl = liger_jsd(ls, tl, 1.0)
        out["kl"] = torch.where(valid, kl, 0.0)
    elif teacher is not None:
        idx, lpk = teacher[1], teacher[2].double()
        lq = F.log_softmax(lpk / teacher_temperature, -1)
        q = lq.exp()
        lsk = ls.gather(-1, idx)
        if divergence == "kl":
            kl = (q * (lq - lsk)).sum(-1)
        else:
            s = lsk.exp()
            rest = (1 - s.sum(-1)).clamp_min(0)
            lm = torch.log(beta * q + (1 - beta) * s)
            kl = beta * (q * (lq - lm)).sum(-1) + (1 - beta) * ((s * (lsk - lm)).sum(-1) - rest * math.log1p(-beta))
        out["kl"] = torch.where(valid, kl, 0.0)
    return out


def make(seed=0, shape=(17,), H=5, V=23, dtype=torch.float64, ignore=(2, 9), k=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape + (H,), generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[[i for i in ignore if i < y.numel()]] = -100
    th = torch.randn(shape + (4,), generator=g, dtype=torch.float64)
    tW = torch.randn(V, 4, generator=g, dtype=torch.float64)
    tl = torch.randn(shape + (V,), generator=g, dtype=torch.float64) * 1.5
    idx = tl.argsort(-1, descending=True)[..., :k]
    lpk = F.log_softmax(tl, -1).gather(-1, idx)
    c = lambda t: t.to(dtype).requires_grad_(True)  # noqa: E731
    return dict(h=c(h), W=c(W), b=c(b), y=y, th=th.to(dtype), tW=tW.to(dtype), tl=tl.to(dtype), idx=idx,
                lpk=lpk.to(dtype), temp=torch.rand(shape, generator=g, dtype=torch.float64) + 0.5)


def teacher_kw(P, form):
    if form == "head":
        return dict(teacher_hidden=P["th"], teacher_weight=P["tW"]), ("dense", P["th"] @ P["tW"].T)
    if form == "logits":
        return dict(teacher_logits=P["tl"]), ("dense", P["tl"])
    return dict(teacher_topk=(P["idx"], P["lpk"])), ("topk", P["idx"], P["lpk"])


def _objective(out, cot, fields):
    total = 0.0
    for name in fields:
        v = out[name] if isinstance(out, dict) else getattr(out, name)
        total = total + (v.double() * cot[name]).sum()
    return total


def _grads(total, P):
    return torch.autograd.grad(total, (P["h"], P["W"], P["b"]))


def _cotangents(P, fields, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = P["y"].shape
    return {n: (torch.randn((), generator=g, dtype=torch.float64) if n == "loss" else
                torch.randn(shape, generator=g, dtype=torch.float64)) for n in fields}


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("form", ["head", "logits"])
def test_jsd_matches_trl_gkd_and_liger(beta, form):
    P = make()
    T = 1.7
    kw, teach = teacher_kw(P, form)
    out = lt.linear_head(P["h"], P["W"], None, linear_bias=P["b"], outputs=("kl",), temperature=T,
                         teacher_temperature=T, divergence="jsd", beta=beta, **kw)
    x = F.linear(P["h"], P["W"], P["b"]).detach()
    want = trl_generalized_jsd(x, teach[1], beta, T)
    torch.testing.assert_close(out.kl, want, rtol=1e-11, atol=1e-13)
    X, Y = F.log_softmax(x / T, -1), F.log_softmax(teach[1] / T, -1)
    torch.testing.assert_close(out.kl, liger_jsd(X, Y, beta), rtol=1e-11, atol=1e-13)
    if beta in (0.0, 1.0):  # the two ends are the forward and reverse KL
        other = lt.linear_head(P["h"], P["W"], None, linear_bias=P["b"], outputs=("kl",), temperature=T,
                               teacher_temperature=T, divergence="kl" if beta == 0.0 else "reverse_kl", **kw)
        torch.testing.assert_close(out.kl, other.kl, rtol=0, atol=0)


@pytest.mark.parametrize("fields", [c for r in range(1, 6) for c in itertools.combinations(DIFF, r)])
def test_every_combination_of_outputs_values_and_grads(fields):
    P = make(seed=len(fields))
    kw, teach = teacher_kw(P, "logits") if "kl" in fields else ({}, None)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, divergence="jsd", beta=0.4)
    out = lt.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=fields + ("argmax",), chunk_size=5,
                         **kw, **opts)
    want = ref(P["h"], P["W"], P["b"], P["y"], teacher=teach, **opts)
    for name in fields + ("argmax",):
        torch.testing.assert_close(getattr(out, name), want[name].to(getattr(out, name).dtype), rtol=1e-11,
                                   atol=1e-12)
    for name in set(ALL) - set(fields) - {"argmax"}:
        assert getattr(out, name) is None
    cot = _cotangents(P, fields)
    got = _grads(_objective(out, cot, fields), P)
    exp = _grads(_objective(want, cot, fields), P)
    for g, e, n in zip(got, exp, ("hidden", "linear_weight", "linear_bias")):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=n)


OPTIONS = [
    dict(),
    dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=3.0, temperature=0.8, teacher_temperature=1.4),
    dict(temperature="per-token", softcap=4.0, label_smoothing=0.1),
    dict(temperature="per-token", weight=True, reduction="sum"),
    dict(reduction="none", z_loss=1e-3),
    dict(num_items_in_batch=41, z_loss=1e-2, temperature="per-token"),
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("form,divergence,beta", [("head", "kl", 0.5), ("logits", "reverse_kl", 0.5),
                                                   ("head", "jsd", 0.3), ("topk", "kl", 0.5), ("topk", "jsd", 0.6)])
def test_every_option_and_teacher_values_and_grads(opts, form, divergence, beta):
    P = make(seed=3, shape=(3, 6), ignore=(1, 7, 8))
    o = dict(opts)
    if o.get("weight") is True:
        o["weight"] = torch.rand(23, dtype=torch.float64) + 0.3
    if o.get("temperature") == "per-token":
        o["temperature"] = P["temp"]
    kw, teach = teacher_kw(P, form)
    out = lt.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=ALL, divergence=divergence, beta=beta,
                         chunk_size=4, **kw, **o)
    want = ref(P["h"], P["W"], P["b"], P["y"], teacher=teach, divergence=divergence, beta=beta, **o)
    for name in ALL:
        torch.testing.assert_close(getattr(out, name), want[name].to(getattr(out, name).dtype), rtol=1e-11,
                                   atol=1e-12, msg=name)
    cot = _cotangents(P, DIFF, seed=7)
    if o.get("reduction") == "none":
        cot["loss"] = torch.randn(P["y"].shape, dtype=torch.float64)
    got = _grads(_objective(out, cot, DIFF), P)
    exp = _grads(_objective(want, cot, DIFF), P)
    for g, e, n in zip(got, exp, ("hidden", "linear_weight", "linear_bias")):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=n)


def test_gradcheck_finite_differences():
    P = make(seed=5, shape=(6,), H=3, V=7, ignore=(4,), k=3)
    for kw, extra in ((dict(teacher_logits=P["tl"], divergence="jsd", beta=0.3),
                       dict(temperature=P["temp"], softcap=2.5, z_loss=1e-2, label_smoothing=0.1)),
                      (dict(teacher_topk=(P["idx"], P["lpk"]), divergence="jsd", beta=0.7), dict()),
                      (dict(teacher_hidden=P["th"], teacher_weight=P["tW"], divergence="reverse_kl"),
                       dict(weight=torch.rand(7, dtype=torch.float64) + 0.5))):
        def f(h, W, b):
            o = lt.linear_head(h, W, P["y"], linear_bias=b, outputs=ALL, chunk_size=4, **kw, **extra)
            return o.loss, o.logprobs, o.entropy, o.lse, o.kl

        assert torch.autograd.gradcheck(f, (P["h"], P["W"], P["b"]))


def test_grpo_step_through_one_call():
    # -(A · exp(logprobs - old).clamp(0.8, 1.2)).mean() - 0.01 · entropy.mean(), per-token temperature.
    P = make(seed=11, shape=(4, 5), ignore=(3, 12))
    A = torch.randn(4, 5, dtype=torch.float64)
    valid = P["y"] != -100

    def grpo(lp, ent):
        old = lp.detach() - 0.05
        ratio = torch.exp(lp - old).clamp(0.8, 1.2)
        return -(A * ratio)[valid].mean() - 0.01 * ent[valid].mean()

    out = lt.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("logprobs", "entropy"),
                         temperature=P["temp"])
    want = ref(P["h"], P["W"], P["b"], P["y"], temperature=P["temp"])
    got = _grads(grpo(out.logprobs, out.entropy), P)
    exp = _grads(grpo(want["logprobs"], want["entropy"]), P)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_only_the_weight_needs_grad_and_no_grad_mode():
    P = make(seed=2)
    h = P["h"].detach()
    out = lt.linear_head(h, P["W"], P["y"], outputs=("logprobs", "entropy"))
    (gW,) = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (P["W"],))
    want = ref(h, P["W"], None, P["y"])
    (eW,) = torch.autograd.grad(want["logprobs"].sum() + want["entropy"].sum(), (P["W"],))
    torch.testing.assert_close(gW, eW, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        out = lt.linear_head(P["h"], P["W"], P["y"], outputs=ALL, teacher_logits=P["tl"])
    assert not out.loss.requires_grad and not out.kl.requires_grad


def test_saves_no_logits_sized_tensor():
    P = make(seed=4, shape=(64,), V=97)
    sizes = []
    inputs = {P["tl"].untyped_storage().data_ptr()}  # the teacher's logits: an input, saved by reference

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lt.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("logprobs", "entropy", "kl"),
                             teacher_logits=P["tl"])
    assert max(sizes) < 64 * 97, sizes
    out.entropy.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision(dtype):
    P = make(seed=6, dtype=dtype)
    out = lt.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=ALL, teacher_logits=P["tl"],
                         divergence="jsd")
    cast = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in P.items()}
    want = ref(cast["h"], cast["W"], cast["b"], P["y"], teacher=("dense", cast["tl"]), divergence="jsd")
    tol = dict(rtol=2 ** -7, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for name in DIFF:
        v = getattr(out, name)
        assert v.dtype == dtype, name
        torch.testing.assert_close(v.double(), want[name], **tol, msg=name)
    assert torch.equal(out.argmax, want["argmax"])
    (out.loss + out.entropy.sum() + out.kl.sum()).backward()
    assert P["h"].grad.dtype == dtype and P["W"].grad.dtype == dtype and torch.isfinite(P["W"].grad.float()).all()


def test_top_level_dispatch_and_loss_alone_is_linear_cross_entropy():
    P = make(seed=8)
    a = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], label_smoothing=0.1)
    b = lt.linear_cross_entropy(P["h"], P["W"], P["y"], linear_bias=P["b"], label_smoothing=0.1)
    torch.testing.assert_close(a.loss, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="arrays from different libraries"):
        logitkit.linear_head(P["h"], P["W"], P["y"], outputs=("kl",), teacher_logits=np.zeros((17, 23)))


# ----------------------------------------------------------------------------------------------
# linear_head_with_grad: values and gradients from one pass, NumPy and torch, against the same
# float64 autograd reference on the materialized logits


WITH_GRAD_OPTIONS = [
    dict(),
    dict(weight=True, label_smoothing=0.2, z_loss=1e-2, temperature=0.8),
    dict(temperature="per-token", reduction="sum", teacher_temperature=1.4),
    dict(reduction="none", z_loss=1e-3),
    dict(num_items_in_batch=41, z_loss=1e-2, temperature="per-token", weight=True),
    dict(softcap=3.0, label_smoothing=0.1),  # not the row kernel's: values first, then the gradients
]


@pytest.mark.parametrize("opts", WITH_GRAD_OPTIONS)
@pytest.mark.parametrize("lib,form,divergence", [("numpy", None, "kl"), ("torch", "head", "kl"),
                                                 ("numpy", "logits", "kl"), ("torch", "logits", "jsd")])
def test_with_grad_values_and_grads(lib, opts, form, divergence):
    import logitkit.linear as L

    P = make(seed=13, shape=(3, 7), ignore=(1, 8, 9))
    o = dict(opts)
    if o.get("weight") is True:
        o["weight"] = torch.rand(23, dtype=torch.float64) + 0.3
    if o.get("temperature") == "per-token":
        o["temperature"] = P["temp"]
    kw, teach = teacher_kw(P, form) if form else ({}, None)
    fields = DIFF if form else ("loss", "logprobs", "entropy", "lse")
    want = ref(P["h"], P["W"], P["b"], P["y"], teacher=teach, divergence=divergence, **o)
    cot = _cotangents(P, fields, seed=17)
    if o.get("reduction") == "none":
        cot["loss"] = torch.randn(P["y"].shape, dtype=torch.float64)
    exp = _grads(_objective(want, cot, fields), P)
    conv = (lambda t: t.detach().numpy() if isinstance(t, torch.Tensor) else t) if lib == "numpy" else \
        (lambda t: t.detach() if isinstance(t, torch.Tensor) else t)
    args = {k: conv(v) for k, v in dict(kw, **o).items()}
    out, dh, dW, db = L.linear_head_with_grad(conv(P["h"]), conv(P["W"]), conv(P["y"]), linear_bias=conv(P["b"]),
                                              outputs=fields + ("argmax",), divergence=divergence, chunk_size=4,
                                              grad_outputs={k: conv(v) for k, v in cot.items()}, **args)
    as_t = lambda a: torch.as_tensor(np.asarray(a)) if lib == "numpy" else a  # noqa: E731
    for name in fields + ("argmax",):
        torch.testing.assert_close(as_t(getattr(out, name)), want[name].detach(), rtol=1e-11, atol=1e-12, msg=name)
    for g, e, n in zip((dh, dW, db), exp, ("hidden", "linear_weight", "linear_bias")):
        torch.testing.assert_close(as_t(g), e, rtol=1e-9, atol=1e-11, msg=n)
    if lib == "torch":
        assert not dh.requires_grad and dh.shape == P["h"].shape


def test_with_grad_loss_alone_matches_linear_cross_entropy_with_grad_and_errors():
    import logitkit.linear as L

    P = make(seed=19)
    h, W, b = (P[k].detach().numpy() for k in ("h", "W", "b"))
    y = P["y"].numpy()
    kw = dict(linear_bias=b, label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    out, dh, dW, db = L.linear_head_with_grad(h, W, y, grad_outputs={"loss": 0.5}, **kw)
    loss, eh, eW, eb = L.linear_cross_entropy_with_grad(h, W, y, grad_output=0.5, **kw)
    for a_, e_ in ((out.loss, loss), (dh, eh), (dW, eW), (db, eb)):
        np.testing.assert_allclose(a_, e_, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="grad_outputs: 'entropy' is not a requested"):
        L.linear_head_with_grad(h, W, y, grad_outputs={"entropy": 1.0})
    with pytest.raises(ValueError, match=r"grad_outputs\['logprobs'\]: expected a scalar or shape"):
        L.linear_head_with_grad(h, W, y, outputs=("logprobs",), grad_outputs={"logprobs": np.ones(3)})
    with pytest.raises(TypeError, match="unexpected keyword"):
        L.linear_head_with_grad(h, W, y, nope=1)


def test_row_kernel_float32_values_and_grads_with_confident_rows(monkeypatch):
    # The numba row pass (float32, no softcap, dense-teacher kl) is what runs here; its values and
    # gradients against float64, with rows whose label has probability 1 - 1e-13.
    import logitkit.kernels.cpu.head as kh
    import logitkit.linear as L

    calls = []
    real = kh.head_rows
    monkeypatch.setattr(kh, "head_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(23)
    N, V = 48, 701
    h = torch.eye(N, dtype=torch.float32)
    W = torch.randn(V, N, generator=g) * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = 5
    W[5, ::4] = 35.0
    tl = torch.randn(N, V, generator=g) * 3
    temp = torch.rand(N, generator=g, dtype=torch.float64) * 1.2 + 0.5
    P = dict(h=h.double().requires_grad_(), W=W.double().requires_grad_())
    fields = ("loss", "logprobs", "entropy", "lse", "kl")
    cot = _cotangents(dict(P, y=y), fields, seed=29)
    for T in (1.0, temp.float().double()):
        want = ref(P["h"], P["W"], None, y, teacher=("dense", tl.double()), temperature=T)
        exp = torch.autograd.grad(_objective(want, cot, fields), (P["h"], P["W"]))
        Tf = T if isinstance(T, float) else T.float()
        out, dh, dW, _ = L.linear_head_with_grad(h, W, y, outputs=fields, teacher_logits=tl, temperature=Tf,
                                                 grad_outputs={k: v.float() for k, v in cot.items()}, chunk_size=10)
        lse = want["lse"].detach()
        # log p_y = -log1p(Σ_{c≠y} exp(z_c - z_y)): no cancellation (float64 log_softmax loses the
        # digits of the confident rows' ~1e-12 here)
        z = (W.double().T / (T if isinstance(T, float) else Tf.double()[:, None]))
        d = (z - z.gather(-1, y[:, None])).scatter(-1, y[:, None], -math.inf)
        lp = -torch.log1p(d.exp().sum(-1))
        assert ((out.lse.double() - lse).abs() / lse.abs()).max() <= 2.0 ** -21
        assert ((out.logprobs.double() - lp).abs() / lp.abs()).max() <= 2.0 ** -21
        # 1e-6 absolute, relative above 1 (the confident rows' KL ~30 has a float32 ulp of 2e-6)
        for name in ("entropy", "kl"):
            e = want[name].detach()
            assert ((getattr(out, name).double() - e).abs() / e.abs().clamp_min(1.0)).max() <= 1e-6, name
        for got, e in zip((dh, dW), exp):
            assert ((got.double() - e).abs().max() / e.abs().max()) <= 1e-6
        if isinstance(T, float):
            assert (lp[::4].abs() < 1e-11).all() and (lp[::4].abs() > 1e-16).all()  # the confident rows
    assert calls
