"""Bad class indices on the GPU: a ``ValueError`` without a host synchronisation on the hot path.

A kernel cannot raise. A forward cross-entropy kernel (``ce_forward``, ``ce_forward_backward``,
``linear_ce_forward``) that meets a class index outside ``[0, V)`` that is not ``ignore_index``
writes NaN for that row and records it with masked atomics (free for good rows) in a per-device
int64 flag ``[count, first row, V, smallest bad value, largest bad value]``. Backward-only
launches reuse the forward's labels and do not count them again.

**Deferred check** (the default). After each such launch, :func:`after_launch` enqueues a copy of
the 40-byte flag into pinned host memory on the current stream (``non_blocking``) and records a
CUDA event behind it; at most one copy is in flight per device (a launch while one is in flight
marks the device dirty, and the next poll issues a fresh copy). The next logitkit call on that
device -- every torch stage (:func:`logitkit.torch._ops.run_stage`) and every forward
cross-entropy kernel -- first calls :func:`poll`, which asks the event whether the copy has landed
(``event.query()``, never a wait). If it has and the count is not zero, that call raises
``ValueError`` before launching anything and the flag is cleared. So the error surfaces one or a
few calls after the one with the bad label (as CUDA's own asynchronous errors do); that call's
loss for the row was NaN. The message gives the count, the first row *within its call*, ``V`` and
the bad values of the calls up to the copy; rows flagged after the copy but before the clear are
dropped with it (that error has already stopped the run).

Cost per forward call: one ``cudaMemcpyAsync`` of 40 bytes, one ``cudaEventRecord`` and one
``cudaEventQuery``, i.e. a few microseconds of host time and no device idle time (the copy
queues behind the kernel). ``benchmarks/gpu.py`` measures it (the "label check" rows).

**Explicit check**: :func:`check_labels` reads the flag now, which synchronizes the current
stream with the host; call it where a sync is cheap (when the loss is read for logging, at the
end of an epoch, in tests). It sees every kernel queued on the current stream.

**Opt-out.** While the current CUDA stream is capturing a graph
(``torch.cuda.is_current_stream_capturing()``) nothing is copied, recorded or queried: those calls
would break or be baked into the capture. Replays still set the device flag, so call
:func:`check_labels` after replaying. ``with deferred_label_check(False):`` (per thread / context)
or ``LOGITKIT_DEFERRED_LABEL_CHECK=0`` (process) turns the copy and the query off everywhere; the
flag is still set and :func:`check_labels` still works.

Off CUDA (Triton's interpreter on CPU tensors) the copy is synchronous and the "event" is complete
at once, so the same logic runs, which is how the tests check it.

>>> from logitkit.kernels import triton as tk                       # doctest: +SKIP
>>> tk.check_labels()              # raise now for any device, synchronizing     # doctest: +SKIP
>>> with tk.deferred_label_check(False): graph.replay()                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator, Optional

import torch

__all__ = ["label_flag", "reset_flag", "check_flag", "check_labels", "deferred_label_check", "poll",
           "after_launch"]

_I64_MAX = 2**63 - 1
_I64_MIN = -(2**63)
# flag slots
COUNT, FIRST_ROW, V_SLOT, MIN_VALUE, MAX_VALUE = range(5)

_ENV_ON = os.environ.get("LOGITKIT_DEFERRED_LABEL_CHECK", "1") != "0"
_enabled: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("logitkit_label_check", default=None)


class _State:
    """One device's flag, its host mirror and the copy in flight."""

    __slots__ = ("flag", "cuda", "host", "event", "pending", "dirty", "epoch", "pending_epoch")

    def __init__(self, device: torch.device):
        # Kernels only (no host-to-device copy), so a first use inside a graph capture works.
        self.flag = torch.zeros(5, dtype=torch.int64, device=device)
        _fill_init(self.flag)
        self.cuda = device.type == "cuda"
        # made by the first copy (never during a capture): pinned memory is a host allocation
        self.host: Optional[torch.Tensor] = None
        self.event = None
        self.pending = False       # a copy was issued and not yet read
        self.dirty = False         # a launch happened after the copy in flight was issued
        self.epoch = 0             # bumped by every clear: copies issued before it are stale
        self.pending_epoch = 0


_STATES: dict[torch.device, _State] = {}


def _fill_init(flag: torch.Tensor) -> None:
    flag[COUNT].fill_(0)
    flag[FIRST_ROW].fill_(_I64_MAX)
    flag[V_SLOT].fill_(0)
    flag[MIN_VALUE].fill_(_I64_MAX)
    flag[MAX_VALUE].fill_(_I64_MIN)


def _device(device: Any) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _state(device: Any) -> _State:
    device = _device(device)
    st = _STATES.get(device)
    if st is None:
        st = _STATES[device] = _State(device)
    return st


