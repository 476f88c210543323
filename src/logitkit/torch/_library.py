"""Operators in the ``torch.ops.logitkit`` namespace with the least dispatch cost.

``torch.library.custom_op`` wraps every operator in Python layers of its own (an autograd kernel
that redispatches, a backend wrapper, a ``torch._dynamo`` disable frame): about 25 µs a call on
this project's CPU, more than a small problem's whole kernel, paid on every call of a compiled
graph. :func:`define` registers the same operator (schema inferred from the annotations, as
``custom_op`` does) straight on a ``torch.library.Library``, whose Python kernel the dispatcher
calls directly (~7 µs).

Only operators that mutate nothing come through here: an operator that writes into an argument
needs the ``ADInplaceOrView`` kernel ``custom_op`` adds (it bumps the argument's version counter),
so those stay ``custom_op``. Our operators have no autograd formula of their own: every caller
is an ``autograd.Function`` that runs them with gradients off; a call with gradients on and an
input that requires them is refused (``custom_op`` refused the backward instead).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["define"]

_LIB = torch.library.Library("logitkit", "FRAGMENT")
_grad_enabled = torch.is_grad_enabled
_Tensor = torch.Tensor


class Operator:
    """A registered operator: calling it dispatches ``torch.ops.logitkit.<name>``."""

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        ns, name = qualname.split("::")
        if ns != "logitkit":
            raise ValueError(f"qualname: expected the logitkit namespace, got {qualname!r}")
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))

        def kernel(*args: Any) -> Any:
            # custom_op refuses a backward through an operator without an autograd formula;
            # torch's fallback here would only warn and leave the gradient out. Refuse at the call.
            if _grad_enabled() and any(isinstance(a, _Tensor) and a.requires_grad for a in args):
                raise RuntimeError(f"{qualname}: this operator has no autograd formula; call it with gradients "
                                   "off (torch.no_grad()), or use the logitkit.torch function built on it")
            return fn(*args)

        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        self.qualname = qualname
        self.__doc__ = fn.__doc__
        self._op = getattr(torch.ops.logitkit, name).default

    def __call__(self, *args: Any) -> Any:
        return self._op(*args)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """The shapes-only implementation that torch.compile traces with (usable as a decorator)."""
        torch.library.register_fake(self.qualname, fake, lib=_LIB)
        return fake


def define(qualname: str) -> Callable[[Callable[..., Any]], Operator]:
    """Decorator: ``fn`` (annotated, mutating nothing) as the operator ``qualname``."""
    return lambda fn: Operator(qualname, fn)
