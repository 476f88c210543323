"""The command line: missing optional packages, help text, --version, info, demo and bench output."""

import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import logitkit
from logitkit import bench, cli, reference

pytestmark = pytest.mark.timeout(300)


def _run_without(module: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing ``module`` fails, as if not installed."""
    prog = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("command", ["demo", "check"])
def test_item16_demo_and_check_without_mpmath_name_it_and_how_to_install(command):
    proc = _run_without("mpmath", f"""
        from logitkit.cli import main
        sys.exit(main([{command!r}]))
    """)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "needs mpmath, which is not installed" in proc.stderr
    assert "pip install 'logitkit[demo]'" in proc.stderr
    assert proc.stdout == ""  # nothing half-printed before the error


def test_item16_bench_out_without_matplotlib_does_not_claim_a_png(tmp_path):
    # The timings are replaced (a real run takes a minute): this checks only what bench claims
    # to have written against what lies in the directory.
    proc = _run_without("matplotlib", f"""
        from logitkit import bench
        from logitkit.cli import main
        bench.run_workload = lambda name, repeat, progress, only=None: [
            bench.Result(name, "logitkit fresh gradient", median_ms=2.0, times=[0.001, 0.002, 0.003])]
        sys.exit(main(["bench", "--workload", "small", "--repeat", "3", "--no-progress",
                       "--out", {str(tmp_path)!r}]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["results.csv"]
    assert "bench.png" not in proc.stdout.replace("to get bench.png", "")
    assert f"wrote {tmp_path / 'results.csv'}\n" in proc.stdout
    assert "matplotlib is not installed" in proc.stdout
    assert "pip install 'logitkit[bench]'" in proc.stdout


def test_item16_bench_out_with_matplotlib_writes_the_png_it_claims(tmp_path):
    pytest.importorskip("matplotlib")
    results = [bench.Result("small", "logitkit fresh gradient", median_ms=2.0, times=[0.001, 0.002, 0.003])]
    written, missing = bench.write_outputs(results, str(tmp_path))
    assert missing == ""
    assert sorted(written) == sorted(str(tmp_path / f) for f in ("bench.png", "results.csv"))
    assert all(os.path.getsize(p) > 0 for p in written)


def test_help_is_plain_text_with_a_description_per_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    assert "``" not in top and ":func:" not in top
    for command in ("demo", "check", "info", "bench"):
        assert re.search(rf"^  {command} ", top, re.M), command
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        usage, _, rest = text.partition("\n\n")
        assert rest.strip() and not rest.startswith("options:"), f"{command} has no description"
        assert "``" not in text


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"logitkit {logitkit.__version__}"


def test_info_says_why_an_unavailable_backend_is_unavailable(capsys):
    from logitkit.kernels import registry

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    backends = out.split("kernel backends:\n", 1)[1].splitlines()
    for name, ok in registry.backends().items():
        line = next(ln for ln in backends if ln.strip().startswith(name + " "))
        if ok:
            assert line.split()[1] == "available"
        else:
            reason = line.split("instead:", 1)[1].strip()
            assert reason, line
    torch = sys.modules.get("torch")
    if not registry.backends()["triton"] and torch is not None and not torch.cuda.is_available() \
            and os.environ.get("TRITON_INTERPRET") != "1" and "LOGITKIT_KERNELS" not in os.environ:
        assert "no CUDA device" in out


def test_demo_prints_float32_digits_no_negative_zero_and_the_exact_value(capsys):
    pytest.importorskip("mpmath")
    from logitkit import _cases

    assert cli.main(["demo", "--vocab", "64"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-1] == "exact" and "logitkit" in header
    cases = _cases.cases(V=64)
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    assert [r[0] for r in body] == [c.name for c in cases]
    for row, case in zip(body, cases):
        for cell in row[2:]:
            assert cell != "-0" and not cell.startswith("-0.") or cell == "0"
            if cell in ("nan", "inf", "0") or cell.startswith("error"):
                continue
            # shortest text that reads back to the same float32: no digit float32 does not hold
            assert str(np.float32(float(cell))) == cell, cell
        # the exact column is mpmath's value rounded to float32, computed here independently
        row_f64 = case.logits[0].astype(np.float64)
        keep = np.isfinite(row_f64)
        exact = reference.row_loss_mp(row_f64[keep], int(keep[: case.label].sum()))
        assert row[-1] == str(np.float32(exact))
        lk = float(row[header.index("logitkit")])
        assert math.isclose(lk, exact, rel_tol=2 * 2.0 ** -21 + 2.0 ** -24)


def test_bench_prints_workload_sizes_defaults_and_the_spread(capsys, monkeypatch):
    # Timings are replaced: this checks the report's content, not a measurement.
    monkeypatch.setattr(bench, "run_workload", lambda name, repeat, progress, only=None: [
        bench.Result(name, "copy into fresh (np.copy)", median_ms=1.0, times=[0.0009, 0.001, 0.0012]),
        bench.Result(name, "logitkit fresh gradient", median_ms=2.0, limit="copy", times=[0.0015, 0.002, 0.0031])])
    assert cli.main(["bench", "--workload", "llm", "--repeat", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4096 x 32000 float32" in out and "1024 x 128256 float32" in out
    assert "default llm, small, softmax" in out and "default 5" in out
    assert "min-max ms" in out
    assert "| 1.5-3.1 " in out and "| 0.9-1.2 " in out
    assert "2.00× copy" in out


def test_bench_chart_has_a_legend_shapes_in_titles_and_error_bars():
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.container import ErrorbarContainer

    results = [
        bench.Result("small", "copy into fresh (np.copy)", median_ms=0.2, times=[0.0001, 0.0002, 0.0003]),
        bench.Result("small", "logitkit fresh gradient", median_ms=1.0, times=[0.0009, 0.001, 0.002],
                     limit="copy"),
        bench.Result("small", "torch eager F.cross_entropy", median_ms=30.0, times=[0.02, 0.03, 0.04],
                     limit="copy"),
        bench.Result("llm", "logitkit fresh gradient", median_ms=100.0, times=[0.09, 0.1, 0.12]),
        bench.Result("llm", "jax.jit + optax", median_ms=150.0, times=[0.14, 0.15, 0.2]),
    ]
    fig = bench._chart(results, plt)
    try:
        labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert labels == ["logitkit", "peers", "physical limit (a copy of the logits)"]
        small, llm = fig.axes
        assert "256 x 1000 float32" in small.get_title() and "4096 x 32000 float32" in llm.get_title()
        for ax, group in ((small, results[:3]), (llm, results[3:])):
            bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
            assert len(bars) == 1
            segments = bars[0].lines[2][0].get_segments()
            spans = sorted((round(s[0][0], 6), round(s[1][0], 6)) for s in segments)
            expect = sorted((round(min(r.times) * 1e3, 6), round(max(r.times) * 1e3, 6)) for r in group)
            assert spans == expect
        ratios = [t.get_text().strip() for t in small.texts]
        assert ratios == ["5.00× copy", "150.00× copy"]  # each median over the np.copy median (0.2 ms)
        assert len(llm.texts) == 0  # no limit measured in that panel
        assert small.get_xscale() == "log"  # 0.2 ms beside 30 ms spans more than a decade
        assert llm.get_xscale() == "linear"
    finally:
        plt.close(fig)


def test_bench_from_csv_reads_back_what_out_wrote(tmp_path, capsys):
    results = [
        bench.Result("small", "copy into fresh (np.copy)", median_ms=0.2, peak_mb=0.0,
                     times=[0.0001, 0.0002, 0.0003]),
        bench.Result("llm", "logitkit fresh gradient", median_ms=100.0, peak_mb=500.0, err=3e-8,
                     times=[0.09, 0.1, 0.12]),
    ]
    bench.write_outputs(results, str(tmp_path))
    back = bench.read_results(str(tmp_path / "results.csv"))
    assert [(r.workload, r.impl) for r in back] == [(r.workload, r.impl) for r in results]
    for a, b in zip(back, results):
        assert a.median_ms == b.median_ms and a.peak_mb == b.peak_mb
        assert np.allclose(a.times, b.times, rtol=1e-3)
        assert (math.isnan(a.err) and math.isnan(b.err)) or a.err == b.err
    assert cli.main(["bench", "--from-csv", str(tmp_path / "results.csv")]) == 0
    out = capsys.readouterr().out
    assert "not measured now" in out and "| 90.0-120.0 " in out


def test_item16_bench_without_tqdm_says_why_there_is_no_progress_bar():
    proc = _run_without("tqdm", """
        from logitkit import bench
        items = bench._progress([1, 2], "small", True)
        assert list(items) == [1, 2]
        bench._progress([3], "llm", True)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tqdm is not installed") == 1
    assert "pip install 'logitkit[bench]'" in proc.stderr


def test_bench_from_csv_of_an_older_run_keeps_its_ratios():
    # benchmarks/results/cpu-bench.csv predates the limit column; its table in BENCHMARKS.md
    # printed these ratios to the copy limits.
    csv_path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results/cpu-bench.csv"
    if not csv_path.exists():
        pytest.skip("no saved run")
    table = bench.format_table(bench.read_results(str(csv_path)))
    assert re.search(r"\| llm +\| logitkit in place \(out=logits\) +\|.*\| 1\.00× copyto", table)
    assert re.search(r"\| llm +\| logitkit fresh gradient +\|.*\| 0\.94× copy ", table)


@pytest.mark.slow  # make test-slow (CI runs it after make test): the whole small bench workload, timed
def test_bench_runs_for_real_on_the_small_workload(tmp_path, capsys):
    # A real measurement (no replaced timings), kept short with --only and --repeat 1.
    assert cli.main(["bench", "--workload", "small", "--repeat", "1", "--no-progress",
                     "--only", "logitkit fresh", "--only", "NumPy naive", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| small")]
    impls = [r.split("|")[2].strip() for r in rows]
    assert impls == ["copy into existing (np.copyto)", "copy into fresh (np.copy)",
                     "logitkit fresh gradient", "NumPy naive (softmax, log, pick)"]
    for r in rows[2:]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and "× copy" in cells[4]
        assert float(cells[7]) < 1e-5  # the gradient against float64
    back = bench.read_results(str(tmp_path / "results.csv"))
    assert [r.impl for r in back] == impls and all(len(r.times) == 1 for r in back)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--vocab", "8"], "--vocab: expected at least 16"),
    (["bench", "--workload", "huge"], "--workload: unknown workload 'huge'"),
    (["bench", "--repeat", "0"], "--repeat: expected at least 1"),
])
def test_cli_bad_arguments_name_the_option(argv, message):
    if argv[0] == "demo":
        pytest.importorskip("mpmath")
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert message in str(exc.value.code)


def test_info_says_when_logitkit_kernels_forces_the_core():
    env = dict(os.environ, LOGITKIT_KERNELS="core")
    proc = subprocess.run([sys.executable, "-m", "logitkit", "info"], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "kernel backends: (not used: LOGITKIT_KERNELS=core forces the core everywhere)" in proc.stdout
    if "jax" in proc.stdout.split("kernel backends:", 1)[1]:
        assert "jax      XLA only: LOGITKIT_KERNELS forces the core" in proc.stdout


def test_info_says_why_jax_losses_take_the_xla_route():
    from logitkit.kernels import registry

    class OldJax:  # a jax without jax.ffi
        __version__ = "0.4.0"

    class Ffi:
        @staticmethod
        def _ffi_api_major():
            return 1

    if not registry.backends()["cpu"]:
        assert "CPU kernels are unavailable" in cli._why_xla_only(OldJax, Ffi, registry)
        return
    assert "jax 0.4.0 has no jax.ffi.ffi_call" in cli._why_xla_only(OldJax, Ffi, registry)
    jax = pytest.importorskip("jax")
    if hasattr(jax, "ffi") and hasattr(jax.ffi, "ffi_call"):
        assert cli._why_xla_only(jax, Ffi, registry) == "XLA FFI API 1.x (the handlers are written for 0.x)"


def test_check_fails_when_any_logitkit_path_misses_the_contract(monkeypatch, capsys):
    pytest.importorskip("mpmath")
    # One logitkit column beyond tolerance (a stand-in for a broken framework path) must fail.
    monkeypatch.setattr(cli, "_check_rows", lambda: [
        ("row", {"logitkit": 1e-8, "logitkit (TensorFlow)": 1e-3}, cli.CONTRACT_REL)])
    monkeypatch.setattr(cli, "_check_properties", lambda: [])
    assert cli.main(["check"]) == 1
    assert "result: FAIL" in capsys.readouterr().out
