"""Numba CPU kernels against float64 / mpmath references: every stage, option and dtype."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")
ml_dtypes = pytest.importorskip("ml_dtypes")

import _cpu_ref as ref  # noqa: E402
from logitkit.kernels import cpu  # noqa: E402

BF16 = ml_dtypes.bfloat16
DTYPES = [np.float32, np.float64, np.float16, BF16]
IDS = ["f32", "f64", "f16", "bf16"]
F32_LOSS_RTOL = 2.0 ** -21  # the numerical contract for float32 per-row losses


def loss_rtol(dt):
    return 1e-14 if dt == np.float64 else F32_LOSS_RTOL


def assert_grad_close(g, expected, dt):
    """float32/float64: a few ulps of the row scale; halves: within one rounding of the reference."""
    g = np.asarray(g).astype(np.float64)
    if dt in (np.float32, np.float64):
        eps = np.finfo(dt).eps
        scale = np.abs(expected).max(axis=1, keepdims=True)
        err = np.abs(g - expected)
        assert np.all(err <= 8 * eps * (np.abs(expected) + scale)), err.max()
    else:
        rtol = 2.0 ** -10 if dt == np.float16 else 2.0 ** -7
        tiny = 2.0 ** -24 if dt == np.float16 else 1e-38
        np.testing.assert_allclose(g, expected, rtol=rtol, atol=2 * tiny)


def make(n, v, dt, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v)) * scale).astype(dt)
    labels = rng.integers(0, v, n)
    labels[1::5] = -100
    return x, labels


OPTIONS = {
    "plain": {},
    "weights_smoothing_zloss": dict(weight="w", label_smoothing=0.1, z_loss=1e-2),
    "softcap": dict(softcap=4.0, label_smoothing=0.05),
    "temperature": dict(temperature=0.7, z_loss=1e-3),
}


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_ce_stages_match_reference(dt, opt):
    n, v = 23, 1003  # V is no multiple of any vector width
    x, labels = make(n, v, dt)
    kw = dict(OPTIONS[opt])
    if kw.get("weight") == "w":
        kw["weight"] = np.random.default_rng(1).uniform(0.2, 2.0, v)
    z_loss = kw.pop("z_loss", 0.0)
    g_ce = np.linspace(0.5, 1.5, n)
    g_z = 0.25

    ce, m, r, g = cpu.ce_forward_backward(x, labels, g_ce, g_z, z_loss=z_loss, **kw)
    acc = np.float64 if dt == np.float64 else np.float32
    assert ce.dtype == m.dtype == r.dtype == acc and g.dtype == np.dtype(dt)

    fwd_kw = {k: kw[k] for k in ("weight", "label_smoothing", "softcap", "temperature") if k in kw}
    ce_ref = ref.ce(x, labels, **fwd_kw)
    np.testing.assert_allclose(ce, ce_ref, rtol=loss_rtol(dt), atol=0)
    z = ref.transform(x, kw.get("softcap"), kw.get("temperature", 1.0))
    m_ref, r_ref = ref.stats(z)
    np.testing.assert_allclose(m, m_ref, rtol=2 * np.finfo(acc).eps)
    np.testing.assert_allclose(r, r_ref, rtol=loss_rtol(dt), atol=4 * np.finfo(acc).eps)
    g_ref = ref.ce_grad(x, labels, g_ce, g_z, z_loss=z_loss, **kw)
    assert_grad_close(g, g_ref, dt)
    assert np.all(np.asarray(g)[labels == -100].astype(np.float64) == 0.0)

    ce2, m2, r2 = cpu.ce_forward(x, labels, **fwd_kw)
    np.testing.assert_array_equal(ce2, ce)
    np.testing.assert_array_equal(m2, m)
    np.testing.assert_array_equal(r2, r)
    gb = cpu.ce_backward(x, labels, m, r, g_ce, g_z, z_loss=z_loss, **kw)
    assert gb.dtype == np.dtype(dt)
    assert_grad_close(gb, g_ref, dt)


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_in_place_equals_fresh(dt):
    x, labels = make(17, 515, dt, seed=2)
    for kw in ({}, dict(softcap=3.0, label_smoothing=0.1)):
        ce, m, r, g = cpu.ce_forward_backward(x, labels, 1.0, None, **kw)
        xi = x.copy()
        ce_i, m_i, r_i, gi = cpu.ce_forward_backward(xi, labels, 1.0, None, out=xi, **kw)
        assert gi is xi
        np.testing.assert_array_equal(ce_i, ce)
        np.testing.assert_array_equal(gi.view(np.uint8), g.view(np.uint8))
        xi = x.copy()
        gb = cpu.ce_backward(xi, labels, m, r, 1.0, None, out=xi, **kw)
        assert gb is xi
        np.testing.assert_array_equal(gb.view(np.uint8),
                                      cpu.ce_backward(x, labels, m, r, 1.0, None, **kw).view(np.uint8))
    # an existing out= array that is not x
    out = np.full_like(x, 7)
    _, _, _, g2 = cpu.ce_forward_backward(x, labels, 1.0, None, out=out)
    assert g2 is out
    np.testing.assert_array_equal(out.view(np.uint8), cpu.ce_forward_backward(
        x, labels, 1.0, None)[3].view(np.uint8))
    for fn in (cpu.softmax_forward, cpu.log_softmax_forward):
        fresh = fn(x)
        xi = x.copy()
        assert fn(xi, out=xi) is xi
        np.testing.assert_array_equal(xi.view(np.uint8), fresh.view(np.uint8))


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
@pytest.mark.parametrize("kw", [{}, dict(temperature=1.7), dict(softcap=2.5, temperature=0.6)],
                         ids=["plain", "temperature", "softcap"])
def test_softmax_family_matches_reference(dt, kw):
    x, _ = make(19, 777, dt, seed=3)
    z = ref.transform(x, kw.get("softcap"), kw.get("temperature", 1.0))
    lp = ref.log_softmax(z)
    m, r = ref.stats(z)
    sm = cpu.softmax_forward(x, **kw)
    lsm = cpu.log_softmax_forward(x, **kw)
    lse = cpu.logsumexp_forward(x, **kw)
    assert sm.dtype == lsm.dtype == np.dtype(dt)
    acc = np.float64 if dt == np.float64 else np.float32
    assert lse.dtype == acc
    eps = np.finfo(acc).eps
    np.testing.assert_allclose(lse, m + r, rtol=4 * eps)
    if dt in (np.float32, np.float64):
        # z - m is rounded with error <= eps/2 |z - m|, so p carries ~eps |log p| relative error
        p = np.exp(lp)
        assert np.all(np.abs(sm - p) <= 4 * eps * (2 + np.abs(lp)) * p)
        # log-probabilities: absolute error a few ulps of the row's |z| scale
        np.testing.assert_allclose(lsm, lp, rtol=0, atol=16 * eps * (1 + np.abs(z).max()))
    else:
        assert_grad_close(sm, np.exp(lp), dt)
        assert_grad_close(lsm, lp, dt)


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_softmax_backward_matches_reference(dt):
    x, _ = make(13, 301, dt, seed=4)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(dt)
    y = cpu.softmax_forward(x)
    ly = cpu.log_softmax_forward(x)
    y64, ly64, dy64 = (a.astype(np.float64) for a in (y, ly, dy))
    exp_sm = y64 * (dy64 - (y64 * dy64).sum(1, keepdims=True))
    exp_lsm = dy64 - np.exp(ly64) * dy64.sum(1, keepdims=True)
    for fn, yy, expected in ((cpu.softmax_backward, y, exp_sm),
                             (cpu.log_softmax_backward, ly, exp_lsm)):
        got = fn(yy, dy)
        assert got.dtype == np.dtype(dt)
        if dt in (np.float32, np.float64):
            eps = np.finfo(dt).eps
            scale = np.abs(dy64).max(1, keepdims=True)
            assert np.all(np.abs(got - expected) <= 16 * eps * (np.abs(expected) + scale))
        else:
            assert_grad_close(got, expected, dt)
        # in place over y and over dy, and into an existing array
        for which in ("y", "dy", "other"):
            yc, dc = yy.copy(), dy.copy()
            out = {"y": yc, "dy": dc, "other": np.empty_like(dy)}[which]
            res = fn(yc, dc, out=out)
            assert res is out
            np.testing.assert_array_equal(res.view(np.uint8), got.view(np.uint8))


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_masked_nan_and_inf_rows(dt):
    v = 67
    x = np.random.default_rng(6).standard_normal((6, v)).astype(dt)
    x[0, ::3] = -np.inf                 # partly masked
    x[1, :] = -np.inf                   # fully masked, labelled
    x[2, :] = -np.inf                   # fully masked, ignored
    x[3, 5] = np.nan                    # NaN row
    x[4, 7] = np.inf                    # +inf row
    labels = np.array([1, 3, -100, 2, 2, 4])
    for eps in (0.0, 0.1):
        ce, m, r, g = cpu.ce_forward_backward(x, labels, 1.0, 1.0, z_loss=1e-2,
                                              label_smoothing=eps)
        g = g.astype(np.float64)
        assert not np.isnan(ce[0]) and np.all(np.isfinite(g[0]))
        if eps == 0.0:
            assert np.all(g[0, ::3] == 0)
        # smoothing puts weight on the masked classes: an infinite (not NaN) loss, as in torch
        np.testing.assert_allclose(ce[0], ref.ce(x[:1], labels[:1], label_smoothing=eps)[0],
                                   rtol=loss_rtol(dt))
        assert (ce[0] == np.inf) == (eps > 0)
        assert m[1] == -np.inf and r[1] == 0 and ce[1] == np.inf
        assert np.all(np.isfinite(g[1]))
        assert ce[2] == 0 and np.all(g[2] == 0) and m[2] == -np.inf
        for row in (3, 4):
            assert np.isnan(ce[row]) and np.isnan(r[row]) and np.all(np.isnan(g[row]))
        assert np.isfinite(ce[5]) and np.all(np.isfinite(g[5]))
        # the healthy row is unaffected by its neighbours
        np.testing.assert_allclose(ce[5], ref.ce(x[5:], labels[5:], label_smoothing=eps)[0],
                                   rtol=loss_rtol(dt))
    gb = cpu.ce_backward(x, labels, m, r, 1.0, 1.0, z_loss=1e-2).astype(np.float64)
    assert np.all(np.isfinite(gb[[0, 1, 5]])) and np.all(gb[2] == 0)
    assert np.all(np.isnan(gb[3])) and np.all(np.isnan(gb[4]))
    sm = cpu.softmax_forward(x).astype(np.float64)
    lsm = cpu.log_softmax_forward(x).astype(np.float64)
    lse = cpu.logsumexp_forward(x)
    assert np.all(sm[0, ::3] == 0) and abs(sm[0].sum() - 1) < 1e-2
    assert np.all(sm[1] == 0) and np.all(lsm[1] == -np.inf) and lse[1] == -np.inf
    assert np.all(lsm[0, ::3] == -np.inf) and np.all(np.isfinite(lsm[0, 1::3]))
    for row in (3, 4):
        assert np.all(np.isnan(sm[row])) and np.all(np.isnan(lsm[row])) and np.isnan(lse[row])
    ly = cpu.log_softmax_forward(x[:2]).astype(np.float64)
    lb = cpu.log_softmax_backward(ly.astype(dt), np.ones((2, v), dt)).astype(np.float64)
    assert np.all(np.isfinite(lb))


def _mp_loss(row, y):
    import mpmath
    mpmath.mp.dps = 40
    s = mpmath.fsum(mpmath.exp(mpmath.mpf(float(t)) - mpmath.mpf(float(row[y]))) for t in row)
    return float(mpmath.log(s))


def test_confident_row_and_large_offset_float32():
    rng = np.random.default_rng(7)
    v = 32000
    x = rng.standard_normal((3, v)).astype(np.float32)
    x[0, 11] = 40.0                     # confident: loss ~2.2e-13
    x[1] += np.float32(1e4)             # shared large offset
    x[2] = x[2] * 3 - np.float32(1e4)
    labels = np.array([11, 5, 9])
    expected = np.array([_mp_loss(x[i], labels[i]) for i in range(3)])
    assert 1e-13 < expected[0] < 1e-12
    for out in (None, "inplace"):
        xx = x.copy()
        ce, m, r, g = cpu.ce_forward_backward(xx, labels, 1.0, None,
                                              out=xx if out else None)
        rel = np.abs(ce.astype(np.float64) - expected) / expected
        assert np.all(rel <= F32_LOSS_RTOL), rel
    ce_f, _, _ = cpu.ce_forward(x, labels)
    assert np.all(np.abs(ce_f - expected) / expected <= F32_LOSS_RTOL)
    lsm = cpu.log_softmax_forward(x)
    assert abs(-float(lsm[0, 11]) - expected[0]) / expected[0] <= F32_LOSS_RTOL
    # gradient at the label of the confident row: p_y - 1 = -loss (to first order), kept relatively
    # accurate by expm1 (a naive e_y / S - 1 would keep only ~3 digits)
    assert abs(-float(g[0, 11]) - expected[0]) / expected[0] <= F32_LOSS_RTOL
    gb = cpu.ce_backward(x, labels, m, r, 1.0, None)
    assert abs(-float(gb[0, 11]) - expected[0]) / expected[0] <= F32_LOSS_RTOL


def test_exact_ties_and_small_shapes():
    x = np.array([[5.0, 5.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    ce, m, r = cpu.ce_forward(x, np.array([0, 3]))
    np.testing.assert_allclose(r[0], np.log(3 + np.exp(-5.0)), rtol=2 ** -23)
    np.testing.assert_allclose(r[1], np.log(4.0), rtol=2 ** -23)
    for dt in DTYPES:
        e = np.zeros((0, 5), dt)
        ce, m, r, g = cpu.ce_forward_backward(e, np.zeros(0, np.int64), 1.0, None)
        assert ce.shape == (0,) and g.shape == (0, 5)
        assert cpu.softmax_forward(e).shape == (0, 5)
        assert cpu.logsumexp_forward(e).shape == (0,)
        one = np.full((3, 1), 2.5, dt)
        ce, m, r, g = cpu.ce_forward_backward(one, np.zeros(3, np.int64), 1.0, None)
        assert np.all(ce == 0) and np.all(r == 0) and np.all(g.astype(np.float64) == 0)


def test_non_contiguous_inputs_and_outputs():
    x, labels = make(9, 200, np.float32, seed=8)
    xt = np.asfortranarray(x)
    ce, _, _, g = cpu.ce_forward_backward(x, labels, 1.0, None)
    ce2, _, _, g2 = cpu.ce_forward_backward(xt, labels, 1.0, None, out=xt)
    assert g2 is xt
    np.testing.assert_array_equal(ce2, ce)
    np.testing.assert_array_equal(g2, g)
    big = np.zeros((9, 400), np.float32)
    cpu.softmax_forward(x, out=big[:, ::2])
    np.testing.assert_array_equal(big[:, ::2], cpu.softmax_forward(x))
    assert np.all(big[:, 1::2] == 0)


@pytest.mark.parametrize("dt,kw", [(np.float32, {}), (BF16, dict(softcap=3.0))], ids=["f32", "bf16"])
def test_threads_do_not_change_results(dt, kw):
    # large enough (> 2**17 elements per thread) to run the parallel kernels on 2+ threads; one
    # thread runs the serial variants, which must give the same bits
    x, labels = make(67, 4500, dt, seed=9)
    m, r = cpu.ce_forward(x, labels, **kw)[1:]
    calls = (lambda: cpu.ce_forward_backward(x, labels, 1.0, None, **kw),
             lambda: cpu.ce_backward(x, labels, m, r, 1.0, None, **kw),
             lambda: cpu.softmax_forward(x, **kw))
    base = [c() for c in calls]
    try:
        cpu.set_num_threads(1)
        assert cpu.get_num_threads() == 1
        one = [c() for c in calls]
    finally:
        cpu.set_num_threads(None)
    for a, b in zip(base, one):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            np.testing.assert_array_equal(u, v)
    assert cpu.get_num_threads() >= 1
    with pytest.raises(ValueError, match="n"):
        cpu.set_num_threads(0)


def test_bad_arguments():
    x = np.zeros((2, 5), np.float32)
    lab = np.array([0, 1])
    with pytest.raises(ValueError, match=r"labels: class index 7 at position 1"):
        cpu.ce_forward(x, np.array([0, 7]))
    with pytest.raises(ValueError, match=r"labels: class index -1 at position 0"):
        cpu.ce_forward_backward(x, np.array([-1, 0]), 1.0, None)
    with pytest.raises(TypeError, match="labels"):
        cpu.ce_forward(x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        cpu.ce_forward(x, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="x"):
        cpu.ce_forward(np.zeros((2, 5), np.int32), lab)
    with pytest.raises(ValueError, match="x"):
        cpu.softmax_forward(np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="x"):
        cpu.softmax_forward([[1.0, 2.0]])
    with pytest.raises(ValueError, match="label_smoothing"):
        cpu.ce_forward(x, lab, label_smoothing=1.5)
    with pytest.raises(ValueError, match="temperature"):
        cpu.softmax_forward(x, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        cpu.ce_forward(x, lab, softcap=-1.0)
    with pytest.raises(ValueError, match="weight"):
        cpu.ce_forward(x, lab, weight=np.ones(4))
    with pytest.raises(ValueError, match="out"):
        cpu.softmax_forward(x, out=np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="out"):
        cpu.ce_forward_backward(x, lab, 1.0, None, out=np.zeros((2, 5), np.float64))
    with pytest.raises(ValueError, match="g_ce"):
        cpu.ce_forward_backward(x, lab, np.ones(3), None)
    with pytest.raises(TypeError, match="dy"):
        cpu.softmax_backward(x, x.astype(np.float64))


def test_import_is_lazy():
    code = ("import sys, numpy as np\nfrom logitkit.kernels import cpu\n"
            "a = 'numba' in sys.modules\nok = cpu.available()\nb = 'numba' in sys.modules\n"
            "cpu.logsumexp_forward(np.zeros((0, 3), np.float32))\n"
            "c = 'numba' in sys.modules\n"
            "cpu.logsumexp_forward(np.zeros((1, 3), np.float32))\n"
            "import json; print(json.dumps([a, ok, b, c, 'numba' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True, False, False, True]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_can_use_kernels():
    # GNU OpenMP aborts a forked child that starts a parallel region after its parent did; the
    # child must fall back to single-threaded kernels instead of dying.
    code = (
        "import numpy as np, multiprocessing as mp\n"
        "from logitkit.kernels import cpu\n"
        "x = np.random.default_rng(0).standard_normal((64, 1100)).astype(np.float32)\n"
        "parent = cpu.softmax_forward(x)\n"
        "def child(q):\n"
        "    q.put(cpu.softmax_forward(x))\n"
        "ctx = mp.get_context('fork')\n"
        "q = ctx.Queue(); p = ctx.Process(target=child, args=(q,)); p.start()\n"
        "res = q.get(timeout=120); p.join(30)\n"
        "assert p.exitcode == 0, p.exitcode\n"
        "assert np.array_equal(res, parent)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=200)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_vector_exp_and_tanh_accuracy():
    from numba import njit

    from logitkit.kernels.cpu._kernels import FM, vexp, vexp_neg, vtanh

    @njit(fastmath=FM)
    def apply(a, o, which):
        for j in range(a.size):
            o[j] = vexp(a[j]) if which == 0 else (vexp_neg(a[j]) if which == 1 else vtanh(a[j]))

    for dt in (np.float32, np.float64):
        eps, tiny = np.finfo(dt).eps, np.finfo(dt).tiny
        lo, hi = (-120.0, 40.0) if dt == np.float32 else (-800.0, 600.0)
        a = np.concatenate([np.linspace(lo, hi, 200001), [-np.inf, np.inf, np.nan, 0.0, -0.0]])
        a = a.astype(dt)
        exact = np.exp(a.astype(np.longdouble))
        for which in (0, 1):
            sel = slice(None) if which == 0 else (a <= 0) | ~np.isfinite(a)
            o = np.empty_like(a[sel])
            apply(a[sel], o, which)
            ex, aa = exact[sel], a[sel]
            normal = np.isfinite(aa) & (ex > tiny)
            assert np.all(np.abs(o[normal] - ex[normal]) <= 1.0 * eps * ex[normal])
            sub = np.isfinite(aa) & (ex <= tiny)
            assert np.all(np.abs(o[sub] - ex[sub]) <= tiny * eps)  # subnormals rounded once
            assert o[aa == -np.inf][0] == 0 and np.isnan(o[np.isnan(aa)][0])
            assert np.all(o[aa == 0] == 1)
        t = np.concatenate([np.linspace(-25, 25, 100001), np.logspace(-30, 1, 500),
                            -np.logspace(-30, 1, 500), [np.inf, -np.inf, 1e30, -1e30, 0.0]])
        t = t.astype(dt)
        o = np.empty_like(t)
        apply(t, o, 2)
        ex = np.tanh(t.astype(np.longdouble))
        assert np.all(np.abs(o - ex) <= 2 * eps * np.abs(ex))


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_softcap_extreme_logits(dt):
    # softcap maps +-inf and huge logits to +-cap (finite): the transform comes first
    big = 6e4 if dt == np.float16 else 1e30
    x = np.random.default_rng(10).standard_normal((4, 50)).astype(dt)
    x[0, :3] = [np.inf, -np.inf, big]
    x[1, 5] = -big
    x[2, :] = -np.inf
    x[3, 7] = 300
    labels = np.array([4, 5, 1, 7])
    kw = dict(softcap=5.0, label_smoothing=0.1)
    ce, m, r, g = cpu.ce_forward_backward(x, labels, 1.0, None, **kw)
    np.testing.assert_allclose(ce, ref.ce(x, labels, **kw), rtol=loss_rtol(dt))
    np.testing.assert_allclose(m, ref.stats(ref.transform(x, 5.0))[0], rtol=1e-6)
    assert_grad_close(g, ref.ce_grad(x, labels, 1.0, None, **kw), dt)
    sm = cpu.softmax_forward(x, softcap=5.0).astype(np.float64)
    assert np.all(np.isfinite(sm)) and np.allclose(sm.sum(1), 1, atol=1e-2)


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_log_softmax_large_common_offset(dt):
    # regression: x - (m + r) rounded m + r at the offset's ulp (float32 [1e4, 1e4] gave -0.69336);
    # (x - m) - r is exact up to the final rounding
    x = np.array([[1e4, 1e4], [-3e3, -3e3]], dt)
    for kw in ({}, dict(temperature=1.0), dict(softcap=1e30)):
        for inplace in (False, True):
            xx = x.copy()
            o = cpu.log_softmax_forward(xx, out=xx if inplace else None, **kw)
            expected = np.array(-np.log(2.0), dtype=dt)  # float64 -log 2 rounded once
            assert np.all(o == expected), (kw, inplace, o)
    if dt in (np.float32, np.float64):
        rng = np.random.default_rng(12)
        x = (rng.standard_normal((3, 1000)) + np.array([[1e4], [-2e4], [0.0]])).astype(dt)
        e = ref.log_softmax(x.astype(np.float64))
        eps = np.finfo(dt).eps
        for inplace in (False, True):
            xx = x.copy()
            o = cpu.log_softmax_forward(xx, out=xx if inplace else None).astype(np.float64)
            assert np.all(np.abs(o - e) <= 4 * eps * (np.abs(e) + 1)), np.abs(o - e).max()


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_softcap_plus_inf_is_finite(dt):
    # regression: +inf under softcap is cap*tanh(inf) = cap, a finite logit, not a NaN row
    x = np.array([[0.5, 1.0, np.inf, -1.0]], dt)
    z = 5.0 * np.tanh(np.array([0.5, 1.0, np.inf, -1.0]) / 5.0)
    expected = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[1]  # float64, ~4.0443
    ce, m, r = cpu.ce_forward(x, np.array([1]), softcap=5.0)
    np.testing.assert_allclose(ce, [expected], rtol=loss_rtol(dt))
    assert m[0] == 5.0
    g = cpu.ce_forward_backward(x, np.array([1]), 1.0, None, softcap=5.0)[3]
    assert np.all(np.isfinite(g)) and g[0, 2] == 0  # d tanh / dx = 0 at +inf


def test_small_inputs_start_no_parallel_region():
    # below 2 * cpu._MIN_PER_THREAD (2**17) elements every stage runs the serial variant: no pool starts
    code = (
        "import json, numpy as np\n"
        "from logitkit.kernels import cpu\n"
        "from numba.np.ufunc import parallel\n"
        "assert 128 * 1000 < 2 * cpu._MIN_PER_THREAD\n"
        "x = np.random.default_rng(0).standard_normal((128, 1000)).astype(np.float32)\n"
        "y = np.arange(128) % 1000\n"
        "ce, m, r, g = cpu.ce_forward_backward(x, y, 1.0, None)\n"
        "cpu.ce_backward(x, y, m, r, 1.0, None, softcap=3.0)\n"
        "cpu.ce_forward(x.astype(np.float16), y)\n"
        "s = cpu.softmax_forward(x); cpu.softmax_backward(s, x)\n"
        "before = [cpu._launched, parallel._is_initialized]\n"
        "cpu.softmax_forward(np.zeros((512, 1024), np.float32))\n"
        "print(json.dumps(before + [cpu._launched or cpu.get_num_threads() == 1]))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, True]


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_softcap_gradient_keeps_relative_accuracy(dt):
    # regression: the factor 1 - tanh(x/c)^2 recovered from z cancelled for |x/c| > ~3 (relative
    # error up to ~1); sech^2 from x keeps every element's relative accuracy
    c = 5.0
    rng = np.random.default_rng(14)
    x = (rng.uniform(-1, 1, (4, 64)) * 9 * c).astype(dt)
    labels = rng.integers(0, 64, 4)
    kw = dict(softcap=c, temperature=1.3)
    want = ref.ce_grad(x, labels, 1.0, None, **kw)
    rtol = 2.0 ** -17 if dt == np.float32 else 1e-12
    ce, m, r, g = cpu.ce_forward_backward(x, labels, 1.0, None, **kw)
    gb = cpu.ce_backward(x, labels, m, r, 1.0, None, **kw)
    xi = x.copy()
    gi = cpu.ce_forward_backward(xi, labels, 1.0, None, out=xi, **kw)[3]
    for got in (g, gb, gi):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
