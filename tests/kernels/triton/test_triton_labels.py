"""Bad class indices through the device-side flag (kernels/triton/_labels.py), in the interpreter.

On CPU tensors the flag's copy to the host is synchronous and there is no CUDA event, so a
deferred error is due at the very next call; a fake event stands in for a copy still in flight.
"""

from __future__ import annotations

import pytest
import torch

from logitkit.kernels import triton as tk
from logitkit.kernels.triton import _labels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CPU = torch.device("cpu")


def _x(N=6, V=37, seed=0):
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed))


GOOD = torch.tensor([0, 1, 2, 3, 4, 5])


def test_explicit_check_counts_and_names_the_bad_label():
    x = _x()
    y = torch.tensor([0, 40, -100, 3, 4, 5])
    ce, _, _ = tk.ce_forward(x, y)
    assert ce[1].isnan() and ce[2] == 0 and ce[[0, 3, 4, 5]].isfinite().all()
    with pytest.raises(ValueError, match=r"labels: 1 row\(s\) .*outside \[0, 37\).*first at row 1 \(value 40\)"):
        tk.check_labels()
    tk.check_labels()  # cleared by the raise
    tk.check_labels(CPU)


def test_several_bad_rows_give_count_first_row_and_value_range():
    x = _x()
    y = torch.tensor([0, 1, -7, 3, 99, 37])
    tk.ce_forward_backward(x, y, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"3 row\(s\).*first at row 2; bad values from -7 to 99"):
        tk.check_labels(CPU)


def test_deferred_raise_at_the_next_call_before_it_launches():
    x = _x()
    bad = torch.tensor([0, 1, 2, 37, 4, 5])
    ce, _, _ = tk.ce_forward(x, bad)  # the kernel cannot raise: NaN row, flag set, copy queued
    assert ce[3].isnan()
    with pytest.raises(ValueError, match=r"1 row\(s\).*first at row 3 \(value 37\).*earlier cross-entropy call"):
        tk.ce_forward(x, GOOD)
    ce, _, _ = tk.ce_forward(x, GOOD)  # raised once, then clear
    assert ce.isfinite().all()
    tk.check_labels()


def test_deferred_raise_from_a_later_torch_stage(monkeypatch):
    """The torch adapter's run_stage polls too: a softmax after the bad call raises."""
    from logitkit.torch import _ops

    tk.ce_forward(_x(), torch.tensor([0, 1, 2, 3, 4, -1]))
    monkeypatch.setattr(_ops, "_select", lambda stage, x: (False, getattr(tk, stage)))
    with pytest.raises(ValueError, match=r"first at row 5 \(value -1\)"):
        _ops.run_stage("softmax_forward", _x(), temperature=1.0)
    p = _ops.run_stage("softmax_forward", _x(), temperature=1.0)
    torch.testing.assert_close(p, torch.softmax(_x(), -1))


class FakeEvent:
    """A CUDA event stand-in: ``query()`` says whether the copy behind it has landed."""

    def __init__(self):
        self.done = False
        self.records = 0

    def record(self):
        self.records += 1

    def query(self):
        return self.done


def test_no_wait_while_the_copy_is_in_flight():
    st = _labels._state(CPU)
    ev = st.event = FakeEvent()
    try:
        x = _x()
        tk.ce_forward(x, torch.tensor([0, 50, 2, 3, 4, 5]))
        assert ev.records == 1 and st.pending
        tk.ce_forward(x, GOOD)  # copy not landed: no error, no second copy (one in flight)
        tk.ce_forward(x, torch.tensor([0, 1, 2, 3, 4, 60]))
        assert ev.records == 1 and st.dirty
        ev.done = True
        # the copy in flight counts the first call only (the CPU copy ran at issue time)
        with pytest.raises(ValueError, match=r"1 row\(s\).*first at row 1 \(value 50\)"):
            tk.ce_forward(x, GOOD)
        # the clear is stream-ordered after the third call: its row goes with that error
        tk.check_labels()
    finally:
        st.event = None


def test_dirty_launches_get_a_fresh_copy_at_the_next_poll():
    st = _labels._state(CPU)
    ev = st.event = FakeEvent()
    try:
        x = _x()
        tk.ce_forward(x, GOOD)
        tk.ce_forward(x, torch.tensor([0, 1, 2, 3, 70, 5]))  # while the first copy is in flight
        assert st.dirty and ev.records == 1
        ev.done = True
        tk.ce_forward(x, GOOD)  # the first copy is clean; this poll issues a fresh copy
        assert ev.records == 3 and not st.dirty  # the fresh one, then this call's own
        with pytest.raises(ValueError, match=r"first at row 4 \(value 70\)"):
            tk.ce_forward(x, GOOD)
    finally:
        st.event = None


