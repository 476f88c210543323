"""The README's quickstart runs as written (it is the first code a user copies)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    pytest.importorskip("torch")
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    # The quickstart's in-place call left the gradient in the logits: each row sums to 0.
    import numpy as np

    assert np.allclose(namespace["logits"].sum(-1), 0.0, atol=1e-6)
    assert float(namespace["loss"]) > 0
