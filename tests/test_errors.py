"""Bad input: a ValueError or TypeError that names the argument, raised before any work is done."""

from __future__ import annotations

import re

import numpy as np
import pytest

import logitkit as lk
from lk_helpers import LIBS, need, to_lib

# NumPy must not warn on masked, empty or non-finite rows: the core discards those values.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

N, C = 4, 5


def _x(lib="numpy", dtype="float32"):
    return to_lib(lib, np.arange(N * C, dtype=np.float64).reshape(N, C) / 7.0, dtype)


def _y(lib="numpy", values=(0, 1, 2, 3)):
    return to_lib(lib, np.array(values))


# ----------------------------------------------------------------------------------------------
# class indices


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_with_grad", "token_logprobs", "sparse"])
def test_out_of_range_class_index_names_first_bad_index_and_position(lib, fn):
    y = np.array([[0, 1, 4], [7, -3, -100]])  # first bad: 7 at (1, 0); -100 is the ignore index
    x = to_lib(lib, np.zeros((2, 3, C)), "float32")
    call = {
        "cross_entropy": lambda: lk.cross_entropy(x, to_lib(lib, y)),
        "cross_entropy_with_grad": lambda: lk.cross_entropy_with_grad(x, to_lib(lib, y)),
        "token_logprobs": lambda: lk.token_logprobs(x, to_lib(lib, y)),
        "sparse": lambda: lk.sparse_softmax_cross_entropy_with_logits(labels=to_lib(lib, y), logits=x),
    }[fn]
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith("labels")
    assert "7" in msg and re.search(r"\(1, 0\)", msg), msg
    assert f"[0, {C})" in msg


@pytest.mark.parametrize("lib", LIBS)
def test_negative_label_other_than_ignore_index(lib):
    with pytest.raises(ValueError, match=r"labels: class index -1 at position 2"):
        lk.cross_entropy(_x(lib), _y(lib, (0, 1, -1, -100)))
    # With ignore_index=-1 the same labels are fine except -100.
    with pytest.raises(ValueError, match=r"labels: class index -100 at position 3"):
        lk.cross_entropy(_x(lib), _y(lib, (0, 1, -1, -100)), ignore_index=-1)
    lk.cross_entropy(_x(lib), _y(lib, (0, 1, -1, 2)), ignore_index=-1)


def test_class_index_with_axis():
    """Positions refer to the labels array, whatever the class axis of the logits."""
    x = np.zeros((2, C, 3), np.float32)
    y = np.zeros((2, 3), np.int64)
    y[1, 2] = C
    with pytest.raises(ValueError, match=r"labels: class index 5 at position \(1, 2\)"):
        lk.cross_entropy(x, y, axis=1)


# ----------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("lib", LIBS)
def test_shape_mismatches(lib):
    x = _x(lib)
    with pytest.raises(ValueError, match=r"^labels: .*\(4,\).*\(3,\)"):
        lk.cross_entropy(x, _y(lib, (0, 1, 2)))
    with pytest.raises(ValueError, match=r"^labels: "):
        lk.cross_entropy(x, to_lib(lib, np.zeros((N, 1), np.int64)))
    with pytest.raises(ValueError, match=r"^labels: probabilities .*\(4, 5\)"):
        lk.cross_entropy(x, to_lib(lib, np.full((N, C + 1), 0.1), "float32"))
    with pytest.raises(ValueError, match=r"^labels: "):
        lk.softmax_cross_entropy_with_logits(labels=to_lib(lib, np.full((N - 1, C), 0.2), "float32"),
                                             logits=x)
    with pytest.raises(ValueError, match=r"^weight: .*\(5,\).*\(4,\)"):
        lk.cross_entropy(x, _y(lib), weight=to_lib(lib, np.ones(C - 1), "float32"))
    with pytest.raises(ValueError, match=r"^weight: "):
        lk.cross_entropy(x, _y(lib), weight=to_lib(lib, np.ones((1, C)), "float32"))
    with pytest.raises(ValueError, match=r"^q_logits: "):
        lk.kl_divergence(x, to_lib(lib, np.zeros((N, C + 1)), "float32"))
    with pytest.raises(ValueError, match=r"^where: "):
        lk.softmax(x, where=to_lib(lib, np.ones(C + 1, bool)))
    with pytest.raises(ValueError, match=r"^axis: "):
        lk.softmax(x, axis=2)
    with pytest.raises(ValueError, match=r"^axis: "):
        lk.cross_entropy(x, _y(lib), axis=-3)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_out_mismatch(lib):
    x = _x(lib)
    with pytest.raises(ValueError, match=r"^out: "):
        lk.cross_entropy_with_grad(x, _y(lib), out=to_lib(lib, np.zeros((N, C + 1)), "float32"))
    with pytest.raises(ValueError, match=r"^out: "):
        lk.cross_entropy_with_grad(x, _y(lib), out=to_lib(lib, np.zeros((N, C)), "float64"))
    other = "torch" if lib == "numpy" else "numpy"
    with pytest.raises(TypeError, match=r"^out: "):
        lk.cross_entropy_with_grad(x, _y(lib), out=to_lib(other, np.zeros((N, C)), "float32"))