def test_opt_out_context_manager_and_environment(monkeypatch):
    x = _x()
    bad = torch.tensor([0, 1, 2, 3, 4, 37])
    with tk.deferred_label_check(False):
        tk.ce_forward(x, bad)
        tk.ce_forward(x, GOOD)  # nothing copied, nothing polled
        with tk.deferred_label_check(True):  # a nested block turns it back on
            tk.ce_forward(x, bad)
            # the device flag kept counting while the check was off: both bad calls are in it
            with pytest.raises(ValueError, match=r"2 row\(s\)"):
                tk.ce_forward(x, GOOD)
    monkeypatch.setattr(_labels, "_ENV_ON", False)  # LOGITKIT_DEFERRED_LABEL_CHECK=0
    tk.ce_forward(x, bad)
    tk.ce_forward(x, GOOD)
    with pytest.raises(ValueError, match=r"first at row 5 \(value 37\)"):
        tk.check_labels()  # the explicit check still works


def test_graph_capture_skips_copy_record_and_query(monkeypatch):
    st = _labels._state(CPU)

    class NoTouch(FakeEvent):
        def record(self):
            raise AssertionError("recorded during capture")

        def query(self):
            raise AssertionError("queried during capture")

    st.event = NoTouch()
    try:
        monkeypatch.setattr(_labels, "_capturing", lambda device: True)
        x = _x()
        tk.ce_forward(x, torch.tensor([0, 1, 2, 3, 4, 37]))
        tk.ce_forward(x, GOOD)
        assert not st.pending
        monkeypatch.setattr(_labels, "_capturing", lambda device: False)
        with pytest.raises(ValueError, match="value 37"):  # after the "replay", an explicit check
            tk.check_labels()
    finally:
        st.event = None


def test_capture_predicate_is_false_off_cuda():
    assert _labels._capturing(CPU) is False


@pytest.mark.parametrize("ii", [-100, 37, 1000, -1])
def test_ignore_index_rows_never_flag(ii):
    x = _x()
    y = torch.tensor([0, ii, 2, ii, 4, 5])
    ce, _, _, dx = tk.ce_forward_backward(x, y, 1.0, 1.0, ignore_index=ii)
    assert ce[1] == 0 and ce[3] == 0 and (dx[1] == 0).all() and ce.isfinite().all()
    tk.ce_forward(x, GOOD, ignore_index=ii)  # no deferred error
    tk.check_labels()


def test_backward_only_launch_does_not_count_again():
    x = _x()
    y = torch.tensor([0, 1, 2, 3, 4, 37])
    ce, m, r = tk.ce_forward(x, y)
    dx = tk.ce_backward(x, y, m, r, 1.0, 1.0)
    assert dx[5].isnan().all()
    with pytest.raises(ValueError, match=r"labels: 1 row\(s\)"):
        tk.check_labels()


def test_linear_ce_forward_defers_too():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 16, generator=g)
    W = torch.randn(20, 16, generator=g)
    ce, _, _ = tk.linear_ce_forward(h, W, torch.tensor([0, 1, 25, 3, -100]))
    assert ce[2].isnan() and ce[4] == 0
    with pytest.raises(ValueError, match=r"outside \[0, 20\).*first at row 2 \(value 25\)"):
        tk.linear_ce_forward(h, W, torch.tensor([0, 1, 2, 3, 4]))


def test_cross_entropy_through_the_torch_adapter(monkeypatch):
    """logitkit.torch.cross_entropy as on CUDA (no host-side label check): NaN, then the error."""
    import logitkit.torch as lt
    from logitkit import _validate
    from logitkit.torch import _eager, _ops

    monkeypatch.setattr(_ops, "_select", lambda stage, x: (False, getattr(tk, stage)))
    monkeypatch.setattr(_eager, "kernels_for", lambda x: None)
    monkeypatch.setattr(_eager, "fast_ce", lambda *args, **kw: None)
    monkeypatch.setattr(_eager, "op_rows_stats", lambda *args, **kw: None)  # CPU-only serial route
    monkeypatch.setattr(_eager, "op_rows_backward", lambda *args, **kw: None)
    # CUDA labels are never read on the host (check_label_range returns for them)
    monkeypatch.setattr(_validate, "check_label_range", lambda *a, **k: None)
    x = _x()
    loss = lt.cross_entropy(x, torch.tensor([0, 1, 2, 3, 4, 41]))
    assert loss.isnan()
    with pytest.raises(ValueError, match=r"value 41"):
        lt.cross_entropy(x, GOOD)
    assert lt.cross_entropy(x, GOOD).isfinite()
