"""Hypothesis properties: shift invariance, softmax sums to 1, gradient = softmax − target, masks = slicing.

Examples are bounded (profile "logitkit" in conftest: 40 per property, no deadline) so the file runs
in seconds; ``HYPOTHESIS_PROFILE=thorough`` runs 500.
"""

from __future__ import annotations

import numpy as np
import pytest

hyp = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import logitkit as lk  # noqa: E402
from logitkit import reference as R  # noqa: E402
from logitkit.kernels import registry  # noqa: E402

# NumPy must not warn on masked, empty or non-finite rows: the core discards those values.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@st.composite
def logits(draw, max_rows=5, max_classes=12, lo=-60.0, hi=60.0, min_classes=1):
    """(N, V) float64 logits on a 1/64 grid, so that adding a multiple of 1/64 is exact."""
    n = draw(st.integers(1, max_rows))
    v = draw(st.integers(min_classes, max_classes))
    k = draw(hnp.arrays(np.int64, (n, v), elements=st.integers(int(lo * 64), int(hi * 64))))
    return k / 64.0


@st.composite
def problem(draw):
    """Logits, class labels (some ignored) and a set of cross-entropy options."""
    x = draw(logits())
    n, v = x.shape
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(-1, v - 1)))
    y = np.where(y < 0, -100, y)
    opts = {}
    if draw(st.booleans()):
        opts["weight"] = draw(hnp.arrays(np.float64, (v,), elements=st.floats(0.125, 4.0)))
    opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
    opts["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1]))
    opts["softcap"] = draw(st.sampled_from([None, None, 5.0, 30.0]))
    opts["temperature"] = draw(st.sampled_from([1.0, 1.0, 0.5, 3.0]))
    opts["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    return x, y, opts


# ----------------------------------------------------------------------------------------------
# shift invariance


@given(logits(), st.integers(-64 * 4000, 64 * 4000).map(lambda k: k / 64.0))
def test_shift_invariance(x, c):
    xs = x + c  # exact: both on the 1/64 grid and far below 2^52 / 64
    np.testing.assert_allclose(lk.logsumexp(xs), lk.logsumexp(x) + c, rtol=1e-15, atol=4e-16 * (abs(c) + 60))
    np.testing.assert_allclose(lk.softmax(xs), lk.softmax(x), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(lk.log_softmax(xs), lk.log_softmax(x), rtol=1e-13, atol=1e-13)
    y = np.zeros(x.shape[0], np.int64)
    np.testing.assert_allclose(lk.cross_entropy(xs, y, reduction="none"),
                               lk.cross_entropy(x, y, reduction="none"), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(lk.entropy(xs), lk.entropy(x), rtol=1e-12, atol=1e-300)


@given(logits(max_classes=40), st.integers(-20000, 20000))
def test_shift_invariance_float32(x, c):
    """float32: the 2^-21 loss bound holds on shifted rows too (the shift is exact in float32)."""
    x32 = x.astype(np.float32)
    xs = (x32 + np.float32(c)).astype(np.float32)
    assert np.array_equal(xs.astype(np.float64) - c, x32.astype(np.float64))  # shift was exact
    y = np.zeros(x.shape[0], np.int64)
    exact = np.array([R.row_loss_mp(row, 0, dps=30) for row in x32])
    got = lk.cross_entropy(xs, y, reduction="none").astype(np.float64)
    assert (np.abs(got - exact) <= 2.0 ** -21 * exact + 1e-25).all()  # mpmath's own 1e-30 noise


# ----------------------------------------------------------------------------------------------
# softmax sums to 1


@given(logits(max_classes=30), st.sampled_from([0.25, 1.0, 4.0]))
def test_softmax_rows_sum_to_one(x, temperature):
    for dt, tol in ((np.float64, 1e-14), (np.float32, 4e-7)):
        p = lk.softmax(x.astype(dt), temperature=temperature)
        assert p.dtype == dt and (p >= 0).all() and (p <= 1).all()
        np.testing.assert_allclose(p.astype(np.float64).sum(-1), 1.0, atol=tol * x.shape[1] ** 0.5 + tol)
        lp = lk.log_softmax(x.astype(dt), temperature=temperature)
        assert (lp <= 0).all()
        np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1), 1.0, atol=tol * x.shape[1] + tol)


@given(logits(max_classes=20), st.data())
def test_masked_softmax_rows_sum_to_one_or_zero(x, data):
    mask = data.draw(hnp.arrays(np.bool_, x.shape))
    p = lk.softmax(x, where=mask)
    sums = p.sum(-1)
    full = mask.any(-1)
    np.testing.assert_allclose(sums[full], 1.0, atol=1e-14)
    assert (sums[~full] == 0).all() and (p[~mask] == 0).all()


# ----------------------------------------------------------------------------------------------
# gradient = softmax − target


def _expected_grad(x, y, weight, label_smoothing, z_loss, softcap, temperature, reduction):
    """Gradient assembled from logitkit.softmax / logsumexp (themselves checked against float64)."""
    n, v = x.shape
    z = x if softcap is None else softcap * np.tanh(x / softcap)
    z = z / temperature
    p = lk.softmax(z)
    lse = lk.logsumexp(z)[:, None]
    w = np.ones(v) if weight is None else weight
    valid = (y != -100)[:, None]
    lab = np.where(y == -100, 0, y)
    onehot = np.eye(v)[lab]
    wy = w[lab][:, None] * valid
    eps = label_smoothing
    dz = (1 - eps) * wy * (p - onehot) + eps / v * (w.sum() * p - w) * valid
    dzz = 2 * z_loss * lse * p * valid
    if reduction == "mean":
        dz = dz / wy.sum() if wy.sum() > 0 else 0 * dz
        dzz = dzz / valid.sum() if valid.sum() > 0 else 0 * dzz
    g = (dz + dzz) / temperature
    if softcap is not None:
        g = g / np.cosh(x / softcap) ** 2
    return g


def _unit(x, opts):
    """Size w·(1 + 2ζ|lse|)/T of the terms that cancel to 0 in some entries (V = 1, smoothing)."""
    wmax = 1.0 if opts.get("weight") is None else float(opts["weight"].max())
    return wmax * (1 + 2 * opts["z_loss"] * (np.abs(x).max() + np.log(x.shape[1]))) / opts["temperature"]


@given(problem())
def test_gradient_is_softmax_minus_target(prob):
    x, y, opts = prob
    for kernels in ("registry", "core"):
        if kernels == "core":
            with registry.use_core():
                loss, g = lk.cross_entropy_with_grad(x, y, **opts)
        else:
            loss, g = lk.cross_entropy_with_grad(x, y, **opts)
        want = _expected_grad(x, y, opts.get("weight"), opts["label_smoothing"], opts["z_loss"],
                              opts["softcap"], opts["temperature"], opts["reduction"])
        np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-14 * _unit(x, opts))
        np.testing.assert_allclose(loss, lk.cross_entropy(x, y, **opts), rtol=1e-12, atol=1e-300)
        assert not g[y == -100].any()  # ignored rows: exactly zero


@given(logits(max_classes=10), st.data())
def test_probability_label_gradient(x, data):
    """Probability labels: gradient p·Σy − y (p − y when the labels sum to 1)."""
    y = data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0.0, 2.0)))
    _, g = lk.cross_entropy_with_grad(x, y, reduction="sum")
    p = lk.softmax(x)
    want = p * y.sum(-1, keepdims=True) - y
    np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-14 * (1 + np.abs(y).max()))
    yn = y + 1e-3
    yn = yn / yn.sum(-1, keepdims=True)
    _, gn = lk.cross_entropy_with_grad(x, yn, reduction="sum")
    np.testing.assert_allclose(gn, p - yn, rtol=1e-9, atol=1e-14)


