"""The documentation site builds with no warning, its links resolve, its code runs (issue 20)."""

import html.parser
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import griffe_docstrings  # noqa: E402  (docs/griffe_docstrings.py, the API pages' docstring filter)

# The API page of each public package and the packages whose __all__ it must show.
API_PAGES = {
    "api/logitkit.html": ["logitkit"],
    "api/torch.html": ["logitkit.torch"],
    "api/jax.html": ["logitkit.jax", "logitkit.jax.linear"],
    "api/distributed.html": ["logitkit.distributed", "logitkit.distributed.stages"],
    "api/transformers.html": ["logitkit.transformers"],
    "api/tensorflow.html": ["logitkit.tensorflow"],
    "api/keras.html": ["logitkit.keras"],
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])


def _parse(path: pathlib.Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.mark.timeout(360)
def test_docs_build_strict_and_every_internal_link_resolves(site):
    # 404.html links from the server root (it is served for any path); every other page is relative.
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    assert len(pages) >= 10
    parsed = {p: _parse(p) for p in pages}
    broken = []
    for page, links in parsed.items():
        for link in links.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or link.startswith("//") or link.startswith("mailto:"):
                continue
            target = (page.parent / urllib.parse.unquote(url.path)).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {link}")
            elif url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if url.fragment not in ids:
                    broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not broken, "\n".join(broken)


def _exported(module: str) -> list[str]:
    """A module's ``__all__``, read from its source (importing torch, jax, TensorFlow takes long)."""
    import ast

    base = ROOT / "src" / module.replace(".", "/")
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    names: list[str] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            names += ast.literal_eval(node.value)
    assert names, f"{module} has no literal __all__"
    return names


def test_docs_api_pages_show_every_public_name(site):
    missing = []
    for page, modules in API_PAGES.items():
        ids = _parse(site / page).ids
        for name in modules:
            for member in _exported(name):
                if member.startswith("__"):
                    continue
                if not any(i == f"{name}.{member}" or i.endswith(f".{member}") for i in ids):
                    missing.append(f"{page}: {name}.{member}")
    assert not missing, "\n".join(missing)


def test_docs_api_pages_render_doctests_as_code_not_quotes(site):
    text = (site / "api/logitkit.html").read_text(encoding="utf-8")
    assert "<blockquote>" not in text  # ">>>" read as Markdown block quotes
    assert ":func:`" not in text and ":math:`" not in text
    assert '<span class="gp">&gt;&gt;&gt; </span>' in text  # a highlighted Python console block
    assert "doctest:" not in text


def test_docs_griffe_filter_fences_doctests_and_literal_blocks():
    text = "Example::\n\n    >>> x = 1\n    >>> x\n    1\n\nSee :func:`logitkit.softmax`.\n"
    md = griffe_docstrings.to_markdown(text)
    assert md.startswith("Example:\n\n```pycon\n>>> x = 1\n>>> x\n1\n```\n")
    assert md.endswith("See `logitkit.softmax`.\n")
    # a doctest inside an indented section keeps its indentation
    md = griffe_docstrings.to_markdown("Args:\n  x: y\n\n  >>> f()  # doctest: +SKIP\n  2\n")
    assert "  ```pycon\n  >>> f()\n  2\n  ```" in md


def test_docs_griffe_filter_reads_tex_as_plain_symbols():
    md = griffe_docstrings.to_markdown(r"Log-sum-exp: :math:`\log \sum_j e^{x_j}`; :math:`\beta\,\mathrm{KL}(q\|M)`.")
    assert md == "Log-sum-exp: `log Σ_j e^{x_j}`; `β KL(q‖M)`."
    md = griffe_docstrings.to_markdown("Loss:\n\n.. math:: (1-\\varepsilon)\\,w_y\n   + \\zeta\\,lse^2\n\nEnd.")
    assert md == "Loss:\n\n```text\n(1-ε) w_y + ζ lse^2\n```\n\nEnd."
    assert griffe_docstrings.to_markdown(r":math:`\ell = \tfrac{\varepsilon}{V} + \frac{a+b}{2}`") == "`ℓ = ε/V + (a+b)/2`"


def _python_blocks(path: pathlib.Path) -> list[str]:
    # Blocks fenced exactly as ```python run; ```py marks code shown but not run (torchrun).
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


DOC_PAGES = [p for p in sorted(DOCS.rglob("*.md")) if _python_blocks(p)]
# The TensorFlow page's child process imports Triton and TensorFlow and compiles with XLA: make
# test-slow (CI runs it after make test).
_SLOW_PAGES = {"guides/tensorflow.md"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", [
    pytest.param(p, id=str(p.relative_to(DOCS)),
                 marks=[pytest.mark.slow] if str(p.relative_to(DOCS)) in _SLOW_PAGES else [])
    for p in DOC_PAGES])
