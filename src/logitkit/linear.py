r"""Fused linear + cross-entropy: a language-model head's loss without the ``(N, V)`` logits.

``logits = hidden @ linear_weight.T + linear_bias`` is computed a chunk of tokens (and, for very
wide vocabularies, a tile of classes) at a time; only per-token statistics and the gradients
leave a chunk. Every option of :func:`logitkit.cross_entropy` applies to those logits.

NumPy arrays run here; torch tensors go to :mod:`logitkit.torch.linear` (autograd) and JAX arrays
to :mod:`logitkit.jax.linear` (``custom_vjp``). See :mod:`logitkit.core.linear_cross_entropy` for
the chunking and the choice between computing gradients in forward and recomputing the logits.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from . import _validate as V
from ._namespace import JAX, NUMPY, TORCH, dtype_name, is_floating, is_integer, namespace_of
from .core import linear_cross_entropy as core

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad", "linear_token_logprobs",
           "linear_entropy"]

_ADAPTERS = {TORCH: "logitkit.torch.linear", JAX: "logitkit.jax.linear"}


def _adapter(lib: str) -> Any:
    return importlib.import_module(_ADAPTERS[lib])


def check_chunk_size(chunk_size: Any) -> Any:
    """``None``, a positive int (tokens per chunk) or a pair of positive ints ``(tokens, classes)``."""
    if chunk_size is None:
        return None
    items = chunk_size if isinstance(chunk_size, (tuple, list)) else (chunk_size,)
    if len(items) not in (1, 2) or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0 for c in items):
        raise ValueError(f"chunk_size: expected None, a positive int or a pair of positive ints "
                         f"(tokens, classes), got {chunk_size!r}")
    return tuple(int(c) for c in items) if len(items) == 2 else int(items[0])


def validate_head(lib: str, hidden: Any, linear_weight: Any, labels: Any, linear_bias: Any, weight: Any,
                  *, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                  z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0,
                  chunk_size: Any = None, names: tuple = ("hidden", "linear_weight", "labels"),
                  check_range: bool = True) -> Any:
    """Check every argument of a linear cross-entropy call before any work; returns ``chunk_size``.

    ``hidden`` ``(..., H)`` floating; ``linear_weight`` ``(V, H)`` of the same dtype; ``labels``
    integer ``hidden.shape[:-1]`` (``None`` for the entropy); ``linear_bias`` ``(V,)``; ``weight``
    ``(V,)`` class weights.
    """
    hn, wn, ln = names
    V.check_logits(hn, hidden)
    if not hasattr(linear_weight, "dtype") or linear_weight.ndim != 2:
        raise ValueError(f"{wn}: expected a 2-D array (V, H), got shape "
                         f"{tuple(getattr(linear_weight, 'shape', ()))}")
    if dtype_name(linear_weight.dtype) != dtype_name(hidden.dtype):
        raise TypeError(f"{wn}: expected {hn}'s dtype {dtype_name(hidden.dtype)}, got "
                        f"{dtype_name(linear_weight.dtype)}")
    nclass, H = int(linear_weight.shape[0]), int(hidden.shape[-1])
    if int(linear_weight.shape[1]) != H:
        raise ValueError(f"{wn}: expected shape (V, {H}) to match {hn}'s last dimension {H}, got "
                         f"{tuple(linear_weight.shape)}")
    if linear_bias is not None:
        if tuple(linear_bias.shape) != (nclass,):
            raise ValueError(f"linear_bias: expected shape ({nclass},), got {tuple(linear_bias.shape)}")
        if dtype_name(linear_bias.dtype) != dtype_name(hidden.dtype):
            raise TypeError(f"linear_bias: expected {hn}'s dtype {dtype_name(hidden.dtype)}, got "
                            f"{dtype_name(linear_bias.dtype)}")
    V.check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    temperature=temperature)
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    V.check_weight(weight, nclass)
    if labels is not None:
        if not hasattr(labels, "dtype") or not is_integer(labels.dtype):
            got = dtype_name(labels.dtype) if hasattr(labels, "dtype") else type(labels).__name__
            raise TypeError(f"{ln}: expected integer class indices, got {got}")
        if tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"{ln}: expected shape {tuple(hidden.shape[:-1])} ({hn}'s shape without the "
                             f"last dimension), got {tuple(labels.shape)}")
        if check_range:
            V.check_label_range(lib, labels, nclass, int(ignore_index), name=ln)
    return check_chunk_size(chunk_size)


def _opts(weight, ignore_index, label_smoothing, z_loss, softcap, temperature) -> dict:
    return dict(weight=weight, ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
                z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
                temperature=float(temperature))


def _numpy_head(hidden, linear_weight, labels, linear_bias, opts, chunk_size, kernels=True):
    H = hidden.shape[-1]
    h2 = np.ascontiguousarray(hidden).reshape(-1, H)
    W = np.ascontiguousarray(linear_weight)
    lab = np.ascontiguousarray(labels).reshape(-1).astype(np.int64, copy=False)
    ops = core.NumpyOps(h2, W, linear_bias)
    return core.Head(ops, h2, W, lab, linear_bias, opts, chunk_size=chunk_size, kernels=kernels)


def linear_cross_entropy(hidden: Any, linear_weight: Any, labels: Any, *, linear_bias: Any = None,
                         weight: Any = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", z_loss: float = 0.0, softcap: float | None = None,
                         temperature: float = 1.0, chunk_size: Any = None) -> Any:
    r"""Cross-entropy of the logits ``hidden @ linear_weight.T + linear_bias``, never materialized.

    Equal to ``logitkit.cross_entropy(hidden @ linear_weight.T + linear_bias, labels, ...)`` with
    the same options (softcap, then temperature, then the loss

    .. math:: \ell = (1-\varepsilon)\,w_y(\mathrm{lse}-z_y) + \tfrac{\varepsilon}{V}\sum_c w_c(\mathrm{lse}-z_c)
              + \zeta\,\mathrm{lse}^2

    per row not ignored), while only a chunk of the logits ever exists.

    Args:
      hidden: ``(..., H)`` floating. linear_weight: ``(V, H)``, same dtype (torch's ``Linear`` layout).
      labels: ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
      linear_bias: ``(V,)`` or ``None``. weight: ``(V,)`` class weights (torch semantics).
      ignore_index, label_smoothing, reduction, z_loss, softcap, temperature: as in
        :func:`logitkit.cross_entropy`.
      chunk_size: ``None`` (automatic, a ~16 MB workspace), tokens per chunk (int), or
        ``(tokens, classes)`` to also cut the vocabulary into tiles.

    Returns the loss in ``hidden``'s dtype: a scalar, or ``labels``' shape for ``"none"``. NumPy,
    torch (differentiable) or JAX (differentiable), like the inputs.

    >>> import numpy as np, logitkit
    >>> h = np.eye(2, 3); W = np.array([[2.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    >>> float(logitkit.linear_cross_entropy(h, W, np.array([0, 1]))) ==  \
    ...     float(logitkit.cross_entropy(h @ W.T, np.array([0, 1])))
    True
    """
    lib, _ = namespace_of(hidden=hidden, linear_weight=linear_weight, labels=labels,
                          linear_bias=linear_bias, weight=weight)
    chunk_size = validate_head(lib, hidden, linear_weight, labels, linear_bias, weight,
                               ignore_index=ignore_index, label_smoothing=label_smoothing,
                               reduction=reduction, z_loss=z_loss, softcap=softcap,
                               temperature=temperature, chunk_size=chunk_size)
    opts = _opts(weight, ignore_index, label_smoothing, z_loss, softcap, temperature)
    if lib != NUMPY:
        return _adapter(lib).fused_linear_cross_entropy(hidden, linear_weight, labels, linear_bias, opts,
                                                        reduction, chunk_size)
    head = _numpy_head(hidden, linear_weight, labels, linear_bias, opts, chunk_size)
    ce, m, r = head.forward()
    loss = head.loss(ce, m, r, reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return np.asarray(loss).astype(hidden.dtype)


def linear_cross_entropy_with_grad(hidden: Any, linear_weight: Any, labels: Any, *, linear_bias: Any = None,
                                   weight: Any = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                                   reduction: str = "mean", z_loss: float = 0.0, softcap: float | None = None,
                                   temperature: float = 1.0, chunk_size: Any = None,
                                   grad_output: Any = None) -> tuple[Any, Any, Any, Any]:
    r"""NumPy: ``(loss, dhidden, dlinear_weight, dlinear_bias)`` of :func:`linear_cross_entropy`.

    The gradients are those of ``Σ grad_output · loss``: ``grad_output`` is a scalar (default 1)
    or, for ``reduction="none"``, one value per token (``labels``' shape). ``dlinear_bias`` is
    ``None`` without a bias. Whole-row chunks compute the gradients during the forward pass (three
    matrix products); vocabulary tiles recompute the logits (four). ``dlinear_weight`` and
    ``dlinear_bias`` accumulate in float32 for float16/bfloat16 inputs.

    >>> import numpy as np, logitkit
    >>> h = np.zeros((1, 2)); W = np.zeros((2, 2)); b = np.zeros(2)
    >>> loss, dh, dW, db = logitkit.linear_cross_entropy_with_grad(h, W, np.array([1]), linear_bias=b)
    >>> db
    array([ 0.5, -0.5])
    """
    lib, _ = namespace_of(hidden=hidden, linear_weight=linear_weight, labels=labels,
                          linear_bias=linear_bias, weight=weight, grad_output=grad_output)
    if lib != NUMPY:
        raise TypeError(f"hidden: linear_cross_entropy_with_grad takes NumPy arrays; for {lib} arrays "
                        "use linear_cross_entropy with the framework's autograd")
    chunk_size = validate_head(lib, hidden, linear_weight, labels, linear_bias, weight,
                               ignore_index=ignore_index, label_smoothing=label_smoothing,
                               reduction=reduction, z_loss=z_loss, softcap=softcap,
                               temperature=temperature, chunk_size=chunk_size)
    g = _grad_output(grad_output, labels.shape, reduction)
    opts = _opts(weight, ignore_index, label_smoothing, z_loss, softcap, temperature)
    head = _numpy_head(hidden, linear_weight, labels, linear_bias, opts, chunk_size)
    g_ce, g_z = head.scales(reduction, g)
    need = (True, True, linear_bias is not None)
    if core.choose_strategy(reduction, head.plan, True) == "fused":
        ce, m, r, dh, dw, db = head.forward(g_ce, g_z, need)
    else:
        ce, m, r = head.forward()
        dh, dw, db = head.backward(m, r, g_ce, g_z, need)
    loss = head.loss(ce, m, r, reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return np.asarray(loss).astype(hidden.dtype), dh.reshape(hidden.shape), dw, db


def _grad_output(grad_output: Any, shape: tuple, reduction: str) -> Any:
    if grad_output is None:
        return 1.0
    g = np.asarray(grad_output)
    if not is_floating(g.dtype) and not is_integer(g.dtype):
        raise TypeError(f"grad_output: expected real numbers, got {g.dtype}")
    if reduction == "none":
        if g.ndim and tuple(g.shape) != tuple(shape):
            raise ValueError(f"grad_output: expected a scalar or labels' shape {tuple(shape)}, got {g.shape}")
        return np.broadcast_to(g.astype(np.float64), shape).reshape(-1)
    if g.ndim:
        raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r}, got shape {g.shape}")
    return float(g)


def linear_token_logprobs(hidden: Any, linear_weight: Any, labels: Any, *, linear_bias: Any = None,
                          ignore_index: int = -100, softcap: float | None = None, temperature: float = 1.0,
                          chunk_size: Any = None) -> Any:
    r"""``log softmax(z)[label]`` per token for ``z = hidden @ linear_weight.T + linear_bias``.

    For reinforcement learning and evaluation: the log-probabilities of the sampled tokens without
    the logits. 0 where ``labels == ignore_index``. Differentiable for torch and JAX inputs.

    >>> import numpy as np, logitkit
    >>> logitkit.linear_token_logprobs(np.ones((1, 2)), np.zeros((4, 2)), np.array([3]))  # log 1/4
    array([-1.38629436])
    """
    loss = linear_cross_entropy(hidden, linear_weight, labels, linear_bias=linear_bias,
                                ignore_index=ignore_index, reduction="none", softcap=softcap,
                                temperature=temperature, chunk_size=chunk_size)
    return -loss


def linear_entropy(hidden: Any, linear_weight: Any, *, linear_bias: Any = None, softcap: float | None = None,
                   temperature: float = 1.0, chunk_size: Any = None) -> Any:
    r"""Entropy of ``softmax(z)`` per token, ``z = hidden @ linear_weight.T + linear_bias``.

    :math:`H = \mathrm{lse} - \sum_c p_c z_c`, computed as ``r + Σ_c e_c (m − z_c) / Σ_c e_c``
    merged across vocabulary tiles (every term ≥ 0, so confident rows keep their tiny entropies).
    Returns ``hidden.shape[:-1]`` in ``hidden``'s dtype; differentiable for torch and JAX inputs.

    >>> import numpy as np, logitkit
    >>> logitkit.linear_entropy(np.ones((1, 2)), np.zeros((4, 2)))  # log 4
    array([1.38629436])
    """
    lib, _ = namespace_of(hidden=hidden, linear_weight=linear_weight, linear_bias=linear_bias)
    chunk_size = validate_head(lib, hidden, linear_weight, None, linear_bias, None, softcap=softcap,
                               temperature=temperature, chunk_size=chunk_size)
    opts = _opts(None, -100, 0.0, 0.0, softcap, temperature)
    if lib != NUMPY:
        return _adapter(lib).fused_linear_entropy(hidden, linear_weight, linear_bias, opts, chunk_size)
    labels = np.zeros(hidden.shape[:-1], np.int64)
    head = _numpy_head(hidden, linear_weight, labels, linear_bias, opts, chunk_size, kernels=False)
    return head.entropy()[0].reshape(hidden.shape[:-1]).astype(hidden.dtype)