def label_flag(device: Any) -> torch.Tensor:
    """The int64 flag ``[count, first_row, V, min_value, max_value]`` kernels on ``device`` set.

    ``count``: rows seen with a class index outside ``[0, V)`` that is not ``ignore_index`` since
    the last clear; ``first_row``: the smallest such row index within its call; ``V``: the class
    count of a call that saw one; ``min_value`` / ``max_value``: the range of the bad indices.
    """
    return _state(device).flag


def _clear(st: _State) -> None:
    _fill_init(st.flag)  # stream-ordered: kernels queued before it are counted, later ones not
    st.epoch += 1
    st.pending = st.dirty = False


def reset_flag(flag: torch.Tensor) -> None:
    """Clear ``flag`` on the device (no sync); a copy in flight is discarded."""
    st = _STATES.get(_device(flag.device))
    if st is not None and st.flag is flag:
        _clear(st)
    else:
        _fill_init(flag)


def _message(vals: list, labels: Optional[torch.Tensor], where: str) -> str:
    count, first, V, lo, hi = vals
    if labels is not None and 0 <= first < labels.numel():
        what = f" (value {int(labels.reshape(-1)[first])})"
    elif lo == hi:
        what = f" (value {lo})"
    else:
        what = f"; bad values from {lo} to {hi}"
    return (f"labels: {count} row(s) hold a class index outside [0, {V}) that is not ignore_index; "
            f"first at row {first}{what}{where}")


def check_flag(flag: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
    """Raise ``ValueError`` if a kernel saw a bad class index; **synchronizes with the device**.

    The flag is cleared before raising. ``labels`` (the flattened labels of the failing call), if
    given, lets the message name the value at the first bad row.

    >>> check_flag(label_flag(x.device))        # doctest: +SKIP
    """
    vals = [int(v) for v in flag.tolist()]
    if vals[COUNT] == 0:
        return
    reset_flag(flag)
    raise ValueError(_message(vals, labels, ""))


def check_labels(device: Any = None) -> None:
    """Raise ``ValueError`` now for any bad class index the Triton cross-entropy kernels have seen
    on ``device`` (every device used so far when ``None``) since the last error or check.

    Synchronizes the current stream with the host (it reads the device flag), so call it where a
    sync is cheap. Without a call, the error comes from a later logitkit call (see module doc).

    >>> loss = lt.cross_entropy(logits, labels); check_labels()   # doctest: +SKIP
    """
    devices = list(_STATES) if device is None else [_device(device)]
    for dev in devices:
        st = _STATES.get(dev)
        if st is None:
            continue
        vals = [int(v) for v in st.flag.tolist()]
        if vals[COUNT]:
            _clear(st)
            raise ValueError(_message(vals, None, f" (on {dev})"))


def _on() -> bool:
    v = _enabled.get()
    return _ENV_ON if v is None else v


@contextlib.contextmanager
def deferred_label_check(enabled: bool = False) -> Iterator[None]:
    """Turn the deferred check (copy + event after a launch, query on the next call) off (or on)
    inside the block, for this thread / context. The device flag is set either way."""
    token = _enabled.set(bool(enabled))
    try:
        yield
    finally:
        _enabled.reset(token)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _skip(device: torch.device) -> bool:
    if not _on():
        return True
    if torch.compiler.is_compiling():  # traced code must not run host-side bookkeeping
        return True
    # Inside a graph capture a copy / record / query would be baked into (or break) the graph.
    return _capturing(device)


def _ready(st: _State) -> bool:
    return st.event is None or st.event.query()


def _issue(st: _State) -> None:
    if st.host is None:
        st.host = torch.zeros(5, dtype=torch.int64, pin_memory=st.cuda)
        if st.cuda and st.event is None:
            st.event = torch.cuda.Event()
    st.host.copy_(st.flag, non_blocking=st.event is not None)
    if st.event is not None:
        st.event.record()
    st.pending, st.dirty, st.pending_epoch = True, False, st.epoch


def after_launch(device: Any) -> None:
    """Queue the flag's copy to the host behind a forward cross-entropy launch (never waits)."""
    device = _device(device)
    if _skip(device):
        return
    st = _state(device)
    if st.pending and not _ready(st):
        st.dirty = True  # the flag only grows until cleared: the next poll's copy covers this launch
        return
    _issue(st)  # the new copy holds everything an unread older one did


def poll(device: Any) -> None:
    """Raise the deferred ``ValueError`` if a completed copy of ``device``'s flag counts bad labels.

    Called at the start of logitkit calls; reads only host memory (``event.query()``, no wait).
    """
    if not _STATES:
        return
    device = _device(device)
    st = _STATES.get(device)
    if st is None or not st.pending or _skip(device) or not _ready(st):
        return
    st.pending = False
    if st.pending_epoch != st.epoch:  # cleared after this copy was issued
        return
    vals = [int(v) for v in st.host.tolist()]
    if vals[COUNT]:
        _clear(st)
        raise ValueError(_message(vals, None, f" (seen on {device} by an earlier cross-entropy call, whose "
                                              "loss for that row is NaN; raised at the next call without a "
                                              "host sync)"))
    if st.dirty:
        _issue(st)
