"""The README's multi-process example, run as a user would: torchrun with 2 processes (gloo, CPU).

``--standalone`` rendezvouses at ``localhost:0``, so the port is picked free by the OS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vocab_parallel_torchrun.py"


def test_torchrun_example_two_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE)]
    # A session of its own, so that on timeout the launcher and its workers go down together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=EXAMPLE.parent, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun example did not finish in 150 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert out.count("-> matches") == 2, out[-4000:]
    assert "step  0  loss" in out


def test_readme_scaling_out_shows_this_example():
    """The README's "Scaling out" section carries the example verbatim, so the suite runs what users read."""
    readme = EXAMPLE.parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    start = text.find("## Scaling out")
    if start < 0:
        pytest.skip("README.md has no '## Scaling out' section")
    section = text[start:]
    nxt = section.find("\n## ", 3)
    section = section if nxt < 0 else section[:nxt]
    fence = section.find("```python\n")
    assert fence >= 0, "the Scaling out section shows no ```python block"
    block = section[fence + len("```python\n"):section.find("\n```", fence + 10)]
    assert block.strip() == EXAMPLE.read_text(encoding="utf-8").strip()
