"""torch.distributed (gloo, CPU) at 2 and 4 ranks against one process on the gathered logits.

Ranks are started with torch.multiprocessing (spawn) and a ``file://`` rendezvous in a temporary
directory (no port); each has a 60 s group timeout and destroys its process group in ``finally``;
the parent kills them after 150 s. One launch per world size runs every case.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import logitkit  # noqa: E402
from logitkit.distributed import stages  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

from _vp_contract import contract_cases, contract_errors  # noqa: E402
from _vp_sim import shard_bounds  # noqa: E402
from _vp_workers import launch  # noqa: E402

pytestmark = pytest.mark.timeout(400)  # the launches kill their ranks after 150 s each

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.3, "weight": True},
    {"weight": True, "ignore_index": 2},
    {"z_loss": 1e-2},
    {"softcap": 4.0, "temperature": 0.7},
    {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-3, "softcap": 6.0, "temperature": 1.3,
     "reduction": "none"},
]
SIZES = {2: [7, 12], 4: [5, 1, 9, 3]}
N = 12


def _labels(rng, bounds, ignore_index=-100):
    owners = [b for b in bounds if b[1] > b[0]]
    y = np.array([rng.integers(*owners[i % len(owners)]) for i in range(N)])
    y[3] = ignore_index
    return y


def _cases(world):
    rng = np.random.default_rng(world)
    sizes = SIZES[world]
    V = sum(sizes)
    bounds = shard_bounds(sizes)
    cases = []
    for o in OPTIONS:
        o = dict(o)
        if o.get("weight"):
            o["weight"] = rng.uniform(0.2, 2.0, V)
        x = rng.normal(size=(N, V)) * 3
        y = _labels(rng, bounds, o.get("ignore_index", -100))
        cases.append({"kind": "logits", "x": x, "y": y, "bounds": bounds, "opts": o, "dtype": "float64"})
    for dtype in ("float32", "bfloat16"):
        x = (rng.normal(size=(N, V)) * 3).astype(np.float32)
        cases.append({"kind": "logits", "x": x, "y": _labels(rng, bounds), "bounds": bounds, "dtype": dtype,
                      "opts": {"label_smoothing": 0.1}})
    eq = shard_bounds([4] * world)
    x = rng.normal(size=(N, 4 * world))
    cases.append({"kind": "logits", "x": x, "y": _labels(rng, eq), "bounds": eq, "dtype": "float64",
                  "equal": True, "opts": {"label_smoothing": 0.1}})
    H = 6
    for o, chunk, reduce_dh in (({}, 5, True),
                                ({"label_smoothing": 0.2, "weight": True, "z_loss": 1e-3, "softcap": 5.0}, 4, True),
                                ({"reduction": "none", "temperature": 2.0}, 64, True),
                                ({"label_smoothing": 0.1}, 7, False)):
        o = dict(o)
        if o.get("weight"):
            o["weight"] = rng.uniform(0.2, 2.0, V)
        cases.append({"kind": "linear", "h": rng.normal(size=(N, H)), "w": rng.normal(size=(V, H)),
                      "b": rng.normal(size=V), "y": _labels(rng, bounds), "bounds": bounds, "opts": o,
                      "dtype": "float64", "chunk": chunk, "reduce_hidden_grad": reduce_dh})
    # float32 and bfloat16 heads: d loss / d hidden is all-reduced in float32 (4·H bytes a token);
    # their own generator, so the cases after them keep their data
    r16 = np.random.default_rng(200 + world)
    for dtype, chunk in (("float32", 5), ("bfloat16", None)):
        cases.append({"kind": "linear", "h": r16.normal(size=(N, H)), "w": r16.normal(size=(V, H)),
                      "b": r16.normal(size=V), "y": _labels(r16, bounds), "bounds": bounds,
                      "opts": {"label_smoothing": 0.1}, "dtype": dtype, "chunk": chunk, "reduce_hidden_grad": True})
    # error cases: every rank must raise the same error, none may hang
    x = rng.normal(size=(N, V))
    cases.append({"kind": "error", "x": x, "y": _labels(rng, bounds), "bounds": bounds, "opts": {}, "equal": True})
    cases.append({"kind": "error", "x": x, "y": _labels(rng, bounds), "bounds": bounds, "opts": {},
                  "y_per_rank": [(_labels(rng, bounds) + r) % V for r in range(world)]})
    cases += _issue_cases(world)
    if world == 4:
        x = rng.normal(size=(N, 24)) * 3
        mb = shard_bounds([6] * 4)
        y = _labels(rng, mb)
        cases.append({"kind": "megatron", "x": x, "y": y, "bounds": mb, "eps": 0.1})
        cases.append({"kind": "logits", "x": x, "y": y, "bounds": mb, "dtype": "float64",
                      "opts": {"label_smoothing": 0.1 * 24 / 23, "reduction": "none"}})
    return cases


def _issue_cases(world):
    """Issue 13 items 3, 4, 5, 9 and issue 21's contract rows, in the same launch."""
    rng = np.random.default_rng(100 + world)
    sizes = SIZES[world]
    V = sum(sizes)
    bounds = shard_bounds(sizes)
    cases = []
    # item 3: row c holds a NaN in column c, so every rank and every position in a shard is hit
    x = rng.normal(size=(V + 1, V)) * 2
    x[np.arange(V), np.arange(V)] = np.nan
    # (no smoothing: its sum of m − z over every class would carry the NaN and hide the bug)
    cases.append({"kind": "nan", "x": x, "y": rng.integers(0, V, V + 1), "bounds": bounds, "dtype": "float32",
                  "opts": {"reduction": "none"}})
    # item 4: every rank passes vocab_start=4 with 4 classes (nobody holds 0-3)
    x = rng.normal(size=(N, V))
    cases.append({"kind": "error", "x": x, "y": _labels(rng, bounds) % 8, "bounds": bounds, "opts": {},
                  "item": "4", "per_rank": [{"bounds": (4, 8), "vocab_start": 4}] * world})
    # item 5: labels that collided in the 20-bit hash
    cases.append({"kind": "error", "x": rng.normal(size=(4, V)), "y": np.array([1, 5, 2, 7]), "bounds": bounds,
                  "opts": {}, "item": "5", "y_per_rank": [[1, 5, 2, 7]] + [[4, 4, 2, 7]] * (world - 1)})
    # item 9: one rank's mistake (the last rank's), every rank raises the same error promptly
    y = _labels(rng, bounds)
    mistakes = [("labels of the wrong shape", "ValueError", {"y": y[:-1]}),
                ("label_smoothing differs", "ValueError", {"opts": {"label_smoothing": 0.1}}),
                ("dtype differs", "TypeError", {"dtype": "float32"}),
                ("batch size differs", "ValueError", {"rows": N - 2, "y": y[:N - 2]}),
                ("reduction differs", "ValueError", {"opts": {"reduction": "sum"}}),
                ("an invalid option", "ValueError", {"opts": {"z_loss": -1.0}})]
    for name, etype, over in mistakes:
        cases.append({"kind": "error", "x": x, "y": y, "bounds": bounds, "opts": {}, "item": "9", "name": name,
                      "etype": etype, "per_rank": [{}] * (world - 1) + [over]})
    H = 6
    cases.append({"kind": "error", "linear": True, "x": x, "h": rng.normal(size=(N, H)), "w": rng.normal(size=(V, H)),
                  "y": y, "bounds": bounds, "opts": {}, "item": "9", "name": "reduce_hidden_grad differs",
                  "etype": "ValueError", "per_rank": [{}] * (world - 1) + [{"opts": {"reduce_hidden_grad": False}}]})
    # after the mistakes the group is in step: a plain case (checked by the parity test)
    cases.append({"kind": "logits", "x": rng.normal(size=(N, V)), "y": _labels(rng, bounds), "bounds": bounds,
                  "opts": {}, "dtype": "float64"})
    # issue 21: the float32 contract rows
    for x, y, names, o in contract_cases(rng, bounds):
        cases.append({"kind": "contract", "x": x, "y": y, "names": names, "bounds": bounds, "dtype": "float32",
                      "opts": o})
    return cases


