"""The device math helpers (written without libdevice) against float64 NumPy / mpmath."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from logitkit.kernels.triton._math import _expm1, _log1p, _tanh_sech2, split64, _scalar

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@triton.jit
def _apply(X, TH, SE, L1P, EM1, n, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(X + i, mask=mask, other=0.0)
    th, se = _tanh_sech2(x, IS_F64)
    tl.store(TH + i, th, mask=mask)
    tl.store(SE + i, se, mask=mask)
    tl.store(L1P + i, _log1p(tl.abs(x), IS_F64), mask=mask)
    tl.store(EM1 + i, _expm1(x, IS_F64), mask=mask)


@triton.jit
def _rebuild(OUT, hi, lo, IS_F64: tl.constexpr):
    tl.store(OUT, _scalar(hi, lo, IS_F64))


def _run(x):
    outs = [torch.empty_like(x) for _ in range(4)]
    _apply[(1,)](x, *outs, x.numel(), IS_F64=x.dtype == torch.float64,
                 BLOCK=triton.next_power_of_2(x.numel()))
    return [o.double().numpy() for o in outs]


VALUES = [0.0, 1e-30, 1e-8, 1e-4, 0.01, 0.1, 0.3, 0.3499, 0.35, 0.3501, 0.5, 0.99, 1.0, 1.5, 3.0,
          5.0, 9.0, 20.0, 40.0, 80.0]


@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 2.0**-21), (torch.float64, 1e-14)], ids=str)
def test_helpers_relative_accuracy(dtype, ulps):
    v = np.array(VALUES + [-a for a in VALUES[1:]])
    x = torch.tensor(v, dtype=dtype)
    th, se, l1p, em1 = _run(x)
    xs = x.double().numpy()
    with mpmath.workdps(40):
        want_th = np.array([float(mpmath.tanh(a)) for a in xs])
        want_se = np.array([float(mpmath.sech(a) ** 2) for a in xs])
        want_l1p = np.array([float(mpmath.log1p(abs(a))) for a in xs])
        want_em1 = np.array([float(mpmath.expm1(a)) for a in xs])
    tiny = np.finfo(np.float32 if dtype == torch.float32 else np.float64).tiny
    for name, got, want in (("tanh", th, want_th), ("sech2", se, want_se), ("log1p", l1p, want_l1p),
                            ("expm1", em1, want_em1)):
        ok = np.abs(want) > tiny * 1e6  # normal range, away from underflow
        rel = np.abs(got[ok] - want[ok]) / np.abs(want[ok])
        # sech**2 = 4e / (1 + e)**2 inherits exp's argument rounding: |2u| * 2**-24 at u = 9
        tol = 2 * ulps if name == "sech2" else ulps
        assert rel.max() <= tol, (name, xs[ok][rel.argmax()], rel.max())


def test_special_values():
    x = torch.tensor([np.inf, -np.inf, np.nan])
    th, se, l1p, em1 = _run(x)
    assert th[0] == 1 and th[1] == -1 and np.isnan(th[2])
    assert se[0] == 0 and se[1] == 0 and np.isnan(se[2])
    assert l1p[0] == np.inf and np.isnan(l1p[2])
    assert em1[0] == np.inf and em1[1] == -1 and np.isnan(em1[2])


def test_split64_rebuilds_float64_scalars():
    out = torch.empty(1, dtype=torch.float64)
    for v in (0.1, 1.0 / 3.0, 1.0 / 0.7, 123.456789):
        _rebuild[(1,)](out, *split64(v), IS_F64=True)
        assert abs(float(out) - v) <= 4e-15 * abs(v)
