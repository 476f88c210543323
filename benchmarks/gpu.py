#!/usr/bin/env python
"""GPU benchmark of logitkit's Triton kernels and torch heads against torch eager, torch.compile,
Liger-Kernel, Cut Cross-Entropy and quack (each peer when it imports; otherwise its row says
"not installed"). Prints ONE markdown table and writes it to ``--out`` (default on a GPU:
``benchmarks/results/gpu-<card>-<date>.md``; also ``$OUT/gpu.md`` when ``OUT`` is set).

The table's header line names the card, the date, the versions and the device-to-device copy
bandwidth measured first in the same run. Columns: median time over timed iterations (CUDA events,
after warm-up); effective rate (bytes that must move / time, or useful TFLOP/s for the heads);
% of that copy bandwidth for the memory-bound ops, or the time as a multiple of the head's three
GEMMs alone (cuBLAS through ``torch.matmul``, same run: the physical floor); peak memory beyond
the inputs (``torch.cuda.max_memory_allocated`` delta over one call, outputs included); error
against float64 references.

Workloads (``--quick`` shrinks them; ``--only`` picks some: ce, softmax, linear, vp, labels):

* ``ce``: cross-entropy forward+backward (mean), N x V = 16384 x 128256, bf16 and float32
* ``softmax``: softmax forward, and forward+backward, same shapes
* ``linear``: the fused head, forward+backward, bf16 N=8192 H=4096 V=128256 and float32 N=4096
  H=1024 V=32000: the Triton kernels, ``logitkit.torch.linear_cross_entropy`` and
  ``logitkit.torch.linear_head`` with outputs loss / logprobs+entropy / kl (a teacher head)
* ``vp``: vocabulary-parallel CE forward+backward on one rank's local shard, N = 8192, n = 128256/8
  and 262144/8, bf16 and float32, collectives the identity (one process): the Triton kernels
  (kernels/triton/vp.py), the kernels alone, and the former xp stages on torch ops, each as a
  multiple of ``F.cross_entropy`` on the same shard; the two all-reduces only inside a real group
* ``labels``: the host cost of the deferred bad-label check (kernels/triton/_labels.py): 100
  small ``ce_forward`` calls with it on and off

``--sweep`` times each kernel configuration candidate (the table's entry and ``SWEEP``) for CE
fwd+bwd, softmax forward and softmax backward at V = 32000, 128256 and 262144 (N x V ~ 2.1e9)
and writes the fastest per (op, dtype, V) into ``--configs`` (default: the package's
``kernels/triton/configs.json``; a copy goes to ``$OUT``), which the kernels read.

GPU (``benchmarks/gpu_setup.sh`` installs the peers' wheels from ``.whl/`` first)::

    PYTHONPATH=src python benchmarks/gpu.py [--sweep]

Dry run (Triton interpreter on the CPU, tiny shapes, torch.compile with the eager backend)::

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu.py --quick --device cpu --out /tmp/gpu.md

Each cell catches its own failure and prints ``OOM`` or ``error: ...`` instead of stopping;
cells past ``--budget`` seconds print ``skipped (time budget)``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from logitkit.kernels import triton as tk  # noqa: E402
from logitkit.kernels.triton import _configs  # noqa: E402

COLUMNS = ("workload", "implementation", "time (ms, median)", "effective rate", "% of copy BW or × 3 GEMMs",
           "peak MiB beyond inputs", "error vs float64 reference")
# Cells run in phases so that a tight budget drops the least important ones: every workload's
# main cells first (logitkit and the peers), then torch.compile (slow to compile), then the
# configuration sweep. The table lists them per workload in phase order.
PHASES = ("main", "compile", "tune")
# configuration candidates besides the table's own entry: (input bytes per block step, num_warps,
# programs per SM (0: one per row), prefetch, L2 hints)
SWEEP = ((16384, 16, 1, True, True), (16384, 16, 2, True, True), (32768, 32, 1, True, True),
         (16384, 8, 2, True, True), (32768, 16, 2, True, True), (16384, 16, 0, True, True),
         (16384, 16, 1, False, True), (16384, 16, 1, True, False))
PEERS = ("liger-kernel", "cut-cross-entropy", "quack-kernels")


def cfg_label(block: int, warps: int, per_sm: int, prefetch: bool, hints: bool) -> str:
    # the format test_triton_config.py finds a measured configuration by in a results file
    return (f"[BLOCK={block}, warps={warps}, per-SM={per_sm or 'row'}, prefetch={int(prefetch)}, "
            f"hints={int(hints)}]")


def candidates(op: str, dtype: torch.dtype, V: int):
    """``(label, config dict)``: the table's entry for ``(op, dtype, V)`` first, then ``SWEEP``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    e = _configs.wide(op, dtype, V)
    seen = set()
    cfgs = [("(table) ", (int(e["block"]), int(e["warps"]), int(e["per_sm"]), bool(e.get("prefetch", True)),
                          bool(e.get("hints", True))))]
    cfgs += [("", (b // itemsize, w, p, pf, h)) for b, w, p, pf, h in SWEEP]
    for tag, c in cfgs:
        if c in seen:
            continue
        seen.add(c)
        yield tag + cfg_label(*c), dict(zip(("block", "warps", "per_sm", "prefetch", "hints"), c))


def cfg_env(c: dict) -> dict:
    return {"LOGITKIT_TRITON_BLOCK": str(c["block"]), "LOGITKIT_TRITON_WARPS": str(c["warps"]),
            "LOGITKIT_TRITON_PERSIST": str(c["per_sm"]), "LOGITKIT_TRITON_PREFETCH": str(int(c["prefetch"])),
            "LOGITKIT_TRITON_HINTS": str(int(c["hints"]))}


class Stop(BaseException):
    """Raised by SIGTERM (``timeout`` in gpu_setup.sh): stop measuring, still write the table.
    A BaseException, so that a cell's ``except Exception`` does not swallow it."""


def _on_term(signum, frame):
    raise Stop()


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
        self.winners: dict[tuple, tuple] = {}  # (op, dtype, V) -> (ms, config, % of copy)
        self.gemm_ms: dict[str, float] = {}  # linear workload -> its three GEMMs' time
        self.refs: dict[str, tuple] = {}  # linear workload -> float64 references (kept across phases)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def key(self):
        return (self.workload, PHASES.index(self.phase), len(self.rows))

    def add(self, workload, impl, *cells):
        cells = list(cells) + [""] * (len(COLUMNS) - 2 - len(cells))
        self.rows.append((self.key(), [workload, impl] + cells))


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


def cell(ctx: Ctx, workload: str, impl: str, run, *, nbytes=None, flops=None, gemm_ms=None, check=None,
         warmup=2, iters=10, record=None) -> float:
    """Time ``run``, measure its memory, then ``check()`` -> error string; one table row.

    ``nbytes``: bytes that must move (rate and % of copy); ``flops`` with ``gemm_ms``: useful flops
    and the three GEMMs' time (rate and × GEMMs). ``record=(op, dtype, V, config)`` offers the
    result to the sweep's winners. Returns the median ms (NaN when the cell failed or was skipped).
    """
    if ctx.over_budget():
        ctx.add(workload, impl, "skipped (time budget)")
        print(f"  {impl}: skipped", file=sys.stderr)
        return float("nan")
    t = time.perf_counter()
    ms = float("nan")
    if not ctx.cuda:  # the interpreter is slow: enough calls to run every code path
        warmup, iters = 1, 1
    try:
        ms = timed(ctx, run, warmup, iters)
        mem = peak_mb(ctx, run)
        err = check() if check is not None else ""
        if nbytes is not None:
            bps = nbytes / (ms * 1e-3)
            rate = f"{bps / 1e12:.2f} TB/s" if ctx.cuda else f"{bps / 1e9:.3f} GB/s"
            rel = f"{100 * nbytes / (ms * 1e-3) / ctx.copy_bw:.0f}%"
        elif flops is not None:
            rate = f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s" if ctx.cuda else f"{flops / (ms * 1e-3) / 1e9:.2f} GFLOP/s"
            rel = f"{ms / gemm_ms:.2f}× GEMMs" if gemm_ms and not math.isnan(gemm_ms) else "—"
        else:
            rate, rel = "", "—"
        ctx.add(workload, impl, f"{ms:.3f}", rate, rel, "n/a" if math.isnan(mem) else f"{mem:,.0f}", err)
        if record is not None and nbytes is not None:
            op, dt, V, cfg = record
            pct = 100 * nbytes / (ms * 1e-3) / ctx.copy_bw
            best = ctx.winners.get((op, dt, V))
            if best is None or ms < best[0]:
                ctx.winners[(op, dt, V)] = (ms, cfg, pct)
    except torch.cuda.OutOfMemoryError:
        ctx.add(workload, impl, "OOM")
        ms = float("nan")
    except Exception as e:  # one failing peer must not stop the table
        msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")
        ctx.add(workload, impl, f"error: {msg[:120]}")
        ms = float("nan")
        if ctx.args.verbose:
            traceback.print_exc()
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
    print(f"  {impl}: {ctx.rows[-1][1][2]} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return ms


def _maxerr(got, want) -> float:
    return float((got.double() - want.double()).abs().max())


def _relerr(got, want) -> float:
    return _maxerr(got, want) / max(float(want.double().abs().max()), 1e-300)


def _dtname(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# peers


def _peer(module: str, attr: str):
    """The peer's entry point, or the exception that importing it raised."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # any failure means "not available here", reported in the table
        return e


PEER_ENTRIES = {
    "liger-kernel CE": ("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction"),
    "liger-kernel softmax": ("liger_kernel.ops.softmax", "LigerSoftmaxFunction"),
    "liger-kernel FLCE": ("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction"),
    "cut-cross-entropy": ("cut_cross_entropy", "linear_cross_entropy"),
    "quack CE": ("quack.cross_entropy", "cross_entropy"),
    "quack softmax": ("quack.softmax", "softmax"),
    "quack linear CE": ("quack.linear_cross_entropy", "chunked_linear_cross_entropy"),
}


def peer_or_row(ctx: Ctx, workload: str, impl: str, entry: str):
    """The peer's entry point if it can run here; otherwise a row saying why not and ``None``."""
    peer = _peer(*PEER_ENTRIES[entry])
    if isinstance(peer, Exception):
        msg = f"{type(peer).__name__}: {peer}".replace("|", "/").replace("\n", " ")[:100]
        ctx.add(workload, impl, f"not installed ({msg})")
        return None
    if not ctx.cuda:
        ctx.add(workload, impl, "skipped (needs CUDA: dry run)")
        return None
    return peer


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _compile(ctx: Ctx, fn):
    # The dry run traces with dynamo but skips inductor's code generation (minutes on 2 CPUs).
    return torch.compile(fn, dynamic=False, backend="inductor" if ctx.cuda else "eager")


def _compile_name(ctx: Ctx) -> str:
    return "torch.compile" if ctx.cuda else "torch.compile [backend=eager: dry run]"


# ----------------------------------------------------------------------------------------------
# workloads


def ce_workload(ctx: Ctx, N: int, V: int, dtype: torch.dtype, sweep_key=None) -> None:
    """CE forward+backward. ``sweep_key`` (a V bucket): only the configuration sweep rows."""
    name = f"CE fwd+bwd {N}x{V} {_dtname(dtype)}"
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

    def autograd(f):
        def run():
            xr = x.detach().requires_grad_()
            loss = f(xr, y)
            (grad,) = torch.autograd.grad(loss, xr)
            return loss.detach(), grad
        return run

    if sweep_key is not None:
        for label, c in candidates("ce", dtype, sweep_key):
            with env_set(cfg_env(c)):
                x.copy_(x0)
                cell(ctx, name, f"logitkit in place {label}", lk_inplace, nbytes=nbytes,
                     check=check_with(lk_inplace), record=("ce", _dtname(dtype), sweep_key, c))
    elif ctx.phase == "main":
        x.copy_(x0)
        cell(ctx, name, "logitkit (in place)", lk_inplace, nbytes=nbytes, check=check_with(lk_inplace))
        x.copy_(x0)
        cell(ctx, name, "logitkit (new grad)", lk_new, nbytes=nbytes, check=check_with(lk_new))
        x.copy_(x0)
        eager = autograd(lambda a, b: F.cross_entropy(a, b))
        cell(ctx, name, "torch eager", eager, nbytes=nbytes, check=check_with(eager))
        L = peer_or_row(ctx, name, "liger-kernel", "liger-kernel CE")
        if L is not None:
            lg = autograd(lambda a, b: _first(L.apply(a, b, None)))  # the gradient is written into x in forward
            x.copy_(x0)
            cell(ctx, name, "liger-kernel", lg, nbytes=nbytes, check=check_with(lg))
        Q = peer_or_row(ctx, name, "quack", "quack CE")
        if Q is not None:
            qk = autograd(lambda a, b: Q(a, b, inplace_backward=True))
            x.copy_(x0)
            cell(ctx, name, "quack (inplace_backward)", qk, nbytes=nbytes, check=check_with(qk))
    elif ctx.phase == "compile":
        run = autograd(_compile(ctx, lambda a, b: F.cross_entropy(a, b)))
        x.copy_(x0)
        cell(ctx, name, _compile_name(ctx), run, nbytes=nbytes, check=check_with(run))


def softmax_workload(ctx: Ctx, N: int, V: int, dtype: torch.dtype, backward: bool, sweep_key=None) -> None:
    """Softmax forward (``backward=False``) or forward+backward; ``sweep_key``: the sweep rows
    (forward alone, and the backward kernel alone)."""
    what = "fwd+bwd" if backward else "fwd"
    if sweep_key is not None:
        what = "bwd" if backward else "fwd"
    name = f"softmax {what} {N}x{V} {_dtname(dtype)}"
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

    if sweep_key is not None:
        if backward:  # the backward kernel alone: reads y and dy, writes dx
            y0 = tk.softmax_forward(x)
            nb = 3 * N * V * s
            run = lambda: tk.softmax_backward(y0, dy)  # noqa: E731
            for label, c in candidates("softmax_bwd", dtype, sweep_key):
                with env_set(cfg_env(c)):
                    cell(ctx, name, f"logitkit {label}", run, nbytes=nb, check=check_with(run),
                         record=("softmax_bwd", _dtname(dtype), sweep_key, c))
            del y0
        else:
            for label, c in candidates("softmax", dtype, sweep_key):
                with env_set(cfg_env(c)):
                    cell(ctx, name, f"logitkit {label}", lk, nbytes=nbytes, check=check_with(lk),
                         record=("softmax", _dtname(dtype), sweep_key, c))
        return

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
        L = peer_or_row(ctx, name, "liger-kernel", "liger-kernel softmax")
        if L is not None:
            lg = torch_fn(lambda a: L.apply(a))
            cell(ctx, name, "liger-kernel", lg, nbytes=nbytes, check=check_with(lg))
        Q = peer_or_row(ctx, name, "quack", "quack softmax")
        if Q is not None:
            qk = torch_fn(Q)
            cell(ctx, name, "quack", qk, nbytes=nbytes, check=check_with(qk))
    elif ctx.phase == "compile":
        comp = torch_fn(_compile(ctx, lambda a: torch.softmax(a, -1)))
        cell(ctx, name, _compile_name(ctx), comp, nbytes=nbytes, check=check_with(comp))


def _linear_refs(ctx, h, W, th, tW, y, k, n_valid):
    """float64 references, chunked: the mean loss, dW of it over all rows, dh for the first k rows,
    and per token the label's log-probability, the entropy and KL(teacher || student)."""
    N, V, H = h.shape[0], W.shape[0], h.shape[1]
    h64, W64, th64, tW64 = h.double(), W.double(), th.double(), tW.double()
    loss_ref = torch.zeros((), dtype=torch.float64, device=ctx.dev)
    dW_ref = torch.zeros(V, H, dtype=torch.float64, device=ctx.dev)
    lp_ref = torch.zeros(N, dtype=torch.float64, device=ctx.dev)
    ent_ref = torch.zeros_like(lp_ref)
    kl_ref = torch.zeros_like(lp_ref)
    for i in range(0, N, 1024):
        sl = slice(i, i + 1024)
        z = h64[sl] @ W64.T
        ls = torch.log_softmax(z, -1)
        yy = y[sl]
        ok = yy != -100
        lab = torch.where(ok, yy, 0)
        lp = ls.gather(1, lab[:, None])[:, 0]
        lp_ref[sl] = torch.where(ok, lp, 0.0)
        ent_ref[sl] = torch.where(ok, -(ls.exp() * ls).sum(-1), 0.0)
        lq = torch.log_softmax(th64[sl] @ tW64.T, -1)
        kl_ref[sl] = torch.where(ok, (lq.exp() * (lq - ls)).sum(-1), 0.0)
        loss_ref -= lp_ref[sl].sum()
        dz = ls.exp_()
        dz[torch.arange(dz.shape[0], device=ctx.dev), lab] -= 1
        dz *= ok[:, None] / n_valid
        if i == 0:
            dh_ref = dz[:k] @ W64
        dW_ref += dz.T @ h64[sl]
        del z, ls, lq, dz
    loss_ref /= n_valid
    return loss_ref, dW_ref, dh_ref, lp_ref, ent_ref, kl_ref


def linear_workload(ctx: Ctx, N: int, H: int, V: int, dtype: torch.dtype) -> None:
    """The fused head, forward + backward, against the three GEMMs it cannot avoid."""
    import logitkit.torch as lt

    name = f"linear head fwd+bwd N={N} H={H} V={V} {_dtname(dtype)}"
    print(name, file=sys.stderr)
    g = torch.Generator(device=ctx.dev).manual_seed(2)
    h = torch.randn(N, H, device=ctx.dev, generator=g).to(dtype)
    W = (torch.randn(V, H, device=ctx.dev, generator=g) * (2.0 / math.sqrt(H))).to(dtype)
    y = torch.randint(0, V, (N,), device=ctx.dev, generator=g)
    y[::13] = -100
    # a teacher head near the student (distillation), and per-token advantages (RL)
    th = (h.float() + 0.3 * torch.randn(N, H, device=ctx.dev, generator=g)).to(dtype)
    tW = (W.float() + 0.3 * (2.0 / math.sqrt(H)) * torch.randn(V, H, device=ctx.dev, generator=g)).to(dtype)
    adv = torch.randn(N, device=ctx.dev, generator=g)
    k = min(64, N)
    flops = 6 * N * H * V
    n_valid = int((y != -100).sum())

    if name not in ctx.refs:
        ctx.refs[name] = _linear_refs(ctx, h, W, th, tW, y, k, n_valid)
    loss_ref, dW_ref, dh_ref, lp_ref, ent_ref, kl_ref = ctx.refs[name]

    if ctx.phase == "main":
        # the physical floor: logits, dh and dW as three cuBLAS GEMMs in the input dtype
        dz_buf = torch.randn(N, V, device=ctx.dev, generator=g).to(dtype)

        def gemms():
            torch.matmul(h, W.T)
            torch.matmul(dz_buf, W)
            return torch.matmul(dz_buf.T, h)

        ctx.gemm_ms[name] = cell(ctx, name, "3 GEMMs alone (cuBLAS, torch.matmul): the floor", gemms,
                                 flops=flops, iters=5)
        del dz_buf
    gemm_ms = ctx.gemm_ms.get(name)

    def e_loss(loss, dh, dW):
        return (f"loss {abs(float(loss) - float(loss_ref)):.1e}, dh {_relerr(dh[:k], dh_ref):.1e}, "
                f"dW {_relerr(dW, dW_ref):.1e}")

    def autograd(f):
        def run():
            hr, Wr = h.detach().requires_grad_(), W.detach().requires_grad_()
            out = f(hr, Wr)
            obj = out[0] if isinstance(out, tuple) else out
            dh, dW = torch.autograd.grad(obj, (hr, Wr))
            return (out if isinstance(out, tuple) else (out,)), dh, dW
        return run

    def loss_check(run):
        def check():
            (loss, *_), dh, dW = run()
            return e_loss(loss, dh, dW)
        return check

    def lpent_check(run):
        def check():
            (_, lp, ent), _, _ = run()
            return f"logprobs {_relerr(lp, lp_ref):.1e}, entropy {_relerr(ent, ent_ref):.1e}"
        return check

    def kl_check(run):
        def check():
            (_, kl), _, _ = run()
            return f"kl {_relerr(kl, kl_ref):.1e}"
        return check

    # the three objectives, eager (materialized float32 logits) and through logitkit.torch
    def eager_loss(a, b):
        return F.cross_entropy((a @ b.T).float(), y)

    def eager_lpent(a, b):
        ls = torch.log_softmax((a @ b.T).float(), -1)
        ok = y != -100
        lp = torch.where(ok, ls.gather(1, torch.where(ok, y, 0)[:, None])[:, 0], 0.0)
        ent = torch.where(ok, -(ls.exp() * ls).sum(-1), 0.0)
        return ((lp * adv).sum() + 0.01 * ent.sum()) / n_valid, lp, ent

    def eager_kl(a, b):
        ls = torch.log_softmax((a @ b.T).float(), -1)
        with torch.no_grad():
            lq = torch.log_softmax((th @ tW.T).float(), -1)
        kl = torch.where(y != -100, (lq.exp() * (lq - ls)).sum(-1), 0.0)
        return kl.sum() / n_valid, kl

    def lk_loss(a, b):
        return lt.linear_head(a, b, y, outputs=("loss",)).loss

    def lk_lpent(a, b):
        o = lt.linear_head(a, b, y, outputs=("logprobs", "entropy"))
        return ((o.logprobs.float() * adv).sum() + 0.01 * o.entropy.float().sum()) / n_valid, o.logprobs, o.entropy

    def lk_kl(a, b):
        o = lt.linear_head(a, b, y, outputs=("kl",), teacher_hidden=th, teacher_weight=tW)
        return o.kl.float().sum() / n_valid, o.kl

    kw = dict(flops=flops, gemm_ms=gemm_ms, iters=5)
    scale = torch.full((1,), 1.0 / n_valid, device=ctx.dev)
    if ctx.phase == "main":
        def kernels():
            ce, m, r = tk.linear_ce_forward(h, W, y)
            dh, dW, _db, _skipped = tk.linear_ce_backward(h, W, y, m, r, scale, scale)
            return (ce.sum() / n_valid,), dh, dW
        cell(ctx, name, "logitkit Triton kernels (loss)", kernels, check=loss_check(kernels), **kw)

        g_lp, g_ent = adv / n_valid, torch.full((1,), 0.01 / n_valid, device=ctx.dev)

        def head_kernels():  # kernels/triton/linear_head.py: logprobs + entropy without the logits
            lse, lp, ent, m, r = tk.linear_head_forward(h, W, y)
            dh, dW, _db = tk.linear_head_backward(h, W, y, m, r, ent, None, g_lp, g_ent)
            return ((lp.double() * adv).sum() / n_valid, lp, ent), dh, dW
        cell(ctx, name, "logitkit Triton kernels (logprobs+entropy)", head_kernels, check=lpent_check(head_kernels),
             **kw)
        run = autograd(lambda a, b: lt.linear_cross_entropy(a, b, y))
        cell(ctx, name, "logitkit.torch.linear_cross_entropy (loss)", run, check=loss_check(run), **kw)
        for label, fn, chk in (("loss", lk_loss, loss_check), ("logprobs+entropy", lk_lpent, lpent_check),
                               ("kl, teacher head", lk_kl, kl_check)):
            run = autograd(fn)
            cell(ctx, name, f"logitkit.torch.linear_head ({label})", run, check=chk(run), **kw)
        for label, fn, chk in (("loss", eager_loss, loss_check), ("logprobs+entropy", eager_lpent, lpent_check),
                               ("kl, teacher head", eager_kl, kl_check)):
            run = autograd(fn)
            cell(ctx, name, f"torch eager ({label})", run, check=chk(run), **kw)
        L = peer_or_row(ctx, name, "liger-kernel (loss)", "liger-kernel FLCE")
        if L is not None:
            run = autograd(lambda a, b: _first(L.apply(a, b, y)))
            cell(ctx, name, "liger-kernel (loss)", run, check=loss_check(run), **kw)
        C = peer_or_row(ctx, name, "cut-cross-entropy (loss)", "cut-cross-entropy")
        if C is not None:
            run = autograd(lambda a, b: C(a, b, y))
            cell(ctx, name, "cut-cross-entropy (loss, default filter)", run, check=loss_check(run), **kw)
            run = autograd(lambda a, b: C(a, b, y, filter_eps=None))
            cell(ctx, name, "cut-cross-entropy (loss, filter_eps=None)", run, check=loss_check(run), **kw)
        Q = peer_or_row(ctx, name, "quack (loss)", "quack linear CE")
        if Q is not None:
            run = autograd(lambda a, b: Q(a, b, y))
            cell(ctx, name, "quack chunked_linear_cross_entropy (loss)", run, check=loss_check(run), **kw)
    elif ctx.phase == "compile":
        for label, fn, chk in (("loss", eager_loss, loss_check), ("logprobs+entropy", eager_lpent, lpent_check),
                               ("kl, teacher head", eager_kl, kl_check)):
            run = autograd(_compile(ctx, fn))
            cell(ctx, name, f"{_compile_name(ctx)} ({label})", run, check=chk(run), **kw)
    else:
        def filtered():  # CCE-style skipping of tiles whose softmax is below float32 epsilon
            ce, m, r = tk.linear_ce_forward(h, W, y)
            dh, dW, _db, _skipped = tk.linear_ce_backward(h, W, y, m, r, scale, scale, filter_eps=2.0**-24)
            return (ce.sum() / n_valid,), dh, dW
        cell(ctx, name, "logitkit Triton kernels [filter_eps=2**-24]", filtered, check=loss_check(filtered), **kw)


class vp_route:
    """Point ``logitkit.distributed._torch._vp_kernels`` (the selector of
    ``vocab_parallel_cross_entropy``'s local stages) at the Triton kernels (``"triton"``: CPU
    tensors too, through the interpreter in the dry run) or at the xp stages on torch ops
    (``"stages"``) for the duration of a ``with`` block."""

    def __init__(self, which):
        from logitkit.distributed import _torch as vpt
        from logitkit.kernels.triton import vp

        self.mod, self.fn = vpt, (lambda x: vp) if which == "triton" else (lambda x: None)

    def __enter__(self):
        self.old = self.mod._vp_kernels
        self.mod._vp_kernels = self.fn

    def __exit__(self, *exc):
        self.mod._vp_kernels = self.old


def graphed(ctx: Ctx, x, y, f):
    """``f(x', y)`` forward+backward captured in a CUDA graph on its first call, replayed after;
    returns ``(loss, grad)`` like the eager rows (a capture failure is the cell's error)."""
    state = {}

    def run():
        if "g" not in state:
            xs = x.detach().clone().requires_grad_()
            s = torch.cuda.Stream(device=ctx.dev)
            s.wait_stream(torch.cuda.current_stream(ctx.dev))
            with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph requires
                for _ in range(3):
                    f(xs, y).backward()
            torch.cuda.current_stream(ctx.dev).wait_stream(s)
            xs.grad = None
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                loss = f(xs, y)
                loss.backward()
            state.update(g=g, out=(loss, xs.grad))
        state["g"].replay()
        return state["out"]
    return run


def allreduce_row(ctx: Ctx, name: str, N: int) -> None:
    """The forward's two per-token all-reduces alone, inside a real process group (else a row
    saying why not): MAX of N + the header table, SUM of 3N, float32."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        ctx.add(name, "the two all-reduces alone", "skipped (no process group: one process)")
        return
    from logitkit.distributed import stages

    P_ = dist.get_world_size()
    mx = torch.zeros(N + stages.header_size(P_, with_message=False), device=ctx.dev)
    sm = torch.zeros(3 * N, device=ctx.dev)

    def allreduce():
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        dist.all_reduce(sm, op=dist.ReduceOp.SUM)
    cell(ctx, name, f"the two all-reduces alone (MAX of N + header, SUM of 3N float32; {P_} ranks)", allreduce)


def vp_workload(ctx: Ctx, N: int, n: int, dtype: torch.dtype, P: int = 8) -> None:
    """Vocabulary-parallel CE forward+backward on one rank's local shard ``(N, n)`` (``n = V/P``),
    in one process: no process group, so the collectives are the identity (world size 1) and what
    is timed is the local work, against ``F.cross_entropy`` on the same shard (issue 19 item 3:
    at most 1.2x). Bytes that must move: one read in forward, one read and one write in
    backward (a fresh gradient), ``3·N·n·b``. The all-reduces are timed only inside a real group."""
    if ctx.phase != "main":
        return
    from logitkit.distributed import _torch as vpt
    from logitkit.distributed import vocab_parallel_cross_entropy
    from logitkit.kernels.triton import vp

    name = f"vocab-parallel CE fwd+bwd, local shard {N}x{n} (V = {n * P}/{P}) {_dtname(dtype)}"
    print(name, file=sys.stderr)
    g = torch.Generator(device=ctx.dev).manual_seed(2)
    x = (torch.randn(N, n, device=ctx.dev, generator=g) * 2).to(dtype)
    y = torch.randint(0, n, (N,), device=ctx.dev, generator=g)
    k = min(64, N)
    loss_ref = sum(F.cross_entropy(x[i:i + 1024].double(), y[i:i + 1024], reduction="sum")
                   for i in range(0, N, 1024)) / N
    p = torch.softmax(x[:k].double(), -1)
    grad_ref = (p - F.one_hot(y[:k], n).double()) / N
    del p
    nbytes = 3 * N * n * x.element_size()

    def autograd(f):
        def run():
            xr = x.detach().requires_grad_()
            loss = f(xr, y)
            (grad,) = torch.autograd.grad(loss, xr)
            return loss.detach(), grad
        return run

    def check_with(fn):
        def check():
            loss, grad = fn()
            return f"loss {abs(float(loss) - float(loss_ref)):.1e}, grad {_relerr(grad[:k], grad_ref):.1e}"
        return check

    ones = torch.ones(N, dtype=torch.float64, device=ctx.dev)
    scale = ones / N

    def kernels():  # the two launches and the three O(N) ops that join them, no autograd
        pt = vp.vp_partials(x, y, start=0, ignore_index=-100)
        m = pt.m.reshape(-1).double()
        r = torch.log1p(pt.t.reshape(-1) + (pt.c.reshape(-1) - 1.0))
        ce = (m - pt.zy.reshape(-1).double()) + r
        return ce.mean(), vp.vp_grad(x, y, m, r, scale, scale, start=0, vocab_size=n, wtotal=float(n), wy=ones,
                                     validf=ones)

    allreduce_row(ctx, name, N)
    eager = autograd(lambda a, b: F.cross_entropy(a, b))
    ms_f = cell(ctx, name, "F.cross_entropy (torch eager) on the local shard", eager, nbytes=nbytes,
                check=check_with(eager))
    default = "default route" if ctx.cuda and vpt._vp_kernels(x) is vp else "forced: dry run"
    lk = autograd(lambda a, b: vocab_parallel_cross_entropy(a, b))
    rows = []
    with vp_route("triton"):
        rows.append(cell(ctx, name, f"logitkit vocab_parallel_cross_entropy, Triton kernels ({default})", lk,
                         nbytes=nbytes, check=check_with(lk)))
    rows.append(cell(ctx, name, "logitkit Triton kernels alone (vp_partials + vp_grad, no autograd)", kernels,
                     nbytes=nbytes, check=check_with(kernels)))
    with vp_route("stages"):
        rows.append(cell(ctx, name, "logitkit vocab_parallel_cross_entropy, xp stages on torch ops (before)", lk,
                         nbytes=nbytes, check=check_with(lk)))
    for i, ms in enumerate(rows):
        row = ctx.rows[len(ctx.rows) - len(rows) + i][1]
        if not (math.isnan(ms) or math.isnan(ms_f)):
            row[4] = f"{row[4]}, {ms / ms_f:.2f}× F.cross_entropy"
    # The same calls replayed from a CUDA graph: what is left once the host's launches of the
    # O(N) glue (header, label hashes, slots, finish: a few hundred small ops) are taken away.
    graph_rows = (("F.cross_entropy, CUDA graph", lambda a, b: F.cross_entropy(a, b)),
                  ("logitkit vocab_parallel_cross_entropy, Triton kernels, CUDA graph",
                   lambda a, b: vocab_parallel_cross_entropy(a, b)))
    if not ctx.cuda:
        for impl, _ in graph_rows:
            ctx.add(name, impl, "skipped (needs CUDA: dry run)")
        return
    ms_gf = float("nan")
    for impl, f in graph_rows:
        run = graphed(ctx, x, y, f)
        ms = cell(ctx, name, impl, run, nbytes=nbytes, check=check_with(run))
        if impl.startswith("F."):
            ms_gf = ms
        elif not (math.isnan(ms) or math.isnan(ms_gf)):
            ctx.rows[-1][1][4] += f", {ms / ms_gf:.2f}× F.cross_entropy (graph)"


def labels_workload(ctx: Ctx, N: int, V: int) -> None:
    """The deferred bad-label check's host cost: 100 launch-bound ce_forward calls, on vs off."""
    if ctx.phase != "main":
        return
    calls = 100 if ctx.cuda else 3  # the interpreter spends ~0.1 s on a call whatever the check does
    name = f"label check: {calls} x ce_forward {N}x{V} float32"
    print(name, file=sys.stderr)
    x = torch.randn(N, V, device=ctx.dev)
    y = torch.randint(0, V, (N,), device=ctx.dev)

    def run():
        for _ in range(calls):
            out = tk.ce_forward(x, y)
        return out

    on = cell(ctx, name, "deferred check on (default)", run)
    with tk.deferred_label_check(False):
        off = cell(ctx, name, "deferred check off", run)
    if not (math.isnan(on) or math.isnan(off)):
        ctx.rows[-1][1][-1] = f"on costs {(on - off) * 1e3 / calls:+.1f} µs per call"
    tk.check_labels(ctx.dev)  # good labels: nothing to raise


# ----------------------------------------------------------------------------------------------
# output


def card_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``: the model number, else the name in lower case."""
    m = re.search(r"\b([A-Za-z]{1,2}\d{2,4}[A-Za-z]?)\b", name.replace("NVIDIA", ""))
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def versions() -> str:
    import triton

    out = [f"torch {torch.__version__}", f"triton {triton.__version__}"]
    for p in PEERS:
        try:
            out.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{p} not installed")
    return ", ".join(out)


def render(ctx: Ctx, dev_name: str) -> str:
    lines = [
        f"**{dev_name}**, {datetime.date.today().isoformat()}, {versions()}; device-to-device copy "
        f"{ctx.copy_bw / 1e12:.2f} TB/s ({ctx.copy_bw / 1e9:.1f} GB/s; 1 read + 1 write); "
        f"total run {time.perf_counter() - ctx.t0:.0f} s",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(r) + " |" for _, r in sorted(ctx.rows, key=lambda kr: kr[0])]
    return "\n".join(lines) + "\n"


def write_configs(ctx: Ctx, path: str, dev_name: str, results: str) -> None:
    """Merge the sweep's winners into the configuration table at ``path``."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        with open(_configs.PATH) as f:
            doc = json.load(f)
    entries = {(e["op"], e["dtype"], int(e["V"])): e for e in doc["entries"]}
    today = datetime.date.today().isoformat()
    for (op, dt, V), (ms, c, pct) in ctx.winners.items():
        e = dict(op=op, dtype=dt, V=V, **c)
        if ctx.cuda:
            e.update(source="measured", card=dev_name, date=today, ms=round(ms, 3), pct_copy=round(pct), run=results)
        else:  # the interpreter's times say nothing about a GPU
            e.update(source="dry run (Triton interpreter on the CPU): not a measurement", date=today, run=results)
        entries[(op, dt, V)] = e
    order = {o: i for i, o in enumerate(_configs.OPS)}
    dorder = {d: i for i, d in enumerate(_configs.DTYPES)}
    doc["entries"] = [entries[k] for k in sorted(entries, key=lambda k: (order.get(k[0], 9), dorder.get(k[1], 9), k[2]))]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test; tiny on --device cpu)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1)")
    ap.add_argument("--budget", type=float, default=255.0,
                    help="seconds after which no new cell starts (default 255: the run ends within 5 min)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--no-tune", dest="tune", action="store_false",
                    help="leave out the configuration sweep rows at the main shape (and the filter_eps row)")
    ap.add_argument("--sweep", action="store_true",
                    help="sweep at V = 32000, 128256, 262144 too and write the winners to --configs")
    ap.add_argument("--configs", default=None,
                    help="configuration table to write with --sweep (default: the package's configs.json on "
                         "a GPU; required with --device cpu)")
    ap.add_argument("--only", default="", help="comma list among ce,softmax,linear,vp,labels")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="dtypes of the CE, softmax and linear workloads (comma list)")
    ap.add_argument("--out", default=None,
                    help="where to write the table (default on a GPU: benchmarks/results/gpu-<card>-<date>.md)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing cells")
    args = ap.parse_args(argv)
    ctx = Ctx(args)
    if ctx.cuda and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu with TRITON_INTERPRET=1 for a dry run", file=sys.stderr)
        return 2
    if not ctx.cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu runs the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if args.sweep and not ctx.cuda and not args.configs:
        print("--sweep on the CPU needs --configs (the interpreter's times must not enter the package table)",
              file=sys.stderr)
        return 2
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    only = set(filter(None, args.only.split(","))) or {"ce", "softmax", "linear", "vp", "labels"}
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    if not args.quick:
        ce_shape = (16384, 128256)
        lin_shapes = [((8192, 4096, 128256), torch.bfloat16), ((4096, 1024, 32000), torch.float32)]
        sweep_shapes = {V: (max(1, round(16384 * 128256 / V)), V) for V in _configs.BUCKETS}
        lab_shape = (64, 1000)
        vp_shapes = [(8192, 128256 // 8), (8192, 262144 // 8)]
    elif ctx.cuda:
        ce_shape = (1024, 32000)
        lin_shapes = [((512, 256, 32000), torch.bfloat16), ((512, 256, 32000), torch.float32)]
        sweep_shapes = {V: (256, V) for V in _configs.BUCKETS}
        lab_shape = (64, 1000)
        vp_shapes = [(1024, 128256 // 8)]
    else:  # the interpreter runs a program at a time in NumPy: tiny shapes, one block and several
        ce_shape = (8, 1000)
        lin_shapes = [((8, 16, 300), torch.bfloat16), ((8, 16, 300), torch.float32)]
        sweep_shapes = dict(zip(_configs.BUCKETS, ((4, 300), (4, 1000), (4, 3000))))
        lab_shape = (4, 100)
        vp_shapes = [(8, 300)]

    signal.signal(signal.SIGTERM, _on_term)
    measure_copy(ctx)
    workloads = []  # (kind, fn), in table order
    if "ce" in only:
        workloads += [("ce", lambda dt=dt: ce_workload(ctx, *ce_shape, dt)) for dt in dtypes]
    if "softmax" in only:
        workloads += [("softmax", lambda dt=dt, b=b: softmax_workload(ctx, *ce_shape, dt, b))
                      for b in (False, True) for dt in dtypes]
    if "linear" in only:
        workloads += [("linear", lambda s=s, dt=dt: linear_workload(ctx, *s, dt)) for s, dt in lin_shapes
                      if dt in dtypes]
    if "vp" in only:
        workloads += [("vp", lambda s=s, dt=dt: vp_workload(ctx, *s, dt)) for s in vp_shapes for dt in dtypes]
    if "labels" in only:
        workloads += [("labels", lambda: labels_workload(ctx, *lab_shape))]
    # The sweep: at the main shape's V bucket; with --sweep at every bucket, 128256 first.
    sweep = []
    if args.sweep:
        plan = [(V, sweep_shapes[V]) for V in (128256,) + tuple(b for b in _configs.BUCKETS if b != 128256)]
    elif args.tune:
        plan = [(_configs.bucket(ce_shape[1]), ce_shape)]
    else:
        plan = []
    for V, (N_, V_) in plan:
        if "ce" in only:
            sweep += [lambda dt=dt, N_=N_, V_=V_, V=V: ce_workload(ctx, N_, V_, dt, sweep_key=V) for dt in dtypes]
        if "softmax" in only:
            sweep += [lambda dt=dt, b=b, N_=N_, V_=V_, V=V: softmax_workload(ctx, N_, V_, dt, b, sweep_key=V)
                      for b in (False, True) for dt in dtypes]
    for phase in PHASES:
        if phase == "compile" and args.no_compile:
            continue
        ctx.phase = phase
        if phase == "tune":
            # the linear workloads' filter_eps rows, then the configuration sweep
            todo = [(i, fn) for i, (kind, fn) in enumerate(workloads) if kind == "linear" and args.tune]
            todo += [(len(workloads) + i, fn) for i, fn in enumerate(sweep)]
        else:
            todo = [(i, fn) for i, (kind, fn) in enumerate(workloads)]
        try:
            for i, run in todo:
                if ctx.over_budget():
                    break
                ctx.workload = i
                print(f"[{phase}]", end=" ", file=sys.stderr)
                run()
                if ctx.cuda:
                    torch.cuda.empty_cache()
        except Stop:
            ctx.add(f"(run stopped by SIGTERM during the {phase} phase)", "", "")
            print("SIGTERM: writing the rows measured so far", file=sys.stderr)
            break

    dev_name = torch.cuda.get_device_name(ctx.dev) if ctx.cuda else "CPU (Triton interpreter, dry run)"
    today = datetime.date.today().isoformat()
    out = args.out
    if out is None and ctx.cuda:
        out = os.path.join(HERE, "results", f"gpu-{card_slug(dev_name)}-{today}.md")
    text = render(ctx, dev_name)
    print(text, end="")
    results_rel = os.path.relpath(os.path.abspath(out), ROOT) if out else "(not written)"
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}", file=sys.stderr)
    configs = None
    if args.sweep and ctx.winners:
        configs = args.configs or _configs.PATH
        write_configs(ctx, configs, dev_name, results_rel)
        print(f"wrote {configs} ({len(ctx.winners)} winners)", file=sys.stderr)
    dest = os.environ.get("OUT")
    if dest:  # the device tool brings back only what is under $OUT
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "gpu.md"), "w") as f:
            f.write(text)
        if out:
            shutil.copy(out, os.path.join(dest, os.path.basename(out)))
        if configs:
            shutil.copy(configs, os.path.join(dest, "configs.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
