"""A griffe extension that turns logitkit's docstrings into Markdown for the API pages.

The docstrings are written for ``help()`` and doctest: ``>>>`` examples in running text and a
few reST roles (:func:`x`). Markdown would read ``>>>`` as nested block quotes and print the
roles verbatim, so, before griffe parses a docstring, each run of doctest lines becomes a fenced
``pycon`` block and each role its plain code span. The docstrings themselves stay as they are.
"""

from __future__ import annotations

import re

from griffe import Extension, Object

_MATH = re.compile(r":math:`([^`]+)`")
# The site has no math renderer (it works offline): the commonest TeX reads as plain symbols.
_TEX = [(r"\\mathrm\{([^}]*)\}", r"\1"), (r"\\operatorname\{([^}]*)\}", r"\1"),
        (r"\\(log|exp|max|min|tanh|sech|cosh|sinh)\b", r"\1"), (r"\\sum", "Σ"), (r"\\prod", "∏"),
        (r"\\tilde\s*\{?(\w)\}?", "\\1\u0303"), (r"\\epsilon|\\varepsilon", "ε"), (r"\\cdot", "·"),
        *((rf"\\{name}\b", char) for name, char in zip(
            ("alpha", "beta", "gamma", "delta", "zeta", "eta", "theta", "lambda", "mu", "pi", "sigma",
             "tau", "phi", "partial", "nabla"), "αβγδζηθλμπστφ∂∇")),
        (r"\\\|", "‖"), (r"\\[,;!]", " "), (r"\\left|\\right", ""), (r"\\infty", "∞"), (r"\\ell\b", "ℓ"),
        (r"\\leq?", "≤"), (r"\\geq?", "≥"), (r"\\neq", "≠"), (r"\\approx", "≈"), (r"\\times", "×")]


def _frac(m: re.Match) -> str:
    num, den = (t if len(t) == 1 else f"({t})" for t in (m.group(1).strip(), m.group(2).strip()))
    return f"{num}/{den}"


def _plain_tex(text: str) -> str:
    for pattern, repl in _TEX:
        text = re.sub(pattern, repl, text)
    text = re.sub(r"\\t?frac\{([^{}]*)\}\{([^{}]*)\}", _frac, text)
    return re.sub(r"\s+", " ", text).strip()


def _plain_math(m: re.Match) -> str:
    return "`" + _plain_tex(m.group(1)) + "`"


def _math_directives(text: str) -> str:
    """``.. math:: formula`` (the formula on that line and the more indented ones after it)
    becomes a ``text`` block with the formula in plain symbols."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, parts = m.group(1), [m.group(2)]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
            parts.append(lines[i])
            i += 1
        out += [indent + "```text", indent + _plain_tex(" ".join(parts)), indent + "```"]
    return "\n".join(out)


_FLAGS = re.compile(r"\s*#\s*doctest:.*$")
_ROLE = re.compile(r":(?:py:)?(?:func|mod|class|meth|attr|data|obj|exc|math|term|ref):`~?([^`]+)`")


def _fence_doctests(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not (stripped.startswith(">>> ") or stripped == ">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        # A doctest runs to the first blank line (its last output line included).
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(_FLAGS.sub("", lines[i][len(indent):]))
            i += 1
        prev = next((ln for ln in reversed(out) if ln.strip()), "")
        if prev.rstrip().endswith("::"):
            # reST literal block ("Example::"): the fence replaces the indentation.
            j = max(k for k, ln in enumerate(out) if ln.strip())
            out[j] = out[j].rstrip()[:-1]
            indent = prev[: len(prev) - len(prev.lstrip())]
        if out and out[-1].strip():
            out.append("")
        out += [indent + "```pycon", *(indent + b for b in block), indent + "```"]
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """Docstring text with fenced doctests and plain code spans for reST roles.

    >>> print(to_markdown("See :func:`f`.\\n\\n>>> f(1)\\n2"))
    See `f`.
    <BLANKLINE>
    ```pycon
    >>> f(1)
    2
    ```
    """
    return _fence_doctests(_ROLE.sub(r"`\1`", _MATH.sub(_plain_math, _math_directives(text))))


class LogitkitDocstrings(Extension):
    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = to_markdown(obj.docstring.value)
