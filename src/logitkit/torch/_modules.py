"""``nn.Module`` drop-ins: subclasses of torch's modules with the same constructors and state."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import _validate as V
from ._functional import cross_entropy, log_softmax, softmax

__all__ = ["CrossEntropyLoss", "Softmax", "LogSoftmax"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""``torch.nn.CrossEntropyLoss`` computed by :func:`logitkit.torch.cross_entropy`.

    Same constructor, attributes and ``state_dict`` (``weight`` is a buffer) as torch's, so it
    is an ``isinstance`` drop-in; the keyword-only extras ``z_loss``, ``softcap``,
    ``temperature``, ``return_lse`` and ``inplace_backward`` are passed on to each call.

    >>> import torch, logitkit.torch as lt
    >>> loss = lt.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    >>> float(loss(torch.zeros(2, 4), torch.tensor([0, 3])))  # doctest: +ELLIPSIS
    1.38...
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average: Any = None, ignore_index: int = -100,
                 reduce: Any = None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None, temperature: float = 1.0,
                 return_lse: bool = False, inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        V.check_options(reduction=self.reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                        softcap=softcap, temperature=temperature)
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = temperature
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Any:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap, temperature=self.temperature,
                             return_lse=self.return_lse, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        for name, default in (("ignore_index", -100), ("label_smoothing", 0.0), ("z_loss", 0.0),
                              ("softcap", None), ("temperature", 1.0), ("return_lse", False),
                              ("inplace_backward", False)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim=None)`` computed by :func:`logitkit.torch.softmax` (plus ``temperature``).

    >>> import torch, logitkit.torch as lt
    >>> lt.Softmax(dim=-1)(torch.zeros(1, 4))
    tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """

    def __init__(self, dim: Optional[int] = None, *, temperature: float = 1.0) -> None:
        super().__init__(dim)
        V.check_options(temperature=temperature)
        self.temperature = temperature

    def forward(self, input: Tensor) -> Tensor:
        return softmax(input, self.dim, _stacklevel=5, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (f", temperature={self.temperature}" if self.temperature != 1.0 else "")


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax(dim=None)`` computed by :func:`logitkit.torch.log_softmax` (plus ``temperature``).

    >>> import torch, logitkit.torch as lt
    >>> lt.LogSoftmax(dim=1)(torch.zeros(1, 2))
    tensor([[-0.6931, -0.6931]])
    """

    def __init__(self, dim: Optional[int] = None, *, temperature: float = 1.0) -> None:
        super().__init__(dim)
        V.check_options(temperature=temperature)
        self.temperature = temperature

    def forward(self, input: Tensor) -> Tensor:
        return log_softmax(input, self.dim, _stacklevel=5, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (f", temperature={self.temperature}" if self.temperature != 1.0 else "")
