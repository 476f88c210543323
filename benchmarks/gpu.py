#!/usr/bin/env python
"""GPU benchmark of logitkit's Triton kernels against torch eager, torch.compile, Liger-Kernel
and Cut Cross-Entropy (each when importable). Prints ONE markdown table (and writes it to
``$OUT/gpu.md`` when ``OUT`` is set). Needs no network and nothing beyond torch, triton and,
optionally, the ``liger-kernel`` / ``cut-cross-entropy`` wheels.

Workloads (``--quick`` shrinks them for a smoke test):

* ``ce``: cross-entropy forward+backward (mean), N x V = 16384 x 128256, bf16 and float32
* ``softmax``: softmax forward, and forward+backward, same shapes
* ``linear-ce``: linear + cross-entropy forward+backward, N=8192, H=4096, V=128256, bf16

Columns: median time over timed iterations (CUDA events, after warm-up); effective TB/s = bytes
that must move / time (CE: read logits + write the gradient; softmax: read + write; softmax
fwd+bwd: x, y, y, dy, dx); % of the device-to-device copy bandwidth measured first in the same
run; peak memory beyond the inputs (``torch.cuda.max_memory_allocated`` delta over one call,
outputs included); error against float64 (CE, softmax) or float32 (linear CE) references on a
slice of rows. Linear CE is compute-bound: its row reports TFLOP/s (6 N H V useful flops).

GPU::

    pip install --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src python benchmarks/gpu.py

CPU smoke test (Triton interpreter, tiny shapes)::

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu.py --quick --device cpu

Each cell catches its own failure and prints ``OOM`` or ``error: ...`` instead of stopping;
cells past ``--budget`` seconds print ``skipped (time budget)``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# logitkit.kernels.triton directly: this script depends on no other part of logitkit.
from logitkit.kernels import triton as tk  # noqa: E402


# Cells run in phases so that a tight budget drops the least important ones: every workload's
# main cells first (logitkit and the peers), then the logitkit configuration sweep (quick), then
# torch.compile (slow to compile). The table lists them per workload in DISPLAY order.
PHASES = ("main", "tune", "compile")
DISPLAY = ("main", "compile", "tune")
# logitkit sweep around the default (16 KiB steps, 16 warps, 1 program per SM, prefetch, L2
# hints): (input bytes per block step, num_warps, programs per SM (0: one per row), prefetch, hints)
SWEEP = ((16384, 16, 2, True, True), (32768, 32, 1, True, True), (16384, 8, 2, True, True),
         (16384, 16, 0, True, True), (16384, 16, 1, False, True), (16384, 16, 1, True, False))


def sweep_envs(itemsize: int):
    for block_bytes, warps, persist, prefetch, hints in SWEEP:
        label = (f"[BLOCK={block_bytes // itemsize}, warps={warps}, per-SM={persist or 'row'}, "
                 f"prefetch={int(prefetch)}, hints={int(hints)}]")
        env = {"LOGITKIT_TRITON_BLOCK": str(block_bytes // itemsize), "LOGITKIT_TRITON_WARPS": str(warps),
               "LOGITKIT_TRITON_PERSIST": str(persist), "LOGITKIT_TRITON_PREFETCH": str(int(prefetch)),
               "LOGITKIT_TRITON_HINTS": str(int(hints))}
        yield label, env


class env_set:
    """Set environment variables for the duration of a ``with`` block."""

    def __init__(self, env):
        self.env, self.old = env, {}

    def __enter__(self):
        for k, v in self.env.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Ctx:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.t0 = time.perf_counter()
        self.rows: list[tuple[tuple, list[str]]] = []  # (sort key, row)
        self.copy_bw = float("nan")  # bytes/s
        self.workload = 0  # index of the workload being run (table order)
        self.phase = "main"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)


# ----------------------------------------------------------------------------------------------
# measurement


def timed(ctx: Ctx, fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    if ctx.cuda:
        events = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
        torch.cuda.synchronize(ctx.dev)
        return statistics.median(a.elapsed_time(b) for a, b in events)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mb(ctx: Ctx, fn) -> float:
    """MiB allocated beyond what was live before one call of ``fn`` (its outputs included)."""
    if not ctx.cuda:
        return float("nan")
    ctx.sync()
    torch.cuda.reset_peak_memory_stats(ctx.dev)
    base = torch.cuda.memory_allocated(ctx.dev)
    out = fn()
    ctx.sync()
    peak = torch.cuda.max_memory_allocated(ctx.dev) - base
    del out
    return peak / 2**20


def measure_copy(ctx: Ctx) -> None:
    n = (1 << 28) if ctx.cuda and not ctx.args.quick else (1 << 22)  # 1 GiB / 16 MiB of float32
    src = torch.randn(n, device=ctx.dev)
    dst = torch.empty_like(src)
    ms = timed(ctx, lambda: dst.copy_(src), 3, 10 if ctx.cuda else 3)
    ctx.copy_bw = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst


def cell(ctx: Ctx, workload: str, impl: str, run, *, nbytes=None, flops=None, check=None,
         warmup=2, iters=10) -> None:
    """Time ``run``, measure its memory, then ``check()`` -> error string; one table row."""
    row = [workload, impl]
    key = (ctx.workload, DISPLAY.index(ctx.phase), len(ctx.rows))
    if ctx.over_budget():
        ctx.rows.append((key, row + ["skipped (time budget)", "", "", "", ""]))
        print(f"  {impl}: skipped", file=sys.stderr)
        return
    t = time.perf_counter()
    try:
        ms = timed(ctx, run, warmup, iters if ctx.cuda else 2)
        mem = peak_mb(ctx, run)
        err = check() if check is not None else ""
        if nbytes is not None:
            tbs = nbytes / (ms * 1e-3) / 1e12
            rate, pct = f"{tbs:.2f} TB/s", f"{100 * nbytes / (ms * 1e-3) / ctx.copy_bw:.0f}%"
        else:
            rate, pct = f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s", "—"
        row += [f"{ms:.3f}", rate, pct, "n/a" if math.isnan(mem) else f"{mem:,.0f}", err]
    except torch.cuda.OutOfMemoryError:
        row += ["OOM", "", "", "", ""]
    except Exception as e:  # one failing peer must not stop the table
        msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")
        row += [f"error: {msg[:120]}", "", "", "", ""]
        if ctx.args.verbose:
            traceback.print_exc()
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
    ctx.rows.append((key, row))
    print(f"  {impl}: {row[2]} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)


def _maxerr(got, want) -> float:
    return float((got.double() - want.double()).abs().max())


def _relerr(got, want) -> float:
    return _maxerr(got, want) / max(float(want.double().abs().max()), 1e-300)


# ----------------------------------------------------------------------------------------------
# peers (None when not importable)


def _peer(module: str, attr: str):
    """The peer's entry point, or the exception that importing it raised."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # any failure means "not available here", reported in the table
        return e


