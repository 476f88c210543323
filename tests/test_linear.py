"""Fused linear + cross-entropy on NumPy against the unfused float64 reference.

Reference: ``cross_entropy64(hidden @ W.T + b, ...)`` and its gradient chained through the
product (``dh = dz @ W``, ``dW = dz.T @ h``, ``db = Σ dz``), all in float64 NumPy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import logitkit
from logitkit import reference as R
from logitkit.core import linear_cross_entropy as core
from logitkit.linear import (linear_cross_entropy, linear_cross_entropy_with_grad, linear_entropy,
                             linear_token_logprobs)

OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.15),
    dict(z_loss=1e-2),
    dict(softcap=4.0),
    dict(temperature=0.7),
    dict(weight=True),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, temperature=1.3),
    dict(label_smoothing=1.0, z_loss=1e-3),
]
# whole rows (auto, a token count that does not divide N) and vocabulary tiles (odd sizes)
CHUNKS = [None, 5, (7, 10), (4, 53)]


def _problem(rng, N=37, H=11, V=53, ignore=(3, 10, 11), dtype=np.float64, bias=True):
    h = rng.standard_normal((N, H))
    W = rng.standard_normal((V, H)) * 0.7
    b = rng.standard_normal(V) if bias else None
    y = rng.integers(0, V, N)
    y[list(i for i in ignore if i < N)] = -100
    return h.astype(dtype), W.astype(dtype), None if b is None else b.astype(dtype), y


def _resolve(opts, rng, V):
    o = dict(opts)
    if o.get("weight") is True:
        o["weight"] = rng.random(V) + 0.25
    return o


def _reference(h, W, b, y, reduction, grad_output=None, **o):
    h, W = h.astype(np.float64), W.astype(np.float64)
    z = h @ W.T + (0.0 if b is None else b.astype(np.float64))
    loss = R.cross_entropy64(z, y, reduction=reduction, **o)
    dz = R.cross_entropy_grad64(z, y, reduction=reduction, **o)
    if grad_output is not None:
        g = np.asarray(grad_output, np.float64)
        dz = dz * (g[..., None] if g.ndim else g)
    return loss, dz @ W, dz.T @ h, dz.sum(0)


def _close(got, want, rtol, atol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS)
def test_every_option_float64(kernels, rng, opts, reduction, chunk):
    h, W, b, y = _problem(rng)
    o = _resolve(opts, rng, W.shape[0])
    want = _reference(h, W, b, y, reduction, **o)
    loss = linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction, chunk_size=chunk, **o)
    _close(loss, want[0], 1e-12, 1e-12, "loss")
    got = linear_cross_entropy_with_grad(h, W, y, linear_bias=b, reduction=reduction, chunk_size=chunk, **o)
    for g, w, name in zip(got, want, ("loss", "dhidden", "dweight", "dbias")):
        _close(g, w, 1e-10, 1e-12, name)


@pytest.mark.parametrize("chunk", [None, 3, (5, 6)])
def test_no_bias_and_batch_dims(rng, chunk):
    h, W, _, y = _problem(rng, N=24, bias=False)
    h3, y3 = h.reshape(2, 3, 4, -1), y.reshape(2, 3, 4)
    want = _reference(h, W, None, y, "none", label_smoothing=0.05)
    loss, dh, dW, db = linear_cross_entropy_with_grad(h3, W, y3, reduction="none", label_smoothing=0.05,
                                                      chunk_size=chunk)
    assert db is None and loss.shape == (2, 3, 4) and dh.shape == h3.shape
    _close(loss.reshape(-1), want[0], 1e-12, 1e-12, "loss")
    _close(dh.reshape(24, -1), want[1], 1e-10, 1e-12, "dhidden")
    _close(dW, want[2], 1e-10, 1e-12, "dweight")


@pytest.mark.parametrize("chunk", [None, 4, (4, 7)])
def test_per_token_grad_output_with_ignored_rows(rng, chunk):
    """reduction='none' with a per-token grad_output: the gradient is Σ_i g_i ∇loss_i, ignored
    rows contribute nothing, and the loss keeps its per-token shape (Liger's bugs)."""
    h, W, b, y = _problem(rng, N=19, ignore=(0, 5, 6, 18))
    g = rng.standard_normal(19)
    o = dict(z_loss=1e-3, weight=rng.random(53) + 0.5, label_smoothing=0.1)
    want = _reference(h, W, b, y, "none", grad_output=g, **o)
    got = linear_cross_entropy_with_grad(h, W, y, linear_bias=b, reduction="none", grad_output=g,
                                         chunk_size=chunk, **o)
    assert got[0].shape == (19,)
    assert np.all(got[0][[0, 5, 6, 18]] == 0) and np.all(got[1][[0, 5, 6, 18]] == 0)
    for val, exp, name in zip(got, want, ("loss", "dhidden", "dweight", "dbias")):
        _close(val, exp, 1e-10, 1e-12, name)
    assert np.abs(got[2]).max() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, (3, 7)])
