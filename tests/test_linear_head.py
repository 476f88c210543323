"""logitkit.linear_head on NumPy against a float64 reference that materializes the logits.

Reference (:func:`ref_head`): ``x = h @ W.T + b`` in float64, softcap and temperature applied,
``scipy.special.log_softmax`` and the documented formulas written out on the full ``(N, V)``
array; the loss from :func:`logitkit.reference.cross_entropy64`. The torch and JAX test files
import these references and add the gradients (against autograd through the same materialized
computation, and finite differences).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import special

import logitkit
from logitkit import reference as R
from logitkit.core import linear_head as core_head

ALL = ("loss", "logprobs", "entropy", "lse", "argmax", "kl")


# ----------------------------------------------------------------------------------------------
# float64 references on the materialized logits


def _transform(x, softcap, temperature):
    z = x if softcap is None else softcap * np.tanh(x / softcap)
    t = np.asarray(temperature, np.float64)
    return z / (t[..., None] if t.ndim else t)


def _plogq(p, d):
    with np.errstate(all="ignore"):
        return np.where(p > 0, p * d, 0.0).sum(-1)


def ref_divergence(ls, lt, divergence, beta):
    """Per-row divergence between teacher log-probs ``lt`` and student log-probs ``ls`` (full rows)."""
    p, q = np.exp(ls), np.exp(lt)
    if divergence == "jsd" and beta == 0.0:
        divergence = "kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "kl":
        return _plogq(q, lt - ls)
    if divergence == "reverse_kl":
        return _plogq(p, ls - lt)
    lm = np.logaddexp(lt + np.log(beta), ls + np.log(1 - beta))
    return beta * _plogq(q, lt - lm) + (1 - beta) * _plogq(p, ls - lm)


def ref_topk(ls, idx, lpk, divergence, beta, teacher_temperature):
    """The documented top-k formula: teacher renormalized on its k classes, student on k + 1 bins."""
    lq = special.log_softmax(lpk / teacher_temperature, -1)
    q = np.exp(lq)
    lsk = np.take_along_axis(ls, idx, -1)
    if divergence == "kl" or (divergence == "jsd" and beta == 0.0):
        return _plogq(q, lq - lsk)
    s = np.exp(lsk)
    rest = np.clip(1.0 - s.sum(-1), 0.0, None)
    m = beta * q + (1 - beta) * s
    m_rest = (1 - beta) * rest
    with np.errstate(all="ignore"):
        kl_t = _plogq(q, lq - np.log(m))
        kl_s = _plogq(s, lsk - np.log(m)) + np.where(rest > 0, rest * (np.log(rest) - np.log(m_rest)), 0.0)
    return beta * kl_t + (1 - beta) * kl_s


def ref_head(h, W, b, y, *, temperature=1.0, softcap=None, weight=None, ignore_index=-100, label_smoothing=0.0,
             reduction="mean", z_loss=0.0, num_items_in_batch=None, teacher_hidden=None, teacher_weight=None,
             teacher_bias=None, teacher_logits=None, teacher_topk=None, divergence="kl", beta=0.5,
             teacher_temperature=1.0):
    """Every field of :class:`logitkit.HeadOutput` in float64 from the full logits (ignored rows 0)."""
    f = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    h, W, b, weight = f(h), f(W), f(b), f(weight)
    x = h @ W.T + (0.0 if b is None else b)
    z = _transform(x, softcap, temperature)
    ls = special.log_softmax(z, -1)
    p = np.exp(ls)
    valid = np.ones(z.shape[:-1], bool) if y is None else y != ignore_index
    safe = None if y is None else np.where(valid, y, 0)
    out = {}
    lse = special.logsumexp(z, -1)
    if y is not None:
        V = z.shape[-1]
        ce = R.cross_entropy64(z.reshape(-1, V), y.reshape(-1), weight=weight, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="none").reshape(y.shape)
        zt = np.where(valid, z_loss * lse ** 2, 0.0)
        if reduction == "none":
            out["loss"] = ce + zt
        elif reduction == "sum":
            out["loss"] = ce.sum() + zt.sum()
        elif num_items_in_batch is not None:
            out["loss"] = (ce.sum() + zt.sum()) / float(num_items_in_batch)
        else:
            out["loss"] = R.cross_entropy64(z.reshape(-1, V), y.reshape(-1), weight=weight, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, reduction="mean", z_loss=z_loss)
        out["logprobs"] = np.where(valid, np.take_along_axis(ls, safe[..., None], -1)[..., 0], 0.0)
    with np.errstate(all="ignore"):
        out["entropy"] = np.where(valid, -np.where(p > 0, p * ls, 0.0).sum(-1), 0.0)
    out["lse"] = np.where(valid, lse, 0.0)
    out["argmax"] = np.where(valid, x.argmax(-1), 0)
    tz = None
    if teacher_hidden is not None:
        tz = f(teacher_hidden) @ f(teacher_weight).T + (0.0 if teacher_bias is None else f(teacher_bias))
    elif teacher_logits is not None:
        tz = f(teacher_logits)
    if tz is not None:
        lt = special.log_softmax(tz / teacher_temperature, -1)
        out["kl"] = np.where(valid, ref_divergence(ls, lt, divergence, beta), 0.0)
    elif teacher_topk is not None:
        idx, lpk = teacher_topk
        out["kl"] = np.where(valid, ref_topk(ls, np.asarray(idx), f(lpk), divergence, beta, teacher_temperature),
                             0.0)
    return out


def problem(rng, shape=(23,), H=6, V=29, ignore=(3, 10, 11), dtype=np.float64, Ht=5, k=4, bias=True):
    """Student head, labels with ignored rows, and the three teacher forms (aligned rows)."""
    h = rng.standard_normal(shape + (H,))
    W = rng.standard_normal((V, H)) * 0.8
    b = rng.standard_normal(V) * 0.5 if bias else None
    y = rng.integers(0, V, shape)
    y.reshape(-1)[[i for i in ignore if i < y.size]] = -100
    th = rng.standard_normal(shape + (Ht,))
    tW = rng.standard_normal((V, Ht))
    tb = rng.standard_normal(V) * 0.3
    tl = rng.standard_normal(shape + (V,)) * 1.5
    idx = np.argsort(-tl, axis=-1)[..., :k]
    lpk = np.take_along_axis(special.log_softmax(tl, -1), idx, -1)
    c = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return dict(h=c(h), W=c(W), b=c(b), y=y, th=c(th), tW=c(tW), tb=c(tb), tl=c(tl), idx=idx, lpk=c(lpk))


def teacher_kwargs(P, form):
    if form == "head":
        return dict(teacher_hidden=P["th"], teacher_weight=P["tW"], teacher_bias=P["tb"])
    if form == "logits":
        return dict(teacher_logits=P["tl"])
    if form == "topk":
        return dict(teacher_topk=(P["idx"], P["lpk"]))
    return {}


OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.15, z_loss=1e-2),
    dict(softcap=4.0, temperature=0.7),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, temperature=1.3),
    dict(temperature="per-token"),
    dict(temperature="per-token", softcap=3.0, weight=True),
]


def resolve(opts, rng, P):
    o = dict(opts)
    if o.get("weight") is True:
        o["weight"] = rng.random(P["W"].shape[0]) + 0.25
    if isinstance(o.get("temperature"), str):
        o["temperature"] = rng.random(P["y"].shape) * 1.5 + 0.4
    return o


def check_fields(out, want, fields, rtol, atol):
    for name in fields:
        got = getattr(out, name)
        assert got is not None, name
        np.testing.assert_allclose(np.asarray(got, np.float64), want[name], rtol=rtol, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("opts", OPTION_SETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_output_and_option_float64(rng, opts, reduction, chunk):
    P = problem(rng)
    o = resolve(opts, rng, P)
    kw = dict(teacher_logits=P["tl"], divergence="jsd", beta=0.3, teacher_temperature=1.7)
    out = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=ALL, reduction=reduction,
                               chunk_size=chunk, **kw, **o)
    want = ref_head(P["h"], P["W"], P["b"], P["y"], reduction=reduction, **kw, **o)
    check_fields(out, want, ALL, 1e-11, 1e-12)
    assert out.argmax.dtype.kind == "i"


@pytest.mark.parametrize("form", ["head", "logits", "topk"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.25),
                                             ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)])
def test_teacher_forms_and_divergences(rng, form, divergence, beta):
    P = problem(rng)
    kw = dict(teacher_kwargs(P, form), divergence=divergence, beta=beta, teacher_temperature=1.3,
              temperature=0.8)
    if form == "topk" and (divergence == "reverse_kl" or beta == 1.0 and divergence == "jsd"):
        with pytest.raises(ValueError, match="infinite against a top-k teacher"):
            logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("kl",), **kw)
        return
    want = ref_head(P["h"], P["W"], P["b"], P["y"], **kw)
    out = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("kl", "entropy"),
                               chunk_size=4, **kw)
    check_fields(out, want, ("kl", "entropy"), 1e-11, 1e-13)
    assert out.loss is None and out.logprobs is None
    assert (np.asarray(out.kl)[P["y"] != -100] > 0).all()


def test_topk_forward_kl_is_the_dense_kl_of_the_renormalized_teacher(rng):
    # Independent route: a dense teacher whose logits are the top-k log-probabilities and -inf elsewhere.
    P = problem(rng, k=5)
    dense = np.full_like(P["tl"], -np.inf)
    np.put_along_axis(dense, P["idx"], P["lpk"], -1)
    a = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("kl",),
                             teacher_topk=(P["idx"], P["lpk"]), teacher_temperature=0.9)
    b = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("kl",), teacher_logits=dense,
                             teacher_temperature=0.9)
    np.testing.assert_allclose(a.kl, b.kl, rtol=1e-12, atol=1e-14)


def test_topk_with_all_classes_is_the_dense_divergence(rng):
    # k = V: the bucket is empty and the renormalized teacher is the teacher itself.
    P = problem(rng, V=9)
    idx = np.argsort(-P["tl"], -1)
    lpk = np.take_along_axis(special.log_softmax(P["tl"], -1), idx, -1)
    for div, beta in (("kl", 0.5), ("jsd", 0.4)):
        a = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("kl",),
                                 teacher_topk=(idx, lpk), divergence=div, beta=beta)
        b = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=("kl",),
                                 teacher_logits=P["tl"], divergence=div, beta=beta)
        np.testing.assert_allclose(a.kl, b.kl, rtol=1e-9, atol=1e-13)


def test_no_labels_3d_and_batch_dims(rng):
    P = problem(rng, shape=(3, 7), ignore=())
    o = dict(teacher_hidden=P["th"], teacher_weight=P["tW"], teacher_bias=P["tb"], divergence="reverse_kl")
    out = logitkit.linear_head(P["h"], P["W"], None, linear_bias=P["b"], outputs=("entropy", "lse", "argmax", "kl"),
                               chunk_size=4, **o)
    want = ref_head(P["h"], P["W"], P["b"], None, **o)
    check_fields(out, want, ("entropy", "lse", "argmax", "kl"), 1e-11, 1e-13)
    assert out.entropy.shape == (3, 7) and out.argmax.shape == (3, 7)
    P = problem(rng, shape=(2, 5, 3), ignore=(0, 7))
    out = logitkit.linear_head(P["h"], P["W"], P["y"], outputs=ALL, teacher_topk=(P["idx"], P["lpk"]))
    want = ref_head(P["h"], P["W"], None, P["y"], teacher_topk=(P["idx"], P["lpk"]))
    check_fields(out, want, ALL, 1e-11, 1e-13)
    assert out.logprobs.shape == (2, 5, 3) and out.loss.shape == ()


def test_ignored_rows_give_zero_and_all_ignored(rng):
    P = problem(rng, ignore=tuple(range(0, 23, 2)))
    out = logitkit.linear_head(P["h"], P["W"], P["y"], outputs=ALL, teacher_logits=P["tl"], reduction="none")
    ign = P["y"] == -100
    for name in ALL:
        assert (np.asarray(getattr(out, name))[ign] == 0).all(), name
    y = np.full_like(P["y"], -100)
    out = logitkit.linear_head(P["h"], P["W"], y, outputs=ALL, teacher_logits=P["tl"])
    assert float(out.loss) == 0.0 and not np.asarray(out.entropy).any() and not np.asarray(out.kl).any()


def test_num_items_in_batch(rng):
    P = problem(rng)
    for extra in (dict(), dict(temperature=rng.random(23) + 0.5)):
        for outputs in (("loss",), ("loss", "entropy")):
            out = logitkit.linear_head(P["h"], P["W"], P["y"], linear_bias=P["b"], outputs=outputs, z_loss=1e-2,
                                       num_items_in_batch=np.asarray(37), label_smoothing=0.1, **extra)
            want = ref_head(P["h"], P["W"], P["b"], P["y"], z_loss=1e-2, num_items_in_batch=37,
                            label_smoothing=0.1, **extra)
            np.testing.assert_allclose(out.loss, want["loss"], rtol=1e-12)


def test_loss_alone_is_linear_cross_entropy(rng):
    P = problem(rng)
    kw = dict(linear_bias=P["b"], label_smoothing=0.1, z_loss=1e-3, softcap=4.0, temperature=0.9)
    for red in ("mean", "sum", "none"):
        a = logitkit.linear_head(P["h"], P["W"], P["y"], reduction=red, **kw)
        b = logitkit.linear_cross_entropy(P["h"], P["W"], P["y"], reduction=red, **kw)
        np.testing.assert_array_equal(a.loss, b)
        assert a[1:] == (None,) * 5


def test_float32_contract_and_confident_rows(rng):
    # Per-token lse / logprobs to the DESIGN.md contract (relative error <= 2^-21 against mpmath),
    # confident rows (log-probabilities ~1e-13) included; entropy and kl within 1e-6 of float64.
    # One-hot hidden rows make the float32 products exact, so the logits are known exactly.
    N, V = 64, 301
    h = np.eye(N, dtype=np.float32)
    W = (rng.standard_normal((V, N)) * 2).astype(np.float32)
    y = rng.integers(0, V, N)
    y[::3] = 7
    W[7, ::3] = 35.0  # class 7 dominates by ~35 on every third token
    tl = rng.standard_normal((N, V)).astype(np.float32) * 3
    out = logitkit.linear_head(h, W, y, outputs=ALL, teacher_logits=tl, divergence="jsd", chunk_size=9)
    x = W.T.astype(np.float64)
    ls = special.log_softmax(x, -1)
    # mpmath: float64 log_softmax itself loses the ~1e-40 log-probabilities of the confident rows
    lse = np.array([R.row_lse_mp(x[i]) for i in range(N)])
    lp = np.array([-R.row_loss_mp(x[i], int(y[i])) for i in range(N)])
    assert out.logprobs.dtype == np.float32
    rel = lambda got, exp: np.abs(got.astype(np.float64) - exp) / np.maximum(np.abs(exp), 1e-300)  # noqa: E731
    assert rel(out.lse, lse).max() <= 2.0 ** -21
    assert rel(out.logprobs, lp).max() <= 2.0 ** -21
    assert (np.abs(lp[::3]) < 1e-11).all() and (np.abs(lp[::3]) > 1e-16).all()  # the confident rows
    ent = -(np.exp(ls) * ls).sum(-1)
    kl = ref_divergence(ls, special.log_softmax(tl.astype(np.float64), -1), "jsd", 0.5)
    assert np.abs(out.entropy - ent).max() <= 1e-6
    assert np.abs(out.kl - kl).max() <= 1e-6


def test_bfloat16(rng):
    ml = pytest.importorskip("ml_dtypes")
    P = problem(rng)
    bf = lambda a: a.astype(ml.bfloat16)  # noqa: E731
    out = logitkit.linear_head(bf(P["h"]), bf(P["W"]), P["y"], linear_bias=bf(P["b"]), outputs=ALL,
                               teacher_logits=bf(P["tl"]), chunk_size=6)
    f = lambda a: a.astype(ml.bfloat16).astype(np.float64)  # noqa: E731
    want = ref_head(f(P["h"]), f(P["W"]), f(P["b"]), P["y"], teacher_logits=f(P["tl"]))
    for name in ("loss", "logprobs", "entropy", "lse", "kl"):
        got = getattr(out, name)
        assert got.dtype == ml.bfloat16, name
        np.testing.assert_allclose(got.astype(np.float64), want[name], rtol=2 ** -7, atol=2e-2, err_msg=name)


# ----------------------------------------------------------------------------------------------
# memory: the (N, V) logits never exist


def test_peak_memory_is_the_chunk_workspace(rng):
    N, H, V, Ht = 512, 8, 32000, 8
    h = rng.standard_normal((N, H)).astype(np.float32)
    W = rng.standard_normal((V, H)).astype(np.float32)
    th = rng.standard_normal((N, Ht)).astype(np.float32)
    tW = rng.standard_normal((V, Ht)).astype(np.float32)
    y = rng.integers(0, V, N)
    logits_bytes = N * V * 4  # 65.5 MB
    tracemalloc.start()
    try:
        out = logitkit.linear_head(h, W, y, outputs=ALL, teacher_hidden=th, teacher_weight=tW,
                                   divergence="jsd")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isfinite(out.kl).all()
    assert peak <= 32e6 < logits_bytes, peak
    rows = core_head.plan_rows(4096, 32000, 4, "dense")
    assert rows * 32000 * 4 * (core_head.STUDENT_TEMPS + core_head.TEACHER_TEMPS) <= core_head.DEFAULT_WORKSPACE


def test_row_kernel_peak_memory_with_gradients(rng):
    # The numba row pass (every output; a dense teacher with any divergence, here the forward KL): the chunk's
    # logits and the teacher's are the whole workspace, for the values and for the gradients of
    # linear_head_with_grad (allocated here too: 1 MB for dW at H=8).
    import logitkit.linear as L

    N, H, V = 512, 8, 32000
    h = rng.standard_normal((N, H)).astype(np.float32)
    W = rng.standard_normal((V, H)).astype(np.float32)
    th = rng.standard_normal((N, H)).astype(np.float32)
    tW = rng.standard_normal((V, H)).astype(np.float32)
    y = rng.integers(0, V, N)
    outs = ("loss", "logprobs", "entropy", "lse", "argmax", "kl")
    g = {"loss": 1.0, "logprobs": np.ones(N), "entropy": np.ones(N), "kl": np.ones(N)}
    for fn, kw in ((logitkit.linear_head, {}), (L.linear_head_with_grad, {"grad_outputs": g})):
        # compiled first: numba's compiler objects are Python allocations too
        fn(h[:300], W[:900], y[:300] % 900, outputs=outs, teacher_hidden=th[:300], teacher_weight=tW[:900],
           **({"grad_outputs": {k: (v if np.ndim(v) == 0 else v[:300]) for k, v in g.items()}} if kw else {}))
        tracemalloc.start()
        try:
            out = fn(h, W, y, outputs=outs, teacher_hidden=th, teacher_weight=tW, **kw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        grads = 0 if fn is logitkit.linear_head else (N + V) * H * 4  # dhidden, dlinear_weight
        out = out if fn is logitkit.linear_head else out[0]
        assert np.isfinite(out.kl).all()
        assert peak - grads <= 32e6 < N * V * 4, (fn.__name__, peak)
    rows = core_head.plan_rows(4096, V, 4, "dense", workspace=core_head.KERNEL_WORKSPACE, temps=2)
    assert rows * V * 4 * 2 <= core_head.KERNEL_WORKSPACE <= 32e6 and rows >= 100


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kw,exc,match", [
    (dict(outputs="loss"), TypeError, "outputs: expected a tuple"),
    (dict(outputs=("loss", "nope")), ValueError, "outputs: expected distinct names"),
    (dict(outputs=()), ValueError, "outputs: expected distinct names"),
    (dict(outputs=("kl",)), ValueError, "outputs: 'kl' needs a teacher"),
    (dict(outputs=("loss",), teacher_logits="tl"), ValueError, "teacher_logits: a teacher is given but 'kl'"),
    (dict(outputs=("kl",), teacher_logits="tl", teacher_topk="topk"), ValueError, "give one teacher form"),
    (dict(outputs=("kl",), teacher_logits="tl", divergence="js"), ValueError, "divergence: expected one of"),
    (dict(outputs=("kl",), teacher_logits="tl", beta=1.5), ValueError, "beta: expected a value in"),
    (dict(outputs=("kl",), teacher_logits="tl", teacher_temperature=0.0), ValueError, "teacher_temperature"),
    (dict(outputs=("kl",), teacher_logits="tl_bad"), ValueError, "teacher_logits: expected shape"),
    (dict(outputs=("kl",), teacher_topk="topk_dup"), ValueError, "repeats a class"),
    (dict(outputs=("kl",), teacher_topk="topk_range"), ValueError, "out of range"),
    (dict(outputs=("kl",), teacher_hidden="th"), ValueError, "teacher_weight: a teacher head needs"),
    (dict(outputs=("logprobs",), labels=None), ValueError, "labels: outputs"),
    (dict(outputs=("entropy",), temperature="t_bad"), ValueError, "temperature: expected shape"),
    (dict(outputs=("entropy",), temperature="t_neg"), ValueError, "temperature: expected finite values > 0"),
    (dict(outputs=("entropy", "loss"), num_items_in_batch=0), ValueError, "num_items_in_batch: expected a value > 0"),
    (dict(outputs=("entropy",), num_items_in_batch=3), ValueError, "num_items_in_batch: applies to"),
    (dict(outputs=("entropy",), chunk_size=(4, 5)), ValueError, "chunk_size: vocabulary tiles"),
])
def test_errors(rng, kw, exc, match):
    P = problem(rng, V=9, k=3)
    subst = {"tl": P["tl"], "tl_bad": P["tl"][:, :5], "th": P["th"], "topk": (P["idx"], P["lpk"]),
             "topk_dup": (np.zeros_like(P["idx"]), P["lpk"]), "topk_range": (P["idx"] + 9, P["lpk"]),
             "t_bad": np.ones(3), "t_neg": -np.ones(P["y"].shape)}
    kw = {k: subst.get(v, v) if isinstance(v, str) and k != "outputs" and k != "divergence" else v
          for k, v in kw.items()}
    labels = kw.pop("labels", P["y"])
    with pytest.raises(exc, match=match):
        logitkit.linear_head(P["h"], P["W"], labels, **kw)


def test_nan_row_stays_in_its_row_and_masked_classes(rng):
    P = problem(rng, ignore=())
    h = P["h"].copy()
    h[4, 1] = np.nan
    b = P["b"].copy()
    b[[2, 5]] = -np.inf  # classes masked out through the bias: no NaN anywhere
    tl = P["tl"].copy()
    tl[9, 3] = np.nan
    outs = ("loss", "logprobs", "entropy", "lse", "kl")
    for div in ("kl", "reverse_kl", "jsd"):
        out = logitkit.linear_head(h, P["W"], P["y"], linear_bias=b, outputs=outs, teacher_logits=tl,
                                   divergence=div, reduction="none")
        for name in outs:
            v = np.asarray(getattr(out, name))
            assert np.isnan(v[4]), (div, name)
            bad = [4, 9] if name == "kl" else [4]
            if name == "kl" and div == "kl":  # the teacher has mass on classes the student masks
                assert (np.delete(v, bad) == np.inf).all()
            else:
                assert np.isfinite(np.delete(v, bad)).all(), (div, name)
        assert np.isnan(out.kl[9])
    y = P["y"].copy()
    y[y == 2] = 0
    out = logitkit.linear_head(P["h"], P["W"], y, linear_bias=b, outputs=outs, teacher_logits=P["tl"],
                               divergence="reverse_kl", reduction="none")
    with np.errstate(invalid="ignore"):
        want = ref_head(P["h"], P["W"], b, y, teacher_logits=P["tl"], divergence="reverse_kl", reduction="none")
    check_fields(out, want, ("logprobs", "entropy", "lse", "kl"), 1e-11, 1e-12)
    np.testing.assert_allclose(out.loss, -want["logprobs"], rtol=1e-11)  # (the oracle's loss is NaN at -inf)
