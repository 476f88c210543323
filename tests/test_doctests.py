"""Every docstring example in src/logitkit runs as a doctest, so none can rot (issue 13 item 17).

Each module of the package (private ones too: their functions are re-exported, and their
docstrings are what ``help()`` and the API pages show) is one test. A module is skipped only when
importing it fails because a framework it bridges (torch, jax, tensorflow, ...) is not installed.
"""

import doctest
import importlib
import pathlib

import pytest

import logitkit

PACKAGE = pathlib.Path(logitkit.__file__).resolve().parent
# Packages whose absence skips a bridge module; any other import error is a failure.
OPTIONAL = {"torch", "jax", "jaxlib", "optax", "triton", "tensorflow", "keras", "transformers",
            "ml_dtypes", "mpmath", "scipy", "matplotlib", "tqdm", "flax"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":  # importing it runs the command line
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


MODULES = _modules()


def test_item17_harness_sees_every_module_and_examples():
    # Guards the harness itself: a broken discovery would pass every module vacuously.
    assert "logitkit" in MODULES and "logitkit.functional" in MODULES and "logitkit.cli" in MODULES
    mod = importlib.import_module("logitkit.functional")
    found = [t for t in doctest.DocTestFinder().find(mod, mod.__name__) if t.examples]
    assert len(found) >= 5


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", MODULES)
def test_item17_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in OPTIONAL:
            pytest.skip(f"{name} needs {missing}, which is not installed")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    for test in finder.find(module, name):
        if not test.examples:
            continue
        out: list[str] = []
        result = runner.run(test, out=out.append, clear_globs=True)
        if result.failed:
            report.append("".join(out))
    assert not report, f"{len(report)} failing docstring(s) in {name}:\n" + "\n".join(report)
