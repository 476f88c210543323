r"""Fused linear + cross-entropy: a language-model head's loss without the ``(N, V)`` logits.

``logits = hidden @ linear_weight.T + linear_bias`` is computed a chunk of tokens (and, for very
wide vocabularies, a tile of classes) at a time; only per-token statistics and the gradients
leave a chunk. Every option of :func:`logitkit.cross_entropy` applies to those logits.

NumPy arrays run here; torch tensors go to :mod:`logitkit.torch.linear` (autograd) and JAX arrays
to :mod:`logitkit.jax.linear` (``custom_vjp``). See :mod:`logitkit.core.linear_cross_entropy` for
the chunking and the choice between computing gradients in forward and recomputing the logits.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np

from . import _validate as V
from ._namespace import JAX, NUMPY, TENSORFLOW, TORCH, dtype_name, is_floating, is_integer, library_of, namespace_of
from .core import linear_cross_entropy as core
from .core import linear_head as core_head
from .core.linear_head import HeadOutput
from .core.reduction import reduce_loss, row_weights

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad", "linear_token_logprobs",
           "linear_entropy", "linear_head", "linear_head_with_grad", "HeadOutput"]

def _adapter(lib: str) -> Any:
    """The framework module of the fused linear cross-entropy for ``lib``."""
    # Import statements, not importlib: torch.compile traces an import statement but
    # graph-breaks on importlib.import_module.
    if lib == TORCH:
        from .torch import linear
    elif lib == JAX:
        from .jax import linear
    else:
        from .tensorflow import linear
    return linear


def _head_adapter(lib: str) -> Any:
    """The framework module of ``linear_head`` for ``lib``."""
    if lib == TORCH:
        from .torch import head
        return head
    return _adapter(lib)


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
    h2 = np.ascontiguousarray(hidden).reshape(math.prod(hidden.shape[:-1]), H)  # H may be 0
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
    if not isinstance(chunk_size, tuple):
        # whole rows: the fused head's chunk loop (its numba row pass where it applies)
        return linear_head(hidden, linear_weight, None, linear_bias=linear_bias, outputs=("entropy",),
                           softcap=softcap, temperature=temperature, chunk_size=chunk_size).entropy
    labels = np.zeros(hidden.shape[:-1], np.int64)  # vocabulary tiles: merged online across tiles
    head = _numpy_head(hidden, linear_weight, labels, linear_bias, opts, chunk_size, kernels=False)
    return head.entropy()[0].reshape(hidden.shape[:-1]).astype(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# the fused head: every output of one chunked pass


class HeadArgs:
    """Validated arguments of one :func:`linear_head` call (what the framework bridges receive).

    Arrays keep their library and shapes: ``hidden`` ``(..., H)``, ``labels`` ``(...)`` or
    ``None``, ``temp`` ``(...)`` per-token temperatures or ``None``, ``teacher`` ``None`` or
    ``("head", teacher_hidden, teacher_weight, teacher_bias)``, ``("logits", teacher_logits)``,
    ``("topk", indices, logprobs)``.
    """

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _host(lib: str, x: Any) -> Any:
    """A NumPy copy of a concrete array (float64 / int64), or ``None`` where it cannot be read cheaply."""
    if lib == TORCH:
        import torch

        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        x = x.detach()
        return (x.double() if x.is_floating_point() else x.long()).numpy()
    if lib == JAX:
        if V._is_tracer(x):
            return None
        x = np.asarray(x)
    if lib == TENSORFLOW:
        if sys.modules["tensorflow"].is_symbolic_tensor(x):
            return None
        x = x.numpy()
    return x.astype(np.float64) if is_floating(x.dtype) else np.asarray(x)


def _check_per_token(lib: str, name: str, x: Any, shape: tuple, *, floating: bool = True) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected a float or an array, got {type(x).__name__}")
    if floating and not is_floating(x.dtype):
        raise TypeError(f"{name}: expected a floating dtype, got {dtype_name(x.dtype)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (hidden's shape without the last "
                         f"dimension), got {tuple(x.shape)}")


def divergence_options(divergence: Any, beta: Any, teacher_temperature: Any) -> tuple:
    """``(beta, teacher_temperature)`` as floats once ``divergence``, ``beta`` in [0, 1] and a finite
    ``teacher_temperature`` > 0 are checked (each error names its argument)."""
    if divergence not in core_head.DIVERGENCES:
        raise ValueError(f"divergence: expected one of {core_head.DIVERGENCES}, got {divergence!r}")
    b = V.real_scalar("beta", beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    tt = V.real_scalar("teacher_temperature", teacher_temperature)
    if not (V._finite(tt) and tt > 0):
        raise ValueError(f"teacher_temperature: expected a finite value > 0, got {teacher_temperature}")
    return b, tt


def resolve_divergence(divergence: str, beta: float, teacher: Any) -> str:
    """The divergence computed: ``"jsd"`` at ``beta`` 0 / 1 is ``"kl"`` / ``"reverse_kl"`` (TRL's GKD
    and Liger-Kernel special-case both ends); a reverse KL against a top-k ``teacher`` (a tuple
    whose first item is its kind) is infinite and raises."""
    div = divergence
    if div == "jsd" and beta in (0.0, 1.0):
        div = "kl" if beta == 0.0 else "reverse_kl"
    if teacher is not None and teacher[0] == "topk" and div == "reverse_kl":
        raise ValueError(f"divergence: {divergence!r}" + (f" with beta={beta}" if divergence == "jsd" else "") +
                         " is infinite against a top-k teacher (the renormalized teacher puts no mass outside "
                         "its k classes, the student does); use 'kl' or 'jsd' with beta < 1")
    return div


def teacher_form(outputs: tuple, teacher_hidden: Any, teacher_weight: Any, teacher_bias: Any, teacher_logits: Any,
                 teacher_topk: Any, holder: str = "") -> Any:
    """The name of the one teacher form given, or ``None`` when ``'kl'`` is not in ``outputs``; raises
    for a teacher that is missing, given twice or given without ``'kl'``. ``holder`` ("rank",
    "device") says, for a vocabulary-parallel caller, that each form is that holder's part."""
    forms = [n for n, v in (("teacher_hidden", teacher_hidden), ("teacher_logits", teacher_logits),
                            ("teacher_topk", teacher_topk)) if v is not None]
    if teacher_hidden is None and (teacher_weight is not None or teacher_bias is not None):
        raise ValueError("teacher_weight: a teacher head needs teacher_hidden too")
    if len(forms) > 1:
        raise ValueError(f"{forms[1]}: give one teacher form, not {' and '.join(forms)}")
    if "kl" not in outputs:
        if forms:
            raise ValueError(f"{forms[0]}: a teacher is given but 'kl' is not in outputs {outputs}")
        return None
    if not forms:
        rows, cls = (f" (this {holder}'s rows)", f" (this {holder}'s classes)") if holder else ("", "")
        raise ValueError(f"outputs: 'kl' needs a teacher: teacher_hidden and teacher_weight{rows}, "
                         f"teacher_logits{cls} or teacher_topk")
    return forms[0]


