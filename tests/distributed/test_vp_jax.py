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
        k = stages.n_slots(case["opts"].get("label_smoothing", 0.0))
        acc = "float64" if case["dtype"] == "float64" else "float32"
        # one pmax of N scalars and the agreement table (F fields × 4 devices), one psum of k·N
        # scalars in the accumulation dtype; the psum primitive's name varies between jax versions
        # (psum, psum_invariant)
        assert [c[1:] for c in out["fwd"]] == [((N + stages.header_size(4, with_message=False),), acc),
                                               ((k * N,), acc)]
        assert out["fwd"][0][0] == "pmax" and out["fwd"][1][0].startswith("psum")
        assert out["fwd_bwd"] == out["fwd"]  # value_and_grad adds no collective