def test_out_rejected_for_jax():
    jx = _x("jax")
    with pytest.raises(TypeError, match=r"^out: .*immutable"):
        lk.cross_entropy_with_grad(jx, _y("jax"), out=jx)


# ----------------------------------------------------------------------------------------------
# dtypes and types


@pytest.mark.parametrize("lib", LIBS)
def test_non_floating_logits(lib):
    xi = to_lib(lib, np.zeros((N, C), np.int64))
    for call, name in [(lambda: lk.cross_entropy(xi, _y(lib)), "logits"),
                       (lambda: lk.cross_entropy_with_grad(xi, _y(lib)), "logits"),
                       (lambda: lk.softmax(xi), "x"), (lambda: lk.log_softmax(xi), "x"),
                       (lambda: lk.logsumexp(xi), "x"), (lambda: lk.entropy(xi), "logits"),
                       (lambda: lk.kl_divergence(xi, xi), "p_logits"),
                       (lambda: lk.token_logprobs(xi, _y(lib)), "logits"),
                       (lambda: lk.sparse_softmax_cross_entropy_with_logits(labels=_y(lib), logits=xi), "logits")]:
        with pytest.raises(TypeError, match=rf"^{name}: expected a floating dtype.*int"):
            call()
    xb = to_lib(lib, np.zeros((N, C), bool))
    with pytest.raises(TypeError, match=r"^x: expected a floating dtype"):
        lk.softmax(xb)


@pytest.mark.parametrize("lib", LIBS)
def test_bad_label_dtypes(lib):
    x = _x(lib)
    with pytest.raises(TypeError, match=r"^labels: "):
        lk.cross_entropy(x, to_lib(lib, np.zeros(N, bool)))
    with pytest.raises(TypeError, match=r"^labels: "):
        lk.sparse_softmax_cross_entropy_with_logits(labels=to_lib(lib, np.zeros(N), "float32"), logits=x)
    with pytest.raises(TypeError, match=r"^labels: "):
        lk.softmax_cross_entropy_with_logits(labels=_y(lib), logits=x)
    with pytest.raises(TypeError, match=r"^labels: "):
        lk.token_logprobs(x, to_lib(lib, np.full((N, C), 0.2), "float32"))
    with pytest.raises(TypeError, match=r"^weight: "):
        lk.cross_entropy(x, _y(lib), weight=to_lib(lib, np.ones(C, np.int64)))
    with pytest.raises(TypeError, match=r"^where: "):
        lk.softmax(x, where=to_lib(lib, np.ones((N, C), np.int64)))


def test_non_array_arguments():
    x = _x()
    with pytest.raises(TypeError, match=r"^x: "):
        lk.softmax([[0.0, 1.0]])
    with pytest.raises(TypeError, match=r"^logits: "):
        lk.cross_entropy([[0.0, 1.0]], np.array([0]))
    with pytest.raises(TypeError, match=r"^labels: "):
        lk.cross_entropy(x, [0, 1, 2, 3])
    with pytest.raises(TypeError, match=r"^labels: "):
        lk.cross_entropy(x, None)
    with pytest.raises(TypeError, match=r"^weight: "):
        lk.cross_entropy(x, _y(), weight=[1.0] * C)
    with pytest.raises(TypeError, match=r"^x: "):
        lk.softmax("logits")
    with pytest.raises(ValueError, match=r"^x: .*scalar"):
        lk.softmax(np.float32(1.0))
    with pytest.raises(TypeError, match=r"^ignore_index: "):
        lk.cross_entropy(x, _y(), ignore_index=1.5)
    with pytest.raises(TypeError, match=r"^axis: "):
        lk.softmax(x, axis=1.0)