def test_all_rows_ignored(rng, reduction, chunk):
    h, W, b, y = _problem(rng, N=9)
    y[:] = -100
    loss, dh, dW, db = linear_cross_entropy_with_grad(h, W, y, linear_bias=b, reduction=reduction, chunk_size=chunk,
                                                      z_loss=0.1)
    assert np.all(loss == 0) and np.all(dh == 0) and np.all(dW == 0) and np.all(db == 0)
    assert np.all(np.isfinite(loss))


def test_empty_batch(rng):
    h, W, b, _ = _problem(rng, N=1)
    loss, dh, dW, db = linear_cross_entropy_with_grad(h[:0], W, np.zeros(0, np.int64), linear_bias=b)
    assert float(loss) == 0.0 and dh.shape == (0, 11) and not dW.any() and not db.any()


@pytest.mark.parametrize("chunk", [None, 6, (6, 9)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32(kernels, rng, chunk, reduction):
    h, W, b, y = _problem(rng, N=41, H=16, V=67, dtype=np.float32)
    o = dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0)
    want = _reference(h, W, b, y, reduction, **o)
    got = linear_cross_entropy_with_grad(h, W, y, linear_bias=b, reduction=reduction, chunk_size=chunk, **o)
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32 and got[2].dtype == np.float32
    for g, w, name in zip(got, want, ("loss", "dhidden", "dweight", "dbias")):
        _close(g, w, 2e-5, 2e-6, name)


@pytest.mark.parametrize("chunk", [None, (8, 16)])
def test_bfloat16(rng, chunk):
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    h, W, b, y = _problem(rng, N=33, H=16, V=40)
    h, W, b = h.astype(bf16), W.astype(bf16), b.astype(bf16)
    # the reference sees exactly the rounded inputs
    want = _reference(h.astype(np.float64), W.astype(np.float64), b.astype(np.float64), y, "mean",
                      label_smoothing=0.1)
    loss, dh, dW, db = linear_cross_entropy_with_grad(h, W, y, linear_bias=b, label_smoothing=0.1, chunk_size=chunk)
    assert loss.dtype == bf16 and dh.dtype == bf16 and dW.dtype == bf16 and db.dtype == bf16
    for g, w, name in zip((loss, dh, dW, db), want, ("loss", "dhidden", "dweight", "dbias")):
        scale = np.abs(w).max() + 1e-30
        assert np.abs(np.asarray(g, np.float64) - w).max() <= 2 ** -7 * scale * 2, name


def test_confident_rows_across_tiles():
    """Exact logits (one-hot hidden rows pick a column of W): a confident row's ~1e-13 loss keeps
    float32 relative accuracy 2^-21 with whole rows and with the maximum in another tile."""
    V = 48
    rng = np.random.default_rng(5)
    W = np.zeros((V, 4), np.float32)
    W[:, 0] = rng.integers(-8, 8, V)           # an ordinary row
    W[:, 1] = 0.0
    W[17, 1] = 32.0                            # confident: loss ~ 47 e^-32 ~ 6e-13
    W[:, 2] = 1.0e4                            # large common offset
    W[40, 2] = 1.0e4 + 3.0
    W[:, 3] = 0.0
    W[5, 3] = W[29, 3] = 30.0                  # tie for the max in two tiles
    h = np.eye(4, dtype=np.float32)
    y = np.array([3, 17, 40, 29])
    z = (h @ W.T).astype(np.float64)
    exact = np.array([R.row_loss_mp(z[i], y[i]) for i in range(4)])
    for chunk in (None, (4, 16), (4, 7), (1, 1)):
        loss = linear_cross_entropy(h, W, y, reduction="none", chunk_size=chunk)
        rel = np.abs(loss.astype(np.float64) - exact) / exact
        assert rel.max() <= 2.0 ** -21, (chunk, rel)


def test_token_logprobs_and_entropy(rng):
    h, W, b, y = _problem(rng, N=23, V=31)
    z = h @ W.T + b
    logp = R.log_softmax64(z)
    want = np.where(y != -100, np.take_along_axis(logp, np.where(y < 0, 0, y)[:, None], -1)[:, 0], 0.0)
    ent = -(np.exp(logp) * logp).sum(-1)
    for chunk in (None, 4, (4, 6)):
        _close(linear_token_logprobs(h, W, y, linear_bias=b, chunk_size=chunk), want, 1e-12, 1e-13, "logprobs")
        _close(linear_entropy(h, W, linear_bias=b, chunk_size=chunk), ent, 1e-12, 1e-13, "entropy")
    # temperature and softcap apply to the entropy's logits too
    zt = 3.0 * np.tanh(z / 3.0) / 0.5
    lp = R.log_softmax64(zt)
    _close(linear_entropy(h, W, linear_bias=b, softcap=3.0, temperature=0.5, chunk_size=(5, 8)),
           -(np.exp(lp) * lp).sum(-1), 1e-12, 1e-13, "entropy softcap/T")


def test_entropy_confident_row():
    """Entropy of a confident row ~ 32·e^-32·V: every term is ≥ 0, no cancellation."""
    W = np.zeros((64, 1))
    W[9, 0] = 32.0
    h = np.ones((1, 1))
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        e = [mpmath.exp(mpmath.mpf(float(v))) for v in W[:, 0]]
        tot = mpmath.fsum(e)
        want = float(-mpmath.fsum(x / tot * mpmath.log(x / tot) for x in e))
    for chunk in (None, (1, 5)):
        got = linear_entropy(h, W, chunk_size=chunk)[0]
        assert abs(got - want) <= 1e-14 * want


def test_public_names():
    for name in ("linear_cross_entropy", "linear_cross_entropy_with_grad", "linear_token_logprobs",
                 "linear_entropy"):
        if hasattr(logitkit, name):
            assert getattr(logitkit, name) is globals()[name]


def test_plan_respects_workspace():
    plan = core.plan_chunks(4096, 32000, bytes_per_logit=4)
    assert plan.full_rows and plan.rows * 32000 * 4 <= core.DEFAULT_WORKSPACE and plan.rows >= 64
    wide = core.plan_chunks(4096, 1 << 20, bytes_per_logit=4)
    assert not wide.full_rows and wide.rows * wide.cols * 4 <= core.DEFAULT_WORKSPACE
    small = core.plan_chunks(10, 7, bytes_per_logit=4)
    assert small == core.Plan(10, 7, True)
    assert core.plan_chunks(100, 50, bytes_per_logit=4, chunk_size=(8, 60)) == core.Plan(8, 50, True)
    assert core.choose_strategy("mean", plan, False) == "fused"
    assert core.choose_strategy("none", plan, False) == "recompute"
    assert core.choose_strategy("none", plan, True) == "fused"
    assert core.choose_strategy("sum", wide, False) == "recompute"


def test_chunks_skip_ignored_rows():
    y = np.array([-100, 1, 2, -100, -100, 3, 4, 5, -100])
    h = np.zeros((9, 2))
    W = np.zeros((6, 2))
    head = core.Head(core.NumpyOps(h, W, None), h, W, y, None,
                     dict(weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                          temperature=1.0), chunk_size=2)
    rows = [np.arange(9)[s] for s, _ in head.chunks]
    assert sum(len(r) for r in rows) == 5
    assert set(np.concatenate(rows).tolist()) == {1, 2, 5, 6, 7}


def test_workspace_never_holds_all_logits(monkeypatch, rng):
    """Every array allocated by the driver is smaller than N×V (checked through its ops object)."""
    h, W, b, y = _problem(rng, N=64, H=8, V=96)
    sizes = []
    orig_empty, orig_zeros = core.NumpyOps.empty, core.NumpyOps.zeros

    def empty(self, shape, dtype):
        sizes.append(int(np.prod(shape)))
        return orig_empty(self, shape, dtype)

    def zeros(self, shape, dtype):
        sizes.append(int(np.prod(shape)))
        return orig_zeros(self, shape, dtype)

    monkeypatch.setattr(core.NumpyOps, "empty", empty)
    monkeypatch.setattr(core.NumpyOps, "zeros", zeros)
    monkeypatch.setattr(core, "DEFAULT_WORKSPACE", 16 * 96 * 8)
    head = core.Head(core.NumpyOps(h, W, b), h, W, y, b,
                     dict(weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                          temperature=1.0), workspace=16 * 96 * 8)
    g_ce, g_z = head.scales("mean")
    head.forward(g_ce, g_z, (True, True, True))
    assert head.plan.rows == 16
    assert max(sizes) <= max(16 * 96, 96 * 8, 64 * 8)  # a chunk, the weight's gradient, hidden's


@pytest.mark.parametrize("bad, exc, match", [
    (dict(labels=np.array([0, 53, 1])), ValueError, "labels: class index 53 at position 1"),
    (dict(labels=np.array([0.0, 1.0, 2.0])), TypeError, "labels: expected integer"),
    (dict(labels=np.array([0, 1])), ValueError, "labels: expected shape"),
    (dict(hidden=np.zeros((3, 10))), ValueError, "linear_weight: expected shape"),
    (dict(linear_weight=np.zeros((53, 11), np.float32)), TypeError, "linear_weight: expected hidden's dtype"),
    (dict(linear_weight=np.zeros(53)), ValueError, "linear_weight: expected a 2-D"),
    (dict(hidden=np.zeros((3, 11), np.int64)), TypeError, "hidden: expected a floating dtype"),
    (dict(linear_bias=np.zeros(52)), ValueError, "linear_bias: expected shape"),
    (dict(weight=np.ones(52)), ValueError, "weight: expected shape"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=(4, 0)), ValueError, "chunk_size"),
    (dict(ignore_index=1.0), TypeError, "ignore_index"),
])
def test_errors(bad, exc, match):
    args = dict(hidden=np.zeros((3, 11)), linear_weight=np.zeros((53, 11)), labels=np.array([0, 1, 2]))
    kw = {}
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(exc, match=match):
        linear_cross_entropy(args["hidden"], args["linear_weight"], args["labels"], **kw)