def _check_teacher(lib: str, hidden: Any, nclass: int, outputs: tuple, teacher_hidden: Any,
                   teacher_weight: Any, teacher_bias: Any, teacher_logits: Any, teacher_topk: Any) -> Any:
    lead = tuple(hidden.shape[:-1])
    if teacher_form(outputs, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk) is None:
        return None
    if teacher_hidden is not None:
        V.check_logits("teacher_hidden", teacher_hidden)
        if teacher_weight is None:
            raise ValueError("teacher_weight: a teacher head needs teacher_weight (V, H_teacher)")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden: expected leading shape {lead} (hidden's), got "
                             f"{tuple(teacher_hidden.shape)}")
        Ht = int(teacher_hidden.shape[-1])
        if not hasattr(teacher_weight, "dtype") or tuple(teacher_weight.shape) != (nclass, Ht):
            raise ValueError(f"teacher_weight: expected shape ({nclass}, {Ht}), got "
                             f"{tuple(getattr(teacher_weight, 'shape', ()))}")
        if dtype_name(teacher_weight.dtype) != dtype_name(teacher_hidden.dtype):
            raise TypeError(f"teacher_weight: expected teacher_hidden's dtype {dtype_name(teacher_hidden.dtype)}, "
                            f"got {dtype_name(teacher_weight.dtype)}")
        if teacher_bias is not None and (tuple(teacher_bias.shape) != (nclass,) or
                                         dtype_name(teacher_bias.dtype) != dtype_name(teacher_hidden.dtype)):
            raise ValueError(f"teacher_bias: expected shape ({nclass},) and dtype {dtype_name(teacher_hidden.dtype)}, "
                             f"got {tuple(teacher_bias.shape)} {dtype_name(teacher_bias.dtype)}")
        return ("head", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_logits is not None:
        V.check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != lead + (nclass,):
            raise ValueError(f"teacher_logits: expected shape {lead + (nclass,)}, got {tuple(teacher_logits.shape)}")
        return ("logits", teacher_logits)
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk: expected a pair (indices, logprobs), each of shape (..., k)")
    idx, lp = teacher_topk
    for name, a in (("teacher_topk indices", idx), ("teacher_topk logprobs", lp)):
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    if not is_integer(idx.dtype):
        raise TypeError(f"teacher_topk indices: expected integers, got {dtype_name(idx.dtype)}")
    if not is_floating(lp.dtype):
        raise TypeError(f"teacher_topk logprobs: expected a floating dtype, got {dtype_name(lp.dtype)}")
    if len(idx.shape) != len(lead) + 1 or tuple(idx.shape[:-1]) != lead or not 1 <= idx.shape[-1] <= nclass:
        raise ValueError(f"teacher_topk indices: expected shape {lead + ('k',)} with 1 <= k <= {nclass}, got "
                         f"{tuple(idx.shape)}")
    if tuple(lp.shape) != tuple(idx.shape):
        raise ValueError(f"teacher_topk logprobs: expected the indices' shape {tuple(idx.shape)}, got "
                         f"{tuple(lp.shape)}")
    arr = _host(lib, idx)
    if arr is not None and arr.size:
        k = arr.shape[-1]
        flat = arr.reshape(-1, k)
        bad = (flat < 0) | (flat >= nclass)
        if bad.any():
            raise ValueError(f"teacher_topk indices: {int(flat[bad][0])} is out of range [0, {nclass})")
        srt = np.sort(flat, axis=-1)
        if k > 1 and (srt[:, 1:] == srt[:, :-1]).any():
            row = int(np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(-1))[0])
            raise ValueError(f"teacher_topk indices: row {row} repeats a class; the k classes must be distinct")
    return ("topk", idx, lp)


