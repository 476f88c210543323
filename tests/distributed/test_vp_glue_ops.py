"""The O(N) glue around the vocabulary-parallel kernels, counted in aten ops (issue 19, item 3).

On a GPU every small torch op of the header, the slots, the finish and the grad scales is a
kernel launch of several µs; at bf16 8192 × 16032 the local F.cross_entropy takes ~0.4 ms, so a
few hundred launches would dominate ``vocab_parallel_cross_entropy``. These tests count the aten
ops of one device-mode forward + backward on the CPU (the path CUDA tensors take, forced by
``_host_mode``), with the local kernels stubbed out (their ops are the kernels' own, counted
apart), attribute each op to the innermost glue function on the Python stack, and bound them.

``python tests/distributed/test_vp_glue_ops.py`` prints the table per part.
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from logitkit._namespace import TORCH, get_namespace  # noqa: E402
from logitkit.core.logsumexp import transform  # noqa: E402
from logitkit.distributed import _torch as vt  # noqa: E402
from logitkit.distributed import stages, vocab_parallel_cross_entropy  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

xp = get_namespace(TORCH)

# innermost first: the first of these names found walking out from the op's frame owns the op
PARTS = ("kernel", "_hash64", "label_digest", "label_hashes", "label_range", "header_fields", "encode_header",
         "header_check", "header_ok", "vocab",
         "reduce_rows", "_finish_forward", "_grad_scales", "_agree")
_KERNEL_FNS = {"_stub_partials", "_stub_grad"}
# no kernel launch on a GPU: views, autograd's detach, allocations, and Python numbers wrapped as
# 0-d CPU tensors (``torch.where(c, a, 0.0)``)
_FREE = ("aten.detach.", "aten.alias.", "aten.lift_fresh.", "aten.scalar_tensor.", "aten.empty.",
         "aten.empty_like.", "aten.empty_strided.")


def _launches(func) -> bool:
    return not (getattr(func, "is_view", False) or str(func).startswith(_FREE))


def _stub_partials(x, labels, *, start, ignore_index, label_smoothing=0.0, weight_local=None, softcap=None,
                   temperature=1.0):
    """What ``vp.vp_partials`` returns (same dtypes), from the xp stage: the kernel's stand-in."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = transform(xp, x.to(acc), softcap, 1.0)
    return stages.local_partials(xp, u, labels, start=start, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, weight_local=weight_local,
                                 temperature=temperature, stat_dtype=torch.float64)


def _stub_grad(x, labels, m, r, g_ce, g_z, **kw):
    return stages.local_grad(xp, x, labels, m, r, g_ce, g_z, max_before_temperature=True, **kw)


class _Kernels:
    vp_partials = staticmethod(_stub_partials)
    vp_grad = staticmethod(_stub_grad)


class OpCounter(TorchDispatchMode):
    """Every aten op, attributed to the innermost function of :data:`PARTS` on the Python stack."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: collections.Counter = collections.Counter()
        self.ops: dict = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if _launches(func):
            part = "other"
            f = sys._getframe(1)
            while f is not None:
                co = f.f_code.co_name
                if co in _KERNEL_FNS:
                    part = "kernel"
                    break
                if co in PARTS:
                    part = co
                    break
                f = f.f_back
            self.parts[part] += 1
            self.ops[part][name] += 1
        return func(*args, **(kwargs or {}))


def count_glue(monkeypatch, *, N=64, n=50, dtype=torch.bfloat16, **options) -> OpCounter:
    """Ops of one device-mode forward + backward of ``vocab_parallel_cross_entropy`` (one process)."""
    monkeypatch.setattr(vt, "_host_mode", lambda x: False)
    monkeypatch.setattr(vt, "_vp_kernels", lambda x: _Kernels)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, n, generator=g) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, n, (N,), generator=g)
    y[1] = -100
    if options.get("weight") is True:
        options["weight"] = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    counter = OpCounter()
    with counter:
        loss = vocab_parallel_cross_entropy(x, y, **options)
        loss.backward()
    assert torch.isfinite(loss)
    return counter


ALL = {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0, "temperature": 0.9}


class _MP:
    """A monkeypatch for the script (pytest's MonkeyPatch outside a test)."""

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        return self.mp

    def __exit__(self, *a):
        self.mp.undo()


# bounds on the glue (every part but the kernels' own ops). Before the vectorization (11b08e7's
# stages): 329 aten ops that launch (plain) and 369 (every option); after it 77 and 111.
GLUE_BOUND = {"plain": 80, "all": 115}


@pytest.mark.parametrize("case", ["plain", "all"])
def test_device_mode_glue_is_a_few_tens_of_ops(monkeypatch, case):
    c = count_glue(monkeypatch, **({} if case == "plain" else dict(ALL)))
    glue = sum(v for k, v in c.parts.items() if k != "kernel")
    assert glue <= GLUE_BOUND[case], (glue, dict(c.parts))


def test_host_mode_checks_the_header_on_the_host(monkeypatch):
    """CPU tensors read the header on the host (header_verdict): no device check of the table."""
    c = count_glue(monkeypatch)  # device mode forced
    monkeypatch.setattr(vt, "_host_mode", lambda x: True)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 50, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 50, (64,), generator=g)
    counter = OpCounter()
    with counter:
        vocab_parallel_cross_entropy(x, y).backward()
    assert counter.parts["header_check"] == 0 and c.parts["header_check"] > 0


