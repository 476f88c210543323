"""The numerical contract of DESIGN.md, against mpmath (extreme rows) and float64 NumPy.

- float32 per-row loss: relative error ≤ 2^-21 against the exact value, including the confident
  row (loss ≈ 2.2e-13, where PyTorch and optax return 0) and the 1e4-offset row.
- float16 / bfloat16: accumulate in float32, so the result is within an ulp of the exact value.
- -inf is masking and never gives NaN; an ignored fully masked row gives loss 0 and gradient 0.
- NaN or +inf in a row gives NaN for that row only.
- Gradients: softmax − target at the same accuracy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import logitkit as lk
from logitkit import reference as R
from lk_helpers import EPS, LIBS, need, rel_err, to_lib, to_np

# NumPy must not warn on masked, empty or non-finite rows: the core discards those values.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

mpmath = pytest.importorskip("mpmath")

V = 32000
BOUND = 2.0 ** -21


def _case_rows():
    """Rows of the contract, class axis last; labels chosen per row."""
    rng = np.random.default_rng(2024)
    confident = rng.standard_normal(V).astype(np.float32)
    confident[11] = 40.0                                  # the issue's confident row
    offset = (1e4 + rng.standard_normal(V)).astype(np.float32)
    wide = (rng.standard_normal(V) * 30).astype(np.float32)
    unit = rng.standard_normal(V).astype(np.float32)
    tiny_gap = np.zeros(V, np.float32)
    tiny_gap[3] = 1e-3                                    # nearly uniform: loss ≈ log V
    neg = (-5e3 + rng.standard_normal(V) * 3).astype(np.float32)
    x = np.stack([confident, offset, wide, unit, tiny_gap, neg])
    y = np.array([11, int(np.argmax(offset)), 5, 17, 3, int(np.argmin(neg))])
    return x, y


def _grad_mp(row, label):
    """Exact gradient of lse(row) − row[label] (each entry correctly rounded to float64)."""
    with mpmath.workdps(40):
        lse = R.row_lse_mp(row, 40)
        g = np.array([float(mpmath.exp(mpmath.mpf(float(v)) - lse)) for v in row])
        g[label] = float(mpmath.exp(mpmath.mpf(float(row[label])) - lse) - 1)
    return g


def _assert_grad_close(g, want, x):
    """Each entry within 2^-21 relative, plus the rounding of exp's float32 argument
    (|z − m − r|·2^-24 relative) and float32's subnormal range (entries below 2^-126 lose bits)."""
    x64 = x.astype(np.float64)
    # |(z − m) − r|: the size of exp's argument, whose rounding exp turns into relative error.
    arg = np.abs(x64 - x64.max(-1, keepdims=True)) + (R.logsumexp64(x64) - x64.max(-1))[:, None]
    tol = np.abs(want) * (BOUND + 2.0 ** -23 * arg) + 2.0 ** -126
    err = np.abs(np.asarray(g, np.float64) - want)
    bad = ~(err <= tol)
    if bad.any():
        i, j = np.unravel_index(np.argmax(np.where(bad, err / tol, 0)), err.shape)
        raise AssertionError(f"{bad.sum()} gradient entries off; worst at {(i, j)}: got {g[i, j]!r}, "
                             f"exact {want[i, j]!r}, tolerance {tol[i, j]:.3g}")


@pytest.fixture(scope="module")
def cases():
    x, y = _case_rows()
    loss = np.array([R.row_loss_mp(x[i], y[i]) for i in range(len(x))])
    return x, y, loss


def test_oracle_confident_row_is_the_issue_case(cases):
    x, y, loss = cases
    assert 1e-13 < loss[0] < 1e-12  # ≈ 2.2e-13
    assert loss[1] > 1.0


