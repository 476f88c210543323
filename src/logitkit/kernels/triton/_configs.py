"""Launch configurations for rows wider than one block, from a recorded sweep.

``configs.json`` beside this file maps ``(op, dtype, V bucket)`` -- op ``"ce"`` (the fused
cross-entropy kernel, all its stages), ``"softmax"`` (softmax / log_softmax / logsumexp forward)
or ``"softmax_bwd"``; V bucketed to the nearest of :data:`BUCKETS` in log scale -- to
``block`` (elements per step), ``warps``, ``per_sm`` (persistent programs per SM; 0: one per
row), ``prefetch`` and ``hints`` (L2 eviction hints). ``python benchmarks/gpu.py --sweep``
writes the fastest configuration it measured for each key (``"source": "measured"``, with the
card, date, time and % of copy bandwidth); entries whose source starts with ``"default"`` were
not measured at that key and hold the built-in defaults. The ``LOGITKIT_TRITON_*`` environment
variables override the table (``benchmarks/gpu.py`` sweeps through them).

If the file is missing or unreadable (a packaging slip), :data:`_BUILTIN` -- the same defaults
the file was first written with -- is used, so a launch never fails for want of it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Optional

__all__ = ["BUCKETS", "PATH", "bucket", "wide", "dtype_name", "load"]

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")
BUCKETS = (32000, 128256, 262144)  # the V values that benchmarks/gpu.py --sweep measures
OPS = ("ce", "softmax", "softmax_bwd")
DTYPES = ("bfloat16", "float16", "float32", "float64")
_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

# (op, dtype) -> (block, warps, per_sm): the H100 winners at V = 128256
# (benchmarks/results/gpu-h100-2026-11-28.md), float16 as bfloat16 (same element size); anything
# else 16 KiB of input per step at 16 warps, one program per SM.
_BUILTIN = {
    ("ce", "float32"): (8192, 32, 1),
    ("ce", "bfloat16"): (8192, 8, 2),
    ("ce", "float16"): (8192, 8, 2),
    ("softmax", "float32"): (8192, 32, 1),
    ("softmax", "bfloat16"): (16384, 32, 1),
    ("softmax", "float16"): (16384, 32, 1),
}


def dtype_name(dtype: Any) -> str:
    """``"bfloat16"`` for ``torch.bfloat16`` (or an element size: 2 -> bfloat16, 4, 8)."""
    if isinstance(dtype, int):
        return {2: "bfloat16", 4: "float32", 8: "float64"}[dtype]
    return str(dtype).replace("torch.", "")


def bucket(V: int) -> int:
    """The member of :data:`BUCKETS` nearest to ``V`` in log scale."""
    lv = math.log(max(int(V), 1))
    return min(BUCKETS, key=lambda b: abs(math.log(b) - lv))


def _builtin(op: str, dtype: str) -> dict:
    block, warps, per_sm = _BUILTIN.get((op, dtype), (16384 // _SIZE.get(dtype, 4), 16, 1))
    return dict(block=block, warps=warps, per_sm=per_sm, prefetch=True, hints=True, source="built-in")


@functools.lru_cache(maxsize=None)
def load(path: Optional[str] = None) -> dict:
    """``{(op, dtype, V): entry}`` from ``path`` (default :data:`PATH`); ``{}`` if unreadable."""
    try:
        with open(path or PATH) as f:
            doc = json.load(f)
        return {(e["op"], e["dtype"], int(e["V"])): e for e in doc["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def wide(op: str, dtype: Any, V: int) -> dict:
    """The table's entry for ``op`` on ``dtype`` rows of ``V`` classes (wider than one block)."""
    name = dtype_name(dtype)
    e = load().get((op, name, bucket(V)))
    return e if e is not None else _builtin(op, name)
