"""The collective-agnostic stages with NumPy, P ranks simulated by threads (no processes).

References come from float64 NumPy (`logitkit.reference`) and mpmath on the gathered logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import logitkit

from logitkit.distributed import stages
from logitkit.reference import cross_entropy64, cross_entropy_grad64, row_loss_mp

from _vp_sim import run_ranks, shard_bounds

LAYOUTS = {  # global V = sum
    "one rank": [13],
    "two even": [8, 8],
    "two uneven": [5, 12],
    "three uneven": [1, 9, 4],
    "four with an empty shard": [6, 0, 3, 7],
}

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"label_smoothing": 0.25, "weight": True},
    {"weight": True, "ignore_index": 3},
    {"z_loss": 1e-2, "reduction": "sum"},
    {"softcap": 4.0, "temperature": 0.7, "label_smoothing": 0.05},
    {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-3, "softcap": 6.0, "temperature": 1.3,
     "reduction": "none"},
]


def _case(sizes, seed=0, N=9, dtype=np.float64, ignore_index=-100):
    rng = np.random.default_rng(seed)
    V = sum(sizes)
    x = (rng.normal(size=(N, V)) * 3).astype(dtype)
    bounds = shard_bounds(sizes)
    nonempty = [i for i, n in enumerate(sizes) if n]
    # labels on every rank: cycle through the shards so that every non-empty shard owns some
    y = np.array([rng.integers(*bounds[nonempty[i % len(nonempty)]]) for i in range(N)])
    y[1] = ignore_index
    return x, y, bounds


def _run(x, y, bounds, **opts):
    def rank_fn(rank, group):
        s, e = bounds[rank]
        return stages.cross_entropy_with_grad(x[:, s:e], y, vocab_start=s, rank=rank, world_size=len(bounds),
                                              **group.collectives(rank), **opts)

    results, group = run_ranks(len(bounds), rank_fn)
    return results, group


def _opts(o, V, seed=1):
    o = dict(o)
    if o.get("weight") is True:
        o["weight"] = np.random.default_rng(seed).uniform(0.2, 2.0, V)
    return o


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("oi", range(len(OPTIONS)))
def test_parity_float64(layout, oi):
    sizes = LAYOUTS[layout]
    o = _opts(OPTIONS[oi], sum(sizes))
    x, y, bounds = _case(sizes, ignore_index=o.get("ignore_index", -100))
    results, group = _run(x, y, bounds, **o)
    ref = cross_entropy64(x, y, **o)
    gref = cross_entropy_grad64(x, y, **o)
    for rank, (loss, g) in enumerate(results):
        np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-14)
        s, e = bounds[rank]
        np.testing.assert_allclose(g, gref[:, s:e], rtol=1e-10, atol=1e-15)
    # the fixed-size header, then one MAX and one SUM all-reduce per forward (the gradient needs none)
    N = x.shape[0]
    k = stages.n_slots(o.get("label_smoothing", 0.0))
    assert [c[0] for c in group.calls] == ["max", "max", "sum"]
    assert [c[1] for c in group.calls] == [stages.header_size(len(bounds)), N, k * N]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_parity_low_precision_uses_float32_scalars(dtype):
    sizes = [7, 3, 10]
    x, y, bounds = _case(sizes, seed=3, N=16, dtype=dtype)
    o = {"label_smoothing": 0.1, "z_loss": 1e-3}
    results, group = _run(x, y, bounds, **o)
    ref = cross_entropy64(x.astype(np.float64), y, **o)
    gref = cross_entropy_grad64(x.astype(np.float64), y, **o)
    tol = 2e-6 if dtype == np.float32 else 1e-3
    for rank, (loss, g) in enumerate(results):
        assert loss.dtype == dtype and g.dtype == dtype
        np.testing.assert_allclose(float(loss), ref, rtol=tol)
        s, e = bounds[rank]
        np.testing.assert_allclose(g.astype(np.float64), gref[:, s:e], rtol=tol * 10, atol=tol * 1e-2)
    # scalars travel as float32 (4 bytes) for 16- and 32-bit inputs
    assert [c[2] // c[1] for c in group.calls] == [4, 4, 4]


def test_confident_rows_keep_full_relative_accuracy():
    """Losses ~1e-13 in float32: the maximum on another rank than most mass, and tied across ranks."""
    V = 12
    a = np.full(V, -30.0); a[0] = 0.0                 # max and label on rank 0
    b = np.full(V, -30.0); b[11] = 0.0                # max and label on the last rank
    c = np.full(V, -30.0); c[2] = 0.0; c[9] = 0.0     # max tied across ranks 0 and 2
    d = np.full(V, 1e4 - 31.0); d[5] = 1e4            # a large common offset, max on rank 1
    rows = np.stack([a, b, c, d]).astype(np.float32)
    y = np.array([0, 11, 9, 5])
    results, _ = _run(rows, y, shard_bounds([4, 4, 4]), reduction="none")
    exact = [row_loss_mp(rows[i].astype(np.float64), int(y[i])) for i in range(4)]
    assert max(exact[0], exact[1], exact[3]) < 1e-11  # confident rows indeed
    for loss, _g in results:
        for i in range(4):
            assert abs(float(loss[i]) - exact[i]) <= 2.0 ** -21 * exact[i], (i, float(loss[i]), exact[i])


def test_masking_and_nan_stay_in_their_rows():
    V = 9
    x = np.random.default_rng(5).normal(size=(5, V))
    x[0, 3:6] = -np.inf           # a whole middle shard masked, label elsewhere
    x[1, :] = -np.inf             # fully masked row, ignored: 0 loss, 0 gradient
    x[2, 7] = np.nan              # NaN on the last rank: that row only
    x[3, 0] = -np.inf             # masked logit that is not the label
    y = np.array([1, -100, 4, 8, 5])
    bounds = shard_bounds([3, 3, 3])
    results, _ = _run(x, y, bounds, reduction="none")
    # single-process logitkit on the gathered logits (the float64 oracle has no -inf handling)
    ref = logitkit.cross_entropy(x, y, reduction="none")
    _, gref = logitkit.cross_entropy_with_grad(x, y, reduction="none")
    keep = [0, 1, 3, 4]
    for rank, (loss, g) in enumerate(results):
        assert np.isnan(loss[2]) and np.all(np.isnan(g[2]))
        np.testing.assert_allclose(loss[keep], ref[keep], rtol=1e-12)
        s, e = bounds[rank]
        np.testing.assert_allclose(g[keep], gref[keep, s:e], rtol=1e-12, atol=1e-300)
        assert loss[1] == 0 and np.all(g[1] == 0)
        assert np.all(np.isfinite(g[keep]))
    # the finite rows also match the float64 oracle on their unmasked classes
    np.testing.assert_allclose(loss[4], cross_entropy64(x[4:5], y[4:5]), rtol=1e-12)


def test_all_masked_row_not_ignored_is_inf():
    x = np.full((1, 6), -np.inf)
    bounds = shard_bounds([2, 4])
    results, _ = _run(x, np.array([2]), bounds, reduction="none")
    _, gref = logitkit.cross_entropy_with_grad(x, np.array([2]), reduction="none")
    for rank, (loss, g) in enumerate(results):
        # as in one process: infinite loss, softmax 0, so the gradient is -1 at the label only
        assert loss[0] == np.inf
        np.testing.assert_array_equal(g, gref[:, bounds[rank][0]:bounds[rank][1]])


def test_empty_batch_mean_is_zero():
    x = np.zeros((0, 6))
    results, group = _run(x, np.zeros(0, dtype=np.int64), shard_bounds([3, 3]))
    for loss, g in results:
        assert loss == 0 and g.shape == (0, 3)
    assert [c[1] for c in group.calls] == [stages.header_size(2), 0, 0]


def test_errors_are_raised_on_every_rank():
    x, y, _ = _case([4, 4])
    with pytest.raises(ValueError, match="vocab_start: the shards do not tile"):
        _run(x, y, [(0, 4), (3, 7)])  # overlap
    with pytest.raises(ValueError, match="labels: the ranks passed different labels"):
        run_ranks(2, lambda r, g: stages.cross_entropy_with_grad(
            x[:, 4 * r:4 * r + 4], (y + r) % 8, vocab_start=4 * r, rank=r, world_size=2, **g.collectives(r)))
    bad = y.copy(); bad[0] = 8
    with pytest.raises(ValueError, match=r"labels: class index 8 at position 0 is out of range \[0, 8\)"):
        _run(x, bad, shard_bounds([4, 4]))
    with pytest.raises(ValueError, match=r"weight: expected the global class weights, shape \(8,\)"):
        _run(x, y, shard_bounds([4, 4]), weight=np.ones(6))

    # every rank raised, none is left waiting: each thread's own exception is a ValueError
    def each(rank, g):
        try:
            stages.cross_entropy_with_grad(x[:, 4 * rank:4 * rank + 4], bad, vocab_start=4 * rank, rank=rank,
                                           world_size=2, **g.collectives(rank))
        except ValueError:
            return "raised"
        return "returned"

    results, _ = run_ranks(2, each)
    assert results == ["raised", "raised"]


# ----------------------------------------------------------------------------------------------
# Megatron-Core's per-partition label smoothing, implemented here only as a counter-example.


def megatron_smoothed_loss(x_local, y, start, logits_max, sum_exp, predicted, eps):
    """Megatron-Core ``_VocabParallelCrossEntropy.forward`` with label smoothing, for one rank.

    Its smoothing term is ``smoothing · mean(log p)`` with the mean over the *local* partition and
    ``smoothing = eps·K/(K−1)`` with ``K`` the *local* partition size (Megatron-LM issue #737).
    """
    K = x_local.shape[1]
    loss = np.log(sum_exp) - predicted
    log_probs = (x_local - logits_max[:, None]) - np.log(sum_exp)[:, None]
    smoothing = eps * K / (K - 1)
    return (1.0 - smoothing) * loss - smoothing * log_probs.mean(-1)


def _megatron_all_ranks(x, y, bounds, eps):
    m = x.max(-1)
    sum_exp = np.exp(x - m[:, None]).sum(-1)
    predicted = np.take_along_axis(x - m[:, None], y[:, None], -1)[:, 0]
    return [megatron_smoothed_loss(x[:, s:e], y, s, m, sum_exp, predicted, eps) for s, e in bounds]


def test_megatron_per_partition_smoothing_is_wrong_at_four_ranks():
    x, y, bounds = _case([6, 6, 6, 6], seed=11, N=32)
    y[1] = 0
    V, eps = 24, 0.1
    # Megatron spreads eps over the K-1 other classes; torch spreads it over all K. The same
    # target distribution in torch's convention has eps' = eps·V/(V−1) for the global V.
    ref = cross_entropy64(x, y, label_smoothing=eps * V / (V - 1), reduction="none")
    # In one process the formula is right:
    (one,) = _megatron_all_ranks(x, y, [(0, V)], eps)
    np.testing.assert_allclose(one, ref, rtol=1e-12)
    # At four ranks each rank gets a different, wrong loss ...
    per_rank = _megatron_all_ranks(x, y, bounds, eps)
    for loss in per_rank:
        assert not np.allclose(loss, ref, rtol=1e-3)
    assert not np.allclose(per_rank[0], per_rank[1], rtol=1e-3)
    # ... while the stages give the right one on every rank.
    results, _ = _run(x, y, bounds, label_smoothing=eps * V / (V - 1), reduction="none")
    for loss, _g in results:
        np.testing.assert_allclose(loss, ref, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# random shard layouts and options


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4).filter(lambda s: sum(s) >= 1),
       N=st.integers(0, 6), eps=st.sampled_from([0.0, 0.3, 1.0]), weighted=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), z_loss=st.sampled_from([0.0, 1e-2]),
       scale=st.sampled_from([1.0, 30.0]), seed=st.integers(0, 2 ** 16))
def test_random_layouts_match_float64(sizes, N, eps, weighted, reduction, z_loss, scale, seed):
    rng = np.random.default_rng(seed)
    V = sum(sizes)
    x = rng.normal(size=(N, V)) * scale
    y = rng.integers(0, V, N)
    if N > 1:
        y[rng.integers(0, N)] = -100
    o = {"label_smoothing": eps, "reduction": reduction, "z_loss": z_loss}
    if weighted:
        o["weight"] = rng.uniform(0.1, 3.0, V)
    bounds = shard_bounds(sizes)
    results, group = _run(x, y, bounds, **o)
    ref, gref = cross_entropy64(x, y, **o), cross_entropy_grad64(x, y, **o)
    for rank, (loss, g) in enumerate(results):
        np.testing.assert_allclose(loss, ref, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(g, gref[:, bounds[rank][0]:bounds[rank][1]], rtol=1e-9, atol=1e-14)
    assert len(group.calls) == 3


def test_importing_the_package_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, logitkit.distributed as d, logitkit.distributed.stages; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules); "
            "assert 'vocab_parallel_cross_entropy' in dir(d)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------
# the header's vectorized pieces (issue 19, item 3): the same values from NumPy and torch, and the
# device check (header_check) agreeing with the host's verdict on every kind of table


def _labels_cases():
    rng = np.random.default_rng(21)
    yield rng.integers(0, 50, 17)
    y = rng.integers(0, 9, 12)
    y[[1, 4]] = -100
    yield y
    yield np.array([-100, -100, -100])                       # every label ignored
    yield np.array([3, -7, 2 ** 40, -(2 ** 33), 5])          # out of every range, beyond 32 bits
    yield np.zeros(0, dtype=np.int64)


@pytest.mark.parametrize("y", list(_labels_cases()), ids=["plain", "ignored", "all-ignored", "wide", "empty"])
def test_label_digest_numpy_and_torch_agree(y):
    torch = pytest.importorskip("torch")
    d_np = stages.label_digest(np, y, -100)
    d_t = stages.label_digest(stages_torch_xp(), torch.tensor(y), -100)
    np.testing.assert_array_equal(d_np, d_t.numpy())
    assert [int(v) for v in stages.label_hashes(np, y)] == [int(v) for v in d_np[:3]]
    assert all(0 <= int(v) < 2 ** 24 for v in d_np[:3])
    valid = y[y != -100]
    if valid.size:
        lo, hi = stages.label_range(np, y, -100)
        assert (int(d_np[3]), int(d_np[4])) == (int(lo), int(hi))
    else:
        assert (int(d_np[3]), int(d_np[4])) == (2 ** 24 - 1, -1)
    # hash_ids hashes other data, the range stays the labels'
    other = stages.label_digest(np, y, -100, hash_ids=np.concatenate([y, [7]]))
    assert list(other[3:]) == list(d_np[3:]) and list(other[:3]) != list(d_np[:3])


def test_label_hashes_see_shifts_swaps_and_sign():
    y = np.arange(40) % 7
    base = [int(v) for v in stages.label_hashes(np, y)]
    for other in (np.roll(y, 1), y[::-1].copy(), np.where(y == 0, -1, y), np.concatenate([y[1:], y[:1]])):
        assert all(a != b for a, b in zip(base, (int(v) for v in stages.label_hashes(np, other))))


def stages_torch_xp():
    from logitkit._namespace import TORCH, get_namespace

    return get_namespace(TORCH)


def _tables(rng):
    """(name, per-rank (start, size), per-rank edits of the fields, labels) for reduced headers."""
    cases = [("even", [(0, 4), (4, 4)], {}), ("uneven", [(0, 5), (5, 12)], {}),
             ("permuted", [(9, 4), (0, 6), (6, 3)], {}), ("empty shard", [(0, 6), (6, 0), (6, 3)], {}),
             ("empty shard anywhere", [(0, 0), (0, 6), (6, 3)], {}),
             ("gap", [(0, 4), (5, 4)], {}), ("overlap", [(0, 4), (3, 4)], {}),
             ("same start", [(0, 4), (0, 4)], {}), ("not from 0", [(1, 4), (5, 4)], {}),
             ("one rank", [(0, 9)], {}), ("one rank off 0", [(2, 9)], {}),
             ("options differ", [(0, 4), (4, 4)], {1: {"z_loss": 7}}),
             ("tokens differ", [(0, 4), (4, 4)], {1: {"rows_lo": 3}}),
             ("labels differ", [(0, 4), (4, 4)], {1: {"labels_b": 5}}),
             ("dtype differs", [(0, 4), (4, 4)], {0: {"dtype": 1}})]
    for name, shards, edits in cases:
        yield name, shards, edits, rng.integers(0, sum(n for _, n in shards) or 1, 6)
    yield "label out of range", [(0, 4), (4, 4)], {}, np.array([0, 8, 2])
    yield "negative label", [(0, 4), (4, 4)], {}, np.array([0, -3, 2])
    yield "all ignored", [(0, 4), (4, 4)], {}, np.array([-100, -100])


@pytest.mark.parametrize("with_weight", [False, True])
def test_header_check_agrees_with_the_host_verdict(with_weight):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    txp = stages_torch_xp()
    seen = {}
    for name, shards, edits, y in _tables(rng):
        P = len(shards)
        V = sum(n for _, n in shards)
        parts_np, parts_t = [], []
        for r, (s, n) in enumerate(shards):
            for xp, lab, out in ((np, y, parts_np), (txp, torch.tensor(y), parts_t)):
                f = stages.header_fields(xp, lab, start=s, size=n, dtype="float32", ignore_index=-100,
                                         options={"z_loss": 0.0})
                for k, v in edits.get(r, {}).items():
                    f[k] = v
                like = np.zeros(0) if xp is np else torch.zeros(0)
                out.append(np.asarray(stages.encode_header(xp, rank=r, world_size=P, fields=f, error=None,
                                                           like=like, with_message=False)))
        tab_np, tab_t = np.max(parts_np, axis=0), np.max(parts_t, axis=0)
        np.testing.assert_array_equal(tab_np, tab_t, err_msg=name)     # the same table either way
        wl = (V + (name == "even")) if with_weight else None              # one weight of the wrong length
        try:
            nV = stages.header_verdict(stages.decode_header(tab_np, P), weight_len=wl)
            valid = y[y != -100]
            expect = bool(np.all((valid >= 0) & (valid < nV)))
        except (TypeError, ValueError):
            expect = False
        ok_np, V_np = stages.header_check(np, tab_np, P, weight_len=wl)
        ok_t, V_t = stages.header_check(txp, torch.tensor(tab_t), P, weight_len=wl)
        assert bool(ok_np) == bool(ok_t) == expect, name
        seen[name] = expect
        assert float(V_np) == float(V_t) == V, name
        assert bool(stages.header_ok(np, tab_np, P, vocab_size=V)) == bool(
            stages.header_check(np, tab_np, P)[0]), name
    good = {"even", "uneven", "permuted", "empty shard", "empty shard anywhere", "one rank", "all ignored"}
    assert {k for k, v in seen.items() if v} == (good - {"even"} if with_weight else good)