def liger_ce():
    return _peer("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction")


def liger_softmax():
    return _peer("liger_kernel.ops.softmax", "LigerSoftmaxFunction")


def liger_flce():
    return _peer("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")


def cce_fn():
    return _peer("cut_cross_entropy", "linear_cross_entropy")


def peer_or_row(ctx: "Ctx", workload: str, impl: str, peer):
    """``peer`` if usable; otherwise a table row saying why not (on a GPU) and ``None``."""
    if not ctx.cuda:
        return None  # the peers' kernels need CUDA; the CPU smoke test leaves them out
    if isinstance(peer, Exception):
        msg = f"{type(peer).__name__}: {peer}".replace("|", "/").replace("\n", " ")[:100]
        ctx.rows.append(((ctx.workload, DISPLAY.index(ctx.phase), len(ctx.rows)),
                         [workload, impl, f"not importable ({msg})", "", "", "", ""]))
        return None
    return peer


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _compile(fn):
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------
# workloads


def ce_workload(ctx: Ctx, N: int, V: int, dtype: torch.dtype) -> None:
    name = f"CE fwd+bwd {N}x{V} {str(dtype).replace('torch.', '')}"
    print(name, file=sys.stderr)
    g = torch.Generator(device=ctx.dev).manual_seed(0)
    x0 = (torch.randn(N, V, device=ctx.dev, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (N,), device=ctx.dev, generator=g)
    x = x0.clone()
    k = min(64, N)
    # float64 references: the mean loss over all rows, the gradient of the first k rows
    loss_ref = sum(F.cross_entropy(x0[i:i + 1024].double(), y[i:i + 1024], reduction="sum")
                   for i in range(0, N, 1024)) / N
    p = torch.softmax(x0[:k].double(), -1)
    grad_ref = (p - F.one_hot(y[:k], V).double()) / N
    del p
    scale = torch.full((1,), 1.0 / N, device=ctx.dev)
    nbytes = 2 * N * V * x0.element_size()

    def check_with(fn):
        def check():
            x.copy_(x0)
            loss, grad = fn()
            return f"loss {abs(float(loss) - float(loss_ref)):.1e}, grad {_relerr(grad[:k], grad_ref):.1e}"
        return check

    def lk_inplace():
        ce, m, r, grad = tk.ce_forward_backward(x, y, scale, scale, out=x)
        return ce.sum() / N, grad

    def lk_new():
        ce, m, r, grad = tk.ce_forward_backward(x, y, scale, scale)
        return ce.sum() / N, grad

    def eager(f=lambda a, b: F.cross_entropy(a, b)):
        xr = x.detach().requires_grad_()
        loss = f(xr, y)
        (grad,) = torch.autograd.grad(loss, xr)
        return loss.detach(), grad

    if ctx.phase == "main":
        x.copy_(x0)
        cell(ctx, name, "logitkit (in place)", lk_inplace, nbytes=nbytes, check=check_with(lk_inplace))
        x.copy_(x0)
        cell(ctx, name, "logitkit (new grad)", lk_new, nbytes=nbytes, check=check_with(lk_new))
        x.copy_(x0)
        cell(ctx, name, "torch eager", eager, nbytes=nbytes, check=check_with(eager))
        L = peer_or_row(ctx, name, "liger-kernel", liger_ce())
        if L is not None:
            def liger():
                xr = x.detach().requires_grad_()
                loss = _first(L.apply(xr, y, None))  # the gradient is written into x in forward
                (grad,) = torch.autograd.grad(loss, xr)
                return loss.detach(), grad
            x.copy_(x0)
            cell(ctx, name, "liger-kernel", liger, nbytes=nbytes, check=check_with(liger))
    elif ctx.phase == "compile":
        cf = _compile(lambda a, b: F.cross_entropy(a, b))
        x.copy_(x0)
        run = lambda: eager(cf)  # noqa: E731
        cell(ctx, name, "torch.compile", run, nbytes=nbytes, check=check_with(run))
    else:
        for label, env in sweep_envs(x0.element_size()):
            with env_set(env):
                x.copy_(x0)
                cell(ctx, name, f"logitkit in place {label}", lk_inplace, nbytes=nbytes,
                     check=check_with(lk_inplace))
    del x, x0


def softmax_workload(ctx: Ctx, N: int, V: int, dtype: torch.dtype, backward: bool) -> None:
    name = f"softmax {'fwd+bwd' if backward else 'fwd'} {N}x{V} {str(dtype).replace('torch.', '')}"
    print(name, file=sys.stderr)
    g = torch.Generator(device=ctx.dev).manual_seed(1)
    x = (torch.randn(N, V, device=ctx.dev, generator=g) * 2).to(dtype)
    dy = torch.randn(N, V, device=ctx.dev, generator=g).to(dtype) if backward else None
    k = min(64, N)
    p_ref = torch.softmax(x[:k].double(), -1)
    if backward:
        d = dy[:k].double()
        ref = p_ref * (d - (p_ref * d).sum(-1, keepdim=True))
    else:
        ref = p_ref
    s = x.element_size()
    nbytes = (5 if backward else 2) * N * V * s

    def check_with(fn):
        return lambda: f"{'grad' if backward else 'out'} {_relerr(fn()[:k], ref):.1e}"

    def lk():
        y = tk.softmax_forward(x)
        return tk.softmax_backward(y, dy, out=y) if backward else y

    def torch_fn(f):
        def run():
            if not backward:
                with torch.no_grad():
                    return f(x)
            xr = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(f(xr), xr, dy)
            return grad
        return run

    if ctx.phase == "main":
        cell(ctx, name, "logitkit", lk, nbytes=nbytes, check=check_with(lk))
        if not backward:
            xi = x.clone()
            run = lambda: tk.softmax_forward(xi, out=xi)  # noqa: E731
            cell(ctx, name, "logitkit (in place)", run, nbytes=nbytes,
                 check=lambda: f"out {_relerr(tk.softmax_forward(x.clone())[:k], ref):.1e}")
            del xi
        eager = torch_fn(lambda a: torch.softmax(a, -1))
        cell(ctx, name, "torch eager", eager, nbytes=nbytes, check=check_with(eager))
        L = peer_or_row(ctx, name, "liger-kernel", liger_softmax())
        if L is not None:
            lg = torch_fn(lambda a: L.apply(a))
            cell(ctx, name, "liger-kernel", lg, nbytes=nbytes, check=check_with(lg))
    elif ctx.phase == "compile":
        comp = torch_fn(_compile(lambda a: torch.softmax(a, -1)))
        cell(ctx, name, "torch.compile", comp, nbytes=nbytes, check=check_with(comp))
    elif not backward:  # fwd+bwd runs the same kernels: the forward sweep covers it
        for label, env in sweep_envs(s):
            with env_set(env):
                cell(ctx, name, f"logitkit {label}", lk, nbytes=nbytes, check=check_with(lk))
    del x, dy


def linear_ce_workload(ctx: Ctx, N: int, H: int, V: int, dtype: torch.dtype) -> None:
    name = f"linear CE fwd+bwd N={N} H={H} V={V} {str(dtype).replace('torch.', '')}"
    print(name, file=sys.stderr)
    g = torch.Generator(device=ctx.dev).manual_seed(2)
    h = torch.randn(N, H, device=ctx.dev, generator=g).to(dtype)
    W = (torch.randn(V, H, device=ctx.dev, generator=g) * (2.0 / math.sqrt(H))).to(dtype)
    y = torch.randint(0, V, (N,), device=ctx.dev, generator=g)
    k = min(64, N)
    flops = 6 * N * H * V
    # float32 references: loss, dW over all rows (chunked), dh for the first k rows
    hf, Wf = h.float(), W.float()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    loss_ref = torch.zeros((), dtype=torch.float64, device=ctx.dev)
    dW_ref = torch.zeros(V, H, device=ctx.dev)
    for i in range(0, N, 1024):
        z = hf[i:i + 1024] @ Wf.T
        loss_ref += F.cross_entropy(z, y[i:i + 1024], reduction="sum").double()
        dz = torch.softmax(z, -1)
        dz[torch.arange(dz.shape[0], device=ctx.dev), y[i:i + 1024]] -= 1
        if i == 0:
            dh_ref = (dz[:k] @ Wf) / N
        dW_ref += dz.T @ hf[i:i + 1024] / N
        del z, dz
    loss_ref /= N
    torch.backends.cuda.matmul.allow_tf32 = old_tf32
    del hf, Wf
    scale = torch.full((1,), 1.0 / N, device=ctx.dev)

    def check_with(fn):
        def check():
            loss, dh, dW = fn()
            return (f"loss {abs(float(loss) - float(loss_ref)):.1e}, dh {_relerr(dh[:k], dh_ref):.1e}, "
                    f"dW {_relerr(dW, dW_ref):.1e}")
        return check

    def lk():
        ce, m, r = tk.linear_ce_forward(h, W, y)
        dh, dW, _db, _skipped = tk.linear_ce_backward(h, W, y, m, r, scale, scale)
        return ce.sum() / N, dh, dW

    def autograd_fn(f):
        def run():
            hr, Wr = h.detach().requires_grad_(), W.detach().requires_grad_()
            loss = f(hr, Wr)
            dh, dW = torch.autograd.grad(loss, (hr, Wr))
            return loss.detach(), dh, dW
        return run

    def torch_lce(a, b):
        return F.cross_entropy((a @ b.T).float(), y)

    if ctx.phase == "main":
        cell(ctx, name, "logitkit", lk, flops=flops, check=check_with(lk), iters=5)
        eager = autograd_fn(torch_lce)
        cell(ctx, name, "torch eager", eager, flops=flops, check=check_with(eager), iters=5)
        L = peer_or_row(ctx, name, "liger-kernel", liger_flce())
        if L is not None:
            lg = autograd_fn(lambda a, b: _first(L.apply(a, b, y)))
            cell(ctx, name, "liger-kernel", lg, flops=flops, check=check_with(lg), iters=5)
        C = peer_or_row(ctx, name, "cut-cross-entropy", cce_fn())
        if C is not None:
            cc = autograd_fn(lambda a, b: C(a, b, y))
            cell(ctx, name, "cut-cross-entropy (default filter)", cc, flops=flops, check=check_with(cc),
                 iters=5)
            ce_exact = autograd_fn(lambda a, b: C(a, b, y, filter_eps=None))
            cell(ctx, name, "cut-cross-entropy (filter_eps=None)", ce_exact, flops=flops,
                 check=check_with(ce_exact), iters=5)
    elif ctx.phase == "compile":
        comp = autograd_fn(_compile(torch_lce))
        cell(ctx, name, "torch.compile", comp, flops=flops, check=check_with(comp), iters=5)
    else:
        def lk_filter():  # CCE-style skipping of tiles whose softmax is below float32 epsilon
            ce, m, r = tk.linear_ce_forward(h, W, y)
            dh, dW, _db, _skipped = tk.linear_ce_backward(h, W, y, m, r, scale, scale, filter_eps=2.0**-24)
            return ce.sum() / N, dh, dW
        cell(ctx, name, "logitkit [filter_eps=2**-24]", lk_filter, flops=flops, check=check_with(lk_filter),
             iters=5)
    del h, W, dW_ref


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1)")
    ap.add_argument("--budget", type=float, default=255.0,
                    help="seconds after which no new cell starts (default 255: the run ends within 5 min)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--no-tune", dest="tune", action="store_false",
                    help="leave out the logitkit configuration sweep rows (BLOCK, warps, persistence)")
    ap.add_argument("--only", default="", help="comma list among ce,softmax,linear")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing cells")
    args = ap.parse_args(argv)
    ctx = Ctx(args)
    if ctx.cuda and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu with TRITON_INTERPRET=1 for a smoke test", file=sys.stderr)
        return 2
    if not ctx.cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu runs the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    only = set(filter(None, args.only.split(","))) or {"ce", "softmax", "linear"}
    if args.quick:
        ce_shape, lin_shape = (64, 20000), (64, 64, 1000)
    else:
        ce_shape, lin_shape = (16384, 128256), (8192, 4096, 128256)

    measure_copy(ctx)
    workloads = []
    if "ce" in only:
        workloads += [lambda dt=dt: ce_workload(ctx, *ce_shape, dt) for dt in (torch.bfloat16, torch.float32)]
    if "softmax" in only:
        workloads += [lambda dt=dt, b=b: softmax_workload(ctx, *ce_shape, dt, b)
                      for b in (False, True) for dt in (torch.bfloat16, torch.float32)]
    if "linear" in only:
        workloads += [lambda: linear_ce_workload(ctx, *lin_shape, torch.bfloat16)]
    phases = [p for p in PHASES if (p != "compile" or not args.no_compile) and (p != "tune" or args.tune)]
    for phase in phases:
        ctx.phase = phase
        for i, run in enumerate(workloads):
            if ctx.over_budget():
                break
            ctx.workload = i
            print(f"[{phase}]", end=" ", file=sys.stderr)
            run()
            if ctx.cuda:
                torch.cuda.empty_cache()

    import triton
    dev_name = torch.cuda.get_device_name(ctx.dev) if ctx.cuda else "CPU (Triton interpreter)"
    lines = [
        f"**{dev_name}**, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"triton {triton.__version__}; device-to-device copy {ctx.copy_bw / 1e12:.2f} TB/s "
        f"(1 read + 1 write); total run {time.perf_counter() - ctx.t0:.0f} s",
        "",
        "| workload | impl | time (ms, median) | effective rate | % of copy BW | peak MiB beyond inputs | error vs reference |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(r) + " |" for _, r in sorted(ctx.rows, key=lambda kr: kr[0])]
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