@pytest.mark.parametrize("lib", LIBS)
def test_float32_row_loss_within_2_pow_minus_21(lib, cases, kernels):
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    x, y, exact = cases
    xl, yl = to_lib(lib, x), to_lib(lib, y)
    outs = {
        "cross_entropy": lk.cross_entropy(xl, yl, reduction="none"),
        "with_grad": lk.cross_entropy_with_grad(xl, yl, reduction="none")[0],
        "sparse": lk.sparse_softmax_cross_entropy_with_logits(labels=yl, logits=xl),
        "token_logprobs": -lk.token_logprobs(xl, yl),
    }
    for name, got in outs.items():
        err = rel_err(to_np(got), exact)
        assert err.max() <= BOUND, f"{name}: relative errors {err} exceed 2^-21"
    # The confident row alone, with the mean: still exact, never 0.
    single = float(to_np(lk.cross_entropy(to_lib(lib, x[:1]), to_lib(lib, y[:1]))))
    assert rel_err(single, exact[0]) <= BOUND


def test_float32_dense_labels_confident_row(cases):
    """TF-style probability labels on the confident row keep the same accuracy."""
    x, y, exact = cases
    onehot = np.zeros((2, V), np.float32)
    onehot[0, y[0]] = onehot[1, y[1]] = 1.0
    got = lk.softmax_cross_entropy_with_logits(labels=onehot, logits=x[:2])
    assert rel_err(got, exact[:2]).max() <= BOUND


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float32_gradient_accuracy(lib, cases, kernels):
    """Each gradient entry within 2^-21 relative, plus the rounding of exp's float32 argument."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    x, y, _ = cases
    _, g = lk.cross_entropy_with_grad(to_lib(lib, x), to_lib(lib, y), reduction="none")
    g = to_np(g)
    want = R.cross_entropy_grad64(x, y, reduction="none")
    want[0] = _grad_mp(x[0], y[0])  # float64 itself loses p_y − 1 ≈ −2.2e-13 on this row
    _assert_grad_close(g, want, x)
    assert g[0, y[0]] < 0  # the confident label's gradient is not rounded to 0


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_float32_autograd_gradient_accuracy(lib, cases):
    x, y, _ = cases
    x, y = x[:2], y[:2]
    if lib == "torch":
        tx = to_lib(lib, x, requires_grad=True)
        lk.cross_entropy(tx, to_lib(lib, y), reduction="sum").backward()
        g = to_np(tx.grad)
    else:
        import jax

        g = to_np(jax.grad(lambda a: lk.cross_entropy(a, to_lib(lib, y), reduction="sum"))(to_lib(lib, x)))
    want = np.stack([_grad_mp(x[0], y[0]), R.cross_entropy_grad64(x[1:], y[1:], reduction="sum")[0]])
    _assert_grad_close(g, want, x)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float32_softcap_gradient_accuracy(lib, rng, kernels):
    """The softcap factor sech²(x/c) keeps its relative accuracy where 1 − tanh² would cancel."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    c = 5.0
    x = (rng.uniform(-1, 1, (4, 64)) * 9 * c).astype(np.float32)  # |x/c| up to 9
    y = rng.integers(0, 64, 4)
    _, g = lk.cross_entropy_with_grad(to_lib(lib, x), to_lib(lib, y), softcap=c, reduction="sum")
    g = to_np(g)
    x64 = x.astype(np.float64)
    want = R.cross_entropy_grad64(x64, y, softcap=c, reduction="sum")
    z = c * np.tanh(x64 / c)
    arg = np.abs(z - z.max(-1, keepdims=True)) + (R.logsumexp64(z) - z.max(-1))[:, None]
    # plus exp(−2|x/c|) inside sech², whose argument rounds like 2|x/c|·2^-24
    tol = np.abs(want) * (BOUND + 2.0 ** -23 * (arg + 2 * np.abs(x64 / c))) + 2.0 ** -126
    err = np.abs(g - want)
    assert (err <= tol).all(), f"worst relative error {np.max(err / np.abs(want)):.3g}"


# ----------------------------------------------------------------------------------------------
# -inf: masking, never NaN


def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", RuntimeWarning)
    return ctx


