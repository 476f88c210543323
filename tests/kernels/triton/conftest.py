"""Triton kernel tests run in Triton's CPU interpreter on torch CPU tensors.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is defined (that is, before
``logitkit.kernels.triton.ce`` and friends are imported), so it is set here, at collection.
Without triton (or torch) the folder is skipped.
"""

import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
    collect_ignore_glob = ["test_*.py"]


if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("torch") is not None:
    import pytest

    @pytest.fixture(autouse=True)
    def _clear_label_flags():
        """Each test starts with no bad label pending on any device (the flag is process-wide)."""
        from logitkit.kernels.triton import _labels

        for st in _labels._STATES.values():
            _labels._clear(st)
        yield