def test_the_parts_sum_up(monkeypatch):
    """Each part stays small (what the bound of the whole is made of), plain options."""
    c = count_glue(monkeypatch)
    header = sum(c.parts[k] for k in ("_hash64", "label_digest", "header_fields", "encode_header", "header_check",
                                      "vocab", "_agree"))
    assert header <= 36 and c.parts["encode_header"] <= 2, dict(c.parts)
    assert c.parts["reduce_rows"] <= 32 and c.parts["_finish_forward"] <= 10 and c.parts["_grad_scales"] <= 2


# ----------------------------------------------------------------------------------------------
# device mode: every disagreement the header detects still gives a NaN loss (one process, the
# reduced table edited in the MAX as another rank's column would make it)


def _device(monkeypatch, edit=None):
    """Device mode, one rank of a group of two whose other rank's column ``edit(col)`` writes."""
    monkeypatch.setattr(vt, "_host_mode", lambda x: False)
    F = len(stages.HEADER_FIELDS)

    def init(self, group=None):
        self.active, self.group, self.rank, self.size = True, None, 0, 2

    def amax(self, t):
        # the tail is this rank's table (F, 2) with column 1 at the fill value: the "other rank"
        # writes a copy of column 0, edited
        tab = t[-F * 2:].reshape(F, 2)
        other = tab[:, 0].clone()
        other[stages.HEADER_FIELDS.index("start")] += tab[stages.HEADER_FIELDS.index("size"), 0]
        if edit is not None:
            edit(other)
        tab[:, 1] = torch.maximum(tab[:, 1], other)
        return t

    def asum(self, t):
        return t

    monkeypatch.setattr(vt.TorchCollectives, "__init__", init)
    monkeypatch.setattr(vt.TorchCollectives, "all_reduce_max", amax)
    monkeypatch.setattr(vt.TorchCollectives, "all_reduce_sum", asum)


def _fi(name):
    return stages.HEADER_FIELDS.index(name)


def _set(name, value):
    def edit(col):
        col[_fi(name)] = value
    return edit


def _add(name, delta):
    def edit(col):
        col[_fi(name)] += delta
    return edit


DISAGREEMENTS = {
    "error": _set("error", 1.0),
    "rows_lo": _add("rows_lo", 1.0),
    "rows_hi": _add("rows_hi", 1.0),
    "dtype": _set("dtype", 0.0),            # float16 against this rank's float64
    **{f: _add(f, 1.0) for f in ("ignore_index", "label_smoothing", "reduction", "z_loss", "softcap",
                                 "temperature", "weight", "vocab_start", "kind")},
    "labels_a": _add("labels_a", 1.0),
    "labels_b": _add("labels_b", 1.0),
    "labels_c": _add("labels_c", 1.0),
    "gap": _add("start", 1.0),                         # the shards leave a hole
    "overlap": _add("start", -1.0),                    # ... or overlap
    "other_starts_at_0": _set("start", 0.0),
}


