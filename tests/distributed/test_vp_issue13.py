"""Issue 13, items 3, 4, 5, 9 and 17, on the stages with threads as ranks (no processes).

The gloo and shard_map versions of the same items live in test_vp_torch_gloo.py and
test_vp_jax.py (they share those files' one launch per world size). References: single-process
logitkit on the gathered logits and float64 NumPy.
"""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

import logitkit
from logitkit.distributed import stages
from logitkit.reference import cross_entropy64

from _vp_sim import run_ranks, shard_bounds

pytestmark = pytest.mark.timeout(120)  # a rank left waiting fails the test, never stalls it


def _each(size, fn, drop_nan=False):
    """``fn(rank, group)`` on every rank; per rank ``("ok", result)`` or ``(type name, message)``."""
    def wrap(rank, group):
        try:
            return "ok", fn(rank, group)
        except (ValueError, TypeError) as exc:
            return type(exc).__name__, str(exc)

    results, group = run_ranks(size, wrap, drop_nan=drop_nan)
    return results, group


def _ce(x, y, bounds, rank, group, **o):
    s, e = bounds[rank]
    return stages.cross_entropy_with_grad(x[:, s:e], y, vocab_start=s, rank=rank, world_size=len(bounds),
                                          **group.collectives(rank), **o)


def test_issue13_item3_nan_in_every_shard_position():
    """A NaN at every column (so on every rank, first/middle/last of its shard) poisons its row only,
    even with a MAX all-reduce that drops NaN (gloo, XLA)."""
    rng = np.random.default_rng(3)
    sizes = [3, 5, 4]
    V = sum(sizes)
    bounds = shard_bounds(sizes)
    x = rng.normal(size=(V + 2, V)) * 2
    x[np.arange(V), np.arange(V)] = np.nan          # row c: NaN in column c
    x[V, 7] = np.nan                                # a NaN row that is ignored: 0 and 0
    y = rng.integers(0, V, V + 2)
    y[[0, 5, 11]] = [0, 5, 11]                      # the NaN is the label logit
    y[V] = -100
    for smoothing in (0.0, 0.1):
        results, _ = _each(3, lambda r, g: _ce(x, y, bounds, r, g, reduction="none",
                                               label_smoothing=smoothing), drop_nan=True)
        ref = logitkit.cross_entropy(x, y, reduction="none", label_smoothing=smoothing)
        for rank, (kind, (loss, g)) in enumerate(results):
            assert kind == "ok"
            assert np.all(np.isnan(loss[:V])), (rank, loss[:V])
            assert np.all(np.isnan(g[:V])), rank
            assert loss[V] == 0 and np.all(g[V] == 0)
            np.testing.assert_allclose(loss[V + 1], ref[V + 1], rtol=1e-12)
            assert np.all(np.isfinite(g[V + 1]))


@pytest.mark.parametrize("layout", [
    [(4, 8), (4, 8)],              # the issue's case: nobody holds classes 0-3
    [(2, 5), (2, 4)],              # max(start + n) == Σ n, but 0 and 1 are missing and 2, 3 doubled
    [(0, 3), (3, 3), (1, 4)],      # an empty shard, and an overlap that leaves nothing out
])
def test_issue13_item4_non_tiling_shards_raise(layout):
    V = max(e for _, e in layout)
    x = np.random.default_rng(4).normal(size=(5, V + 2))
    y = np.array([4, 4, 4, 4, 4])
    results, group = _each(len(layout), lambda r, g: _ce(x, y, layout, r, g))
    assert {k for k, _ in results} == {"ValueError"}
    assert len({m for _, m in results}) == 1            # the same message on every rank
    assert "vocab_start: the shards do not tile the vocabulary" in results[0][1]
    assert len(group.calls) == 1                        # raised after the header, before any per-token collective


def _old_hash(labels):
    """The 20-bit position-weighted label hash the checks used before (a linear function)."""
    pos = np.arange(len(labels))
    return int(np.sum(labels * (pos * 2 + 1) + pos)) & ((1 << 20) - 1)