# ----------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf")])
def test_label_smoothing_outside_unit_interval(value):
    with pytest.raises(ValueError, match=r"^label_smoothing: .*\[0, 1\]"):
        lk.cross_entropy(_x(), _y(), label_smoothing=value)
    with pytest.raises(ValueError, match=r"^label_smoothing: "):
        lk.cross_entropy_with_grad(_x(), _y(), label_smoothing=value)


@pytest.mark.parametrize("value", ["avg", "MEAN", None, "elementwise_mean"])
def test_unknown_reduction(value):
    with pytest.raises(ValueError, match=r"^reduction: .*mean.*sum.*none"):
        lk.cross_entropy(_x(), _y(), reduction=value)


@pytest.mark.parametrize("name,value", [("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")),
                                        ("softcap", 0.0), ("softcap", -3.0), ("softcap", float("inf")),
                                        ("z_loss", -1e-3), ("z_loss", float("nan"))])
def test_bad_numeric_options(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        lk.cross_entropy(_x(), _y(), **{name: value})
    if name == "temperature":
        with pytest.raises(ValueError, match=r"^temperature: "):
            lk.softmax(_x(), temperature=value)
        with pytest.raises(ValueError, match=r"^temperature: "):
            lk.kl_divergence(_x(), _x(), temperature=value)


# ----------------------------------------------------------------------------------------------
# arrays from two libraries


@pytest.mark.parametrize("a,b", [("numpy", "torch"), ("torch", "numpy"), ("numpy", "jax"), ("torch", "jax")])
def test_mixed_libraries(a, b):
    need(a), need(b)
    xa = _x(a)
    with pytest.raises(TypeError, match=rf"'logits' is a {a} array.*'labels' is a {b} array"):
        lk.cross_entropy(xa, _y(b))
    with pytest.raises(TypeError, match=r"'weight'"):
        lk.cross_entropy(xa, _y(a), weight=to_lib(b, np.ones(C), "float32"))
    with pytest.raises(TypeError, match=r"'q_logits'"):
        lk.kl_divergence(xa, _x(b))
    with pytest.raises(TypeError, match=r"'where'"):
        lk.softmax(xa, where=to_lib(b, np.ones(C, bool)))
    with pytest.raises(TypeError, match=r"'labels'"):
        lk.softmax_cross_entropy_with_logits(labels=to_lib(b, np.full((N, C), 0.2), "float32"), logits=xa)


# ----------------------------------------------------------------------------------------------
# a failed call changes nothing


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_failed_in_place_call_does_not_write(lib):
    base = np.arange(N * C, dtype=np.float32).reshape(N, C) / 3.0
    bad_calls = [
        dict(labels=(0, 1, C, 2)),                            # bad class index, found late
        dict(labels=(0, 1, 2, 3), reduction="avg"),
        dict(labels=(0, 1, 2, 3), label_smoothing=2.0),
        dict(labels=(0, 1, 2, 3), weight=np.ones(C + 1, np.float32)),
        dict(labels=(0, 1, 2), ),
    ]
    for kw in bad_calls:
        kw = dict(kw)
        y = _y(lib, kw.pop("labels"))
        if "weight" in kw:
            kw["weight"] = to_lib(lib, kw["weight"])
        x = to_lib(lib, base.copy())
        with pytest.raises((ValueError, TypeError)):
            lk.cross_entropy_with_grad(x, y, out=x, **kw)
        np.testing.assert_array_equal(np.asarray(x.numpy() if lib == "torch" else x), base)
        buf = to_lib(lib, np.full_like(base, 7.0))
        with pytest.raises((ValueError, TypeError)):
            lk.cross_entropy_with_grad(x, y, out=buf, **kw)
        assert np.all(np.asarray(buf.numpy() if lib == "torch" else buf) == 7.0)


def test_failed_call_leaves_labels_and_weight_untouched():
    x = _x()
    y = np.array([0, 1, 9, 2])
    w = np.linspace(1, 2, C).astype(np.float32)
    y0, w0 = y.copy(), w.copy()
    with pytest.raises(ValueError):
        lk.cross_entropy(x, y, weight=w)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(w, w0)