@pytest.mark.parametrize("lib", LIBS)
def test_rows_full_of_minus_inf(lib, rng, kernels):
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    x = (rng.standard_normal((4, 7)) * 2).astype(np.float32)
    x[1] = -np.inf
    x[3] = -np.inf
    y = np.array([2, -100, 4, 0])  # row 1 masked and ignored, row 3 masked but labelled
    ctx = _no_warnings()
    try:
        xl, yl = to_lib(lib, x), to_lib(lib, y)
        loss, g = lk.cross_entropy_with_grad(xl, yl, reduction="none")
        loss, g = to_np(loss), to_np(g)
        assert not np.isnan(loss).any() and not np.isnan(g).any()
        assert loss[1] == 0 and not g[1].any()
        assert loss[3] == np.inf  # the labelled class has probability 0
        np.testing.assert_allclose(loss[[0, 2]], R.cross_entropy64(x[[0, 2]], y[[0, 2]], reduction="none"),
                                   rtol=2e-6)
        # Batch means: the ignored masked row takes no part, with every option on.
        keep = [0, 2]
        opts = dict(label_smoothing=0.1, z_loss=1e-3, weight=np.linspace(0.5, 2, 7).astype(np.float32))
        lo = dict(opts, weight=to_lib(lib, opts["weight"]))
        yk = y.copy()
        yk[3] = -100
        mean, gm = lk.cross_entropy_with_grad(xl, to_lib(lib, yk), **lo)
        np.testing.assert_allclose(to_np(mean), R.cross_entropy64(x[keep], y[keep], **opts), rtol=2e-6)
        gm = to_np(gm)
        assert not np.isnan(gm).any() and not gm[[1, 3]].any()
        np.testing.assert_allclose(gm[keep], R.cross_entropy_grad64(x[keep], y[keep], **opts),
                                   rtol=1e-5, atol=1e-8)
        # The per-row functions agree: zeros / -inf / -inf, no NaN.
        assert not to_np(lk.softmax(xl))[[1, 3]].any()
        assert np.all(to_np(lk.log_softmax(xl))[[1, 3]] == -np.inf)
        assert np.all(to_np(lk.logsumexp(xl))[[1, 3]] == -np.inf)
        assert np.all(to_np(lk.entropy(xl))[[1, 3]] == 0)
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_minus_inf_autograd_is_finite(lib, rng):
    """Autograd through -inf entries and a fully masked ignored row: zeros, not NaN."""
    x = (rng.standard_normal((3, 6)) * 2).astype(np.float32)
    x[0, [1, 4]] = -np.inf
    x[2] = -np.inf
    y = np.array([0, 3, -100])
    fns = {
        "ce": lambda a: lk.cross_entropy(a, to_lib(lib, y), label_smoothing=0.0, z_loss=1e-3),
        "lse": lambda a: lk.logsumexp(a).sum(),
        "log_softmax": lambda a: lk.log_softmax(a)[:2, 0].sum(),
        "softmax": lambda a: lk.softmax(a)[:, 2].sum(),
        "entropy": lambda a: lk.entropy(a).sum(),
        "token_logprobs": lambda a: lk.token_logprobs(a, to_lib(lib, y)).sum(),
    }
    for name, f in fns.items():
        if lib == "torch":
            tx = to_lib(lib, x, requires_grad=True)
            f(tx).backward()
            g = to_np(tx.grad)
        else:
            import jax

            g = to_np(jax.grad(f)(to_lib(lib, x)))
        assert np.isfinite(g).all(), name
        assert not g[np.isneginf(x)].any(), name


@pytest.mark.parametrize("lib", LIBS)
def test_minus_inf_entries_equal_dropping_them(lib, rng):
    x = (rng.standard_normal((5, 9)) * 3).astype(np.float32)
    mask = rng.random((5, 9)) < 0.4
    mask[:, 0] = False
    xm = np.where(mask, -np.inf, x).astype(np.float32)
    y = np.zeros(5, np.int64)
    loss, g = lk.cross_entropy_with_grad(to_lib(lib, xm), to_lib(lib, y), reduction="none")
    loss, g = to_np(loss), to_np(g)
    for i in range(5):
        keep = ~mask[i]
        np.testing.assert_allclose(loss[i], R.cross_entropy64(x[i][keep][None], y[:1], reduction="none")[0],
                                   rtol=2e-6)
        np.testing.assert_allclose(g[i][keep], R.cross_entropy_grad64(x[i][keep][None], y[:1],
                                                                      reduction="none")[0], rtol=1e-5, atol=1e-8)
        assert not g[i][mask[i]].any()


