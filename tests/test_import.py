"""``import logitkit`` stays light: no framework, no JIT compiler is imported with it."""

import json
import subprocess
import sys

HEAVY = ("torch", "jax", "jaxlib", "numba", "llvmlite", "triton", "scipy", "mpmath")


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_logitkit_imports_no_framework():
    loaded = _modules_after("import logitkit")
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"import logitkit pulled in {heavy}"
    assert "logitkit.functional" in loaded


def test_numpy_call_imports_no_framework():
    # A NumPy call must not import torch or jax either (type detection reads sys.modules only).
    loaded = _modules_after(
        "import numpy as np, logitkit\n"
        "x = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)\n"
        "logitkit.softmax(x); logitkit.cross_entropy(x, np.array([1]))\n"
        "logitkit.softmax_cross_entropy_with_logits(labels=np.full((1, 3), 1 / 3), logits=x)"
    )
    frameworks = sorted(m for m in loaded if m.split(".")[0] in ("torch", "jax", "jaxlib", "triton"))
    assert frameworks == []


def test_public_names():
    import logitkit

    expected = {"logsumexp", "softmax", "log_softmax", "cross_entropy", "cross_entropy_with_grad",
                "softmax_cross_entropy_with_logits", "sparse_softmax_cross_entropy_with_logits",
                "token_logprobs", "entropy", "kl_divergence"}
    assert expected <= set(logitkit.__all__)
    for name in expected:
        assert callable(getattr(logitkit, name)), name
    json.dumps(logitkit.__version__)
