"""Fused linear + cross-entropy and the fused LM head, workload ``head`` (N=4096, H=1024, V=32000, float32, CPU).

Forward + backward of the loss of a language-model head, for:

- ``logitkit`` (``logitkit.torch.linear_cross_entropy``, automatic strategy: gradients in forward);
- ``logitkit recompute`` (the same, ``LOGITKIT_LCE_STRATEGY=recompute``: logits recomputed in
  backward), measured to justify the automatic choice;
- ``logitkit NumPy`` (``logitkit.linear_cross_entropy_with_grad`` on NumPy arrays);
- ``torch eager`` (``h @ W.T`` then ``F.cross_entropy``);
- ``torch F.linear_cross_entropy`` (torch 2.13's chunked path, ``LinearCrossEntropyOptions()``).

Every variant runs in a fresh subprocess: its peak memory beyond the inputs is the growth of the
process's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the first
forward + backward, after the inputs exist and after a small warm-up call (kernel compilation,
thread pools) that leaves the peak far below. The time is the median of the later calls. Rounds
alternate the variants so that a noisy machine slows them alike.

    python benchmarks/linear_bench.py [--rounds 2] [--repeat 2] [--out DIR] [--variants a,b]

``--out DIR`` writes ``linear_head.csv`` and ``linear_head.png`` (bar charts of memory and time).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

N, H, V = 4096, 1024, 32000

VARIANTS = {
    "3 matmuls torch": "h @ W.T, G @ W, G.T @ h alone (torch.matmul): the floor of forward + backward",
    "3 matmuls NumPy": "the same three products with NumPy's BLAS",
    "4 matmuls torch": "the three, plus a teacher's h_t @ W_t.T (torch.matmul)",
    "4 matmuls NumPy": "the four with NumPy's BLAS",
    "head loss": "logitkit.torch.linear_head, outputs=('loss',), autograd",
    "head loss+lp+ent": "logitkit.torch.linear_head, outputs=('loss','logprobs','entropy'), autograd "
                        "(GRPO-style objective; backward recomputes the logits)",
    "head loss+lp+ent array stages": "the same, LOGITKIT_HEAD_KERNEL=off: the array-level chunk stages "
                                     "(the path before the row kernel; one timed call)",
    "head loss+lp+ent with_grad": "logitkit.linear.linear_head_with_grad on torch tensors, cotangents given",
    "head loss+lp+ent with_grad NumPy": "logitkit.linear.linear_head_with_grad on NumPy arrays",
    "head loss with_grad NumPy": "logitkit.linear.linear_head_with_grad, outputs=('loss',), NumPy",
    "head kl": "logitkit.torch.linear_head, outputs=('kl',), dense teacher head, autograd",
    "head kl with_grad": "logitkit.linear.linear_head_with_grad, outputs=('kl',), teacher head, torch",
    "head kl with_grad NumPy": "logitkit.linear.linear_head_with_grad, outputs=('kl',), teacher head, NumPy",
    "torch eager lp+ent": "materialized logits: log_softmax, NLL, gather, entropy, autograd",
    "torch chunked lp+ent": "RL-framework loop: 1024-token chunks under torch.utils.checkpoint",
    "logitkit": "logitkit.torch.linear_cross_entropy",
    "logitkit recompute": "logitkit.torch.linear_cross_entropy, logits recomputed in backward",
    "logitkit NumPy": "logitkit.linear_cross_entropy_with_grad (NumPy)",
    "torch eager": "h @ W.T, then F.cross_entropy",
    "torch F.linear_cross_entropy": "torch 2.13, LinearCrossEntropyOptions()",
}


_INPUTS: dict = {}


def _inputs() -> tuple:
    """The workload's arrays, made once per process (float32, scaled in place: no transient copy
    may raise the peak before the measurement starts)."""
    if not _INPUTS:
        import numpy as np

        rng = np.random.default_rng(0)
        h_np = rng.standard_normal((N, H), dtype=np.float32)
        h_np *= 0.5
        w_np = rng.standard_normal((V, H), dtype=np.float32)
        w_np *= 1.0 / np.sqrt(H)
        y_np = rng.integers(0, V, N).astype(np.int64)
        _INPUTS["v"] = (rng, h_np, w_np, y_np)
    return _INPUTS["v"]


def _child(variant: str, repeat: int) -> dict:
    """Runs inside the subprocess: inputs, warm-up, measured call, timed calls."""
    import resource

    import torch

    import logitkit

    try:
        step, args, small = _build(variant)
    except LookupError as exc:
        return {"error": str(exc)}
    # warm-up on a slice: compiles kernels and starts thread pools, far below the peak to come
    step(*small)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss, dh, dw = step(*args)
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del dh, dw
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = step(*args)
        times.append(time.perf_counter() - t0)
        del out
    return {"variant": variant, "peak_bytes": peak, "first_s": first, "times": times, "loss": loss,
            "threads": torch.get_num_threads(), "logitkit": logitkit.__version__}


def _build(variant: str) -> tuple:
    """``(step, args, small_args)`` of one variant: ``step(*args)`` is one forward + backward."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import logitkit.linear as lin
    import logitkit.torch as lt

    rng, h_np, w_np, y_np = _inputs()
    h, W, y = torch.from_numpy(h_np), torch.from_numpy(w_np), torch.from_numpy(y_np)
    lce = getattr(lt, "linear_cross_entropy", None)
    if lce is None:
        from logitkit.torch.linear import linear_cross_entropy as lce

    def torch_step(fn):
        def run(hh, WW, yy):
            hg = hh.detach().requires_grad_()
            Wg = WW.detach().requires_grad_()
            loss = fn(hg, Wg, yy)
            loss.backward()
            return float(loss), hg.grad, Wg.grad
        return run

    outs3 = ("loss", "logprobs", "entropy")
    adv = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    if "t" not in _INPUTS:
        t_np = rng.standard_normal((N, H), dtype=np.float32), rng.standard_normal((V, H), dtype=np.float32)
        t_np[1][...] *= 1.0 / np.sqrt(H)
        _INPUTS["t"] = t_np
    th_np, tw_np = _INPUTS["t"]
    th, tW = torch.from_numpy(th_np), torch.from_numpy(tw_np)

    def objective(out):
        # GRPO-style: the advantage-weighted log-probabilities, an entropy bonus, and the SFT loss
        n = out.logprobs.shape[0]
        return out.loss - (adv[:n] * out.logprobs).mean() - 0.01 * out.entropy.mean()

    def grads3(yy):
        n = yy.shape[0]
        return {"loss": 1.0, "logprobs": -adv[:n] / n, "entropy": torch.full((n,), -0.01 / n)}

    if variant.endswith("matmuls torch") or variant.endswith("matmuls NumPy"):
        four = variant.startswith("4")
        mm = torch.matmul if variant.endswith("torch") else np.matmul

        def step(a, b, c, ta=None, tb=None):
            z = mm(a, b.T)
            if four:
                zt = mm(ta, tb.T)
                del zt
            dh_ = mm(z, b)
            dw_ = mm(z.T, a)
            return 0.0, dh_, dw_
        if variant.endswith("torch"):
            args = (h, W, y) + ((th, tW) if four else ())
        else:
            args = (h_np, w_np, y_np) + ((th_np, tw_np) if four else ())
    elif variant == "head loss":
        step = torch_step(lambda a, b, c: lt.linear_head(a, b, c).loss)
        args = (h, W, y)
    elif variant in ("head loss+lp+ent", "head loss+lp+ent array stages"):
        step = torch_step(lambda a, b, c: objective(lt.linear_head(a, b, c, outputs=outs3)))
        args = (h, W, y)
    elif variant in ("head loss+lp+ent with_grad", "head loss+lp+ent with_grad NumPy"):
        def step(a, b, c):
            g = grads3(c)
            if isinstance(a, np.ndarray):
                g = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in g.items()}
            out, dh_, dw_, _ = lin.linear_head_with_grad(a, b, c, outputs=outs3, grad_outputs=g)
            return float(out.loss), dh_, dw_
        args = (h, W, y) if variant.endswith("with_grad") else (h_np, w_np, y_np)
    elif variant == "head loss with_grad NumPy":
        def step(a, b, c):
            out, dh_, dw_, _ = lin.linear_head_with_grad(a, b, c)
            return float(out.loss), dh_, dw_
        args = (h_np, w_np, y_np)
    elif variant == "head kl":
        def step(a, b, c, ta, tb):
            hg = a.detach().requires_grad_()
            Wg = b.detach().requires_grad_()
            out = lt.linear_head(hg, Wg, c, outputs=("kl",), teacher_hidden=ta, teacher_weight=tb)
            loss = out.kl.mean()
            loss.backward()
            return float(loss), hg.grad, Wg.grad
        args = (h, W, y, th, tW)
    elif variant in ("head kl with_grad", "head kl with_grad NumPy"):
        def step(a, b, c, ta, tb):
            n = c.shape[0]
            out, dh_, dw_, _ = lin.linear_head_with_grad(a, b, c, outputs=("kl",), teacher_hidden=ta,
                                                         teacher_weight=tb, grad_outputs={"kl": 1.0 / n})
            return float(out.kl.mean()), dh_, dw_
        args = (h, W, y, th, tW) if variant.endswith("with_grad") else (h_np, w_np, y_np, th_np, tw_np)
    elif variant in ("torch eager lp+ent", "torch chunked lp+ent"):
        def stats(hc, Wc, yc):
            logits = hc @ Wc.T
            logp = torch.log_softmax(logits, -1)
            lp = logp.gather(-1, yc[:, None])[:, 0]
            ent = -(logp.exp() * logp).sum(-1)
            return lp, ent

        def full(a, b, c):
            if variant == "torch eager lp+ent":
                lp, ent = stats(a, b, c)
            else:
                import torch.utils.checkpoint as cp
                parts = [cp.checkpoint(stats, a[i:i + 1024], b, c[i:i + 1024], use_reentrant=False)
                         for i in range(0, a.shape[0], 1024)]
                lp = torch.cat([p[0] for p in parts])
                ent = torch.cat([p[1] for p in parts])
            n = c.shape[0]
            return -lp.mean() - (adv[:n] * lp).mean() - 0.01 * ent.mean()
        step = torch_step(full)
        args = (h, W, y)
    elif variant in ("logitkit", "logitkit recompute"):
        step = torch_step(lambda a, b, c: lce(a, b, c))
        args = (h, W, y)
    elif variant == "logitkit NumPy":
        def step(a, b, c):
            loss, dh, dw, _ = lin.linear_cross_entropy_with_grad(a, b, c)
            return float(loss), dh, dw
        args = (h_np, w_np, y_np)
    elif variant == "torch eager":
        step = torch_step(lambda a, b, c: F.cross_entropy(a @ b.T, c))
        args = (h, W, y)
    elif variant == "torch F.linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy"):
            raise LookupError("torch has no F.linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
        step = torch_step(lambda a, b, c: F.linear_cross_entropy(a, b, c, options=opts))
        args = (h, W, y)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    # 256 x 2000 logits: above the kernels' threshold for threads, so the parallel kernels compile here
    small = (args[0][:256], args[1][:2000], (args[2][:256] % 2000)) + tuple(
        (t[:256] if i == 0 else t[:2000]) for i, t in enumerate(args[3:]))
    return step, args, small


def run(variants: list[str], rounds: int, repeat: int) -> list[dict]:
    rows = {v: {"variant": v, "what": VARIANTS[v], "peaks": [], "times": []} for v in variants}
    for _ in range(rounds):
        for v in variants:
            env = dict(os.environ)
            if v == "logitkit recompute":
                env["LOGITKIT_LCE_STRATEGY"] = "recompute"
            rep = repeat
            if v == "head loss+lp+ent array stages":
                env["LOGITKIT_HEAD_KERNEL"] = "off"
                rep = 0  # ~10x the others: the measured first call is its time
            out = subprocess.run([sys.executable, __file__, "--child", v, "--repeat", str(rep)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                rows[v]["error"] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if "error" in res:
                rows[v]["error"] = res["error"]
                continue
            rows[v]["peaks"].append(res["peak_bytes"])
            rows[v]["times"].extend(res["times"] or [res["first_s"]])
            rows[v]["loss"] = res["loss"]
            print(f"  {v}: peak {res['peak_bytes'] / 2**20:.0f} MB, times "
                  f"{', '.join(f'{t:.2f}' for t in res['times'])} s", file=sys.stderr, flush=True)
    out = []
    for v in variants:
        r = rows[v]
        r["peak_mb"] = statistics.median(r["peaks"]) / 2 ** 20 if r["peaks"] else float("nan")
        r["time_s"] = statistics.median(r["times"]) if r["times"] else float("nan")
        out.append(r)
    return out


def interleave(variants: list[str], rounds: int) -> list[dict]:
    """All variants in this one process, round-robin: every round times each variant once, so a
    loaded machine slows neighbours alike; ``ratios`` are per round against the round's products
    of the same BLAS (:func:`_floor`), whose median is what the table quotes. No memory figures
    (one process holds every variant's inputs)."""
    env_of = {"logitkit recompute": ("LOGITKIT_LCE_STRATEGY", "recompute"),
              "head loss+lp+ent array stages": ("LOGITKIT_HEAD_KERNEL", "off")}
    built = {}
    for v in variants:
        try:
            built[v] = _build(v)
        except LookupError as exc:
            print(f"  {v}: {exc}", file=sys.stderr)
    rows = {v: {"variant": v, "what": VARIANTS[v], "peaks": [], "times": [], "ratios": []} for v in built}

    def call(v, args):
        key = env_of.get(v)
        old = os.environ.get(key[0]) if key else None
        if key:
            os.environ[key[0]] = key[1]
        try:
            t0 = time.perf_counter()
            out = built[v][0](*args)
            return time.perf_counter() - t0, out
        finally:
            if key:
                if old is None:
                    os.environ.pop(key[0], None)
                else:
                    os.environ[key[0]] = old

    for v in built:  # warm-up: kernels compiled, pools started
        call(v, built[v][2])
    for k in range(rounds):
        this = {}
        for v in built:
            if v == "head loss+lp+ent array stages" and k:
                continue  # ~10x the others: timed in the first round only
            t, out = call(v, built[v][1])
            del out
            this[v] = t
            rows[v]["times"].append(t)
            print(f"  round {k + 1}: {v}: {t:.2f} s", file=sys.stderr, flush=True)
        for v, t in this.items():
            fl = _floor(v)
            if fl in this and "matmuls" not in v:
                rows[v]["ratios"].append(t / this[fl])
    out = []
    for v, r in rows.items():
        r["peak_mb"] = float("nan")
        r["time_s"] = statistics.median(r["times"]) if r["times"] else float("nan")
        out.append(r)
    return out


def _floor(variant: str) -> str:
    """The matrix products a variant is compared with: same BLAS (torch's or NumPy's), three, or
    four with a teacher head."""
    n = "4" if "kl" in variant else "3"
    lib = "NumPy" if variant.endswith("NumPy") else "torch"
    return f"{n} matmuls {lib}"


def table(rows: list[dict]) -> str:
    grads_mb = 4 * (N * H + V * H) / 2 ** 20
    by = {r["variant"]: r for r in rows}
    eager = by.get("torch eager", {}).get("time_s", float("nan")) or float("nan")
    lines = [f"workload head: N={N}, H={H}, V={V}, float32, CPU, forward + backward "
             f"(gradients of hidden and weight: {grads_mb:.0f} MB; target: peak extra <= "
             f"{grads_mb + 32:.0f} MB)", "",
             "| variant | peak memory beyond inputs | time (median) | min-max | vs the products alone | "
             "vs torch eager CE |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r and not r["times"]:
            lines.append(f"| {r['variant']} | - | - | - | - | {r['error']} |")
            continue
        fl = by.get(_floor(r["variant"]))
        vs = ""
        if r.get("ratios"):
            q = r["ratios"]
            vs = (f"{statistics.median(q):.2f}x {_floor(r['variant'])} (per round: "
                  f"{', '.join(f'{x:.2f}' for x in q)})")
        elif fl and fl["times"] and "matmuls" not in r["variant"]:
            vs = f"{r['time_s'] / fl['time_s']:.2f}x {fl['variant']}"
        peak = "-" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.0f} MB"
        lines.append(f"| {r['variant']} ({r['what']}) | {peak} | {r['time_s']:.2f} s | "
                     f"{min(r['times']):.2f}-{max(r['times']):.2f} s | {vs} | {r['time_s'] / eager:.2f}x |")
    return "\n".join(lines)


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["times"]]
    names = [r["variant"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    grads_mb = 4 * (N * H + V * H) / 2 ** 20
    axes[0].barh(names, [r["peak_mb"] for r in ok], color="tab:blue")
    axes[0].axvline(grads_mb + 32, color="tab:red", ls="--", label="gradients + 32 MB")
    axes[0].set_xlabel("peak memory beyond inputs (MB)")
    axes[0].legend()
    axes[1].barh(names, [r["time_s"] for r in ok], color="tab:green")
    eager = next((r["time_s"] for r in ok if r["variant"] == "torch eager"), None)
    if eager:
        axes[1].axvline(1.05 * eager, color="tab:red", ls="--", label="1.05 x torch eager")
        axes[1].legend()
    axes[1].set_xlabel("forward + backward time (s, median)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle(f"fused linear + cross-entropy, N={N}, H={H}, V={V}, float32 CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per variant")
    p.add_argument("--repeat", type=int, default=2, help="timed calls per subprocess")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--out", help="directory for linear_head.csv and linear_head.png")
    p.add_argument("--interleave", action="store_true",
                   help="all variants in one process, round-robin (ratios per round; no memory figures)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.repeat)))
        return 0
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows = interleave(variants, a.rounds) if a.interleave else run(variants, a.rounds, a.repeat)
    print(table(rows))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "linear_head.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "peak_mb", "time_s", "times"])
            for r in rows:
                w.writerow([r["variant"], f"{r['peak_mb']:.1f}", f"{r['time_s']:.3f}",
                            " ".join(f"{t:.3f}" for t in r["times"])])
        chart(rows, os.path.join(a.out, "linear_head.png"))
        print(f"wrote {a.out}/linear_head.csv and {a.out}/linear_head.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
