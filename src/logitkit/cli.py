"""``python -m logitkit demo | check | info | bench``: the command line of logitkit.

Each command that needs an optional package says which one and the extra that installs it,
instead of a traceback; see :func:`require`.
"""

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

# argparse prints these verbatim, so they are plain text, not reST.
DESCRIPTION = """\
Exact, fused softmax and softmax cross-entropy for NumPy, PyTorch and JAX.

commands:
  demo    hard float32 rows: naive NumPy, each installed framework, logitkit, the exact value
  check   the numerical contract on this machine (exit 1 if logitkit fails it)
  info    versions, kernel backends and why a backend is unavailable
  bench   time, peak memory and error against every installed peer

Run `python -m logitkit COMMAND --help` for a command's options."""


class MissingDependency(RuntimeError):
    """An optional package a command needs is not installed (the message says how to install it)."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingDependency` naming it and the extra to install.

    >>> require("math", "demo", "nothing").__name__
    'math'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:  # also a module blocked with sys.modules[name] = None
        raise MissingDependency(
            f"{purpose} needs {module}, which is not installed here. Install it with\n"
            f"    pip install 'logitkit[{extra}]'     (or: pip install {module})\n"
            f"into the environment that runs logitkit (in this repository: make {extra} "
            f"or .venv/bin/python -m pip install -e '.[{extra}]')") from None


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _fmt(v: float) -> str:
    """A float32 loss as the shortest text that reads back to the same float32; 0, never -0."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    # Every column is a float32 result (the exact value rounded to float32), so more digits
    # than float32 holds would make a correctly rounded value look wrong.
    return str(np.float32(v))


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # a peer failing is a result to show, not a crash
        return f"error: {type(exc).__name__}"


def cmd_demo(args: argparse.Namespace) -> int:
    from . import _cases

    require("mpmath", "demo", "the exact column")
    if args.vocab < 16:
        raise SystemExit("--vocab: expected at least 16 (the wide rows hold labels 3, 7 and 11)")
    peers = _cases.peers()
    print("logitkit demo: per-row softmax cross-entropy of hard float32 rows\n")
    rows = []
    cases = _cases.cases(V=args.vocab)
    for case in cases:
        rows.append([case.name, f"1 x {case.logits.shape[1]}"]
                    + [_fmt(_safe(fn, case.logits, case.label)) for fn in peers.values()]
                    + [_fmt(case.exact)])
    print(_table(["case", "shape", *peers, "exact"], rows))
    print("\nnaive = softmax, then log, then pick the label; exact = 50-digit mpmath, rounded to")
    print("float32 (each value is printed with the digits float32 holds; 0 is exactly zero).")
    for case in cases:
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
    require("mpmath", "demo", "the exact values it compares against")
    rows = _check_rows()
    impls = list(rows[0][1])
    table = []
    failed = False
    for name, errs, tol in rows:
        # every logitkit path (NumPy, and TensorFlow's when installed) is held to the contract
        ok = all(e <= tol for k, e in errs.items() if k.startswith("logitkit"))
        failed |= not ok
        table.append([name, *(f"{errs[k]:.2e}" for k in impls), f"{tol:.1e}", "PASS" if ok else "FAIL"])
    print("Numerical contract: float32 per-row loss, relative error against 50-digit mpmath\n")
    print(_table(["case", *impls, "tolerance", "logitkit verdict"], table))
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
    forced = os.environ.get("LOGITKIT_KERNELS", "").lower() in ("core", "off", "0", "none")
    print("kernel backends:" + (f" (not used: LOGITKIT_KERNELS={os.environ['LOGITKIT_KERNELS']} "
                                "forces the core everywhere)" if forced else ""))
    for name, ok in registry.backends().items():
        state = "available" if ok else f"unavailable, the core is used instead: {_why_unavailable(name)}"
        print(f"  {name:8s} {state}")
    if importlib.util.find_spec("jax") is not None:
        # importing jax is what an info command is for; `import logitkit` itself never does
        import jax

        from .jax import _ffi

        if forced:
            state = "XLA only: LOGITKIT_KERNELS forces the core"
        else:
            state = ("CPU kernels via XLA FFI" if registry.backends().get("cpu") and _ffi._importable()
                     else f"XLA only: {_why_xla_only(jax, _ffi, registry)}")
        if not state.startswith("XLA only") and jax.device_count() > 1:
            state += f" (in shard_map bodies; {jax.device_count()} devices)"
        print(f"  {'jax':8s} {state}")
    return 0