def _xy(N=6, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, n, generator=g, dtype=torch.float64), torch.randint(0, 2 * n, (N,), generator=g)


def test_device_mode_consistent_table_gives_a_finite_loss(monkeypatch):
    _device(monkeypatch)
    x, y = _xy()
    # this rank holds [0, 5) of 10 classes: labels in [5, 10) belong to the other rank
    loss = vocab_parallel_cross_entropy(x, y, vocab_start=0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("case", sorted(DISAGREEMENTS))
def test_device_mode_each_disagreement_gives_nan(monkeypatch, case):
    _device(monkeypatch, DISAGREEMENTS[case])
    x, y = _xy()
    for o in ({}, {"label_smoothing": 0.1, "reduction": "sum"}):
        loss = vocab_parallel_cross_entropy(x, y, vocab_start=0, **o)
        assert torch.isnan(loss), (case, o)


@pytest.mark.parametrize("what", ["label_high", "label_negative", "weight_length", "tiling_alone"])
def test_device_mode_local_checks_give_nan(monkeypatch, what):
    monkeypatch.setattr(vt, "_host_mode", lambda x: False)
    x, y = _xy(n=7)
    y = y % 7
    kw = {}
    if what == "label_high":
        y[3] = 7
    elif what == "label_negative":
        y[3] = -5
    elif what == "weight_length":
        kw["weight"] = torch.ones(6, dtype=torch.float64)
    else:
        kw["vocab_start"] = 2
    loss = vocab_parallel_cross_entropy(x, y, **kw)
    assert torch.isnan(loss)
    ok = vocab_parallel_cross_entropy(x, y % 7)
    np.testing.assert_allclose(ok.item(), cross_entropy64(x.numpy(), (y % 7).numpy()), rtol=1e-12)


def test_device_mode_values_with_every_option(monkeypatch):
    monkeypatch.setattr(vt, "_host_mode", lambda x: False)
    x, y = _xy(N=9, n=11, seed=3)
    y = y % 11
    y[2] = -100
    w = torch.rand(11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    for red in ("mean", "sum", "none"):
        o = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0, "temperature": 0.9, "reduction": red}
        xt = x.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(xt, y, weight=w, **o)
        loss.sum().backward()
        on = {**o, "weight": w.numpy()}
        np.testing.assert_allclose(loss.detach().numpy(), cross_entropy64(x.numpy(), y.numpy(), **on), rtol=1e-12)
        gref = cross_entropy_grad64(x.numpy(), y.numpy(), **{**on, "reduction": "sum" if red == "none" else red})
        np.testing.assert_allclose(xt.grad.numpy(), gref, rtol=1e-10, atol=1e-15)


def _report() -> None:
    for name, opts in (("plain", {}), ("all options", dict(ALL))):
        with _MP() as mp:
            c = count_glue(mp, **opts)
        glue = sum(v for k, v in c.parts.items() if k != "kernel")
        print(f"{name}: glue {glue} aten ops (kernel stand-in {c.parts['kernel']})")
        for part in PARTS[1:] + ("other",):
            if c.parts[part]:
                top = ", ".join(f"{k.replace('aten.', '')} {v}" for k, v in c.ops[part].most_common(6))
                print(f"  {part:16s} {c.parts[part]:4d}   {top}")


if __name__ == "__main__":
    _report()


def test_constants_without_a_host_copy_match():
    """The fallback of the header's constants while a CUDA graph is captured (per-value fills)
    builds the same tensors as the host copy, nested or flat, float32 or int64."""
    for values, dtype in (([[stages._FILL, 3.0], [7.0, stages._FILL]], torch.float32), ([[-1], [1]], torch.int64),
                          ([2 ** 24 - 1, -1], torch.int64), ([], torch.float32)):
        want = torch.tensor(values, dtype=dtype)
        got = stages._fill_const(xp, values, dtype, torch.zeros(0))
        assert got.dtype == dtype and torch.equal(got, want.reshape(got.shape)) and got.shape == want.shape
        assert torch.equal(stages._host_const(xp, values, dtype, torch.zeros(0)), want)
