"""benchmarks/gpu.py's dry run: the Triton interpreter on the CPU, tiny shapes, in a subprocess.

Checks the one table it writes (header, columns, the rows every run must have, peers reported
as not installed) and that ``--sweep`` merges its winners into the configuration table it is
pointed at, leaving the package's own table alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")
COLUMNS = ["workload", "implementation", "time (ms, median)", "effective rate", "% of copy BW or × 3 GEMMs",
           "peak MiB beyond inputs", "error vs float64 reference"]


def _run(*args, timeout=300):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(ROOT, "src"))
    env.pop("OUT", None)
    return subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _table(path):
    with open(path) as f:
        lines = f.read().splitlines()
    header = lines[0]
    cols = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[4:] if ln.startswith("|")]
    return header, cols, rows


def _impls(rows, workload_part):
    return {r[1]: r for r in rows if workload_part in r[0]}


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.slow  # make test-slow (CI runs it after make test): every row of the GPU bench in the interpreter
def test_dry_run_writes_one_table_with_every_row(tmp_path):
    out = tmp_path / "gpu-dry.md"
    p = _run("--dtypes", "float32", "--no-tune", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    header, cols, rows = _table(out)
    assert header.startswith("**CPU (Triton interpreter, dry run)**")
    assert re.search(r"device-to-device copy \d+\.\d+ TB/s \(\d+(\.\d+)? GB/s; 1 read \+ 1 write\)", header)
    assert "torch " in header and "triton " in header and "liger-kernel" in header and "quack-kernels" in header
    assert cols == COLUMNS
    assert all(len(r) == len(COLUMNS) for r in rows), [r for r in rows if len(r) != len(COLUMNS)]
    assert p.stdout.strip().endswith(rows[-1][-1] + " |")  # printed too

    ms = r"\d+\.\d{3}"
    ce = _impls(rows, "CE fwd+bwd 8x1000 float32")
    for impl in ("logitkit (in place)", "logitkit (new grad)", "torch eager", "torch.compile [backend=eager: dry run]"):
        assert re.fullmatch(ms, ce[impl][2]), ce[impl]
        assert ce[impl][4].endswith("%")
        loss, grad = (float(v) for v in re.fullmatch(r"loss (\S+), grad (\S+)", ce[impl][6]).groups())
        assert loss <= 1e-5 and grad <= 1e-5, ce[impl]
    for impl, module in (("liger-kernel", "liger_kernel"), ("quack", "quack")):
        assert impl in ce
        want = "skipped (needs CUDA: dry run)" if _installed(module) else "not installed ("
        assert ce[impl][2].startswith(want), ce[impl]
    for part in ("softmax fwd 8x1000 float32", "softmax fwd+bwd 8x1000 float32"):
        sm = _impls(rows, part)
        assert {"logitkit", "torch eager", "torch.compile [backend=eager: dry run]", "liger-kernel", "quack"} <= set(sm)
        assert re.fullmatch(r"(out|grad) \d\.\de-\d\d", sm["logitkit"][6])

    assert not _impls(rows, "bfloat16")  # --dtypes float32 applies to every workload
    lin = _impls(rows, "linear head fwd+bwd N=8 H=16 V=300 float32")
    assert re.fullmatch(ms, lin["3 GEMMs alone (cuBLAS, torch.matmul): the floor"][2])
    for impl, err in (("logitkit Triton kernels (loss)", "loss"),
                      ("logitkit Triton kernels (logprobs+entropy)", "logprobs"),
                      ("logitkit.torch.linear_cross_entropy (loss)", "loss"),
                      ("logitkit.torch.linear_head (loss)", "loss"),
                      ("logitkit.torch.linear_head (logprobs+entropy)", "logprobs"),
                      ("logitkit.torch.linear_head (kl, teacher head)", "kl"),
                      ("torch eager (loss)", "loss"), ("torch eager (logprobs+entropy)", "logprobs"),
                      ("torch eager (kl, teacher head)", "kl"),
                      ("torch.compile [backend=eager: dry run] (loss)", "loss"),
                      ("torch.compile [backend=eager: dry run] (logprobs+entropy)", "logprobs"),
                      ("torch.compile [backend=eager: dry run] (kl, teacher head)", "kl")):
        assert re.fullmatch(ms, lin[impl][2]), lin.get(impl)
        assert re.fullmatch(r"\d+\.\d\d× GEMMs", lin[impl][4]), lin[impl]
        assert lin[impl][6].startswith(err + " "), lin[impl]
    for impl in ("liger-kernel (loss)", "cut-cross-entropy (loss)", "quack (loss)"):
        assert lin[impl][2].startswith(("not installed (", "skipped (needs CUDA")), lin[impl]
    for impl in ("logitkit.torch.linear_head (logprobs+entropy)", "logitkit Triton kernels (logprobs+entropy)"):
        vals = re.findall(r"(\d\.\de-\d\d)", lin[impl][6])  # float32 heads agree with float64
        assert vals and max(float(v) for v in vals) <= 1e-5, lin[impl]

    vpw = _impls(rows, "vocab-parallel CE fwd+bwd, local shard 8x300 (V = 2400/8) float32")
    kernels = ("logitkit vocab_parallel_cross_entropy, Triton kernels (forced: dry run)",
               "logitkit Triton kernels alone (vp_partials + vp_grad, no autograd)",
               "logitkit vocab_parallel_cross_entropy, xp stages on torch ops (before)")
    for impl in ("F.cross_entropy (torch eager) on the local shard",) + kernels:
        assert re.fullmatch(ms, vpw[impl][2]), vpw.get(impl)
        loss, grad = (float(v) for v in re.fullmatch(r"loss (\S+), grad (\S+)", vpw[impl][6]).groups())
        assert loss <= 1e-5 and grad <= 1e-5, vpw[impl]
    for impl in kernels:  # each as a multiple of F.cross_entropy on the same shard
        assert re.fullmatch(r"\d+%, \d+\.\d\d× F\.cross_entropy", vpw[impl][4]), vpw[impl]
    assert vpw["the two all-reduces alone"][2] == "skipped (no process group: one process)"
    for impl in ("F.cross_entropy, CUDA graph", "logitkit vocab_parallel_cross_entropy, Triton kernels, CUDA graph"):
        assert vpw[impl][2] == "skipped (needs CUDA: dry run)", vpw.get(impl)

    lab = _impls(rows, "label check:")
    assert re.fullmatch(ms, lab["deferred check on (default)"][2])
    assert re.search(r"on costs [+-]\d+\.\d µs per call", lab["deferred check off"][6])


@pytest.mark.slow  # make test-slow (CI runs it after make test): a sweep in the interpreter
def test_sweep_dry_run_merges_winners_into_the_given_table(tmp_path):
    from logitkit.kernels.triton import _configs

    with open(_configs.PATH) as f:
        package_before = f.read()
    configs, out = tmp_path / "configs.json", tmp_path / "sweep.md"
    p = _run("--dtypes", "float32", "--only", "ce", "--sweep", "--no-compile", "--configs", str(configs),
             "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    with open(_configs.PATH) as f:
        assert f.read() == package_before  # the interpreter's times never enter the package table
    doc = json.loads(configs.read_text())
    before = {(e["op"], e["dtype"], e["V"]): e for e in json.loads(package_before)["entries"]}
    after = {(e["op"], e["dtype"], e["V"]): e for e in doc["entries"]}
    assert set(after) == set(before)
    swept = {k for k in after if after[k] != before[k]}
    assert swept == {("ce", "float32", V) for V in _configs.BUCKETS}
    _, _, rows = _table(out)
    for k in swept:
        e = after[k]
        assert e["source"].startswith("dry run") and "ms" not in e and "pct_copy" not in e
        label = (f"[BLOCK={e['block']}, warps={e['warps']}, per-SM={e['per_sm'] or 'row'}, "
                 f"prefetch={int(e['prefetch'])}, hints={int(e['hints'])}]")
        # the winner is the fastest of its bucket's rows (each bucket has its own row count N x V)
        bucket_rows = [r for r in rows if r[1].startswith("logitkit in place") and r[0].endswith("float32")
                       and f"x{dict(zip(_configs.BUCKETS, (300, 1000, 3000)))[k[2]]} " in r[0] + " "]
        assert len(bucket_rows) >= 8
        best = min(bucket_rows, key=lambda r: float(r[2]))
        assert best[1].endswith(label), (best, label)


def test_sweep_on_the_cpu_refuses_the_package_table():
    p = _run("--sweep", timeout=120)
    assert p.returncode == 2 and "--configs" in p.stderr