def _why_unavailable(backend: str) -> str:
    """The reason a kernel backend reports itself unavailable, probed without side effects."""
    if backend == "cpu":
        if importlib.util.find_spec("numba") is None:
            return "numba is not installed (pip install numba)"
        return "numba did not load (run `python -c 'import numba'` to see why)"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'logitkit[triton]')"
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (the Triton kernels take torch CUDA tensors)"
        import torch

        try:
            if not torch.cuda.is_available():
                build = ("is a CPU-only build" if torch.version.cuda is None
                         else f"(CUDA {torch.version.cuda}) sees no GPU")
                return (f"no CUDA device (torch {torch.__version__} {build}; TRITON_INTERPRET=1 "
                        "runs the kernels in Triton's slow CPU interpreter)")
        except Exception as exc:
            return f"torch.cuda failed: {type(exc).__name__}: {exc}"
        return "triton did not load (run `python -c 'import triton'` to see why)"
    return "its module did not load"


def _why_xla_only(jax, ffi, registry) -> str:
    """Why JAX losses do not run on the CPU kernels here (the checks of ``_ffi._importable``)."""
    if not registry.backends().get("cpu"):
        return f"the CPU kernels are unavailable ({_why_unavailable('cpu')})"
    if not (hasattr(jax, "ffi") and hasattr(jax.ffi, "ffi_call")):
        return f"jax {jax.__version__} has no jax.ffi.ffi_call (pip install 'logitkit[jax]' for a newer one)"
    if sys.maxsize <= 2 ** 32:
        return "a 32-bit platform (the handlers assume 8-byte pointers)"
    major = ffi._ffi_api_major()
    if major != 0:
        return f"XLA FFI API {major}.x (the handlers are written for 0.x)"
    return "the FFI handlers did not load"


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .bench import DEFAULT_WORKLOADS, describe_workloads

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="logitkit", description=DESCRIPTION, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"logitkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo", formatter_class=fmt, help="hard rows: naive, each framework, logitkit, exact",
        description="Per-row float32 cross-entropy of five hard rows (logits near 1000, a confident\n"
                    "prediction whose loss is ~2e-13, a 1e4 offset, a masked row, a confidently wrong\n"
                    "row) from naive NumPy, each installed framework and logitkit, beside the exact\n"
                    "value from 50-digit mpmath. Needs mpmath: pip install 'logitkit[demo]'.")
    d.add_argument("--vocab", type=int, default=32000,
                   help="number of classes of the wide rows (default: %(default)s)")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser(
        "check", formatter_class=fmt, help="the numerical contract on this machine (exit 1 on failure)",
        description="Checks logitkit's numerical contract here: float32 per-row loss within 2^-21\n"
                    "relative error of 50-digit mpmath on the demo's rows (PyTorch, optax and scipy\n"
                    "beside it when installed), masks, NaN isolation, gradients against float64.\n"
                    "Exit status 0 when logitkit passes, 1 when it fails, 2 when mpmath is missing\n"
                    "(pip install 'logitkit[demo]').")
    c.set_defaults(func=cmd_check)
    i = sub.add_parser(
        "info", formatter_class=fmt, help="versions, kernel backends and why one is unavailable",
        description="Prints the Python, NumPy, numba and framework versions, each kernel backend\n"
                    "(numba CPU kernels, Triton GPU kernels) with the reason when it is unavailable,\n"
                    "and the route JAX losses take.")
    i.set_defaults(func=cmd_info)
    b = sub.add_parser(
        "bench", formatter_class=fmt, help="time, peak memory and error against installed peers",
        description="Times logitkit against every installed peer (NumPy, scipy, torch eager and\n"
                    "torch.compile, jax.jit + optax) in one process, with the copy limits beside them:\n"
                    "median and min-max of --repeat calls after one warm-up, peak extra memory, max\n"
                    "relative error against float64. Workloads (N x V, float32):\n"
                    + describe_workloads("  ") +
                    "\n--out DIR writes results.csv and, with matplotlib installed, bench.png\n"
                    "(pip install 'logitkit[bench]' for the chart and a progress bar).")
    b.add_argument("--workload", action="append", default=None,
                   help="one of the workloads above; repeat the option for several "
                        f"(default: {', '.join(DEFAULT_WORKLOADS)})")
    b.add_argument("--repeat", type=int, default=5,
                   help="timed calls per implementation; the median and min-max are reported "
                        "(default: %(default)s)")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="directory for results.csv and the chart bench.png (default: none)")
    b.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="time only the implementations whose name contains TEXT, e.g. logitkit or "
                        "'torch eager' (repeatable; the copy limits are always timed)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.add_argument("--from-csv", default=None, metavar="FILE",
                   help="print the table (and with --out, the chart) of a saved results.csv "
                        "instead of measuring")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MissingDependency as exc:
        print(f"logitkit {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
