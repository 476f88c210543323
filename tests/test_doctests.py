"""Every docstring example in src/logitkit runs as a doctest, so none can rot (issue 13 item 17).

Each module of the package (private ones too: their functions are re-exported, and their
docstrings are what ``help()`` and the API pages show) is one test. A module is skipped only when
importing it fails because a framework it bridges (torch, jax, tensorflow, ...) is not installed.
"""

import doctest
import functools
import importlib
import json
import pathlib
import subprocess
import sys

import pytest

import logitkit

PACKAGE = pathlib.Path(logitkit.__file__).resolve().parent
# Packages whose absence skips a bridge module; any other import error is a failure.
OPTIONAL = {"torch", "jax", "jaxlib", "optax", "triton", "tensorflow", "keras", "transformers",
            "ml_dtypes", "mpmath", "scipy", "matplotlib", "tqdm", "flax"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# TensorFlow's bundled LLVM aborts the process if Triton is loaded after it (torch loads Triton
# lazily), so the modules that import TensorFlow or Keras run in a fresh interpreter.
ISOLATED = ("logitkit.tensorflow", "logitkit.keras")


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
    if name.startswith(ISOLATED):
        _run_isolated(name)
        return
    report = _run_doctests(name)
    assert not report, f"{len(report)} failing docstring(s) in {name}:\n" + "\n".join(report)


def _run_doctests(name: str) -> list[str]:
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
    return report


@functools.lru_cache(maxsize=None)
def _isolated_reports() -> dict:
    """{module: ["SKIP", reason] or its failure reports}, for every isolated module, from one
    fresh interpreter (importing TensorFlow once)."""
    names = [n for n in MODULES if n.startswith(ISOLATED)]
    code = (f"import json, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
            "import pytest, test_doctests as t\n"
            "out = {}\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        out[name] = t._run_doctests(name)\n"
            "    except pytest.skip.Exception as exc:\n"
            "        out[name] = ['SKIP', str(exc)]\n"
            "print('\\n@@' + json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0 and "\n@@" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("\n@@", 1)[1])


def _run_isolated(name: str) -> None:
    report = _isolated_reports()[name]
    if report[:1] == ["SKIP"]:
        pytest.skip(report[1])
    assert not report, f"{len(report)} failing docstring(s) in {name}:\n" + "\n".join(report)


def test_item17_no_docstring_example_is_only_comments():
    # A commented-out example (">>> # f(x)") runs nothing and would rot unseen.
    import ast

    parser = doctest.DocTestParser()
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            examples = parser.get_examples(doc) if doc else []
            if examples and all(e.source.lstrip().startswith("#") for e in examples):
                bad.append(f"{path.relative_to(PACKAGE.parent)}: {getattr(node, 'name', '<module>')}")
    assert not bad, "docstring examples that are only comments:\n" + "\n".join(bad)