@given(problem())
def test_reductions_agree(prob):
    x, y, opts = prob
    opts = dict(opts)
    opts.pop("reduction")
    none = lk.cross_entropy(x, y, reduction="none", **opts)
    total = lk.cross_entropy(x, y, reduction="sum", **opts)
    np.testing.assert_allclose(total, none.sum(), rtol=1e-12, atol=1e-300)
    assert not none[y == -100].any()
    np.testing.assert_allclose(none, R.cross_entropy64(x, y, reduction="none", **opts), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(lk.cross_entropy(x, y, reduction="mean", **opts),
                               R.cross_entropy64(x, y, reduction="mean", **opts), rtol=1e-11, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# masks are equivalent to slicing


@given(logits(max_rows=4, max_classes=15), st.data())
def test_mask_equals_slicing(x, data):
    mask = data.draw(hnp.arrays(np.bool_, x.shape))
    sm = lk.softmax(x, where=mask)
    lsm = lk.log_softmax(x, where=mask)
    lse = lk.logsumexp(x, where=mask)
    lse_k = lk.logsumexp(x, where=mask, keepdims=True)
    for i in range(x.shape[0]):
        kept = x[i][mask[i]]
        np.testing.assert_allclose(sm[i][mask[i]], lk.softmax(kept) if kept.size else kept, rtol=1e-14)
        np.testing.assert_allclose(lsm[i][mask[i]], lk.log_softmax(kept) if kept.size else kept, rtol=1e-14)
        assert (lsm[i][~mask[i]] == -np.inf).all()
        want = lk.logsumexp(kept) if kept.size else -np.inf
        np.testing.assert_allclose(lse[i], want, rtol=1e-15)
        assert lse_k[i, 0] == lse[i]


@given(logits(max_rows=4, max_classes=15), st.data())
def test_minus_inf_equals_mask(x, data):
    """A -inf logit and a masked entry are the same thing."""
    mask = data.draw(hnp.arrays(np.bool_, x.shape))
    xm = np.where(mask, x, -np.inf)
    # Unmasked calls may take a fused kernel, masked ones the core: equal to the last bits.
    np.testing.assert_allclose(lk.softmax(xm), lk.softmax(x, where=mask), rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(lk.log_softmax(xm), lk.log_softmax(x, where=mask), rtol=1e-15)
    np.testing.assert_allclose(lk.logsumexp(xm), lk.logsumexp(x, where=mask), rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# fused kernels = core


@given(problem(), st.sampled_from([np.float32, np.float64]))
def test_kernels_match_core(prob, dtype):
    x, y, opts = prob
    x = x.astype(dtype)
    if opts.get("weight") is not None:
        opts = dict(opts, weight=opts["weight"].astype(dtype))
    loss_k, g_k = lk.cross_entropy_with_grad(x, y, **opts)
    sm_k = lk.softmax(x)
    with registry.use_core():
        loss_c, g_c = lk.cross_entropy_with_grad(x, y, **opts)
        sm_c = lk.softmax(x)
    rtol = 1e-12 if dtype == np.float64 else 4e-6
    np.testing.assert_allclose(loss_k, loss_c, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(g_k, g_c, rtol=rtol * 8, atol=rtol * 1e-2 * _unit(x, opts))
    np.testing.assert_allclose(sm_k, sm_c, rtol=rtol * 8, atol=1e-30)