_LAUNCHED: dict = {}


def _launched(world, tmp_path_factory):
    if world not in _LAUNCHED:
        cases = _cases(world)
        results = launch(world, str(tmp_path_factory.mktemp(f"gloo{world}")), cases)
        for r, res in enumerate(results):
            for item in res:
                assert "exception" not in item, f"rank {r}:\n{item['exception']}"
            assert len(res) == len(cases)
        _LAUNCHED[world] = (world, cases, results)
    return _LAUNCHED[world]


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def run(request, tmp_path_factory):
    return _launched(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    return _launched(4, tmp_path_factory)


def _bf16(a):
    return torch.tensor(a).to(torch.bfloat16).double().numpy()


def test_parity_of_loss_and_gradient_for_every_option(run):
    world, cases, results = run
    for i, case in enumerate(cases):
        if case["kind"] != "logits":
            continue
        o = dict(case["opts"])
        x = case["x"] if case["dtype"] != "bfloat16" else _bf16(case["x"])
        x = x.astype(np.float64)
        ref, gref = cross_entropy64(x, case["y"], **o), cross_entropy_grad64(x, case["y"], **o)
        # single-process logitkit (torch) on the gathered logits, in the case's own dtype
        tdt = getattr(torch, case["dtype"])
        xt = torch.tensor(x).to(tdt).requires_grad_()
        wt = None if o.get("weight") is None else torch.tensor(o["weight"]).to(
            torch.float64 if tdt == torch.float64 else torch.float32)
        one_t = logitkit.cross_entropy(xt, torch.tensor(case["y"]), **{**o, "weight": wt})
        one_t.sum().backward()
        one, one_g = one_t.detach().double().numpy(), xt.grad.double().numpy()
        tol = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 1e-2}[case["dtype"]]
        for rank in range(world):
            s, e = case["bounds"][rank]
            out = results[rank][i]
            np.testing.assert_allclose(out["loss"], ref, rtol=tol, atol=tol * 1e-3, err_msg=f"case {i} rank {rank}")
            # the same dtype in and out as one process: agreement to a few roundings of that dtype
            close = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-2}[case["dtype"]]
            np.testing.assert_allclose(out["loss"], one, rtol=close, atol=close * 1e-2)
            np.testing.assert_allclose(out["grad"], one_g[:, s:e], rtol=10 * close, atol=close * 1e-2,
                                       err_msg=f"case {i} rank {rank}")
            np.testing.assert_allclose(out["grad"], gref[:, s:e], rtol=tol * 10, atol=tol * 1e-2,
                                       err_msg=f"case {i} rank {rank}")