def test_issue13_item5_label_edits_that_collided_are_detected():
    a, b = np.array([1, 5, 2, 7]), np.array([4, 4, 2, 7])
    assert _old_hash(a) == _old_hash(b)                 # the issue's collision
    x = np.random.default_rng(5).normal(size=(4, 8))
    bounds = shard_bounds([4, 4])
    results, _ = _each(2, lambda r, g: _ce(x, a if r == 0 else b, bounds, r, g))
    assert [k for k, _ in results] == ["ValueError", "ValueError"]
    assert results[0][1] == results[1][1] and "labels: the ranks passed different labels" in results[0][1]


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(labels=st.lists(st.integers(-100, 50000), min_size=2, max_size=40),
       edits=st.lists(st.tuples(st.integers(0, 39), st.integers(-3, 3).filter(bool)), min_size=1, max_size=3))
def test_issue13_item5_small_edits_change_every_hash(labels, edits):
    """A few small edits (the kind that cancel in a linear hash) change all three 24-bit hashes."""
    a = np.array(labels, dtype=np.int64)
    b = a.copy()
    for i, d in edits:
        b[i % len(b)] += d
    if np.array_equal(a, b):
        return
    ha = [int(v) for v in stages.label_hashes(np, a)]
    hb = [int(v) for v in stages.label_hashes(np, b)]
    assert all(p != q for p, q in zip(ha, hb)), (ha, hb)


def _mistake_cases():
    """(name, per-rank overrides of rank 1, expected type, text in the message)."""
    return [
        ("labels of the wrong shape on one rank", {"y": np.zeros(7, dtype=np.int64)}, "ValueError",
         "x, labels: expected shapes (N, n) and (N,)"),
        ("float labels on one rank", {"y": np.zeros(8)}, "TypeError", "labels"),
        ("label_smoothing differs", {"opts": {"label_smoothing": 0.1}}, "ValueError", "label_smoothing: the ranks"),
        ("reduction differs", {"opts": {"reduction": "sum"}}, "ValueError", "reduction: the ranks"),
        ("dtype differs", {"dtype": np.float32}, "TypeError", "local_logits: the ranks passed different dtypes"),
        ("batch size differs", {"rows": 6}, "ValueError", "different numbers of tokens"),
        ("an invalid option on one rank", {"opts": {"label_smoothing": 2.0}}, "ValueError", "label_smoothing"),
    ]


@pytest.mark.parametrize("name,over,etype,text", _mistake_cases(), ids=[c[0] for c in _mistake_cases()])
def test_issue13_item9_rank_local_mistakes_raise_on_every_rank(name, over, etype, text):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 10))
    y = rng.integers(0, 10, 8)
    bounds = shard_bounds([4, 6])

    def fn(rank, g):
        o, xr, yr = {}, x, y
        if rank == 1:
            o = dict(over.get("opts", {}))
            xr = x[: over.get("rows", 8)].astype(over.get("dtype", np.float64))
            yr = over.get("y", y if xr.shape[0] == 8 else y[: xr.shape[0]])
        s, e = bounds[rank]
        return stages.cross_entropy_with_grad(xr[:, s:e], yr, vocab_start=s, rank=rank, world_size=2,
                                              **g.collectives(rank), **o)

    results, group = _each(2, fn)
    assert [k for k, _ in results] == [etype, etype], results
    assert results[0][1] == results[1][1]               # the same text on every rank
    assert text in results[0][1] and "rank" in results[0][1]
    assert len(group.calls) == 1                        # only the fixed-size header was exchanged


@pytest.mark.parametrize("module", ["logitkit.distributed", "logitkit.distributed.stages",
                                    "logitkit.distributed._torch", "logitkit.distributed._jax"])
def test_issue13_item17_distributed_docstrings_run_as_doctests(module):
    if module.endswith("_torch"):
        pytest.importorskip("torch")
    if module.endswith("_jax"):
        pytest.importorskip("jax")
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    for t in tests:
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0
    if module.endswith("_jax"):
        (t,) = [t for t in tests if t.name.endswith("jax_vocab_parallel_cross_entropy")]
        code = [e.source.strip() for e in t.examples]
        # a real example, not comments: it runs shard_map on the installed JAX and checks the loss
        assert not any(c.startswith("#") for c in code) and any("shard_map" in c for c in code)
        assert any(e.want.strip() == "True" for e in t.examples)