def validate_linear_head(lib: str, hidden: Any, linear_weight: Any, labels: Any, *, linear_bias: Any,
                         outputs: Any, temperature: Any, softcap: Any, weight: Any, ignore_index: Any,
                         label_smoothing: Any, reduction: Any, z_loss: Any, num_items_in_batch: Any,
                         teacher_hidden: Any, teacher_weight: Any, teacher_bias: Any, teacher_logits: Any,
                         teacher_topk: Any, divergence: Any, beta: Any, teacher_temperature: Any,
                         chunk_size: Any) -> HeadArgs:
    """Check every argument of :func:`linear_head` before any work."""
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs: expected a tuple of names from {core_head.OUTPUTS}, got {outputs!r}")
    unknown = [o for o in outputs if o not in core_head.OUTPUTS]
    if unknown or not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs: expected distinct names from {core_head.OUTPUTS}, got {tuple(outputs)!r}")
    outs = tuple(o for o in core_head.OUTPUTS if o in outputs)
    if labels is None and ("loss" in outs or "logprobs" in outs):
        raise ValueError(f"labels: outputs {outs} need labels ('loss' and 'logprobs' do)")
    # numbers.Real first: under torch.compile(dynamic=True) a float default is a symbolic float,
    # on which hasattr / math.isfinite would break the graph
    per_token = not isinstance(temperature, numbers.Real) and hasattr(temperature, "shape")
    chunk = validate_head(lib, hidden, linear_weight, labels, linear_bias, weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss, softcap=softcap,
                          temperature=1.0 if per_token else temperature, chunk_size=chunk_size)
    nclass = int(linear_weight.shape[0])
    lead = tuple(hidden.shape[:-1])
    temp = None
    if per_token:
        _check_per_token(lib, "temperature", temperature, lead)
        arr = _host(lib, temperature)
        if arr is not None and arr.size and not (np.isfinite(arr).all() and (arr > 0).all()):
            raise ValueError("temperature: expected finite values > 0 for every token, got "
                             f"{float(arr.reshape(-1)[np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))[0]])}")
        temp = temperature
    b, tt = divergence_options(divergence, beta, teacher_temperature)
    teacher = _check_teacher(lib, hidden, nclass, outs, teacher_hidden, teacher_weight, teacher_bias,
                             teacher_logits, teacher_topk)
    div = resolve_divergence(divergence, b, teacher)
    num_items = None
    if num_items_in_batch is not None:
        if "loss" not in outs or reduction != "mean":
            raise ValueError("num_items_in_batch: applies to the 'loss' output with reduction='mean', got "
                             f"outputs {outs} and reduction={reduction!r}")
        if isinstance(num_items_in_batch, (bool, np.bool_)):
            raise TypeError("num_items_in_batch: expected an int or a 0-d array, got a bool")
        if isinstance(num_items_in_batch, (int, np.integer, float, np.floating)):
            if not num_items_in_batch > 0:
                raise ValueError(f"num_items_in_batch: expected a value > 0, got {num_items_in_batch}")
            num_items = float(num_items_in_batch)
        elif hasattr(num_items_in_batch, "shape"):
            if tuple(num_items_in_batch.shape) != ():
                raise ValueError(f"num_items_in_batch: expected an int or a 0-d array, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
            arr = _host(lib, num_items_in_batch) if library_of(num_items_in_batch) == lib else None
            if library_of(num_items_in_batch) not in (lib, NUMPY):
                raise TypeError(f"num_items_in_batch: expected a {lib} array or an int, got a "
                                f"{library_of(num_items_in_batch)} array")
            if library_of(num_items_in_batch) == NUMPY:
                arr = np.asarray(num_items_in_batch, np.float64)
            if arr is not None:
                if not float(arr) > 0:
                    raise ValueError(f"num_items_in_batch: expected a value > 0, got {float(arr)}")
                num_items = float(arr)
            else:
                num_items = num_items_in_batch  # traced / on a device: divided as an array
        else:
            raise TypeError(f"num_items_in_batch: expected an int or a 0-d array, got "
                            f"{type(num_items_in_batch).__name__}")
    z = float(z_loss)
    spec = core_head.HeadSpec(outs, int(ignore_index), float(label_smoothing),
                              None if softcap is None else float(softcap),
                              1.0 if per_token else float(temperature), labels is not None,
                              "none" if teacher is None else ("topk" if teacher[0] == "topk" else "dense"),
                              div, b, tt, "loss" in outs and z != 0.0)
    if isinstance(chunk, tuple) and (outs != ("loss",) or temp is not None):
        core_head.plan_rows(1, nclass, 4, spec.teacher, chunk)  # raises for vocabulary tiles
    return HeadArgs(lib=lib, hidden=hidden, W=linear_weight, labels=labels, bias=linear_bias, temp=temp,
                    weight=weight, spec=spec, z_loss=z, reduction=reduction, num_items=num_items,
                    teacher=teacher, chunk_size=chunk, shape=lead)


def assemble_outputs(xp: Any, a: HeadArgs, vals: dict, labels_flat: Any) -> HeadOutput:
    """The :class:`HeadOutput` from per-row values ``(N,)`` (``ce, lse, lp, ent, kl, am``).

    The reduction runs here, in ``xp`` on whatever the bridge returned, so that the framework's
    autograd differentiates it (and the z-loss through ``lse``).
    """
    spec, shape, dtype = a.spec, a.shape, a.hidden.dtype
    res = {}
    if "loss" in spec.outputs:
        ce = vals["ce"]
        validf, wy = row_weights(xp, labels_flat, a.weight, spec.ignore_index, ce.dtype)
        lse = vals.get("lse", ce)
        if a.num_items is None:
            loss = reduce_loss(xp, ce, lse, validf, wy, a.reduction, a.z_loss)
        else:
            loss = reduce_loss(xp, ce, lse, validf, wy, "sum", a.z_loss) / a.num_items
        loss = loss.reshape(shape) if a.reduction == "none" else loss.reshape(())
        res["loss"] = xp.astype(loss, dtype)
    for name, key in (("logprobs", "lp"), ("entropy", "ent"), ("lse", "lse"), ("kl", "kl")):
        if name in spec.outputs:
            res[name] = xp.astype(vals[key], dtype).reshape(shape)
    if "argmax" in spec.outputs:
        res["argmax"] = vals["am"].reshape(shape)
    return HeadOutput(**res)


def linear_head(hidden: Any, linear_weight: Any, labels: Any = None, *, linear_bias: Any = None,
                outputs: Any = ("loss",), temperature: Any = 1.0, softcap: float | None = None,
                weight: Any = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                reduction: str = "mean", z_loss: float = 0.0, num_items_in_batch: Any = None,
                teacher_hidden: Any = None, teacher_weight: Any = None, teacher_bias: Any = None,
                teacher_logits: Any = None, teacher_topk: Any = None, divergence: str = "kl",
                beta: float = 0.5, teacher_temperature: float = 1.0, chunk_size: Any = None) -> HeadOutput:
    r"""Every output a language-model head needs, from one chunked pass over
    ``z = hidden @ linear_weight.T + linear_bias`` that never holds the ``(N, V)`` logits.

    With ``z`` softcapped then divided by ``temperature`` (a float, or one value per token),
    ``ls = log_softmax(z)`` and ``p = exp(ls)``, per token:

    * ``loss``: :func:`logitkit.cross_entropy` of ``z`` with every option, reduced per
      ``reduction``; ``num_items_in_batch`` makes ``"mean"`` the weighted sum (z-loss included)
      divided by it (Hugging Face's gradient-accumulation convention);
    * ``logprobs`` = ``ls[label]``, ``lse`` = logsumexp(z), ``entropy`` = :math:`-\sum_c p_c\,ls_c`,
      ``argmax`` = the predicted class (not differentiable);
    * ``kl``: against a teacher (a head ``teacher_hidden @ teacher_weight.T + teacher_bias``, its
      ``teacher_logits``, or ``teacher_topk = (indices, logprobs)``), teacher probabilities ``q``
      at ``teacher_temperature``: ``"kl"`` :math:`\sum q\,(\log q - ls)`, ``"reverse_kl"``
      :math:`\sum p\,(ls - \log q)`, ``"jsd"``
      :math:`\beta\,\mathrm{KL}(q\|M) + (1-\beta)\,\mathrm{KL}(p\|M)`, :math:`M = \beta q + (1-\beta) p`
      (TRL's GKD; beta=0 is ``"kl"``, beta=1 ``"reverse_kl"``). A top-k teacher is renormalized
      over its k (distinct) classes and the student is compared on those k classes plus one bucket
      for the rest (see :mod:`logitkit.core.linear_head` for the formula; the reverse KL is then
      infinite and refused). The softcap applies to the student only; no gradient reaches the teacher.

    Ignored tokens (``labels == ignore_index``) give 0 in every per-token field. Every output but
    ``argmax`` is differentiable (torch, JAX) with respect to ``hidden``, ``linear_weight`` and
    ``linear_bias``, any combination in one backward pass that recomputes the logits chunk by chunk.
    ``outputs=("loss",)`` with a scalar temperature is :func:`linear_cross_entropy` itself. When the
    cotangents are known before the call (a loss, an RL objective's per-token weights),
    :func:`linear_head_with_grad` returns the gradients from the same pass: three matrix products
    instead of autograd's four (the backward of per-token outputs recomputes the logits).

    Args:
      hidden: ``(..., H)`` floating. linear_weight: ``(V, H)``, same dtype. labels: ``(...)`` class
        indices or ``None`` (then only entropy / lse / argmax / kl).
      outputs: a tuple of names from ``("loss", "logprobs", "entropy", "lse", "argmax", "kl")``.
      chunk_size: ``None`` (a ~24 MB workspace) or tokens per chunk.

    Returns a :class:`HeadOutput` ``(loss, logprobs, entropy, lse, argmax, kl)``; fields not requested
    are ``None``, per-token fields have shape ``hidden.shape[:-1]`` and ``hidden``'s dtype.

    >>> import numpy as np, logitkit
    >>> h = np.eye(2, 3); W = np.array([[2.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    >>> out = logitkit.linear_head(h, W, np.array([0, 1]), outputs=("loss", "logprobs", "entropy"))
    >>> bool(np.allclose(out.logprobs, -logitkit.cross_entropy(h @ W.T, np.array([0, 1]), reduction="none")))
    True
    >>> bool(np.allclose(out.entropy, logitkit.entropy(h @ W.T))), out.kl is None
    (True, True)
    """
    lib, _ = namespace_of(hidden=hidden, linear_weight=linear_weight, labels=labels, linear_bias=linear_bias,
                          weight=weight, temperature=temperature, teacher_hidden=teacher_hidden,
                          teacher_weight=teacher_weight, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                          **_topk_arrays(teacher_topk))
    a = validate_linear_head(lib, hidden, linear_weight, labels, linear_bias=linear_bias, outputs=outputs,
                             temperature=temperature, softcap=softcap, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                             num_items_in_batch=num_items_in_batch, teacher_hidden=teacher_hidden,
                             teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                             teacher_logits=teacher_logits, teacher_topk=teacher_topk, divergence=divergence,
                             beta=beta, teacher_temperature=teacher_temperature, chunk_size=chunk_size)
    if a.spec.outputs == ("loss",) and a.temp is None:
        # Loss alone: the linear cross-entropy driver (numba kernels, gradients during forward).
        red = "sum" if a.num_items is not None else reduction
        loss = linear_cross_entropy(hidden, linear_weight, labels, linear_bias=linear_bias, weight=weight,
                                    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=red,
                                    z_loss=z_loss, softcap=softcap, temperature=temperature,
                                    chunk_size=chunk_size)
        return HeadOutput(loss=loss if a.num_items is None else loss / a.num_items)
    if lib != NUMPY:
        return _head_adapter(lib).fused_linear_head(a)
    return _numpy_linear_head(a)


def _topk_arrays(teacher_topk: Any) -> dict:
    if isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2:
        return {"teacher_topk indices": teacher_topk[0], "teacher_topk logprobs": teacher_topk[1]}
    return {}


def _numpy_run(a: HeadArgs) -> tuple[Any, Any]:
    H = a.hidden.shape[-1]
    h2 = np.ascontiguousarray(a.hidden).reshape(math.prod(a.hidden.shape[:-1]), H)  # H may be 0
    W = np.ascontiguousarray(a.W)
    N = h2.shape[0]
    lab = None if a.labels is None else np.ascontiguousarray(a.labels).reshape(-1).astype(np.int64, copy=False)
    temp = None if a.temp is None else np.asarray(a.temp).reshape(-1).astype(np.float64)
    ops = core.NumpyOps(h2, W, a.bias)
    teacher, tops = None, None
    if a.teacher is not None:
        kind = a.teacher[0]
        if kind == "head":
            th = np.ascontiguousarray(a.teacher[1]).reshape(N, -1)
            tops = core.NumpyOps(th, np.ascontiguousarray(a.teacher[2]), a.teacher[3])
            teacher = ("head", th)
        elif kind == "logits":
            teacher = ("logits", np.asarray(a.teacher[1]).reshape(N, -1))
        else:
            k = a.teacher[1].shape[-1]
            teacher = ("topk", np.asarray(a.teacher[1]).reshape(N, k).astype(np.int64),
                       np.asarray(a.teacher[2]).reshape(N, k))
    run = core_head.HeadRun(ops, h2, W, lab, temp, a.weight, a.spec, teacher, tops, a.chunk_size)
    return run, lab


def _numpy_linear_head(a: HeadArgs) -> HeadOutput:
    run, lab = _numpy_run(a)
    rows = run.forward()
    vals = dict(rows)
    valid = np.ones(run.N, bool) if lab is None else lab != a.spec.ignore_index
    vals["lse"] = np.where(valid, rows["m"] + rows["r"], 0.0)
    return assemble_outputs(np, a, vals, lab if lab is not None else np.zeros(run.N, np.int64))


# ----------------------------------------------------------------------------------------------
# the fused head with its gradients in the same pass (cotangents known before the logits)


_HEAD_DEFAULTS = dict(linear_bias=None, outputs=("loss",), temperature=1.0, softcap=None, weight=None,
                      ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0,
                      num_items_in_batch=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                      teacher_logits=None, teacher_topk=None, divergence="kl", beta=0.5, teacher_temperature=1.0,
                      chunk_size=None)


def linear_head_with_grad(hidden: Any, linear_weight: Any, labels: Any = None, *, grad_outputs: Any = None,
                          **kwargs: Any) -> tuple[HeadOutput, Any, Any, Any]:
    r"""``(HeadOutput, dhidden, dlinear_weight, dlinear_bias)``: :func:`linear_head` and the
    gradients of ``Σ_k <grad_outputs[k], output_k>`` from the same chunked pass.

    When the cotangents are known before the logits (a loss's ``grad_output``, an RL objective's
    per-token advantages and entropy coefficient, a distillation weight), every chunk's logits are
    turned into their gradient in place right after its statistics, so the head costs the three
    matrix products of forward + backward (four with a teacher head): no logits are recomputed.
    On the CPU (float32 / float64, no softcap; no teacher or a dense teacher, any divergence) that
    is one numba pass per chunk; other cases compute the values first and
    the gradients in a second pass (the logits recomputed), with the same results.

    Args:
      hidden, linear_weight, labels, and every keyword of :func:`linear_head` (``outputs``,
        ``reduction``, ``temperature``, teachers, ``chunk_size``, ...). NumPy arrays or torch
        tensors (no autograd: the gradients are returned, in ``hidden``'s library).
      grad_outputs: a dict from names of requested differentiable outputs (``"loss"``,
        ``"logprobs"``, ``"entropy"``, ``"lse"``, ``"kl"``) to their cotangents: a scalar for a
        reduced loss, a scalar or ``hidden.shape[:-1]`` values for per-token outputs (and for the
        loss with ``reduction="none"``). Names not given get no gradient. Default
        ``{"loss": 1.0}`` (when ``"loss"`` is requested).

    Returns the :class:`HeadOutput`, ``dhidden`` (``hidden``'s shape and dtype), ``dlinear_weight``
    and ``dlinear_bias`` (``None`` without a bias). No gradient reaches a teacher.

    >>> import numpy as np, logitkit.linear as L
    >>> h = np.eye(2, 3); W = np.array([[2.0, 0, 0], [0, 1, 0], [0, 0, 0]]); y = np.array([0, 1])
    >>> out, dh, dW, db = L.linear_head_with_grad(h, W, y, outputs=("loss", "entropy"),
    ...                                           grad_outputs={"loss": 1.0, "entropy": -0.01})
    >>> dh.shape, dW.shape, db is None
    ((2, 3), (3, 3), True)
    """
    unknown = sorted(set(kwargs) - set(_HEAD_DEFAULTS))
    if unknown:
        raise TypeError(f"linear_head_with_grad() got unexpected keyword arguments {unknown}")
    kw = dict(_HEAD_DEFAULTS, **kwargs)
    teacher_topk = kw["teacher_topk"]
    lib, _ = namespace_of(hidden=hidden, linear_weight=linear_weight, labels=labels, linear_bias=kw["linear_bias"],
                          weight=kw["weight"], temperature=kw["temperature"], teacher_hidden=kw["teacher_hidden"],
                          teacher_weight=kw["teacher_weight"], teacher_bias=kw["teacher_bias"],
                          teacher_logits=kw["teacher_logits"], **_topk_arrays(teacher_topk))
    if lib not in (NUMPY, TORCH):
        raise TypeError(f"hidden: linear_head_with_grad takes NumPy arrays or torch tensors, got {lib} arrays; "
                        "use linear_head with the framework's autograd")
    a = validate_linear_head(lib, hidden, linear_weight, labels, **kw)
    if grad_outputs is None:
        grad_outputs = {"loss": 1.0} if "loss" in a.spec.outputs else {}
    if not isinstance(grad_outputs, dict):
        raise TypeError(f"grad_outputs: expected a dict from output names to cotangents, got "
                        f"{type(grad_outputs).__name__}")
    bad = [k for k in grad_outputs if k not in core_head.DIFFERENTIABLE or k not in a.spec.outputs]
    if bad:
        raise ValueError(f"grad_outputs: {bad[0]!r} is not a requested differentiable output (requested: "
                         f"{a.spec.outputs}; differentiable: {core_head.DIFFERENTIABLE})")
    if lib == TORCH:
        import torch

        with torch.no_grad():
            return _head_with_grad(a, grad_outputs)
    return _head_with_grad(a, grad_outputs)


def _cotangent(name: str, g: Any, shape: tuple, per_token: bool) -> np.ndarray:
    """A cotangent as float64 ``(N,)`` (per-token) or a float (reduced loss)."""
    if hasattr(g, "detach"):
        g = g.detach().cpu().double().numpy()
    arr = np.asarray(g)
    if not (is_floating(arr.dtype) or is_integer(arr.dtype)):
        raise TypeError(f"grad_outputs[{name!r}]: expected real numbers, got {arr.dtype}")
    if not per_token:
        if arr.ndim:
            raise ValueError(f"grad_outputs[{name!r}]: expected a scalar for a reduced loss, got shape {arr.shape}")
        return float(arr)
    if arr.ndim and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"grad_outputs[{name!r}]: expected a scalar or shape {tuple(shape)}, got {arr.shape}")
    return np.broadcast_to(arr.astype(np.float64), shape).reshape(-1).copy()


