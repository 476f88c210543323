"""Train one small model twice, with keras.losses' loss and with logitkit.keras', on the backend
named by KERAS_BACKEND; print both loss histories (and the final weights' difference) as JSON.

Run as a script (a fresh process per backend, since Keras fixes its backend at import) or
imported by the tests for the backend already loaded.
"""

from __future__ import annotations

import json
import sys


def fit_both(epochs: int = 2) -> dict:
    import logitkit.keras as lk  # first: it loads Triton before Keras may load TensorFlow

    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = (x[:, :5].argmax(-1)).astype(np.int64)
    w = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    histories, weights = {}, {}
    for name, sparse, onehot in (
            ("keras", keras.losses.SparseCategoricalCrossentropy(from_logits=True), False),
            ("logitkit", lk.SparseCategoricalCrossentropy(from_logits=True), False),
            ("keras_cat", keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1), True),
            ("logitkit_cat", lk.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1), True)):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(5)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=sparse)
        target = np.eye(5, dtype=np.float32)[y] if onehot else y
        hist = model.fit(x, target, sample_weight=w, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
        histories[name] = [float(v) for v in hist.history["loss"]]
        weights[name] = np.concatenate([np.ravel(v) for v in model.get_weights()])
    return {"backend": keras.backend.backend(), "histories": histories,
            "weight_diff": float(np.max(np.abs(weights["keras"] - weights["logitkit"]))),
            "weight_diff_cat": float(np.max(np.abs(weights["keras_cat"] - weights["logitkit_cat"])))}


if __name__ == "__main__":
    result = fit_both(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print("RESULT " + json.dumps(result))
