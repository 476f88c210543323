"""logitkit.jax.linear_head: values against the float64 NumPy reference of tests/test_linear_head.py,
gradients of every output against ``jax.grad`` through the materialized logits (``jax.nn.log_softmax``),
under ``jit``, ``vmap`` and with traced labels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import logitkit  # noqa: E402
import logitkit.jax as lj  # noqa: E402
from test_linear_head import ALL, problem, ref_head, teacher_kwargs  # noqa: E402

DIFF = ("loss", "logprobs", "entropy", "lse", "kl")


def jref(h, W, b, y, *, temperature=1.0, softcap=None, label_smoothing=0.0, z_loss=0.0, teacher=None,
         divergence="kl", beta=0.5, teacher_temperature=1.0, ignore_index=-100):
    """Differentiable materialized reference (mean reduction, no class weights)."""
    x = h @ W.T + b
    V = x.shape[-1]
    z = x if softcap is None else softcap * jnp.tanh(x / softcap)
    t = jnp.asarray(temperature)
    z = z / (t[..., None] if t.ndim else t)
    ls = jax.nn.log_softmax(z, -1)
    p = jnp.exp(ls)
    lse = jax.nn.logsumexp(z, -1)
    valid = y != ignore_index
    safe = jnp.where(valid, y, 0)
    nll = -jnp.take_along_axis(ls, safe[..., None], -1)[..., 0]
    ce = (1 - label_smoothing) * nll + label_smoothing / V * (-ls).sum(-1)
    vf = valid.astype(z.dtype)
    out = {"loss": (ce * vf).sum() / vf.sum() + z_loss * (lse ** 2 * vf).sum() / vf.sum(),
           "logprobs": -nll * vf, "entropy": -(p * ls).sum(-1) * vf, "lse": lse * vf}
    if teacher is not None:
        if teacher[0] == "dense":
            lt = jax.nn.log_softmax(teacher[1] / teacher_temperature, -1)
            q = jnp.exp(lt)
            if divergence == "kl":
                kl = (q * (lt - ls)).sum(-1)
            elif divergence == "reverse_kl":
                kl = (p * (ls - lt)).sum(-1)
            else:
                lm = jnp.log(beta * q + (1 - beta) * p)
                kl = beta * (q * (lt - lm)).sum(-1) + (1 - beta) * (p * (ls - lm)).sum(-1)
        else:
            lq = jax.nn.log_softmax(teacher[2] / teacher_temperature, -1)
            q = jnp.exp(lq)
            lsk = jnp.take_along_axis(ls, teacher[1], -1)
            if divergence == "kl":
                kl = (q * (lq - lsk)).sum(-1)
            else:
                s = jnp.exp(lsk)
                rest = jnp.maximum(1 - s.sum(-1), 0.0)
                lm = jnp.log(beta * q + (1 - beta) * s)
                kl = beta * (q * (lq - lm)).sum(-1) + (1 - beta) * ((s * (lsk - lm)).sum(-1) - rest * math.log1p(-beta))
        out["kl"] = kl * vf
    return out


def _teacher_ref(P, form):
    if form == "head":
        return ("dense", jnp.asarray(P["th"] @ P["tW"].T + P["tb"]))
    if form == "logits":
        return ("dense", jnp.asarray(P["tl"]))
    return ("topk", jnp.asarray(P["idx"]), jnp.asarray(P["lpk"]))


def _j(kw):
    return {k: (tuple(jnp.asarray(a) for a in v) if isinstance(v, tuple) else
                jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


_FULL = dict(temperature="per-token", softcap=3.0, label_smoothing=0.1, z_loss=1e-2, teacher_temperature=1.3)


# (each case compiles its own scans: a few cases that together cover every form and option)
@pytest.mark.parametrize("form,divergence,beta,opts", [("head", "jsd", 0.3, _FULL), ("logits", "reverse_kl", 0.5, {}),
                                                        ("topk", "jsd", 0.6, {}), ("topk", "kl", 0.5, _FULL)])
def test_values_and_grads_float64(x64, rng, form, divergence, beta, opts):
    P = problem(rng, shape=(3, 7), ignore=(2, 5, 6))
    o = dict(opts)
    if o.get("temperature") == "per-token":
        o["temperature"] = rng.random((3, 7)) + 0.5
    kw = dict(teacher_kwargs(P, form), divergence=divergence, beta=beta)
    want = ref_head(P["h"], P["W"], P["b"], P["y"], **kw, **o)
    args = [jnp.asarray(P[k]) for k in ("h", "W", "b")]
    y = jnp.asarray(P["y"])
    jkw, jo = _j(kw), _j(o)
    cot = {n: jnp.asarray(rng.standard_normal(() if n == "loss" else (3, 7))) for n in DIFF}

    @jax.jit
    def run(h, W, b):
        out = lj.linear_head(h, W, y, linear_bias=b, outputs=ALL, chunk_size=4, **jkw, **jo)
        return sum((getattr(out, n) * cot[n]).sum() for n in DIFF), out

    (_, out), grads = jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True)(*args)
    for name in ALL:
        np.testing.assert_allclose(np.asarray(getattr(out, name), np.float64), want[name], rtol=1e-11, atol=1e-12,
                                   err_msg=name)

    def ref_total(h, W, b):
        r = jref(h, W, b, y, teacher=_teacher_ref(P, form), divergence=divergence, beta=beta, **jo)
        return sum((r[n] * cot[n]).sum() for n in DIFF)

    exp = jax.grad(ref_total, argnums=(0, 1, 2))(*args)
    for g, e, n in zip(grads, exp, ("hidden", "linear_weight", "linear_bias")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-9, atol=1e-11, err_msg=n)


@pytest.mark.parametrize("fields", [("logprobs",), ("entropy",), ("lse",), ("kl",), ("loss", "entropy"),
                                    ("logprobs", "entropy", "kl"), DIFF])
def test_combinations_of_outputs_grads(x64, rng, fields):
    P = problem(rng, ignore=(1, 4))
    args = [jnp.asarray(P[k]) for k in ("h", "W", "b")]
    y = jnp.asarray(P["y"])
    tl = jnp.asarray(P["tl"])
    kw = dict(teacher_logits=tl) if "kl" in fields else {}
    cot = {n: jnp.asarray(rng.standard_normal(() if n == "loss" else P["y"].shape)) for n in fields}

    def total(h, W, b):
        out = lj.linear_head(h, W, y, linear_bias=b, outputs=fields, **kw)
        return sum((getattr(out, n) * cot[n]).sum() for n in fields)

    def ref_total(h, W, b):
        r = jref(h, W, b, y, teacher=("dense", tl))
        return sum((r[n] * cot[n]).sum() for n in fields)

    for g, e in zip(jax.grad(total, argnums=(0, 1, 2))(*args), jax.grad(ref_total, argnums=(0, 1, 2))(*args)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-9, atol=1e-11)


def test_float32_no_labels_traced_labels_and_vmap(rng):
    P = problem(rng, ignore=(0, 7))
    h, W = jnp.asarray(P["h"], jnp.float32), jnp.asarray(P["W"], jnp.float32)
    out = lj.linear_head(h, W, None, outputs=("entropy", "lse", "argmax"))
    want = ref_head(P["h"].astype(np.float32), P["W"].astype(np.float32), None, None)
    for name in ("entropy", "lse"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), want[name], rtol=2e-6, atol=1e-6)
    assert out.argmax.dtype == jnp.int32 and (np.asarray(out.argmax) == want["argmax"]).all()

    @jax.jit
    def f(h, y):  # labels traced: the ignored rows are found on the device
        return lj.linear_head(h, W, y, outputs=("loss", "logprobs"), num_items_in_batch=jnp.asarray(30.0))

    got = f(h, jnp.asarray(P["y"]))
    want = ref_head(P["h"].astype(np.float32), P["W"].astype(np.float32), None, P["y"], num_items_in_batch=30)
    np.testing.assert_allclose(np.asarray(got.loss), want["loss"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(got.logprobs), want["logprobs"], rtol=2e-6, atol=1e-6)
    hb = jnp.stack([h, h * 0.5])
    ent = jax.vmap(lambda x: lj.linear_head(x, W, None, outputs=("entropy",)).entropy)(hb)
    np.testing.assert_allclose(np.asarray(ent[1]), np.asarray(lj.linear_entropy(h * 0.5, W)), rtol=1e-6)


def test_bfloat16(rng):
    P = problem(rng)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    out = lj.linear_head(bf(P["h"]), bf(P["W"]), jnp.asarray(P["y"]), linear_bias=bf(P["b"]), outputs=ALL,
                         teacher_logits=bf(P["tl"]))
    f = lambda a: np.asarray(bf(a).astype(jnp.float32), np.float64)  # noqa: E731
    want = ref_head(f(P["h"]), f(P["W"]), f(P["b"]), P["y"], teacher_logits=f(P["tl"]))
    for name in DIFF:
        v = getattr(out, name)
        assert v.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(v.astype(jnp.float32)), want[name], rtol=2 ** -7, atol=3e-2,
                                   err_msg=name)
    g = jax.grad(lambda h: lj.linear_head(h, bf(P["W"]), jnp.asarray(P["y"]), outputs=("loss", "entropy"))
                 .entropy.astype(jnp.float32).sum())(bf(P["h"]))
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())


def test_top_level_dispatch():
    h = jnp.ones((2, 3))
    W = jnp.zeros((4, 3))
    out = logitkit.linear_head(h, W, None, outputs=("entropy",))
    np.testing.assert_allclose(np.asarray(out.entropy), np.log(4.0), rtol=1e-6)