def test_grad_output_errors(rng):
    h, W, b, y = _problem(rng, N=5)
    with pytest.raises(ValueError, match="grad_output"):
        linear_cross_entropy_with_grad(h, W, y, grad_output=np.ones(5))
    with pytest.raises(ValueError, match="grad_output"):
        linear_cross_entropy_with_grad(h, W, y, reduction="none", grad_output=np.ones(4))


@pytest.mark.parametrize("opts", [dict(label_smoothing=0.2, weight=True), dict(z_loss=0.01, softcap=3.0)])
def test_tiles_equal_whole_rows_exhaustively(rng, opts):
    """Every (tokens, classes) split of a small problem gives the same loss and gradients."""
    h, W, b, y = _problem(rng, N=7, H=3, V=9, ignore=(2,))
    o = _resolve(opts, rng, 9)
    want = _reference(h, W, b, y, "sum", **o)
    for rows, cols in itertools.product((1, 2, 7), (1, 2, 4, 8, 9)):
        got = linear_cross_entropy_with_grad(h, W, y, linear_bias=b, reduction="sum", chunk_size=(rows, cols), **o)
        for g, w, name in zip(got, want, ("loss", "dhidden", "dweight", "dbias")):
            _close(g, w, 1e-11, 1e-12, f"{name} rows={rows} cols={cols}")
