"""Compiles logitkit's numba CPU kernels into their on-disk cache (``cache=True``), once per
checkout: what a user's first calls do (a few seconds per dtype), run by the Makefile's install
step for the tests so that the test workers load the kernels instead of each compiling them.

It calls the public functions on small NumPy arrays (float32, float64, float16) with and without
the loss options, forward and backward, and the PyTorch and JAX entry points when those are
installed.  Nothing is checked here: the tests check the values.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np

import logitkit as lk
from logitkit.kernels.cpu import available

OPTIONS = [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 5.0, "temperature": 1.3},
           {"weight": True, "ignore_index": 2, "reduction": "sum"}, {"reduction": "none"}]


def _numpy(rng):
    for dtype in (np.float32, np.float64, np.float16):
        for n, v in ((4, 7), (64, 300)):  # a few rows and enough to run on threads
            x = (rng.standard_normal((n, v)) * 2).astype(dtype)
            y = rng.integers(0, v, n)
            p = lk.softmax(rng.standard_normal((n, v)).astype(dtype))
            for o in OPTIONS:
                o = dict(o)
                if o.get("weight"):
                    o["weight"] = rng.uniform(0.5, 1.5, v).astype(dtype)
                lk.cross_entropy(x, y, **o)
                lk.cross_entropy_with_grad(x, y, **o)
                if "ignore_index" not in o:
                    lk.cross_entropy_with_grad(x, p, **o)
            lk.logsumexp(x)
            for f in (lk.softmax, lk.log_softmax):
                f(x)
                f(x, temperature=0.7)
            lk.token_logprobs(x, y)
            lk.entropy(x)
            lk.kl_divergence(x, x[::-1].copy())
        h = rng.standard_normal((16, 8)).astype(dtype)
        w = rng.standard_normal((50, 8)).astype(dtype)
        y = rng.integers(0, 50, 16)
        lk.linear_cross_entropy(h, w, y)
        lk.linear_cross_entropy_with_grad(h, w, y, label_smoothing=0.1)
        lk.linear_head(h, w, y, outputs=("loss", "logprobs", "entropy"))


def _torch(rng):
    import torch

    import logitkit.torch as lt

    for dtype in (torch.float32, torch.float64):
        for n, v in ((4, 7), (64, 300)):
            x = torch.randn(n, v, dtype=dtype, requires_grad=True)
            y = torch.randint(0, v, (n,))
            for o in OPTIONS[:3]:
                lt.cross_entropy(x, y, **o).backward()
            for f in (lt.softmax, lt.log_softmax):
                f(x, dim=-1).sum().backward()


def _jax(rng):
    import jax
    import jax.numpy as jnp

    import logitkit.jax as lj

    for dtype in (jnp.float32,):
        x = jnp.asarray(rng.standard_normal((8, 30)), dtype)
        y = jnp.asarray(rng.integers(0, 30, 8))
        for o in OPTIONS[:3]:
            jax.grad(lambda a: lj.cross_entropy(a, y, **o))(x)


def main(names) -> None:
    """``names``: which of numpy, torch, jax (default all); the Makefile runs two processes."""
    if not available():
        print("warm_kernels: numba is not installed; nothing to compile")
        return
    rng = np.random.default_rng(0)
    for name, fn in (("numpy", _numpy), ("torch", _torch), ("jax", _jax)):
        if names and name not in names:
            continue
        if name != "numpy" and importlib.util.find_spec(name) is None:
            continue
        t = time.perf_counter()
        fn(rng)
        print(f"warm_kernels: {name} entry points compiled or loaded in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
