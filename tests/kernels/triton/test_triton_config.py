"""Launch configuration: measured H100 defaults for wide rows, narrow rows unchanged, overrides."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

import torch  # noqa: E402

from logitkit.kernels.triton import ce as C  # noqa: E402


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for k in ("LOGITKIT_TRITON_BLOCK", "LOGITKIT_TRITON_WARPS", "LOGITKIT_TRITON_PERSIST"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("kind,itemsize,expected", [
    # winners of the sweep in benchmarks/results/gpu-h100-2026-11-28.md (V = 128256)
    ("ce", 4, (8192, 32, 1)),
    ("ce", 2, (8192, 8, 2)),
    ("softmax", 4, (8192, 32, 1)),
    ("softmax", 2, (16384, 32, 1)),
    # not swept: the previous 16 KiB / 16 warps / 1 per SM
    ("ce", 8, (2048, 16, 1)),
    ("softmax_bwd", 2, (8192, 16, 1)),
    ("softmax_bwd", 4, (4096, 16, 1)),
])
def test_wide_row_defaults(kind, itemsize, expected):
    block, warps, per_sm = expected
    assert C._config(128256, itemsize, kind) == (block, warps, False)
    cpu = torch.device("cpu")  # _grid counts 2 "SMs" off the GPU
    assert C._grid(10_000, False, cpu, itemsize, kind) == 2 * per_sm
    assert C._grid(1, False, cpu, itemsize, kind) == 1


@pytest.mark.parametrize("kind", ["ce", "softmax", "softmax_bwd"])
def test_narrow_rows_unchanged(kind):
    assert C._config(1000, 2, kind) == (1024, 4, True)
    assert C._config(3000, 4, kind) == (4096, 8, True)
    assert C._config(16000, 2, kind) == (16384, 16, True)
    assert C._config(8000, 4, kind) == (8192, 16, True)
    assert C._config(5, 4, kind) == (16, 4, True)
    assert C._grid(37, True, torch.device("cpu"), 2, kind) == 37  # one program per row


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("LOGITKIT_TRITON_BLOCK", "2048")
    assert C._config(128256, 2, "ce") == (2048, 16, False)
    monkeypatch.setenv("LOGITKIT_TRITON_WARPS", "4")
    assert C._config(128256, 2, "ce") == (2048, 4, False)
    monkeypatch.setenv("LOGITKIT_TRITON_PERSIST", "0")
    assert C._grid(500, False, torch.device("cpu"), 2, "ce") == 500
    monkeypatch.setenv("LOGITKIT_TRITON_PERSIST", "3")
    assert C._grid(500, False, torch.device("cpu"), 4, "softmax") == 6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_wide_rows_with_default_config_match_float64(dtype):
    # V = 20000 > one block, with the _WIDE defaults: 3 blocks of 8192 (f32; bf16 CE) or 2 of 16384
    # (bf16 softmax), a persistent grid of 2 (or 4) programs walking 7 rows in the interpreter
    from logitkit.kernels import triton as tk
    from _tk_ref import ce_stage, f64, row_stats, softmax_from

    import numpy as np

    N, V = 7, 20000
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = -100
    ce, m, r, dx = tk.ce_forward_backward(x, y, 0.5, None, label_smoothing=0.1)
    ce64, m64, r64, dx64 = ce_stage(f64(x), y.numpy(), 0.5, 0.0, label_smoothing=0.1)
    np.testing.assert_allclose(f64(ce), ce64, rtol=2e-6)
    np.testing.assert_allclose(f64(m) + f64(r), m64 + r64, rtol=2e-6)
    gtol = 2e-6 if dtype == torch.float32 else 2**-7
    assert np.abs(f64(dx) - dx64).max() <= gtol * np.abs(dx64).max()
    p = tk.softmax_forward(x)
    z = f64(x)
    p64 = softmax_from(z, *row_stats(z))
    assert np.abs(f64(p) - p64).max() <= gtol * p64.max()
