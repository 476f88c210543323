"""The torch bridge of :mod:`logitkit.functional`: top-level functions on torch tensors land here.

:mod:`logitkit.functional` has already checked every argument and moved the class axis of
cross-entropy last; these functions run the fused autograd paths of :mod:`logitkit.torch`.
A ``where`` mask on softmax / log_softmax runs the core on torch ops (autograd through them).
:func:`run_stage` runs one kernel stage on 2-D torch rows without autograd (numba kernels on CPU
through zero-copy NumPy views, Triton on CUDA, the core otherwise), for callers such as
``cross_entropy_with_grad``.

>>> import torch, logitkit
>>> x = torch.zeros(2, 3, requires_grad=True)
>>> logitkit.cross_entropy(x, torch.tensor([0, 2]))   # doctest: +ELLIPSIS
tensor(1.0986, grad_fn=<CrossEntropySmallBackward>)
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from .._namespace import TORCH, get_namespace
from ..core import softmax as core_sm
from ._functional import ce_lastdim, softmax_lastdim
from ._ops import run_stage

__all__ = ["cross_entropy", "softmax", "log_softmax", "run_stage"]


def cross_entropy(x: Tensor, y: Tensor, *, kind: str, ignore_index: int, reduction: str, z_loss: float,
                  weight: Optional[Tensor], label_smoothing: float, softcap: Optional[float],
                  temperature: float) -> Any:
    """Cross-entropy of ``x`` (..., V) (class axis last) with labels ``y``; ``"none"`` gives ``x.shape[:-1]``."""
    return ce_lastdim(x, y, kind=kind, out_shape=tuple(x.shape[:-1]), weight=weight,
                      ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, temperature=temperature)


def softmax(x: Tensor, axis: int, *, where: Any = None, temperature: float = 1.0) -> Tensor:
    """Softmax of ``x`` along ``axis`` (already normalized to ``[0, x.ndim)``)."""
    if where is not None:
        return core_sm.softmax(get_namespace(TORCH), x, axis, where, temperature)
    return softmax_lastdim(x, axis, temperature, False)


def log_softmax(x: Tensor, axis: int, *, where: Any = None, temperature: float = 1.0) -> Tensor:
    """Log-softmax of ``x`` along ``axis`` (already normalized to ``[0, x.ndim)``)."""
    if where is not None:
        return core_sm.log_softmax(get_namespace(TORCH), x, axis, where, temperature)
    return softmax_lastdim(x, axis, temperature, True)
