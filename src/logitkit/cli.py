"""``python -m logitkit demo | check | info | bench``."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
from typing import Sequence

import numpy as np

CONTRACT_REL = 2.0 ** -21


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _fmt(v: float) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.10g}"


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # a peer failing is a result to show, not a crash
        return f"error: {type(exc).__name__}"


def cmd_demo(args: argparse.Namespace) -> int:
    from . import _cases

    peers = _cases.peers()
    print("logitkit demo: per-row softmax cross-entropy of hard float32 rows\n")
    rows = []
    for case in _cases.cases(V=args.vocab):
        exact = case.exact
        rows.append([case.name] + [_fmt(_safe(fn, case.logits, case.label)) for fn in peers.values()]
                    + [_fmt(exact)])
    print(_table(["case", *peers, "exact (mpmath)"], rows))
    print("\nnaive = softmax, then log, then pick the label; exact = 50-digit mpmath.")
    for case in _cases.cases(V=args.vocab):
        print(f"  {case.name}: {case.note}")
    return 0


def _check_rows() -> list[tuple[str, dict[str, float], float]]:
    """(case, {implementation: relative error}, tolerance) for the loss cases of the contract."""
    from . import _cases

    peers = {k: v for k, v in _cases.peers().items() if k != "naive NumPy"}
    out = []
    for case in _cases.cases():
        exact = case.exact
        errs = {}
        for name, fn in peers.items():
            val = _safe(fn, case.logits, case.label)
            errs[name] = math.inf if isinstance(val, str) else _cases.rel_err(val, exact)
        out.append((case.name, errs, CONTRACT_REL))
    return out


def _check_properties() -> list[tuple[str, bool, str]]:
    """Contract rules that are not one loss value: masks, NaN isolation, gradients, low precision."""
    import logitkit as lk
    from . import reference

    rng = np.random.default_rng(1)
    res = []
    x = rng.standard_normal((3, 50)).astype(np.float32)
    x[1, :] = -np.inf
    y = np.array([2, -100, 4])
    loss, g = lk.cross_entropy_with_grad(x, y, reduction="none")
    ok = np.isfinite(loss).all() and loss[1] == 0 and (g[1] == 0).all() and np.isfinite(g).all()
    res.append(("ignored all -inf row: loss 0, gradient 0, no NaN", bool(ok), f"loss={loss[1]}"))
    x = rng.standard_normal((3, 50)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 4] = np.inf
    loss = lk.cross_entropy(x, np.array([1, 2, 3]), reduction="none")
    ok = np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[2])
    res.append(("NaN / +inf rows give NaN for that row only", bool(ok), str(loss)))
    x = (rng.standard_normal((64, 1000)) * 3).astype(np.float32)
    y = rng.integers(0, 1000, 64)
    _, g = lk.cross_entropy_with_grad(x, y, label_smoothing=0.1, z_loss=1e-3)
    g64 = reference.cross_entropy_grad64(x, y, label_smoothing=0.1, z_loss=1e-3)
    err = float(np.max(np.abs(g - g64)) / np.max(np.abs(g64)))
    res.append(("gradient vs float64 (smoothing + z-loss)", err < 1e-5, f"max rel {err:.2e}"))
    try:
        import ml_dtypes

        xb = x.astype(ml_dtypes.bfloat16)
        lb = lk.cross_entropy(xb, y, reduction="none").astype(np.float64)
        ref = reference.cross_entropy64(xb.astype(np.float64), y, reduction="none")
        err = float(np.max(np.abs(lb - ref) / np.abs(ref)))
        res.append(("bfloat16 input, float32 accumulation", err <= 2.0 ** -7, f"max rel {err:.2e}"))
    except ImportError:
        pass
    return res


def cmd_check(args: argparse.Namespace) -> int:
    rows = _check_rows()
    impls = list(rows[0][1])
    table = []
    failed = False
    for name, errs, tol in rows:
        ok = errs["logitkit"] <= tol
        failed |= not ok
        table.append([name, *(f"{errs[k]:.2e}" for k in impls), f"{tol:.1e}", "PASS" if ok else "FAIL"])
    print("Numerical contract: float32 per-row loss, relative error against 50-digit mpmath\n")
    print(_table(["case", *impls, "tolerance", "logitkit"], table))
    print()
    prop_rows = []
    for name, ok, detail in _check_properties():
        failed |= not ok
        prop_rows.append([name, "PASS" if ok else "FAIL", detail])
    print(_table(["rule", "logitkit", "detail"], prop_rows))
    print("\nresult:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import logitkit
    from .kernels import registry

    print(f"logitkit {logitkit.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    for dist in ("numpy", "numba", "torch", "jax", "optax", "triton", "scipy"):
        print(f"  {dist:8s} {_version(dist)}")
    print("kernel backends:")
    for name, ok in registry.backends().items():
        print(f"  {name:8s} {'available' if ok else 'unavailable (falls back to the core)'}")
    if importlib.util.find_spec("jax") is not None:
        # importing jax is what an info command is for; `import logitkit` itself never does
        import jax

        from .jax import _ffi

        state = ("CPU kernels via XLA FFI" if registry.backends().get("cpu") and _ffi._importable()
                 else "XLA only")
        if state != "XLA only" and jax.device_count() > 1:
            state += f" (in shard_map bodies; {jax.device_count()} devices)"
        print(f"  {'jax':8s} {state}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logitkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="show hard rows: naive, each framework, logitkit, exact")
    d.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the wide rows")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("check", help="run the accuracy contract on this machine (exit 1 on failure)")
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("info", help="versions, backends and kernels")
    i.set_defaults(func=cmd_info)
    b = sub.add_parser("bench", help="time and memory against installed peers")
    b.add_argument("--workload", action="append", default=None,
                   help="llm, llm3, small, head, softmax (repeatable; default: llm, small, softmax)")
    b.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    b.add_argument("--out", default=None, help="directory for results.csv and a PNG chart")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
