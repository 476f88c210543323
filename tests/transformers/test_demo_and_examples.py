"""The Hugging Face demo (quick mode) and the GRPO example run and show what they claim."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest

from logitkit.transformers import demo

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_markov_source_entropy_rate_is_exact():
    src = demo.MarkovSource(vocab=300, alphabet=20, branches=3, seed=4)
    # the rate from the transition matrix built independently of entropy_rate()
    P = np.zeros((20, 20))
    for s in range(20):
        for j in range(3):
            P[s, src.succ[s, j]] += src.p[j]
    assert np.allclose(P.sum(0), 1) and np.allclose(P.sum(1), 1)  # doubly stochastic: uniform is stationary
    pi = np.full(20, 1 / 20)
    assert np.allclose(pi @ P, pi)
    h = -(pi[:, None] * np.where(P > 0, P * np.log(np.where(P > 0, P, 1)), 0)).sum()
    assert abs(src.entropy_rate() - h) < 1e-12
    # empirically: the mean -log P(next | current) of a long sample tends to the rate
    x = np.searchsorted(src.tokens, src.sample(np.random.default_rng(0), 64, 400))
    emp = -np.log(P[x[:, :-1], x[:, 1:]]).mean()
    assert abs(emp - h) < 0.02


def test_demo_quick(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert demo.main(["--quick", "--in-process", "--no-progress", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "HF loss" in out and "logitkit.transformers.apply" in out and "entropy rate" in out
    diff = float(re.search(r"max \|difference\| ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4
    assert png.exists() and png.stat().st_size > 10_000


def test_grpo_example_runs():
    spec = importlib.util.spec_from_file_location("transformers_grpo", ROOT / "examples" / "transformers_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first, last = mod.main(["--steps", "2", "--vocab", "256", "--group", "4", "--new", "6"])
    assert 0.0 <= first <= 1.0 and 0.0 <= last <= 1.0
