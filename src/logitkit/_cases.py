"""The hard rows that `demo` and `check` show: each a float32 row, a label and its exact loss.

The exact loss comes from mpmath at 50 digits (:func:`logitkit.reference.row_loss_mp`), never from
logitkit. Peers (naive NumPy, PyTorch, optax, scipy.special) run only when installed.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import reference


@dataclass
class Case:
    name: str
    logits: np.ndarray  # (1, V) float32
    label: int
    note: str

    @property
    def exact(self) -> float:
        row = self.logits[0].astype(np.float64)
        if not np.isfinite(row[self.label]):
            return math.inf
        finite = row[np.isfinite(row)]
        idx = int(np.flatnonzero(np.isfinite(row) & (np.arange(row.size) == self.label))[0])
        return reference.row_loss_mp(finite, int(np.sum(np.isfinite(row[:idx]))))


def cases(V: int = 32000, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    out = []
    big = np.array([[1000.0, 999.0, 998.0]], dtype=np.float32)
    out.append(Case("large logits", big, 1, "logits near 1000: exp overflows"))
    conf = rng.standard_normal((1, V)).astype(np.float32)
    conf[0, 7] = 40.0
    out.append(Case("confident prediction", conf, 7, "label logit 40, others N(0,1): loss ~2e-13"))
    off = (1e4 + rng.standard_normal((1, V))).astype(np.float32)
    out.append(Case("1e4 offset", off, 3, "every logit near 1e4"))
    masked = rng.standard_normal((1, 16)).astype(np.float32)
    masked[0, ::2] = -np.inf
    out.append(Case("masked row", masked, 5, "half the classes masked with -inf"))
    wrong = rng.standard_normal((1, V)).astype(np.float32)
    wrong[0, 11] = -60.0
    out.append(Case("confidently wrong", wrong, 11, "label logit -60: loss ~70"))
    return out


def _naive(x: np.ndarray, y: int) -> float:
    with np.errstate(all="ignore"):
        e = np.exp(x[0])
        p = e / e.sum()
        return float(-np.log(p[y]))


def _logitkit(x: np.ndarray, y: int) -> float:
    from . import cross_entropy

    return float(cross_entropy(x, np.array([y]), reduction="none")[0])


def _torch(x: np.ndarray, y: int) -> float:
    import torch
    import torch.nn.functional as F

    return float(F.cross_entropy(torch.from_numpy(x), torch.tensor([y]), reduction="none")[0])


def _optax(x: np.ndarray, y: int) -> float:
    import jax.numpy as jnp
    import optax

    return float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(x), jnp.asarray([y]))[0])


def _tf_nn(x: np.ndarray, y: int) -> float:
    import logitkit.tensorflow  # noqa: F401  (first: it orders Triton before TensorFlow)
    import tensorflow as tf

    return float(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant([y]), logits=tf.constant(x))[0])


def _logitkit_tf(x: np.ndarray, y: int) -> float:
    import logitkit.tensorflow  # noqa: F401
    import tensorflow as tf

    from . import sparse_softmax_cross_entropy_with_logits

    return float(sparse_softmax_cross_entropy_with_logits(labels=tf.constant([y]), logits=tf.constant(x))[0])


def _scipy(x: np.ndarray, y: int) -> float:
    from scipy.special import log_softmax

    return float(-log_softmax(x[0])[y])


def peers() -> dict[str, Callable[[np.ndarray, int], float]]:
    """Column name -> function, for every peer that is installed, in a fixed order."""
    found: dict[str, Callable[[np.ndarray, int], float]] = {"naive NumPy": _naive}
    if importlib.util.find_spec("torch"):
        found["PyTorch F.cross_entropy"] = _torch
    if importlib.util.find_spec("optax"):
        found["optax"] = _optax
    if importlib.util.find_spec("scipy"):
        found["scipy.special"] = _scipy
    if importlib.util.find_spec("tensorflow"):
        found["TensorFlow tf.nn"] = _tf_nn
    found["logitkit"] = _logitkit
    if importlib.util.find_spec("tensorflow"):
        found["logitkit (TensorFlow)"] = _logitkit_tf
    return found


def rel_err(value: float, exact: float) -> float:
    if math.isinf(exact) and value == exact:
        return 0.0
    if not math.isfinite(value):
        return math.inf
    return abs(value - exact) / abs(exact) if exact != 0 else abs(value)
