"""``logitkit bench``: time, peak memory and error of logitkit against every installed peer.

Every number of one table comes from one process run, so the ratios are fair on a noisy machine.
Time is the median of ``--repeat`` calls after one warm-up; set-up (fresh inputs for in-place
cases) is outside the timed region. Peak extra memory is the growth of the process's peak
resident set during the timed calls (Linux ``/proc/self/clear_refs`` resets the peak), which sees
NumPy, torch and XLA allocations alike. Error is measured against float64 NumPy on a slice of rows.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import reference

WORKLOADS = {
    # name: (N, V, kind)
    "llm": (4096, 32000, "ce"),
    "llm3": (1024, 128256, "ce"),
    "small": (256, 1000, "ce"),
    "tiny": (100, 10, "ce"),
    "softmax": (4096, 32000, "softmax"),
    "head": (4096, 32000, "head"),
}
DEFAULT_WORKLOADS = ("llm", "small", "softmax")
HEAD_H = 1024
_KIND = {"ce": "cross-entropy forward + backward, mean over rows",
         "softmax": "softmax forward",
         "head": "fused linear head + cross-entropy forward + backward"}


def workload_shape(name: str) -> str:
    """``"4096 x 32000 float32"`` (for the head: ``"N=4096, H=1024, V=32000 float32"``).

    >>> workload_shape("llm")
    '4096 x 32000 float32'
    """
    N, V, kind = WORKLOADS[name]
    return f"N={N}, H={HEAD_H}, V={V} float32" if kind == "head" else f"{N} x {V} float32"


def describe_workloads(indent: str = "") -> str:
    """One line per workload: name, shape, dtype and what it times."""
    return "\n".join(f"{indent}{name:8s} {workload_shape(name):32s} {_KIND[WORKLOADS[name][2]]}"
                     for name in WORKLOADS)
_ERR_ROWS = 64


@dataclass
class Result:
    workload: str
    impl: str
    median_ms: float = math.nan
    peak_mb: float = math.nan
    err: float = math.nan
    limit: str = ""
    note: str = ""
    times: list = field(default_factory=list)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(setup: Callable[[], Any], run: Callable[[Any], Any], repeat: int) -> tuple[list, float, Any]:
    """Times of ``run(setup())``; peak RSS growth over the timed calls (NaN if unmeasurable)."""
    import gc

    run(setup())  # warm-up: compilation, caches, first touch of reused buffers
    times, peak, last = [], 0.0, None
    for _ in range(repeat):
        arg = setup()
        last = None
        gc.collect()
        can = _reset_peak()
        base = _status().get("VmRSS", 0)
        t0 = time.perf_counter()
        last = run(arg)
        _sync(last)
        times.append(time.perf_counter() - t0)
        if can:
            peak = max(peak, _status().get("VmHWM", 0) - base)
        else:
            peak = math.nan
        del arg
    return times, peak, last


def _sync(obj: Any) -> None:
    """Wait for asynchronous results (JAX dispatches eagerly)."""
    if isinstance(obj, tuple):
        for o in obj:
            _sync(o)
    elif hasattr(obj, "block_until_ready"):
        obj.block_until_ready()


# ----------------------------------------------------------------------------------------------
# cross-entropy forward + backward


def _ce_cases(x: np.ndarray, y: np.ndarray) -> list[tuple[str, str, Callable, Callable, Callable]]:
    """(name, limit it is compared to, setup, run, grad-extractor) for every available peer."""
    import logitkit as lk

    work = np.empty_like(x)
    N = x.shape[0]

    def fresh_copy():
        np.copyto(work, x)
        return work

    cases = [
        ("copy into existing (np.copyto)", "", lambda: x, lambda a: np.copyto(work, a), None),
        ("copy into fresh (np.copy)", "", lambda: x, lambda a: np.copy(a), None),
        ("logitkit in place (out=logits)", "copyto", fresh_copy,
         lambda a: lk.cross_entropy_with_grad(a, y, out=a), lambda r: r[1]),
        ("logitkit fresh gradient", "copy", lambda: x,
         lambda a: lk.cross_entropy_with_grad(a, y), lambda r: r[1]),
        ("NumPy naive (softmax, log, pick)", "copy", lambda: x, lambda a: _numpy_naive(a, y), lambda r: r[1]),
    ]
    if importlib.util.find_spec("scipy"):
        cases.append(("scipy.special log_softmax", "copy", lambda: x, lambda a: _scipy_ce(a, y), lambda r: r[1]))
    if importlib.util.find_spec("torch"):
        cases += _torch_cases(x, y, fresh_copy)
    if importlib.util.find_spec("jax"):
        cases += _jax_cases(x, y)
    if importlib.util.find_spec("tensorflow"):
        cases += _tf_cases(x, y)
    return cases


def _numpy_naive(x, y):
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    n = x.shape[0]
    loss = -np.log(p[np.arange(n), y]).mean()
    p[np.arange(n), y] -= 1
    p /= n
    return loss, p


def _scipy_ce(x, y):
    from scipy.special import log_softmax

    lp = log_softmax(x, axis=-1)
    n = x.shape[0]
    loss = -lp[np.arange(n), y].mean()
    g = np.exp(lp, out=lp)
    g[np.arange(n), y] -= 1
    g /= n
    return loss, g


def _torch_cases(x, y, fresh_copy):
    import torch
    import torch.nn.functional as F

    yt = torch.from_numpy(y)
    cases = []

    def eager(a):
        t = torch.from_numpy(a).requires_grad_()
        loss = F.cross_entropy(t, yt)
        loss.backward()
        return loss.detach(), t.grad

    cases.append(("torch eager F.cross_entropy", "copy", lambda: x, eager, lambda r: r[1].numpy()))

    try:
        compiled = torch.compile(lambda t: F.cross_entropy(t, yt))

        def comp(a):
            t = torch.from_numpy(a).requires_grad_()
            loss = compiled(t)
            loss.backward()
            return loss.detach(), t.grad

        cases.append(("torch.compile F.cross_entropy", "copy", lambda: x, comp, lambda r: r[1].numpy()))
    except Exception:
        pass
    if importlib.util.find_spec("logitkit.torch") is not None:
        try:
            import logitkit.torch as lkt

            _Logits = _logits_function()

            def lk_torch(a):
                t = torch.from_numpy(a).requires_grad_()
                loss = lkt.cross_entropy(t, yt)
                loss.backward()
                return loss.detach(), t.grad

            def lk_torch_inplace(a):
                # In a model the logits are an intermediate (a matmul's output), never a leaf: the
                # in-place path refuses leaves. _Logits hands out the buffer ``a`` as such a tensor.
                anchor = torch.zeros((), requires_grad=True)
                logits = _Logits.apply(anchor, a)
                loss = lkt.cross_entropy(logits, yt, inplace_backward=True)
                loss.backward()
                return loss.detach(), logits.detach()

            cases.append(("logitkit.torch cross_entropy", "copy", lambda: x, lk_torch, lambda r: r[1].numpy()))
            try:
                lk_compiled = torch.compile(lambda t: lkt.cross_entropy(t, yt), fullgraph=True)

                def lk_comp(a):
                    t = torch.from_numpy(a).requires_grad_()
                    loss = lk_compiled(t)
                    loss.backward()
                    return loss.detach(), t.grad

                cases.append(("torch.compile logitkit.torch cross_entropy", "copy", lambda: x, lk_comp,
                              lambda r: r[1].numpy()))
            except Exception:
                pass
            cases.append(("logitkit.torch inplace_backward", "copyto", fresh_copy, lk_torch_inplace,
                          lambda r: r[1].numpy()))
        except Exception:
            pass
    return cases


def _logits_function():
    import torch

    class _Logits(torch.autograd.Function):
        """A non-leaf tensor over an existing NumPy buffer (the gradient stops at a scalar anchor)."""

        @staticmethod
        def forward(ctx, anchor, buffer):
            return torch.from_numpy(buffer)

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros(()), None

    return _Logits


def _jax_cases(x, y):
    import jax
    import jax.numpy as jnp

    xj, yj = jnp.asarray(x), jnp.asarray(y)
    cases = []
    if importlib.util.find_spec("optax"):
        import optax

        f = jax.jit(jax.value_and_grad(lambda a: optax.softmax_cross_entropy_with_integer_labels(a, yj).mean()))
        cases.append(("jax.jit + optax", "copy", lambda: xj, f, lambda r: np.asarray(r[1])))
    if importlib.util.find_spec("logitkit.jax") is not None:
        try:
            import logitkit.jax as lkj

            g = jax.jit(jax.value_and_grad(lambda a: lkj.softmax_cross_entropy_with_integer_labels(a, yj).mean()))
            cases.append(("logitkit.jax (jit)", "copy", lambda: xj, g, lambda r: np.asarray(r[1])))
        except Exception:
            pass
    return cases


def _tf_cases(x, y):
    """tf.nn's fused op eager, in tf.function and under XLA, and logitkit's TensorFlow path; each is
    ``reduce_mean`` of the per-example loss and its gradient from a GradientTape."""
    import logitkit.tensorflow  # noqa: F401  (first: it loads Triton before TensorFlow)
    import tensorflow as tf

    import logitkit as lk

    yt = tf.constant(y)
    holder = {}

    def tensor():  # converted once, on first use (the input, outside the timed region)
        if "x" not in holder:
            holder["x"] = tf.constant(x)
        return holder["x"]

    def step(fn):
        def f(a):
            with tf.GradientTape() as tape:
                tape.watch(a)
                loss = tf.reduce_mean(fn(labels=yt, logits=a))
            return loss, tape.gradient(loss, a)
        return f

    # CPU tensors are ready when a call returns (TensorFlow runs CPU ops synchronously).
    nn, lkf = tf.nn.sparse_softmax_cross_entropy_with_logits, lk.sparse_softmax_cross_entropy_with_logits
    grad = lambda r: r[1].numpy()  # noqa: E731
    return [
        ("TensorFlow tf.nn eager", "copy", tensor, step(nn), grad),
        ("TensorFlow tf.nn tf.function", "copy", tensor, tf.function(step(nn)), grad),
        ("TensorFlow tf.nn jit_compile=True", "copy", tensor, tf.function(step(nn), jit_compile=True), grad),
        ("logitkit TensorFlow tf.function", "copy", tensor, tf.function(step(lkf)), grad),
        ("logitkit TensorFlow eager", "copy", tensor, step(lkf), grad),
    ]


# ----------------------------------------------------------------------------------------------
# softmax forward


def _softmax_cases(x):
    import logitkit as lk
    from .kernels import registry

    work = np.empty_like(x)
    backend, kern = registry.select("softmax_forward", "numpy", x)
    cases = [
        ("copy into existing (np.copyto)", "", lambda: x, lambda a: np.copyto(work, a), None),
        ("copy into fresh (np.copy)", "", lambda: x, lambda a: np.copy(a), None),
        (f"logitkit softmax into existing ({backend} kernel, out=)", "copyto", lambda: x,
         lambda a: kern(a, out=work), lambda r: r),
        ("logitkit.softmax (fresh)", "copy", lambda: x, lambda a: lk.softmax(a), lambda r: r),
        ("NumPy naive", "copy", lambda: x, lambda a: _np_softmax(a), lambda r: r),
    ]
    if importlib.util.find_spec("scipy"):
        from scipy.special import softmax as sp_softmax

        cases.append(("scipy.special.softmax", "copy", lambda: x, lambda a: sp_softmax(a, axis=-1), lambda r: r))
    if importlib.util.find_spec("torch"):
        import torch

        cases.append(("torch.softmax", "copy", lambda: x, lambda a: torch.softmax(torch.from_numpy(a), -1),
                      lambda r: r.numpy()))
    if importlib.util.find_spec("jax"):
        import jax
        import jax.numpy as jnp

        xj = jnp.asarray(x)
        f = jax.jit(lambda a: jax.nn.softmax(a, axis=-1))
        cases.append(("jax.nn.softmax (jit)", "copy", lambda: xj, f, lambda r: np.asarray(r)))
        g = jax.jit(lambda a: lk.softmax(a, axis=-1))
        cases.append(("logitkit.softmax on JAX (jit)", "copy", lambda: xj, g, lambda r: np.asarray(r)))
    return cases


def _np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# fused linear + cross-entropy


def _head_chunk_floors(n: int, V: int) -> list:
    """``(label, tokens per chunk, teacher)`` of the fused heads' automatic float32 chunking."""
    from .core.linear_cross_entropy import DEFAULT_WORKSPACE, plan_chunks
    from .core.linear_head import KERNEL_WORKSPACE, plan_rows

    return [("linear_cross_entropy", plan_chunks(n, V, bytes_per_logit=4, workspace=DEFAULT_WORKSPACE).rows, False),
            ("linear_head", plan_rows(n, V, 4, None, workspace=KERNEL_WORKSPACE, temps=1), False),
            ("linear_head with a teacher head", plan_rows(n, V, 4, "dense", workspace=KERNEL_WORKSPACE, temps=2),
             True)]