def test_collectives_per_forward_and_backward(run):
    world, cases, results = run
    for i, case in enumerate(cases):
        if case["kind"] not in ("logits", "linear"):
            continue
        k = stages.n_slots(case["opts"].get("label_smoothing", 0.0))
        item = 8 if case["dtype"] == "float64" else 4
        for rank in range(world):
            out = results[rank][i]
            hs = stages.header_size(world)  # the fixed-size header: float32, whatever the logits' dtype
            assert out["fwd"] == [("all_reduce", "MAX", hs, hs * 4), ("all_reduce", "MAX", N, N * item),
                                  ("all_reduce", "SUM", k * N, k * N * item)], (i, out["fwd"])
            if case["kind"] == "logits" or not case["reduce_hidden_grad"]:
                assert out["bwd"] == []  # backward needs no communication
            else:  # the linear head all-reduces d loss / d hidden once, float32 unless float64
                assert out["bwd"] == [("all_reduce", "SUM", N * 6, N * 6 * item)], (i, case["dtype"], out["bwd"])


def test_linear_head_parity(run):
    world, cases, results = run
    for i, case in enumerate(cases):
        if case["kind"] != "linear":
            continue
        o = case["opts"]
        if case["dtype"] != "float64":
            _linear_head_parity_low(world, case, results, i)
            continue
        logits = case["h"] @ case["w"].T + case["b"]
        ref, g = cross_entropy64(logits, case["y"], **o), cross_entropy_grad64(logits, case["y"], **o)
        for rank in range(world):
            s, e = case["bounds"][rank]
            out = results[rank][i]
            np.testing.assert_allclose(out["loss"], ref, rtol=1e-12, atol=1e-14)
            if case["reduce_hidden_grad"]:  # the full gradient, all-reduced
                np.testing.assert_allclose(out["dh"], g @ case["w"], rtol=1e-10, atol=1e-13)
            else:  # this rank's part; the parts sum to the full gradient
                np.testing.assert_allclose(out["dh"], g[:, s:e] @ case["w"][s:e], rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(out["dw"], g[:, s:e].T @ case["h"], rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(out["db"], g[:, s:e].sum(0), rtol=1e-10, atol=1e-13)


def _linear_head_parity_low(world, case, results, i):
    """float32 / bfloat16 head against float64 on the same rounded inputs.

    Errors are measured against ``Σ_c |g_c|·|W_c|``, the scale at which the float32 products and
    the float32 all-reduce of the ``P`` partial ``d loss / d hidden`` round.
    """
    rnd = (lambda a: a.astype(np.float32).astype(np.float64)) if case["dtype"] == "float32" else _bf16
    h, w, b = rnd(case["h"]), rnd(case["w"]), rnd(case["b"])
    o = case["opts"]
    logits = h @ w.T + b
    ref, g = cross_entropy64(logits, case["y"], **o), cross_entropy_grad64(logits, case["y"], **o)
    tol = {"float32": 1e-5, "bfloat16": 3e-2}[case["dtype"]]
    scale_h = np.abs(g) @ np.abs(w)
    for rank in range(world):
        s, e = case["bounds"][rank]
        out = results[rank][i]
        np.testing.assert_allclose(out["loss"], ref, rtol=tol)
        err = np.abs(out["dh"] - g @ w)
        assert np.all(err <= tol * scale_h), (case["dtype"], rank, float(np.max(err / scale_h)))
        err_w = np.abs(out["dw"] - g[:, s:e].T @ h)
        assert np.all(err_w <= tol * (np.abs(g[:, s:e]).T @ np.abs(h))), (case["dtype"], rank)
        assert np.all(np.abs(out["db"] - g[:, s:e].sum(0)) <= tol * np.abs(g[:, s:e]).sum(0)), (case["dtype"], rank)
    # the all-reduced gradient is the same on every rank
    for rank in range(1, world):
        np.testing.assert_array_equal(results[rank][i]["dh"], results[0][i]["dh"])


def test_errors_raise_on_every_rank(run):
    world, cases, results = run
    errs = [c for c in range(len(cases)) if cases[c]["kind"] == "error" and "item" not in cases[c]]
    assert len(errs) == 2
    tiling, labels = errs
    for rank in range(world):
        assert "vocab_start: the shards do not tile" in results[rank][tiling]["error"]
        assert "labels: the ranks passed different labels" in results[rank][labels]["error"]


def test_smoothing_megatron_formula_fails_where_ours_passes(run4):
    world, cases, results = run4
    i = next(c for c in range(len(cases)) if cases[c]["kind"] == "megatron")
    case = cases[i]
    V, eps = 24, case["eps"]
    # Megatron spreads eps over the other K−1 classes: torch's label_smoothing eps·V/(V−1) globally
    ref = cross_entropy64(case["x"], case["y"], label_smoothing=eps * V / (V - 1), reduction="none")
    for rank in range(world):
        ours = results[rank][i + 1]["loss"]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(results[rank][i]["loss"], ref, rtol=1e-3)
    # the per-partition formula does not even agree between ranks
    assert not np.allclose(results[0][i]["loss"], results[1][i]["loss"], rtol=1e-3)


def _items(cases, item):
    return [i for i, c in enumerate(cases) if c.get("item") == item]


def _same_error_everywhere(results, i, world):
    errs = [(results[r][i].get("error_type"), results[r][i].get("error")) for r in range(world)]
    assert errs[0][1] is not None and len(set(errs)) == 1, errs  # one type, one text, on every rank
    assert max(results[r][i]["seconds"] for r in range(world)) < 20  # promptly, not at the group timeout
    return errs[0]


def test_issue13_item3_nan_in_every_shard_position(run):
    world, cases, results = run
    (i,) = [i for i, c in enumerate(cases) if c["kind"] == "nan"]
    V = cases[i]["x"].shape[1]
    for rank in range(world):
        loss, g = results[rank][i]["loss"], results[rank][i]["grad"]
        assert np.all(np.isnan(loss[:V])), (rank, np.flatnonzero(~np.isnan(loss[:V])))
        assert np.all(np.isnan(g[:V]))
        assert np.isfinite(loss[V]) and np.all(np.isfinite(g[V]))


def test_issue13_item4_non_tiling_shards_raise(run):
    world, cases, results = run
    (i,) = _items(cases, "4")
    etype, msg = _same_error_everywhere(results, i, world)
    assert etype == "ValueError" and "vocab_start: the shards do not tile the vocabulary" in msg


def test_issue13_item5_colliding_label_edits_are_detected(run):
    world, cases, results = run
    (i,) = _items(cases, "5")
    etype, msg = _same_error_everywhere(results, i, world)
    assert etype == "ValueError" and "labels: the ranks passed different labels" in msg


def test_issue13_item9_rank_local_mistakes_raise_on_every_rank(run):
    world, cases, results = run
    idx = _items(cases, "9")
    assert len(idx) == 7
    for i in idx:
        etype, msg = _same_error_everywhere(results, i, world)
        assert etype == cases[i]["etype"], (cases[i]["name"], etype, msg)
        assert "rank" in msg, msg


def test_issue21_float32_contract_on_gloo(run):
    world, cases, results = run
    idx = [i for i, c in enumerate(cases) if c["kind"] == "contract"]
    assert len(idx) == 6
    for i in idx:
        c = cases[i]
        err, _ = contract_errors(results[0][i]["loss"], c["x"], c["y"], c["opts"])
        bad = [(c["names"][j], err[j]) for j in range(len(err)) if not err[j] <= 2.0 ** -21]
        assert not bad, (c["opts"], bad)
        for rank in range(1, world):
            np.testing.assert_array_equal(results[rank][i]["loss"], results[0][i]["loss"])