# ----------------------------------------------------------------------------------------------
# NaN / +inf: that row only


@pytest.mark.parametrize("lib", LIBS)
def test_nan_and_plus_inf_poison_only_their_row(lib, rng, kernels):
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    x = (rng.standard_normal((5, 8)) * 2).astype(np.float32)
    x[1, 3] = np.nan
    x[3, 6] = np.inf
    y = np.array([1, 2, 3, 4, 5])
    good = [0, 2, 4]
    ctx = _no_warnings()
    try:
        xl, yl = to_lib(lib, x), to_lib(lib, y)
        for opts in ({}, {"label_smoothing": 0.2, "z_loss": 1e-3}, {"softcap": 5.0}):
            loss, g = lk.cross_entropy_with_grad(xl, yl, reduction="none", **opts)
            loss, g = to_np(loss), to_np(g)
            # softcap maps +inf to the finite cap c (the capped model's logit), so only NaN
            # still poisons its row then.
            poisoned = [1] if "softcap" in opts else [1, 3]
            good = [i for i in range(5) if i not in poisoned]
            assert np.isnan(loss[poisoned]).all() and np.isnan(g[poisoned]).all(), opts
            np.testing.assert_allclose(loss[good], R.cross_entropy64(x[good], y[good], reduction="none",
                                                                     **opts), rtol=2e-6)
            np.testing.assert_allclose(g[good], R.cross_entropy_grad64(x[good], y[good], reduction="none",
                                                                       **opts), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(to_np(lk.cross_entropy(xl, yl, reduction="none", **opts)), loss,
                                       rtol=1e-6)
        good = [0, 2, 4]
        sm = to_np(lk.softmax(xl))
        assert np.isnan(sm[[1, 3]]).all()
        np.testing.assert_allclose(sm[good], R.softmax64(x[good]), rtol=1e-6)
        lse = to_np(lk.logsumexp(xl))
        assert np.isnan(lse[1]) and lse[3] == np.inf  # +inf without NaN: +inf (scipy's convention)
        np.testing.assert_allclose(lse[good], R.logsumexp64(x[good]), rtol=1e-6)
        ent = to_np(lk.entropy(xl))
        assert np.isnan(ent[[1, 3]]).all() and np.isfinite(ent[good]).all()
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_nan_row_autograd_stays_in_its_row(lib, rng):
    x = (rng.standard_normal((3, 5)) * 2).astype(np.float32)
    x[1, 2] = np.nan
    y = np.array([0, 1, 2])
    f = lambda a: lk.cross_entropy(a, to_lib(lib, y), reduction="none")[np.array([0, 2])].sum()
    if lib == "torch":
        tx = to_lib(lib, x, requires_grad=True)
        f(tx).backward()
        g = to_np(tx.grad)
    else:
        import jax

        g = to_np(jax.grad(f)(to_lib(lib, x)))
    np.testing.assert_allclose(g[[0, 2]], R.cross_entropy_grad64(x[[0, 2]], y[[0, 2]], reduction="sum"),
                               rtol=1e-5, atol=1e-8)
    assert not np.isnan(g[[0, 2]]).any()


# ----------------------------------------------------------------------------------------------
# float16 / bfloat16


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(lib, dtype, rng, kernels):
    """Loss and gradient within one ulp of the exact values for the rounded inputs."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    eps = EPS[dtype]
    x = (rng.standard_normal((8, 300)) * 3).astype(np.float32)
    x[0, 5] = 30.0 if dtype == "bfloat16" else 12.0   # confident (float16 keeps the loss normal)
    x[1] += 200.0                                     # a common offset
    y = rng.integers(0, 300, 8)
    y[0] = 5
    xl = to_lib(lib, x, dtype)
    xr = to_np(xl)  # the rounded inputs, exactly, in float64
    yl = to_lib(lib, y)
    exact = np.array([R.row_loss_mp(xr[i], y[i]) for i in range(8)])
    loss, g = lk.cross_entropy_with_grad(xl, yl, reduction="none")
    assert str(loss.dtype).endswith(dtype) and str(g.dtype).endswith(dtype)
    assert rel_err(to_np(loss), exact).max() <= eps
    assert rel_err(to_np(lk.cross_entropy(xl, yl, reduction="none")), exact).max() <= eps
    mean = float(to_np(lk.cross_entropy(xl, yl)))
    assert abs(mean - exact.mean()) <= eps * exact.mean()
    want_g = R.cross_entropy_grad64(xr, y, reduction="none")
    tiny = 2.0 ** -24 if dtype == "float16" else 0.0  # float16's smallest subnormal
    assert (np.abs(to_np(g) - want_g) <= eps * np.abs(want_g) + tiny).all()
    # softmax / log_softmax / logsumexp: an ulp too.
    np.testing.assert_allclose(to_np(lk.softmax(xl)), R.softmax64(xr), rtol=eps, atol=tiny)
    np.testing.assert_allclose(to_np(lk.log_softmax(xl)), R.log_softmax64(xr), rtol=eps)
    np.testing.assert_allclose(to_np(lk.logsumexp(xl)), R.logsumexp64(xr), rtol=eps)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_torch_autograd(dtype, rng):
    torch = need("torch")
    x = (rng.standard_normal((4, 50)) * 3).astype(np.float32)
    y = rng.integers(0, 50, 4)
    tx = to_lib("torch", x, dtype, requires_grad=True)
    lk.cross_entropy(tx, to_lib("torch", y), reduction="sum").backward()
    assert tx.grad.dtype == getattr(torch, dtype)
    want = R.cross_entropy_grad64(to_np(tx), y, reduction="sum")
    tiny = 2.0 ** -24 if dtype == "float16" else 0.0
    assert (np.abs(to_np(tx.grad) - want) <= 2 * EPS[dtype] * np.abs(want) + tiny).all()


# ----------------------------------------------------------------------------------------------
# temperature and softcap with a large common offset (issue 13 item 2): z - max z is formed
# from x, never as x/T - max(x)/T, whose rounding near 1e4 was 230x the contract


_OFFSET_OPTS = [(None, 3.0), (None, 0.7), (2e4, 3.0), (1e4, 1.0), (3e4, 0.5), (30.0, 2.0)]


def _offset_rows():
    rng = np.random.default_rng(13)
    pair = np.array([10000.346, 10000.821], np.float32)      # the issue's row
    up = (1e4 + rng.standard_normal(96)).astype(np.float32)
    down = (-1e4 + 3 * rng.standard_normal(96)).astype(np.float32)
    confident = (1e4 + rng.standard_normal(96)).astype(np.float32)
    confident[7] = np.float32(1e4 + 25.0)                      # loss ~1e-14 at T = 0.7
    return [(pair, 1), (up, int(np.argmax(up))), (down, 5), (confident, 7)]


@pytest.fixture(scope="module")
def offset_cases():
    """(row, label, softcap, T, exact log-softmax) for every offset row and option pair."""
    return [(row, y, cap, t, R.row_log_softmax_mp(row, 40, softcap=cap, temperature=t))
            for cap, t in _OFFSET_OPTS for row, y in _offset_rows()]


@pytest.mark.parametrize("lib", LIBS)
def test_issue13_item2_offset_rows_loss_with_temperature_and_softcap(lib, offset_cases, kernels):
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    for row, y, cap, t, logp in offset_cases:
        xl, yl = to_lib(lib, row[None]), to_lib(lib, np.array([y]))
        # Rounding z - max z = (s - s_max)/T to float32 moves the loss by at most 2^-24 of
        # |d_y| + Σ p|d| (nothing at T = 1, where x - max x is exact): negligible on these rows
        # (~1e-8 of the loss) except the confident one, whose loss is that tiny sum itself.
        d = logp - logp.max()
        slack = 2.0 ** -24 * (abs(d[y]) + np.sum(np.exp(logp) * np.abs(d))) / -logp[y]
        outs = {"cross_entropy": lk.cross_entropy(xl, yl, softcap=cap, temperature=t, reduction="none")}
        if lib != "jax":
            outs["with_grad"] = lk.cross_entropy_with_grad(xl, yl, softcap=cap, temperature=t,
                                                           reduction="none")[0]
        for name, got in outs.items():
            err = rel_err(to_np(got), -logp[y])
            assert err.max() <= BOUND + slack, (f"{name} softcap={cap} T={t} row of {row.size}: relative "
                                                f"error {err.max():.3g} = {err.max() / BOUND:.1f} x 2^-21")


@pytest.mark.parametrize("lib", LIBS)
def test_issue13_item2_offset_rows_softmax_with_temperature(lib, offset_cases, kernels):
    """log_softmax within 2^-21; softmax within 2^-21 plus the rounding of exp's float32 argument."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    for row, y, cap, t, logp in offset_cases:
        if cap is not None:
            continue  # softmax has no softcap option
        xl = to_lib(lib, row[None])
        lsm = to_np(lk.log_softmax(xl, temperature=t))[0]
        # plus the float32 rounding of d = z - max z, through d itself and through r (as for the loss)
        d = logp - logp.max()
        tol = np.abs(logp) * BOUND + 2.0 ** -24 * (np.abs(d) + np.sum(np.exp(logp) * np.abs(d)))
        err = np.abs(lsm - logp)
        assert (err <= tol).all(), f"log_softmax T={t}: worst {np.max(err / tol):.3g} x tolerance"
        sm = to_np(lk.softmax(xl, temperature=t))[0]
        want = np.exp(logp)
        tol = want * (BOUND + 2.0 ** -23 * np.abs(logp)) + 2.0 ** -126
        assert (np.abs(sm - want) <= tol).all(), f"softmax T={t}: {np.max(np.abs(sm - want) / want):.3g}"


def _offset_grad_mp(row, y, cap, t, logp):
    """Exact d loss / d x: (softmax - onehot) · sech²(x/c) / T (float64 of mpmath values)."""
    with mpmath.workdps(40):
        g = np.exp(logp)
        g[y] = float(mpmath.expm1(mpmath.mpf(float(logp[y]))))  # p_y - 1 without cancellation
        if cap is not None:
            g = g * np.array([float(mpmath.sech(mpmath.mpf(float(v)) / cap) ** 2) for v in row])
        return g / t


@pytest.mark.parametrize("lib", LIBS)
def test_issue13_item2_offset_rows_gradient_with_temperature_and_softcap(lib, offset_cases, kernels):
    """Gradients of the offset rows at the accuracy rule of test_float32_gradient_accuracy."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    for row, y, cap, t, logp in offset_cases:
        want = _offset_grad_mp(row, y, cap, t, logp)[None]
        x = row[None]
        grads = {}
        if lib != "jax":
            grads["with_grad"] = lk.cross_entropy_with_grad(to_lib(lib, x), to_lib(lib, np.array([y])),
                                                            softcap=cap, temperature=t, reduction="sum")[1]
        if lib == "torch":
            tx = to_lib(lib, x, requires_grad=True)
            lk.cross_entropy(tx, to_lib(lib, np.array([y])), softcap=cap, temperature=t,
                             reduction="sum").backward()
            grads["autograd"] = tx.grad
        if lib == "jax":
            import jax

            yl = to_lib(lib, np.array([y]))
            grads["autograd"] = jax.grad(lambda a: lk.cross_entropy(a, yl, softcap=cap, temperature=t,
                                                                    reduction="sum"))(to_lib(lib, x))
        # exp's argument |z - m - r| = |log p| rounds like 2^-24 of itself; the label entry
        # p_y - 1 is relative to |p_y - 1|; sech² adds 2|x/c|·2^-24 (as in the softcap test)
        # and with softcap, d = c·tanh(gap/c)·(1 - tanh a tanh b)/T rounds a few times (core, float32)
        d = logp - logp.max()
        arg = np.abs(logp)[None] + (0.0 if cap is None else 2 * np.abs(x.astype(np.float64) / cap) + np.abs(d))
        tol = np.abs(want) * (BOUND + 2.0 ** -23 * arg) + 2.0 ** -126
        # p_y - 1 = -Σ_{j≠y} p_j also carries the float32 rounding of each d_j = z_j - max z
        tol[0, y] += 2.0 ** -24 * np.sum(np.exp(logp) * np.abs(d)) * abs(want[0, y]) / max(-np.expm1(logp[y]), 1e-300)
        for name, g in grads.items():
            err = np.abs(to_np(g) - want)
            assert (err <= tol).all(), (f"{name} softcap={cap} T={t} row of {row.size}: worst "
                                        f"{np.max(err / tol):.3g} x tolerance")


def _off_grid_confident_rows():
    """Confident float32 rows whose ``x − max`` is inexact in float32: the maximum and the other
    logits carry low-order bits (the contract rows above have an integral maximum, which hides
    the rounding of the difference behind averaging over 32000 terms)."""
    rng = np.random.default_rng(21)
    R_, n = 12, 400
    x = (rng.standard_normal((R_, n)) - 30.0).astype(np.float32)
    y = rng.integers(0, n, R_)
    x[np.arange(R_), y] = rng.standard_normal(R_).astype(np.float32)
    x[0, :] = -200.0                       # one term carries the whole loss
    x[0, y[0]] = np.float32(1.0 + 2.0 ** -23)
    x[0, (y[0] + 1) % n] = np.float32(-29.7)
    return x, y


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("lib", LIBS)
def test_float32_confident_rows_off_grid(lib, temperature, kernels):
    """A rounded float32 ``x − max`` (or ``(x − max)/T``) is off by up to half an ulp of a gap of
    ~30 (1e-6 relative in each term, twice the contract; 4x at T = 0.5): the difference must be
    carried beyond float32. The rows' gaps scale with T so that every row stays confident."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    x, y = _off_grid_confident_rows()
    x = (x.astype(np.float64) * temperature).astype(np.float32) if temperature != 1.0 else x
    exact = np.array([R.row_log_softmax_mp(x[i], temperature=temperature)[y[i]] for i in range(len(x))])
    exact = -exact
    assert exact.max() < 1e-9
    xl, yl = to_lib(lib, x), to_lib(lib, y)
    outs = {"cross_entropy": lk.cross_entropy(xl, yl, reduction="none", temperature=temperature),
            "token_logprobs": -lk.token_logprobs(xl, yl) if temperature == 1.0 else None,
            "log_softmax": -lk.log_softmax(xl, temperature=temperature)[np.arange(len(y)), y]
            if lib == "numpy" else None}
    for name, got in outs.items():
        if got is None:
            continue
        err = rel_err(to_np(got), exact)
        assert err.max() <= BOUND, f"{name}: relative errors / 2^-21: {np.round(err / BOUND, 2)}"


@pytest.mark.parametrize("lib", LIBS)
def test_float32_confident_rows_softcap(lib, kernels):
    """Softcapped confident rows: a float32 ``cap·tanh`` rounds the capped logits themselves
    (2.7x the contract at cap 30); the differences are formed in float64 and split."""
    if lib != "numpy" and kernels == "core":
        pytest.skip("the registry choice only matters for NumPy arrays")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((12, 400)) - 25.0).astype(np.float32)
    y = rng.integers(0, 400, 12)
    x[np.arange(12), y] = (rng.standard_normal(12) + 10.0).astype(np.float32)
    exact = np.array([-R.row_log_softmax_mp(x[i], softcap=30.0)[y[i]] for i in range(12)])
    assert exact.max() < 1e-9
    got = to_np(lk.cross_entropy(to_lib(lib, x), to_lib(lib, y), reduction="none", softcap=30.0))
    err = rel_err(got, exact)
    assert err.max() <= BOUND, f"relative errors / 2^-21: {np.round(err / BOUND, 2)}"