def _head_with_grad(a: HeadArgs, grad_outputs: dict) -> tuple:
    from .core.reduction import row_scales

    spec, N = a.spec, math.prod(a.shape)
    if a.lib == TORCH:
        from .torch import head as th

        run, lab, xp = th.with_grad_run(a)
        lab_np = None if lab is None else lab.detach().cpu().numpy()
    else:
        run, lab = _numpy_run(a)
        lab_np, xp = lab, np
    cots = {}
    if "loss" in grad_outputs:
        red = a.reduction
        go = _cotangent("loss", grad_outputs["loss"], a.shape, red == "none")
        w = None if a.weight is None else np.asarray(core_head._np(a.weight), np.float64)
        validf, wy = row_weights(np, lab_np, w, spec.ignore_index, np.float64)
        if a.num_items is not None:
            g_ce = g_z = validf * (go / float(a.num_items))
        else:
            g_ce, g_z = row_scales(np, validf, wy, red, go)
        cots["g_ce"] = g_ce
        if a.z_loss:
            cots["g_sq"] = g_z * a.z_loss
    for name, key in (("logprobs", "g_lp"), ("entropy", "g_ent"), ("lse", "g_lse"), ("kl", "g_kl")):
        if name in grad_outputs:
            cots[key] = _cotangent(name, grad_outputs[name], a.shape, True)
    if a.lib == TORCH:
        import torch

        cots = {k: torch.from_numpy(np.ascontiguousarray(v)).to(a.hidden.device) for k, v in cots.items()}
    has_bias = a.bias is not None
    need = (True, True, has_bias)
    if run.fast:
        rows, (dh, dw, db) = run.forward_backward(cots, need, has_bias)
    else:
        rows = run.forward()
        if "g_sq" in cots:  # d(g lse²) = 2 g lse d lse
            g_sq = cots.pop("g_sq")
            extra = 2.0 * g_sq * xp.astype(rows["m"] + rows["r"], g_sq.dtype)
            cots["g_lse"] = extra if "g_lse" not in cots else cots["g_lse"] + extra
        dh, dw, db = run.backward(rows, cots, need, has_bias)
    vals = dict(rows)
    lse = rows["m"] + rows["r"]
    vals["lse"] = lse if lab is None else xp.where(lab != spec.ignore_index, lse, 0.0)
    lab_flat = lab if lab is not None else xp.zeros((N,), dtype=xp.int64)
    out = assemble_outputs(xp, a, vals, lab_flat)
    dh = xp.astype(dh, a.hidden.dtype).reshape(tuple(a.hidden.shape))
    dw = xp.astype(dw, a.W.dtype)
    db = None if db is None else xp.astype(db, a.bias.dtype)
    return out, dh, dw, db


# TensorFlow tensors and variables: the bridge reads variables (so that a tape sees the read)
# and calls these functions back; torch, JAX and NumPy calls pass straight through.
from .functional import _tensorflow_entry  # noqa: E402

for _name in ("linear_cross_entropy", "linear_token_logprobs", "linear_entropy", "linear_head"):
    globals()[_name] = _tensorflow_entry(globals()[_name])
del _name