def chunked_products(w: Any, th: Any, tw: Any, rows: int, teacher: bool) -> Any:
    """The head's matrix products chunk by chunk, as the fused heads run them (torch, CPU):
    logits into one reused buffer, ``dh`` rows written, ``dW`` accumulated (plus a teacher
    head's logits per chunk)."""
    import torch

    def run(a):
        h = torch.from_numpy(a)
        n = h.shape[0]
        buf = torch.empty((rows, w.shape[0]), dtype=h.dtype)
        tbuf = torch.empty_like(buf) if teacher else None
        dh, dw = torch.empty_like(h), torch.zeros_like(w)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            x = torch.mm(h[s:e], w.T, out=buf[:e - s])
            if teacher:
                torch.mm(th[s:e], tw.T, out=tbuf[:e - s])
            torch.mm(x, w, out=dh[s:e])
            dw.addmm_(x.T, h[s:e])
        return dh, dw
    return run


def _head_cases(h, w, y):
    # Ratios: each case's "limit" names the matrix products it is compared with (the same BLAS,
    # timed alone in the same run): forward + backward is three N×H×V products, four with a
    # teacher head. "loss+logprobs+entropy" is a GRPO-style objective: the loss, the
    # advantage-weighted mean log-probability and an entropy bonus.
    cases = []
    rng = np.random.default_rng(1)
    th = (rng.standard_normal(h.shape) * 0.5).astype(np.float32)
    tw = (rng.standard_normal(w.shape) / math.sqrt(w.shape[1])).astype(np.float32)
    adv = rng.standard_normal(y.shape[0]).astype(np.float32)
    n = y.shape[0]
    outs3 = ("loss", "logprobs", "entropy")

    def products(mm, teacher):
        def run(a):
            z = mm(a, w.T)
            if teacher:
                del z
                z = mm(th, tw.T)
            return z, mm(z, w), mm(z.T, a)
        return run

    cases.append(("3 matmuls alone (NumPy)", "", lambda: h, products(np.matmul, False), None))
    if importlib.util.find_spec("logitkit.linear") is not None:
        import logitkit.linear as lin

        cases.append(("logitkit linear_cross_entropy_with_grad", "3 matmuls NumPy", lambda: h,
                      lambda a: lin.linear_cross_entropy_with_grad(a, w, y), None))
        g3 = {"loss": 1.0, "logprobs": -adv / n, "entropy": np.full(n, -0.01 / n, np.float32)}
        cases.append(("logitkit linear_head_with_grad loss+logprobs+entropy (NumPy)", "3 matmuls NumPy",
                      lambda: h, lambda a: lin.linear_head_with_grad(a, w, y, outputs=outs3, grad_outputs=g3),
                      None))
    if importlib.util.find_spec("torch"):
        import torch
        import torch.nn.functional as F

        yt = torch.from_numpy(y)
        wt0, tht, twt, advt = (torch.from_numpy(t) for t in (w, th, tw, adv))

        def tmm(a, b):
            return torch.matmul(torch.as_tensor(a), torch.as_tensor(b))

        cases.insert(0, ("3 matmuls alone (torch)", "", lambda: h, products(tmm, False), None))
        cases.insert(1, ("4 matmuls alone (torch; + a teacher head's logits)", "", lambda: h,
                         products(tmm, True), None))
        # The same products in the token chunks the fused heads' workspace allows (no other work):
        # the floor of any chunked head on this BLAS, beside the whole-matrix products above.
        wt_c, tht_c, twt_c = torch.from_numpy(w), torch.from_numpy(th), torch.from_numpy(tw)
        for label, rows, teacher in _head_chunk_floors(n, w.shape[0]):
            cases.append((f"{label}: the matmuls alone in {rows}-token chunks (torch)",
                          "4 matmuls torch" if teacher else "3 matmuls torch", lambda: h,
                          chunked_products(wt_c, tht_c, twt_c, rows, teacher), None))

        def autograd(objective):
            def run(a):
                ht = torch.from_numpy(a).requires_grad_()
                wt = torch.from_numpy(w).requires_grad_()
                loss = objective(ht, wt)
                loss.backward()
                return loss.detach(), ht.grad, wt.grad
            return run

        def grpo(out):
            return out.loss - (advt * out.logprobs).mean() - 0.01 * out.entropy.mean()

        def rl_stats(hc, wc, yc):
            logp = torch.log_softmax(hc @ wc.T, -1)
            return logp.gather(-1, yc[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

        def rl_loop(ht, wt):
            # as RL frameworks write it: token chunks, each recomputed in backward (checkpoint)
            import torch.utils.checkpoint as cp

            parts = [cp.checkpoint(rl_stats, ht[i:i + 1024], wt, yt[i:i + 1024], use_reentrant=False)
                     for i in range(0, ht.shape[0], 1024)]
            lp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            return -lp.mean() - (advt * lp).mean() - 0.01 * ent.mean()

        def eager_rl(ht, wt):
            lp, ent = rl_stats(ht, wt, yt)
            return -lp.mean() - (advt * lp).mean() - 0.01 * ent.mean()

        cases.append(("PyTorch eager, materialized logits: loss+logprobs+entropy", "3 matmuls torch", lambda: h,
                      autograd(eager_rl), None))
        cases.append(("plain chunked PyTorch loop (checkpoint per 1024 tokens): loss+logprobs+entropy",
                      "3 matmuls torch", lambda: h, autograd(rl_loop), None))
        if importlib.util.find_spec("logitkit.torch") is not None:
            import logitkit.linear as lin
            import logitkit.torch as lkt

            cases.insert(2, ("logitkit.torch linear_head loss (autograd)", "3 matmuls torch", lambda: h,
                             autograd(lambda ht, wt: lkt.linear_head(ht, wt, yt).loss), None))
            cases.insert(3, ("logitkit.torch linear_head loss+logprobs+entropy (autograd: the logits "
                             "recomputed in backward)", "3 matmuls torch", lambda: h,
                             autograd(lambda ht, wt: grpo(lkt.linear_head(ht, wt, yt, outputs=outs3))), None))
            g3t = {"loss": 1.0, "logprobs": -advt / n, "entropy": torch.full((n,), -0.01 / n)}
            cases.insert(4, ("logitkit linear_head_with_grad loss+logprobs+entropy (torch)", "3 matmuls torch",
                             lambda: h, lambda a: lin.linear_head_with_grad(torch.from_numpy(a), wt0, yt,
                                                                            outputs=outs3, grad_outputs=g3t),
                             None))
            cases.insert(5, ("logitkit linear_head_with_grad dense-teacher kl (torch, teacher head)",
                             "4 matmuls torch", lambda: h,
                             lambda a: lin.linear_head_with_grad(torch.from_numpy(a), wt0, yt, outputs=("kl",),
                                                                 teacher_hidden=tht, teacher_weight=twt,
                                                                 grad_outputs={"kl": 1.0 / n}), None))

        def eager(a):
            ht = torch.from_numpy(a).requires_grad_()
            wt = torch.from_numpy(w).requires_grad_()
            loss = F.cross_entropy(ht @ wt.T, yt)
            loss.backward()
            return loss.detach(), ht.grad, wt.grad

        cases.append(("torch eager (h @ W.T, F.cross_entropy)", "3 matmuls torch", lambda: h, eager, None))
        if importlib.util.find_spec("logitkit.torch") is not None:
            import logitkit.torch as lkt

            def lk_head(a):
                ht = torch.from_numpy(a).requires_grad_()
                wt = torch.from_numpy(w).requires_grad_()
                loss = lkt.linear_cross_entropy(ht, wt, yt)
                loss.backward()
                return loss.detach(), ht.grad, wt.grad

            cases.insert(2, ("logitkit.torch linear_cross_entropy", "3 matmuls torch", lambda: h, lk_head, None))
        if hasattr(F, "linear_cross_entropy"):
            def chunked(a):
                ht = torch.from_numpy(a).requires_grad_()
                wt = torch.from_numpy(w).requires_grad_()
                opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
                loss = F.linear_cross_entropy(ht, wt, yt, **({"options": opts()} if opts else {}))
                loss.backward()
                return loss.detach(), ht.grad, wt.grad

            cases.append(("torch F.linear_cross_entropy (2.13, loss only)", "3 matmuls torch", lambda: h, chunked,
                          None))
    return cases


# ----------------------------------------------------------------------------------------------


def _grad_error(g: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """max |g - g64| / max |g64| on the first rows (mean reduction over all rows)."""
    n = min(_ERR_ROWS, x.shape[0])
    ref = reference.cross_entropy_grad64(x[:n], y[:n], reduction="sum") / x.shape[0]
    got = np.asarray(g[:n], dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _softmax_error(p: np.ndarray, x: np.ndarray) -> float:
    n = min(_ERR_ROWS, x.shape[0])
    ref = reference.softmax64(x[:n])
    return float(np.max(np.abs(np.asarray(p[:n], np.float64) - ref) / ref))


def run_workload(name: str, repeat: int, progress: bool, only=None) -> list[Result]:
    """Measure every case of workload ``name``; ``only``: substrings of the implementations to
    keep (case-insensitive; the copy limits are always measured, the ratios need them)."""
    N, V, kind = WORKLOADS[name]
    rng = np.random.default_rng(0)
    if kind == "head":
        h = (rng.standard_normal((N, HEAD_H)) * 0.5).astype(np.float32)
        w = (rng.standard_normal((V, HEAD_H)) / math.sqrt(HEAD_H)).astype(np.float32)
        y = rng.integers(0, V, N).astype(np.int64)
        cases = _head_cases(h, w, y)
        x = None
    else:
        x = (rng.standard_normal((N, V)) * 2).astype(np.float32)
        y = rng.integers(0, V, N).astype(np.int64)
        cases = _ce_cases(x, y) if kind == "ce" else _softmax_cases(x)
    if only:
        keys = [k.lower() for k in only]
        cases = [c for c in cases if c[0].startswith("copy") or any(k in c[0].lower() for k in keys)]
    results = []
    bar = _progress(cases, name, progress)
    for impl, limit, setup, run, extract in bar:
        res = Result(name, impl, limit=limit)
        try:
            times, peak, last = _measure(setup, run, repeat)
            res.times = times
            res.median_ms = statistics.median(times) * 1e3
            res.peak_mb = peak / 2 ** 20
            if extract is not None and x is not None:
                out = extract(last)
                res.err = _grad_error(out, x, y) if kind == "ce" else _softmax_error(out, x)
        except Exception as exc:  # one peer failing must not lose the table
            res.note = f"{type(exc).__name__}: {exc}"[:80]
        results.append(res)
    return results


_said_no_tqdm = []


def _progress(items, desc, enabled):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, desc=desc, leave=False, file=sys.stderr)
        except ImportError:
            if not _said_no_tqdm:
                _said_no_tqdm.append(True)
                print("(no progress bar: tqdm is not installed; pip install 'logitkit[bench]')",
                      file=sys.stderr)
    return items


def format_table(results: list[Result]) -> str:
    from .cli import _table

    rows = []
    for wl in dict.fromkeys(r.workload for r in results):
        group = [r for r in results if r.workload == wl]
        lim = {"copyto": _find(group, "np.copyto"), "copy": _find(group, "np.copy)"),
               "3 matmuls torch": _find(group, "3 matmuls alone (torch)"),
               "3 matmuls NumPy": _find(group, "3 matmuls alone (NumPy)"),
               "4 matmuls torch": _find(group, "4 matmuls alone (torch")}
        eager = _find(group, "torch eager")
        for r in group:
            xl = lim.get(r.limit)
            rows.append([
                wl, r.impl, _ms(r.median_ms), _spread(r),
                f"{r.median_ms / xl:.2f}× {r.limit}" if xl and r.median_ms == r.median_ms else "",
                f"{eager / r.median_ms:.2f}×" if eager and r.median_ms == r.median_ms else "",
                _num(r.peak_mb, "{:.0f}"), _num(r.err, "{:.1e}"), r.note,
            ])
    return _table(["workload", "implementation", "median ms", "min-max ms", "× copy limit",
                   "speed vs torch eager",
                   "peak extra MB", "max rel err", "note"], rows)


def _spread(r: Result) -> str:
    if not r.times:
        return ""
    return f"{_ms(min(r.times) * 1e3)}-{_ms(max(r.times) * 1e3)}"


def _ms(v):
    """Milliseconds with one decimal, or three significant digits below 1 ms (small workloads)."""
    return _num(v, "{:.1f}" if v is None or v != v or v >= 1.0 else "{:.3g}")


def _find(group, key):
    for r in group:
        if key in r.impl and r.median_ms == r.median_ms:
            return r.median_ms
    return None


def _num(v, fmt):
    return "" if v is None or v != v else fmt.format(v)


def write_outputs(results: list[Result], out_dir: str) -> tuple[list[str], str]:
    """Write ``results.csv`` and, when matplotlib is installed, ``bench.png`` into ``out_dir``.

    Returns the paths written and a note on what was not written ("" when nothing is missing).
    """
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["workload", "shape", "implementation", "limit", "median_ms", "min_ms", "max_ms",
                     "peak_extra_mb", "max_rel_err", "times_ms"])
        for r in results:
            lo, hi = (min(r.times) * 1e3, max(r.times) * 1e3) if r.times else (math.nan, math.nan)
            wr.writerow([r.workload, workload_shape(r.workload), r.impl, r.limit, r.median_ms, lo, hi,
                         r.peak_mb, r.err, " ".join(f"{t * 1e3:.2f}" for t in r.times)])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [csv_path], ("no chart: matplotlib is not installed "
                            "(pip install 'logitkit[bench]' to get bench.png)")
    png_path = os.path.join(out_dir, "bench.png")
    _chart(results, plt).savefig(png_path, dpi=110)
    plt.close("all")
    return [csv_path, png_path], ""


def read_results(csv_path: str) -> list[Result]:
    """The results a ``results.csv`` holds (this version's or an older one without min/max)."""
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["workload"] not in WORKLOADS:
                raise ValueError(f"{csv_path}: unknown workload {row['workload']!r}")
            times = [float(t) / 1e3 for t in row.get("times_ms", "").split()]
            limit = row["limit"] if "limit" in row else _old_limit(row["workload"], row["implementation"])
            out.append(Result(row["workload"], row["implementation"], median_ms=float(row["median_ms"]),
                              peak_mb=float(row["peak_extra_mb"]), err=float(row["max_rel_err"]),
                              limit=limit, times=times))
    return out


def _old_limit(workload: str, impl: str) -> str:
    """The limit a row of a CSV from before the ``limit`` column was compared with (as the table
    then did): the copies and the head have none, in-place and ``out=`` rows ``copyto``."""
    if impl.startswith("copy") or WORKLOADS[workload][2] == "head":
        return ""
    return "copyto" if ("in place" in impl or "inplace" in impl or "into existing" in impl) else "copy"


_COLORS = {"logitkit": "#2a9d8f", "peer": "#e76f51", "limit": "#bbbbbb"}


def _role(impl: str) -> str:
    if impl.startswith("copy"):
        return "limit"
    return "logitkit" if impl.startswith("logitkit") else "peer"


def _chart(results: list[Result], plt):
    """One horizontal bar panel per workload: median with min-max error bars, coloured by role."""
    from matplotlib.patches import Patch

    wls = list(dict.fromkeys(r.workload for r in results))
    tallest = max(len([r for r in results if r.workload == w]) for w in wls)
    fig, axes = plt.subplots(len(wls), 1, figsize=(9.5, (1.4 + 0.42 * tallest) * len(wls) + 0.6),
                             squeeze=False)
    for ax, wl in zip(axes[:, 0], wls):
        group = [r for r in results if r.workload == wl and r.median_ms == r.median_ms]
        if not group:
            ax.set_title(f"{wl}: {workload_shape(wl)} (no result)")
            ax.axis("off")
            continue
        med = np.array([r.median_ms for r in group])
        lo = np.array([min(r.times) * 1e3 if r.times else m for r, m in zip(group, med)])
        hi = np.array([max(r.times) * 1e3 if r.times else m for r, m in zip(group, med)])
        ax.barh([r.impl for r in group], med, color=[_COLORS[_role(r.impl)] for r in group],
                xerr=np.vstack([med - lo, hi - med]), ecolor="#333333", capsize=3)
        ax.invert_yaxis()
        # Times that span decades (a 256-row workload beside 500 MB copies) need a log axis to
        # show the small bars at all.
        log = hi.max() / max(lo.min(), 1e-9) > 30
        if log:
            ax.set_xscale("log")
        # Each bar's ratio to its physical limit (the copy it is compared with), beside the bar.
        lim = {"copyto": _find(group, "np.copyto"), "copy": _find(group, "np.copy)")}
        for k, r in enumerate(group):
            xl = lim.get(r.limit)
            if xl:
                ax.text(hi[k] * (1.05 if log else 1.0) + (0 if log else 0.01 * hi.max()), k,
                        f" {r.median_ms / xl:.2f}× {r.limit}", va="center", fontsize=7)
        if any(lim.get(r.limit) for r in group):  # room for the labels right of the longest bar
            ax.set_xlim(right=hi.max() * (3.0 if log else 1.25))
        ax.set_xlabel("median ms, bars from min to max of the repeats"
                      + (" (log scale)" if log else "") + "; lower is better")
        ax.set_title(f"{wl}: {workload_shape(wl)}, {_KIND[WORKLOADS[wl][2]]}", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.legend(handles=[Patch(color=_COLORS["logitkit"], label="logitkit"),
                        Patch(color=_COLORS["peer"], label="peers"),
                        Patch(color=_COLORS["limit"], label="physical limit (a copy of the logits)")],
               loc="upper center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_size_inches()[1]))
    return fig


def _report_outputs(results: list, out: str) -> None:
    """Write results.csv (and the chart, where matplotlib is installed) and say what was written."""
    written, missing = write_outputs(results, out)
    print("wrote " + " and ".join(written))
    if missing:
        print(missing)


def main(args: Any) -> int:
    if getattr(args, "from_csv", None):
        # Redraw a saved run: nothing is measured, so the table says where it came from.
        results = read_results(args.from_csv)
        print(f"results read from {args.from_csv} (not measured now)")
        print(format_table(results))
        if args.out:
            _report_outputs(results, args.out)
        return 0
    workloads = args.workload or list(DEFAULT_WORKLOADS)
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"--workload: unknown workload {w!r}; expected one of {sorted(WORKLOADS)}")
    if args.repeat < 1:
        raise SystemExit("--repeat: expected at least 1")
    print(f"workloads (--workload, default {', '.join(DEFAULT_WORKLOADS)}):")
    print(describe_workloads("  "))
    print(f"each implementation: 1 warm-up call, then --repeat {args.repeat} timed calls "
          "(median and min-max reported; default 5; the small workloads want --repeat 50)\n", flush=True)
    results = []
    for w in workloads:
        results += run_workload(w, args.repeat, not args.no_progress, getattr(args, "only", None))
    # The table is only meaningful with the machine it ran on.
    print(f"machine: {os.cpu_count()} CPUs, {_cpu_name()}; median of {args.repeat}")
    print(format_table(results))
    if args.out:
        _report_outputs(results, args.out)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
