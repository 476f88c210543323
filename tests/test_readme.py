"""The README's code runs as written (it is the first code a user copies), and says what it claims."""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "vocab_parallel_torchrun.py"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_quickstart_runs():
    pytest.importorskip("torch")
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    # The in-place call wrote the gradient over a copy (its rows sum to 0); the logits the later
    # calls use are still the logits.
    assert namespace["grad"] is namespace["work"]
    assert np.allclose(namespace["work"].sum(-1), 0.0, atol=1e-6)
    assert not np.allclose(namespace["logits"].sum(-1), 0.0, atol=1e-3)
    assert float(namespace["loss"]) > 0


def test_every_python_block_runs_or_is_the_torchrun_example():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        if "torchrun" in code.splitlines()[0]:
            # needs torchrun; the test suite runs the file itself (tests/distributed)
            assert code == EXAMPLE.read_text(), "README's scaling-out block differs from the example file"
            continue
        if re.search(r"^\s*import torch\b", code, re.M):
            pytest.importorskip("torch")
        exec(compile(code, f"README block {i + 1}", "exec"), {"__name__": f"readme_{i}"})


def test_readme_says_how_to_run_inside_the_venv_and_what_to_install():
    text = README.read_text()
    assert ".venv/bin/python -m logitkit demo" in text
    assert "source .venv/bin/activate" in text
    assert ".venv/bin/torchrun" in text
    assert "pip install '/path/to/logitkit[torch]'" in text
    assert "download.pytorch.org/whl/cpu" in text  # the CPU-only torch warning
    for extra in ("demo", "bench", "docs"):
        assert f"| `{extra}`" in text or f"`{extra}`," in text, extra


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    named = re.findall(r"\bmake (\w+)\s+#", README.read_text())  # "make demo   # ..." lines
    assert {"demo", "test", "check", "bench", "info", "docs"} <= set(named)
    for target in named:
        assert re.search(rf"^{target}:", makefile, re.M), f"README names `make {target}`, the Makefile has none"


def test_readme_class_axis_warning_holds():
    torch = pytest.importorskip("torch")
    import logitkit as lk
    import logitkit.torch as lkt

    assert "takes them on dim 1" in README.read_text()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 10, generator=g)
    y = torch.randint(0, 10, (4, 10), generator=g)
    # the two APIs differ on a (4, 10, 10) tensor, and axis=1 gives torch's meaning
    assert not torch.allclose(lk.cross_entropy(x, y), lkt.cross_entropy(x, y))
    assert torch.allclose(lk.cross_entropy(x, y, axis=1), torch.nn.functional.cross_entropy(x, y))
