"""Launch configuration: the recorded sweep table (configs.json) for wide rows, its fallbacks,
narrow rows unchanged, environment overrides."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

import torch  # noqa: E402

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from logitkit.kernels.triton import _configs  # noqa: E402
from logitkit.kernels.triton import ce as C  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for k in ("LOGITKIT_TRITON_BLOCK", "LOGITKIT_TRITON_WARPS", "LOGITKIT_TRITON_PERSIST",
              "LOGITKIT_TRITON_PREFETCH", "LOGITKIT_TRITON_HINTS"):
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
    assert C._grid(10_000, False, cpu, itemsize, kind, 128256) == 2 * per_sm
    assert C._grid(1, False, cpu, itemsize, kind, 128256) == 1


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


def _doc():
    with open(_configs.PATH) as f:
        return json.load(f)


def test_table_covers_every_key_and_says_where_each_entry_comes_from():
    doc = _doc()
    keys = [(e["op"], e["dtype"], e["V"]) for e in doc["entries"]]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(o, d, v) for o in _configs.OPS for d in _configs.DTYPES for v in _configs.BUCKETS}
    for e in doc["entries"]:
        assert e["source"] == "measured" or e["source"].startswith(("default", "dry run")), e
        assert e["block"] & (e["block"] - 1) == 0 and e["warps"] in (1, 2, 4, 8, 16, 32) and e["per_sm"] >= 0


def test_measured_entries_are_rows_of_their_recorded_run():
    """A "measured" entry quotes a results file of the repository: its time, at its configuration."""
    measured = [e for e in _doc()["entries"] if e["source"] == "measured"]
    assert measured
    for e in measured:
        assert e["card"] and e["date"] and e["ms"] > 0 and 0 < e["pct_copy"] <= 100
        with open(os.path.join(ROOT, e["run"])) as f:
            text = f.read()
        label = rf"\[BLOCK={e['block']}, warps={e['warps']}, per-SM={e['per_sm'] or 'row'}[^]]*\]"
        row = rf"\| [^|]*{e['V']}[^|]*{e['dtype']} \| logitkit[^|]*{label} \| {e['ms']:.3f} \|"
        assert re.search(row, text), (e, row)


@pytest.mark.parametrize("V,want", [(1, 32000), (32000, 32000), (60000, 32000), (70000, 128256),
                                    (128256, 128256), (180000, 128256), (190000, 262144), (10**7, 262144)])
def test_v_buckets(V, want):
    assert _configs.bucket(V) == want


def _table(tmp_path, monkeypatch, entries):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"entries": entries}))
    monkeypatch.setattr(_configs, "PATH", str(path))
    _configs.load.cache_clear()


@pytest.fixture
def restore_table():
    yield
    _configs.load.cache_clear()


def test_kernels_read_the_table_per_dtype_and_v_bucket(tmp_path, monkeypatch, restore_table):
    _table(tmp_path, monkeypatch, [
        dict(op="ce", dtype="float32", V=262144, block=2048, warps=8, per_sm=3, prefetch=False, hints=False,
             source="measured"),
        dict(op="softmax", dtype="float16", V=32000, block=4096, warps=4, per_sm=0, prefetch=True, hints=True,
             source="measured"),
    ])
    cpu = torch.device("cpu")
    assert C._config(250000, 4, "ce", torch.float32) == (2048, 8, False)
    assert C._grid(1000, False, cpu, 4, "ce", 250000, torch.float32) == 6
    assert C._prefetch("ce", 250000, torch.float32) is False
    assert C._hints("ce", 250000, torch.float32) == dict(EV_KEEP="", EV_DROP="")
    assert C._config(40000, 2, "softmax", torch.float16) == (4096, 4, False)
    assert C._grid(1000, False, cpu, 2, "softmax", 40000, torch.float16) == 1000  # per_sm 0: one per row
    # a key the table lacks: the built-in default; bfloat16 is not float16's entry
    assert C._config(40000, 2, "softmax", torch.bfloat16) == (16384, 32, False)
    assert C._config(128256, 8, "ce", torch.float64) == (2048, 16, False)
    # the environment still wins
    monkeypatch.setenv("LOGITKIT_TRITON_PREFETCH", "1")
    monkeypatch.setenv("LOGITKIT_TRITON_HINTS", "1")
    assert C._prefetch("ce", 250000, torch.float32) is True
    assert C._hints("ce", 250000, torch.float32)["EV_KEEP"] == "evict_last"


def test_missing_table_falls_back_to_the_built_in_defaults(tmp_path, monkeypatch, restore_table):
    """Without the file, launches use the values it was first written with (the H100 winners and the
    defaults); entries a later sweep measured are left out of the comparison."""
    first = "benchmarks/results/gpu-h100-2026-11-28.md"
    committed = {(e["op"], e["dtype"], e["V"]): e for e in _doc()["entries"]
                 if e["source"].startswith("default") or e.get("run") == first}
    monkeypatch.setattr(_configs, "PATH", str(tmp_path / "absent.json"))
    _configs.load.cache_clear()
    assert _configs.load() == {}
    for (op, dt, V), e in committed.items():
        got = _configs.wide(op, dt, V)
        assert (got["block"], got["warps"], got["per_sm"]) == (e["block"], e["warps"], e["per_sm"]), (op, dt, V)
