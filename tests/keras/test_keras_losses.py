"""logitkit.keras against keras.losses: values, reductions, masks, serialization, training.

The backend loaded here (KERAS_BACKEND, tensorflow by default) runs in this process; each other
installed backend trains in one fresh subprocess (Keras fixes its backend at import).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import logitkit.keras as lk  # noqa: E402
from logitkit import reference  # noqa: E402

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from _fit_check import fit_both  # noqa: E402

BACKEND = keras.backend.backend()
F32 = 2.0 ** -23


def npv(t):
    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)


@pytest.fixture
def batch(rng):
    y_pred = (rng.standard_normal((8, 6)) * 3).astype(np.float32)
    y_true = rng.integers(0, 6, 8).astype(np.float32)  # Keras passes class indices as floats
    return y_true, y_pred


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean", "none"])
@pytest.mark.parametrize("ignore_class", [None, 2])
def test_sparse_matches_keras(batch, rng, reduction, ignore_class):
    y_true, y_pred = batch
    y_true[3] = 2.0
    sw = rng.uniform(0.0, 2.0, 8).astype(np.float32)
    ours = lk.SparseCategoricalCrossentropy(ignore_class=ignore_class, reduction=reduction)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_class,
                                                        reduction=reduction)
    for args in ((y_true, y_pred), (y_true[:, None], y_pred), (y_true, y_pred, sw)):
        np.testing.assert_allclose(npv(ours(*args)), npv(theirs(*args)), rtol=8 * F32, atol=1e-7)


def test_categorical_matches_keras(rng):
    y_pred = (rng.standard_normal((4, 3, 5)) * 2).astype(np.float32)
    y_true = rng.dirichlet(np.ones(5), (4, 3)).astype(np.float32)
    for kw in (dict(), dict(label_smoothing=0.2), dict(reduction="none")):
        ours = lk.CategoricalCrossentropy(**kw)
        theirs = keras.losses.CategoricalCrossentropy(from_logits=True, **kw)
        np.testing.assert_allclose(npv(ours(y_true, y_pred)), npv(theirs(y_true, y_pred)), rtol=8 * F32)
    # A class axis other than the last (Keras smooths over the last axis's size; equal here).
    yt, yp = np.moveaxis(y_true, -1, 1), np.moveaxis(y_pred, -1, 1)
    want = -(y_true * reference.log_softmax64(y_pred)).sum(-1)
    np.testing.assert_allclose(npv(lk.softmax_cross_entropy(yt, yp, axis=1)), want, rtol=8 * F32)


def test_exact_where_keras_is_not():
    y_pred = np.array([[40.0, 0.0, 0.0], [1e4, 1e4 - 1, 1e4 - 3]], np.float32)
    y_true = np.array([0.0, 1.0], np.float32)
    want = [reference.row_loss_mp(y_pred[0], 0), reference.row_loss_mp(y_pred[1], 1)]
    got = npv(lk.sparse_softmax_cross_entropy(y_true, y_pred))
    np.testing.assert_allclose(got, want, rtol=2.0 ** -21)
    assert npv(keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True))[0] != got[0]


def test_refusals():
    with pytest.raises(ValueError, match="from_logits.*exactness"):
        lk.SparseCategoricalCrossentropy(from_logits=False)
    with pytest.raises(ValueError, match="from_logits"):
        lk.CategoricalCrossentropy(from_logits=False)
    with pytest.raises(ValueError, match="from_logits"):
        lk.softmax_cross_entropy(np.eye(2), np.zeros((2, 2), np.float32), from_logits=False)
    with pytest.raises(ValueError, match="whole numbers"):
        lk.sparse_softmax_cross_entropy(np.array([0.5]), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        lk.sparse_softmax_cross_entropy(np.array([7.0]), np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="axis"):
        lk.SparseCategoricalCrossentropy(axis=True)


def test_serialization_and_saved_model(tmp_path, batch):
    y_true, y_pred = batch
    for loss in (lk.SparseCategoricalCrossentropy(ignore_class=1, reduction="sum", name="sce"),
                 lk.CategoricalCrossentropy(label_smoothing=0.3, axis=-1, dtype="float32")):
        cfg = loss.get_config()
        again = type(loss).from_config(cfg)
        assert again.get_config() == cfg
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(restored) is type(loss) and restored.get_config() == cfg
    assert lk.SparseCategoricalCrossentropy(ignore_class=1).get_config()["ignore_class"] == 1
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6)])
    model.compile(optimizer="sgd", loss=lk.SparseCategoricalCrossentropy(ignore_class=4))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, lk.SparseCategoricalCrossentropy) and loaded.loss.ignore_class == 4


def _check_fit(result):
    h = result["histories"]
    np.testing.assert_allclose(h["logitkit"], h["keras"], rtol=1e-5)
    np.testing.assert_allclose(h["logitkit_cat"], h["keras_cat"], rtol=1e-5)
    assert h["logitkit"][-1] < h["logitkit"][0]  # it trains
    assert result["weight_diff"] < 1e-4 and result["weight_diff_cat"] < 1e-4


def test_fit_on_loaded_backend():
    result = fit_both()
    assert result["backend"] == BACKEND
    _check_fit(result)


# the other backends train in a fresh child each: make test-slow (CI runs it after make test)
_SLOW = pytest.mark.slow


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", [pytest.param(b, marks=_SLOW) for b in ("tensorflow", "jax", "torch")])
def test_fit_on_other_backends(backend):
    if backend == BACKEND:
        pytest.skip("trained in this process by test_fit_on_loaded_backend")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend)
    out = subprocess.run([sys.executable, str(HERE / "_fit_check.py")], env=env, capture_output=True,
                         text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["backend"] == backend
    _check_fit(result)
