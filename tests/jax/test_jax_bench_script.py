"""benchmarks/jax_bench.py runs end to end on a tiny shape (it is how BENCHMARKS.md is made)."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "jax_bench.py"


def test_every_case_runs_and_is_reported(capsys):
    spec = importlib.util.spec_from_file_location("jax_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shape", "8x16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {r.split(" | ")[0][2:] for r in rows} == set(mod._cases())
    for r in rows:
        median, minimum = (float(v) for v in r.split(" | ")[1:3])
        assert 0 <= minimum <= median  # ms to one decimal: a tiny step may print 0.0
    assert out.count("speed-up of") == 5
