"""`logitkit bench` has the TensorFlow rows when TensorFlow is installed, and they measure what they say."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from logitkit import bench  # noqa: E402

TF_ROWS = ["TensorFlow tf.nn eager", "TensorFlow tf.nn tf.function", "TensorFlow tf.nn jit_compile=True",
           "logitkit TensorFlow tf.function", "logitkit TensorFlow eager"]


@pytest.mark.slow  # make test-slow (CI runs it after make test): every TensorFlow row of the bench, timed
def test_bench_tensorflow_rows_run_and_are_accurate(rng):
    x = (rng.standard_normal((64, 300)) * 2).astype(np.float32)
    y = rng.integers(0, 300, 64)
    cases = bench._tf_cases(x, y)
    assert [c[0] for c in cases] == TF_ROWS
    for name, limit, setup, run, extract in cases:
        times, peak, last = bench._measure(setup, run, 1)
        assert len(times) == 1 and times[0] > 0
        # the gradient of the mean loss against float64, the bench's own error column
        assert bench._grad_error(extract(last), x, y) < 1e-5, name