def test_docs_python_blocks_run_as_written(page):
    blocks = _python_blocks(page)
    tf_blocks = []
    for i, code in enumerate(blocks):
        for lib in ("torch", "jax", "transformers", "tensorflow", "keras"):
            # find_spec, not importorskip: importing TensorFlow here would make a later Triton
            # load abort this process
            if re.search(rf"^\s*import {lib}\b", code, re.M) and importlib.util.find_spec(lib) is None:
                pytest.skip(f"{lib} is not installed")
        if re.search(r"^\s*import (tensorflow|keras)\b", code, re.M):
            # TensorFlow's LLVM must not share this process with a Triton loaded after it: these
            # blocks run in one child process (one TensorFlow import, not one per block), each in
            # a fresh namespace, in page order, as the in-process blocks do here
            tf_blocks.append((f"{page.relative_to(DOCS)} block {i + 1}", f"docs_{page.stem}_{i}", code))
            continue
        namespace: dict = {"__name__": f"docs_{page.stem}_{i}"}
        exec(compile(code, f"{page.relative_to(DOCS)} block {i + 1}", "exec"), namespace)
    if tf_blocks:
        proc = subprocess.run([sys.executable, "-c", _RUN_BLOCKS], input=json.dumps(tf_blocks),
                              capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert proc.returncode == 0, f"{page.name}:\n{proc.stderr[-3000:]}"
        ran = [line for line in proc.stdout.splitlines() if line.startswith("ran: ")]
        assert ran == [f"ran: {name}" for name, _, _ in tf_blocks], proc.stdout


# The child of test_docs_python_blocks_run_as_written: runs ``[(name, module name, code), ...]``
# read from stdin, each block in a fresh namespace, printing ``ran: <name>`` after each (a block
# that raises stops the child with its traceback on stderr).
_RUN_BLOCKS = """
import json, sys
for name, mod, code in json.loads(sys.stdin.read()):
    exec(compile(code, name, "exec"), {"__name__": mod})
    print("ran: " + name, flush=True)
"""


def test_docs_pages_with_code_are_found():
    names = {str(p.relative_to(DOCS)) for p in DOC_PAGES}
    assert {"index.md", "guides/getting-started.md", "guides/pytorch.md", "guides/jax.md"} <= names


def test_docs_cli_page_shows_the_current_help(monkeypatch, capsys):
    from logitkit import cli

    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal width
    page = (DOCS / "guides/cli.md").read_text(encoding="utf-8")
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        help_text = capsys.readouterr().out.strip()
        assert help_text in page, f"docs/guides/cli.md is out of date: regenerate `logitkit {' '.join(argv)}`"


def test_docs_every_public_subpackage_has_an_api_page():
    # core/ is the internal maths (DESIGN.md); every other package a user imports gets a page.
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    packages = sorted(p.parent.name for p in (ROOT / "src" / "logitkit").glob("*/__init__.py"))
    missing = [p for p in packages if p != "core" and not p.startswith("_") and f"api/{p}.md" not in nav]
    assert not missing, f"packages without an API page in mkdocs.yml: {missing}"
    for page in re.findall(r"(api/\w+\.md)", nav):
        assert (DOCS / page).exists(), page
