"""JAX under shard_map on 4 host devices, in a subprocess (XLA_FLAGS must be set before jax loads)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")

from logitkit.distributed import stages  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

from _vp_contract import contract_cases, contract_errors, contract_rows, off_grid_rows  # noqa: E402
from _vp_sim import shard_bounds  # noqa: E402

pytestmark = pytest.mark.timeout(400)  # the child process is killed after 240 s

HERE = Path(__file__).parent
N = 10


def _cases():
    rng = np.random.default_rng(7)
    cases = []
    V = 20
    for o in ({}, {"reduction": "sum", "z_loss": 1e-2}, {"reduction": "none", "label_smoothing": 0.1},
              {"label_smoothing": 0.2, "weight": True, "softcap": 5.0, "temperature": 1.3},
              {"weight": True, "ignore_index": 4}):
        o = dict(o)
        if o.get("weight"):
            o["weight"] = rng.uniform(0.2, 2.0, V)
        x = rng.normal(size=(N, V)) * 3
        y = rng.integers(0, V, N)
        y[2] = o.get("ignore_index", -100)
        cases.append({"x": x, "x_dev": x, "y": y, "opts": o, "dtype": "float64"})
    # float32 with smoothing
    x = rng.normal(size=(N, V)).astype(np.float32) * 3
    y = rng.integers(0, V, N)
    cases.append({"x": x.astype(np.float64), "x_dev": x, "y": y, "opts": {"label_smoothing": 0.1}, "dtype": "float32"})
    # a padded vocabulary: V = 18 over 4 devices of 5 classes (2 padding columns on the last)
    x = rng.normal(size=(N, 18)) * 3
    y = rng.integers(0, 18, N)
    cases.append({"x": x, "x_dev": np.concatenate([x, np.full((N, 2), 7.0)], 1), "y": y, "dtype": "float64",
                  "opts": {"vocab_size": 18, "label_smoothing": 0.15, "weight": rng.uniform(0.5, 1.5, 18)}})
    # explicit vocab_start: device i holds block 3 - i
    x = rng.normal(size=(N, V)) * 3
    y = rng.integers(0, V, N)
    blocks = np.split(x, 4, axis=1)
    cases.append({"x": x, "x_dev": np.concatenate(blocks[::-1], 1), "y": y, "dtype": "float64", "reverse": True,
                  "opts": {"label_smoothing": 0.1}})
    # issue 13 item 3: row c holds a NaN in column c (every device, every position of a shard)
    x = rng.normal(size=(V, V)) * 2
    x[np.arange(V), np.arange(V)] = np.nan
    # (no smoothing: its sum of m − z over every class would carry the NaN and hide the bug)
    cases.append({"x": x, "x_dev": x, "y": rng.integers(0, V, V), "dtype": "float32", "item": "3",
                  "opts": {"reduction": "none"}})
    # item 4: devices 0 and 1 both start at 5, nobody holds 0-4 (the loss must be NaN)
    x = rng.normal(size=(N, V))
    cases.append({"x": x, "x_dev": x, "y": rng.integers(5, V, N), "dtype": "float64", "item": "4", "loss_only": True,
                  "starts": [5, 5, 10, 15], "opts": {}})
    # item 5: labels that collided in the old 20-bit hash, on device 0 only
    x = rng.normal(size=(4, V))
    cases.append({"x": x, "x_dev": x, "y": np.array([1, 5, 2, 7]), "dtype": "float64", "item": "5", "loss_only": True,
                  "y_dev": np.array([[1, 5, 2, 7]] + [[4, 4, 2, 7]] * 3), "opts": {}})
    # issue 21: the float32 contract rows (row statistics in float64: the child enables x64)
    for x, y, names, o in contract_cases(rng, shard_bounds([5] * 4))[::2]:  # {}, T=0.5, T=3 offsets: compile time
        cases.append({"x": x.astype(np.float64), "x_dev": x, "y": y, "dtype": "float32", "item": "21",
                      "names": names, "opts": o, "loss_only": True})
    # issue 21 without x64: float32 row statistics, contract rows and rows off the grid
    x, y, names = contract_rows(rng, shard_bounds([5] * 4))
    xo, yo, no = off_grid_rows(rng, V)
    for T in (1.0, 0.5):
        xs = np.concatenate([x, (xo.astype(np.float64) * T).astype(np.float32)])
        cases.append({"x": xs.astype(np.float64), "x_dev": xs, "y": np.concatenate([y, yo]), "dtype": "float32",
                      "item": "21-nox64", "names": names + no, "opts": {"temperature": T, "reduction": "none"},
                      "loss_only": True, "x64": False})
    return cases


@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("jax4")
    cases = _cases()
    with open(work / "cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "_vp_jax_child.py"), str(work)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(work / "results.pkl", "rb") as f:
        return cases, pickle.load(f)


def _ref_opts(o):
    return {k: v for k, v in o.items() if k != "vocab_size"}


def test_parity_under_shard_map(jax_results):
    cases, results = jax_results
    for i, (case, out) in enumerate(zip(cases, results)):
        if "item" in case:
            continue
        o = _ref_opts(case["opts"])
        ref = cross_entropy64(case["x"], case["y"], **o)
        g = cross_entropy_grad64(case["x"], case["y"], **o)
        tol = 1e-12 if case["dtype"] == "float64" else 2e-6
        np.testing.assert_allclose(out["loss"], ref, rtol=tol, atol=tol * 1e-2, err_msg=f"case {i}")
        V = case["x"].shape[1]
        gd = out["grad"]
        if case.get("reverse"):
            gd = np.concatenate(np.split(gd, 4, axis=1)[::-1], 1)
        np.testing.assert_allclose(gd[:, :V], g, rtol=tol * 10, atol=tol * 1e-2, err_msg=f"case {i}")
        assert np.all(gd[:, V:] == 0)  # padding columns get no gradient


def test_one_pmax_one_psum_and_nothing_in_backward(jax_results):
    cases, results = jax_results
    for case, out in zip(cases, results):
        if "fwd" not in out:
            continue
        N = case["x_dev"].shape[0]
        k = stages.n_slots(case["opts"].get("label_smoothing", 0.0))
        acc = "float64" if case["dtype"] == "float64" else "float32"
        # one pmax of N scalars and the agreement table (F fields × 4 devices), one psum of k·N
        # scalars in the accumulation dtype; the psum primitive's name varies between jax versions
        # (psum, psum_invariant)
        assert [c[1:] for c in out["fwd"]] == [((N + stages.header_size(4, with_message=False),), acc),
                                               ((k * N,), acc)]
        assert out["fwd"][0][0] == "pmax" and out["fwd"][1][0].startswith("psum")
        assert out["fwd_bwd"] == out["fwd"]  # value_and_grad adds no collective


def _item(cases, results, item):
    return [(c, r) for c, r in zip(cases, results) if c.get("item") == item]


def test_issue13_item3_nan_in_every_shard_position(jax_results):
    ((case, out),) = _item(*jax_results, "3")
    assert np.all(np.isnan(out["loss"])), np.flatnonzero(~np.isnan(out["loss"]))
    assert np.all(np.isnan(out["grad"]))


def test_issue13_item4_non_tiling_shards_give_nan(jax_results):
    ((case, out),) = _item(*jax_results, "4")
    assert np.isnan(out["loss"])


def test_issue13_item5_colliding_label_edits_give_nan(jax_results):
    ((case, out),) = _item(*jax_results, "5")
    assert np.isnan(out["loss"])


def test_issue21_float32_contract_without_x64(jax_results):
    """Row statistics in float32 (no x64): the rescale exp(m_loc − m) and every local difference
    carry their float32 rounding error (TwoSum), so the contract holds as with x64."""
    found = _item(*jax_results, "21-nox64")
    assert len(found) == 2
    for case, out in found:
        err, _ = contract_errors(out["loss"], case["x"], case["y"], case["opts"])
        bad = [(case["names"][j], err[j] / 2.0 ** -21) for j in range(len(err)) if not err[j] <= 2.0 ** -21]
        assert not bad, (case["opts"], bad)


def test_issue21_float32_contract_under_shard_map(jax_results):
    found = _item(*jax_results, "21")
    assert len(found) == 3
    for case, out in found:
        err, _ = contract_errors(out["loss"], case["x"], case["y"], case["opts"])
        bad = [(case["names"][j], err[j]) for j in range(len(err)) if not err[j] <= 2.0 ** -21]
        assert not bad, (case["opts"], bad)
