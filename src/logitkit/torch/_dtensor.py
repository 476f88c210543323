r"""DTensor and FSDP2 inputs of ``logitkit.torch``'s losses, and global loss normalization.

What each placement means here, per mesh dimension (a plain tensor counts as ``Replicate()``):

* head weight ``Shard(0)`` (``ColwiseParallel``) with replicated hidden states and labels: the
  vocabulary is split over that mesh dimension; the exact loss comes from
  :func:`logitkit.distributed.vocab_parallel_linear_cross_entropy` over ``mesh.get_group(dim)``,
  with no gather of the weight or the logits. Hidden states sharded on a token dim of that same mesh
  dimension (sequence parallelism before the head) are all-gathered there first, as
  ``ColwiseParallel(input_layouts=Shard(d))`` does. Logits ``Shard(class dim)`` (``ColwiseParallel(
  use_local_output=False)``) likewise go to :func:`~logitkit.distributed.vocab_parallel_cross_entropy`.
* hidden states / logits and labels ``Shard(d)`` on a token dimension (data or sequence parallel),
  weight replicated: local per-token losses; ``"mean"`` divides by the *global* count (``Σ w_y``,
  all-reduced) or by ``num_items_in_batch``.
* everything ``Replicate()``: the local computation.

Outputs are DTensors on the same mesh: a scalar loss ``Replicate()`` on every mesh dimension (the
global value on every rank; token dimensions cost one scalar all-reduce), a ``reduction="none"``
loss ``Shard(d)`` on token dimensions and ``Replicate()`` elsewhere. Gradients carry the
placements DTensor's own ops would give: the weight's gradient is ``Partial()`` on token
dimensions (each rank's tokens contribute their part), the hidden states' ``Partial()`` on the
vocabulary dimension. Anything else (``Partial`` inputs, a sharded hidden size, the vocabulary
split over two mesh dimensions, labels sharded where the hidden states are not) raises an error
that names the argument, the placement and the mesh dimension.

FSDP2: a ``fully_shard``-ed parameter is a DTensor ``Shard(0)`` outside its module's forward, but
that is data-parallel storage, not a vocabulary split (each rank holds different tokens). Such a
weight (recognised through FSDP's own state, not its placement) is all-gathered, FSDP's contract,
and its gradient reduce-scattered with FSDP's averaging (``Partial("avg")``, or
``set_gradient_divide_factor``'s factor). Inside the module's forward, or after
``module.unshard()``, FSDP hands over the plain unsharded parameter and does all of that itself.

Detection is an ``isinstance`` against ``torch.distributed.tensor.DTensor`` only when that module
is already imported (no DTensor can exist otherwise), so ordinary calls pay a dict lookup.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

import torch
from torch import Tensor

from .._namespace import TORCH

__all__ = ["is_dtensor", "cross_entropy", "linear_cross_entropy", "linear_head", "global_num_items",
           "check_num_items"]


_DTENSOR: list = [None]  # the DTensor class, once torch.distributed.tensor has been imported by someone
_PLAIN = (Tensor, torch.nn.Parameter, type(None))


def is_dtensor(*xs: Any) -> bool:
    """True when any argument is a DTensor (``torch.distributed.tensor`` is never imported here).

    Exact type checks first: ``isinstance`` against DTensor costs ~0.3 µs an argument, and this
    runs at the entry of every call.
    """
    D = _DTENSOR[0]
    if D is None:
        mod = sys.modules.get("torch.distributed.tensor")
        if mod is None:
            return False
        D = _DTENSOR[0] = mod.DTensor
    for x in xs:
        t = type(x)
        if t in _PLAIN:
            continue
        if t is D or issubclass(t, D):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# num_items_in_batch (Hugging Face's meaning): "mean" = weighted sum / num_items_in_batch


def check_num_items(num_items_in_batch: Any, reduction: str) -> Any:
    """A validated divisor: a float, or a 0-d tensor (read on the host only for CPU tensors)."""
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch: applies to reduction='mean', got reduction={reduction!r}")
    n = num_items_in_batch
    if is_dtensor(n):
        n = n.full_tensor()
    if isinstance(n, bool):
        raise TypeError("num_items_in_batch: expected an int or a 0-d tensor, got a bool")
    if isinstance(n, (int, float)):
        if not n > 0:
            raise ValueError(f"num_items_in_batch: expected a value > 0, got {n}")
        return float(n)
    if isinstance(n, Tensor):
        if n.ndim != 0:
            raise ValueError(f"num_items_in_batch: expected an int or a 0-d tensor, got shape {tuple(n.shape)}")
        if n.dtype == torch.bool:
            raise TypeError("num_items_in_batch: expected an int or a 0-d tensor, got a bool tensor")
        if n.device.type == "cpu" and not torch.compiler.is_compiling():
            if not float(n) > 0:
                raise ValueError(f"num_items_in_batch: expected a value > 0, got {float(n)}")
            return float(n)
        return n  # on a device: divided as a tensor, never read on the host
    raise TypeError(f"num_items_in_batch: expected an int or a 0-d tensor, got {type(n).__name__}")


def _divide(loss: Tensor, n: Any) -> Tensor:
    if isinstance(n, Tensor):
        return loss / n.to(device=loss.device, dtype=loss.dtype)
    return loss / n


def global_num_items(labels_microbatches: Any, ignore_index: int = -100, group: Any = None, *,
                     weight: Optional[Tensor] = None) -> Tensor:
    r"""The ``num_items_in_batch`` of one optimizer step: non-ignored labels over every micro-batch
    and every data-parallel rank, from one all-reduce (call it before the accumulation steps).

    ``count = Σ_ranks Σ_micro-batches Σ_tokens [label ≠ ignore_index]`` (with ``weight``, the class
    weights ``Σ w_label`` instead, which makes a class-weighted ``"mean"`` exact too). Pass each
    micro-batch's loss ``num_items_in_batch=count``: the sum of the G micro-batch losses of the P
    ranks is then the loss of the one big batch, and so are its gradients, **summed** over ranks.
    DDP and FSDP2 *average* gradients over ranks (divide by P), so with them multiply each loss
    by the data-parallel world size, as Hugging Face's Trainer does (``average_tokens_across_devices``),
    or set FSDP2's ``set_gradient_divide_factor(1.0)``. DTensor inputs sharded over the tokens need
    no factor: their gradients are ``Partial()`` sums.

    Args:
      labels_microbatches: one label tensor or a sequence of them (any shapes).
      group: the data-parallel process group for plain tensors (``None``: the default group, or
        no all-reduce when ``torch.distributed`` is not initialized). DTensor labels are summed
        over the mesh dimensions they are sharded on, and ``group`` must be ``None``.

    Returns a 0-d tensor on the labels' device (int64; float64 with ``weight``), the same on every rank.

    >>> import torch, logitkit.torch as lt
    >>> lt.global_num_items([torch.tensor([1, -100, 3]), torch.tensor([[0, 2], [-100, -100]])])
    tensor(4)
    """
    mbs = list(labels_microbatches) if isinstance(labels_microbatches, (list, tuple)) else [labels_microbatches]
    if not mbs:
        raise ValueError("labels_microbatches: expected at least one label tensor, got none")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    dt = [is_dtensor(y) for y in mbs]
    if any(dt) and not all(dt):
        raise TypeError("labels_microbatches: mixes DTensors and plain tensors; pass all of one kind")
    mesh, placements = None, None
    if all(dt):
        if group is not None:
            raise ValueError("group: must be None for DTensor labels (they are summed over the mesh dimensions "
                             "they are sharded on)")
        mesh, placements = mbs[0].device_mesh, tuple(mbs[0].placements)
        for k, y in enumerate(mbs):
            if y.device_mesh != mesh or tuple(y.placements) != placements:
                raise ValueError(f"labels_microbatches[{k}]: placements {tuple(y.placements)} differ from "
                                 f"labels_microbatches[0]'s {placements}")
        mbs = [y.to_local() for y in mbs]
    w = None
    if weight is not None:
        w = weight.full_tensor() if is_dtensor(weight) else weight
        w = w.detach().to(torch.float64)
    total = None
    for k, y in enumerate(mbs):
        if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"labels_microbatches[{k}]: expected an integer tensor of class indices, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        valid = y != ignore_index
        if w is None:
            c = valid.sum()
        else:
            lab = torch.where(valid & (y >= 0) & (y < w.shape[0]), y, 0)
            c = torch.where(valid, w.to(y.device)[lab], 0.0).sum()
        total = c if total is None else total + c.to(total.device)
    total = total.to(torch.float64 if w is not None else torch.int64)
    dist = torch.distributed
    if mesh is not None:
        for i, p in enumerate(placements):
            if p.is_shard():
                dist.all_reduce(total, group=mesh.get_group(i))
            elif p.is_partial():
                raise ValueError(f"labels_microbatches: Partial placement on mesh dim {_dim_name(mesh, i)} is "
                                 "not supported for labels")
    elif dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    elif group is not None:
        raise ValueError("group: a process group was given but torch.distributed is not initialized")
    return total


# ----------------------------------------------------------------------------------------------
# placements


def _dt():
    import torch.distributed.tensor as dt

    return dt


def _pn(p: Any) -> str:
    """A placement as its constructor reads: ``Shard(0)``, ``Replicate()``, ``Partial(sum)``."""
    if p.is_replicate():
        return "Replicate()"
    if p.is_partial():
        return f"Partial({getattr(p, 'reduce_op', '')})"
    if type(p) is _dt().Shard:
        return f"Shard({p.dim})"
    return repr(p)


def _dim_name(mesh: Any, i: int) -> str:
    names = getattr(mesh, "mesh_dim_names", None)
    return f"{i} ({names[i]!r})" if names else str(i)


def _mesh(named: list) -> Any:
    D = _dt().DTensor
    mesh, first = None, None
    for name, t in named:
        if isinstance(t, D):
            if mesh is None:
                mesh, first = t.device_mesh, name
            elif t.device_mesh != mesh:
                raise ValueError(f"{name}: is on the device mesh {t.device_mesh}, {first} on {mesh}; every DTensor "
                                 "argument must be on the same mesh")
    return mesh


def _shard_dim(name: str, t: Any, mesh: Any, i: int) -> Optional[int]:
    """``None`` for Replicate (or a plain tensor), the tensor dim for Shard; refuses the rest."""
    if not isinstance(t, _dt().DTensor):
        return None
    p = t.placements[i]
    if p.is_replicate():
        return None
    if p.is_partial():
        raise ValueError(f"{name}: placement {_pn(p)} on mesh dim {_dim_name(mesh, i)} is a pending reduction, not "
                         f"supported; redistribute {name} to Replicate() or Shard() first")
    if type(p) is not _dt().Shard:
        raise NotImplementedError(f"{name}: placement {_pn(p)} on mesh dim {_dim_name(mesh, i)} is not supported "
                                  "(only Shard(d) and Replicate())")
    return p.dim % max(t.ndim, 1)


def _local(t: Any, grad_placements: Any = None) -> Any:
    if isinstance(t, _dt().DTensor):
        return t.to_local(grad_placements=grad_placements)
    return t


def _replicated(name: str, t: Any, mesh: Any) -> Any:
    """A tensor every rank holds whole (class weights): Replicate on every mesh dim, or plain."""
    if t is None or not isinstance(t, _dt().DTensor):
        return t
    for i in range(mesh.ndim):
        if _shard_dim(name, t, mesh, i) is not None:
            raise ValueError(f"{name}: expected the global class weights replicated, got {_pn(t.placements[i])} on mesh "
                             f"dim {_dim_name(mesh, i)}")
    return t.to_local().detach()


class _Layout:
    """Per mesh dimension: which one splits the vocabulary, which split the tokens."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.vocab: Optional[int] = None
        self.tokens: dict = {}  # mesh dim -> tensor dim of the labels that it shards
        self.gather: dict = {}  # vocabulary mesh dim -> whether target is gathered too (sequence parallel)

    def placements(self, token: bool) -> list:
        dt = _dt()
        return [dt.Shard(self.tokens[i]) if token and i in self.tokens else dt.Replicate()
                for i in range(self.mesh.ndim)]


def _vocab_start(mesh: Any, i: int, V: int, n: int, name: str) -> int:
    """First class of this rank's shard: DTensor's ``Shard`` splits as ``torch.chunk`` does."""
    P, r = mesh.size(i), mesh.get_local_rank(i)
    full = -(-V // P) if V else 0
    start = min(full * r, V)
    if n != max(0, min(full, V - start)):
        raise ValueError(f"{name}: local shard of {n} classes on mesh dim {_dim_name(mesh, i)} does not match "
                         f"torch.chunk's split of {V} classes over {P} ranks")
    return start


# ----------------------------------------------------------------------------------------------
# the reduction over token-sharded mesh dimensions


def _row_stats(labels: Tensor, weight: Optional[Tensor], ignore_index: int, kind: str) -> Tensor:
    """``[Σ w_y, count]`` of this rank's rows in float64 (probability targets: rows, rows)."""
    if kind == "prob":
        rows = float(math.prod(labels.shape[:-1])) if labels.ndim else 1.0
        return torch.tensor([rows, rows], dtype=torch.float64, device=labels.device)
    valid = labels != ignore_index
    c = valid.sum(dtype=torch.float64)
    if weight is None:
        return torch.stack([c, c])
    w = weight.to(device=labels.device, dtype=torch.float64)
    lab = torch.where(valid & (labels >= 0) & (labels < w.shape[0]), labels, 0)
    return torch.stack([torch.where(valid, w[lab], 0.0).sum(), c])


def _contiguous_stride(shape: tuple) -> tuple:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _reduce(lay: _Layout, call: Any, *, reduction: str, z_loss: float, num_items: Any, check: Any,
            stats: Any, out_shape: tuple, device: Any, smoothing: float) -> Tensor:
    """The loss DTensor from ``call(reduction, z_loss) -> local loss`` (see the module docstring)."""
    dt = _dt()
    mesh = lay.mesh
    # Without a reduction over token dims the local call checks its arguments itself (the
    # vocabulary-parallel one on every rank of its group at once), and no other collective follows.
    if reduction == "none":
        loc = call("none", z_loss)
        return dt.DTensor.from_local(loc, mesh, lay.placements(True), run_check=False, shape=torch.Size(out_shape),
                                     stride=_contiguous_stride(tuple(out_shape)))
    if not lay.tokens:
        loc = call(reduction, z_loss) if num_items is None else _divide(call("sum", z_loss), num_items)
        return dt.DTensor.from_local(loc, mesh, lay.placements(False), run_check=False)
    # Tokens are split: one small all-reduce of [Σ w_y, count, error] before any other collective,
    # so that a rank whose labels are bad makes every rank raise instead of leaving them waiting.
    err = None
    try:
        check()
        buf = torch.cat([stats(), torch.zeros(1, dtype=torch.float64, device=device)])
    except (TypeError, ValueError) as exc:
        err = exc
        buf = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    for i in sorted(lay.tokens):
        torch.distributed.all_reduce(buf, group=mesh.get_group(i))
    wsum, count, bad = buf.tolist()
    if bad:
        if err is not None:
            raise err
        raise ValueError(f"{int(bad)} other rank(s) of the token-sharded mesh dims failed their argument checks "
                         "(see their error)")
    if reduction == "sum":
        loc = call("sum", z_loss)
    elif num_items is not None:
        loc = _divide(call("sum", z_loss), num_items)
    elif wsum == 0 and count != 0 and z_loss != 0.0:
        # every counted row has class weight 0: the cross-entropy part is dropped (1/Σ w_y := 0) and
        # the z-loss part stays, which one "sum" call separates only without smoothing (Σ w·ce = 0)
        if smoothing:
            raise NotImplementedError("weight: class weights that are 0 for every label in the batch, with "
                                      "label_smoothing and z_loss, are not supported with token-sharded DTensors")
        loc = call("sum", z_loss) / count
    else:
        # mean = Σ w·ce / Σ w_y + z·Σ lse² / count = (Σ w·ce + z·(Σ w_y / count)·Σ lse²) / Σ w_y
        z = z_loss if (z_loss == 0.0 or wsum == count or count == 0) else z_loss * wsum / count
        s = call("sum", z)
        loc = s / wsum if wsum != 0 else s * 0.0  # a mean over nothing is 0 with a zero gradient
    part = dt.DTensor.from_local(loc, mesh, [dt.Partial() if i in lay.tokens else dt.Replicate()
                                             for i in range(mesh.ndim)], run_check=False)
    return part.redistribute(mesh, [dt.Replicate()] * mesh.ndim)


# ----------------------------------------------------------------------------------------------
# cross_entropy on DTensor logits


def cross_entropy(input: Any, target: Any, weight: Any = None, size_average: Any = None, ignore_index: int = -100,
                  reduce: Any = None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  z_loss: float = 0.0, softcap: Optional[float] = None, temperature: float = 1.0,
                  return_lse: bool = False, inplace_backward: bool = False,
                  num_items_in_batch: Any = None) -> Any:
    """:func:`logitkit.torch.cross_entropy` of DTensor logits (class dim 1, as torch)."""
    from ..distributed import vocab_parallel_cross_entropy
    from . import _functional

    if size_average is not None or reduce is not None:
        reduction = _functional.legacy_reduction(size_average, reduce)
    if not is_dtensor(input, target, weight):
        # plain tensors with num_items_in_batch: the sum, divided
        n = check_num_items(num_items_in_batch, reduction)
        res = _functional.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction="sum",
                                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                        temperature=temperature, return_lse=return_lse,
                                        inplace_backward=inplace_backward)
        return (_divide(res[0], n), res[1]) if return_lse else _divide(res, n)
    if return_lse or inplace_backward:
        raise NotImplementedError(f"{'return_lse' if return_lse else 'inplace_backward'}: not supported with "
                                  "DTensor inputs")
    mesh = _mesh([("input", input), ("target", target), ("weight", weight)])
    D = _dt().DTensor
    if not isinstance(input, D):
        raise TypeError(f"input: expected a DTensor when target or weight is one, got {type(input).__name__}")
    cdim = 1 if input.ndim > 1 else 0
    prob = target.is_floating_point()
    kind = "prob" if prob else "index"
    lay = _Layout(mesh)
    for i in range(mesh.ndim):
        dx, dy = _shard_dim("input", input, mesh, i), _shard_dim("target", target, mesh, i)
        if dx == cdim:
            if prob:
                raise NotImplementedError(f"target: probability targets with input sharded on the class dim "
                                          f"(Shard({cdim}) on mesh dim {_dim_name(mesh, i)}) are not supported")
            if dy is not None:
                raise ValueError(f"target: {_pn(target.placements[i])} on mesh dim {_dim_name(mesh, i)}, where input is "
                                 f"sharded on the class dim: expected Replicate() (every rank of that dim holds "
                                 f"the same tokens)")
            if lay.vocab is not None:
                raise NotImplementedError(f"input: the class dim is sharded over two mesh dims "
                                          f"({_dim_name(mesh, lay.vocab)} and {_dim_name(mesh, i)}), not supported")
            lay.vocab = i
        elif dx is None:
            if dy is not None:
                raise ValueError(f"target: {_pn(target.placements[i])} on mesh dim {_dim_name(mesh, i)} where input is "
                                 f"Replicate(): shard both alike")
        else:
            want = dx if (prob or dx < cdim) else dx - 1  # index targets have no class dim
            if dy != want:
                got = "a plain tensor (Replicate())" if not isinstance(target, D) else _pn(target.placements[i])
                raise ValueError(f"target: {got} on mesh dim {_dim_name(mesh, i)}, where input is Shard({dx}): "
                                 f"expected Shard({want}) (the same tokens)")
            lay.tokens[i] = want
    w = _replicated("weight", weight, mesh)
    x = input.to_local()  # its gradient has input's placements: the local slice of the full gradient
    y = target.to_local() if isinstance(target, D) else target
    C = input.shape[cdim]
    num_items = None if num_items_in_batch is None else check_num_items(num_items_in_batch, reduction)

    def check() -> None:
        from .. import _validate

        if not prob and isinstance(ignore_index, int):
            _validate.check_label_range(TORCH, y, C, ignore_index, name="target")

    if lay.vocab is not None:
        i = lay.vocab
        start = _vocab_start(mesh, i, C, x.shape[cdim], "input")
        xl = x if cdim == x.ndim - 1 else x.movedim(cdim, -1)

        def call(red: str, z: float) -> Tensor:
            return vocab_parallel_cross_entropy(xl, y, group=mesh.get_group(i), vocab_start=start, weight=w,
                                                ignore_index=ignore_index, label_smoothing=label_smoothing,
                                                reduction=red, z_loss=z, softcap=softcap, temperature=temperature)
    else:
        def call(red: str, z: float) -> Tensor:
            return _functional.cross_entropy(x, y, w, ignore_index=ignore_index, reduction=red,
                                             label_smoothing=label_smoothing, z_loss=z, softcap=softcap,
                                             temperature=temperature)

    out_shape = tuple(target.shape) if not prob else tuple(s for k, s in enumerate(input.shape) if k != cdim)
    ystat = y if not prob else (y if cdim == y.ndim - 1 else y.movedim(cdim, -1))
    return _reduce(lay, call, reduction=reduction, z_loss=float(z_loss), num_items=num_items, check=check,
                   stats=lambda: _row_stats(ystat, w, ignore_index, kind), out_shape=out_shape, device=x.device,
                   smoothing=float(label_smoothing))


# ----------------------------------------------------------------------------------------------
# the linear head: hidden states and a (possibly vocabulary-sharded, possibly FSDP) weight


def _fsdp_group(W: Any) -> Any:
    """The FSDP2 parameter group whose sharded parameter ``W`` is, else ``None``."""
    cs = sys.modules.get("torch.distributed._composable_state")
    if cs is None or "torch.distributed.fsdp" not in sys.modules:
        return None
    for ref in list(getattr(cs, "_module_state_mapping", {}).values()):
        st = ref() if callable(ref) else ref
        for g in getattr(st, "_fsdp_param_groups", None) or ():
            for fp in getattr(g, "fsdp_params", ()):
                if getattr(fp, "sharded_param", None) is W:
                    return g
    return None


def _gather_fsdp(W: Any, g: Any, name: str) -> Tensor:
    """FSDP's contract outside forward: the full weight, its gradient reduce-scattered and averaged."""
    dt = _dt()
    mesh = W.device_mesh
    for i, p in enumerate(W.placements):
        if not (p.is_replicate() or type(p) is dt.Shard):
            raise NotImplementedError(f"{name}: an FSDP2 parameter with placement {_pn(p)} on mesh dim {_dim_name(mesh, i)} "
                                      "(FSDP combined with tensor parallelism) is not supported outside the module's "
                                      "forward; call inside the FSDP module's forward or after module.unshard()")
    factor = getattr(g, "gradient_divide_factor", None)
    red = "sum" if factor is not None else "avg"
    full = W.redistribute(mesh, [dt.Replicate()] * mesh.ndim).to_local(
        grad_placements=[dt.Partial(red)] * mesh.ndim)
    if factor is not None and full.requires_grad:
        full.register_hook(lambda grad: grad / factor)
    pdt = getattr(getattr(g, "mp_policy", None), "param_dtype", None)
    return full if pdt is None else full.to(pdt)


def _check_replicated(h: Tensor, group: Any, name: str, dim: str) -> None:
    """A plain ``hidden`` must be the same on every rank of the vocabulary dim (CPU: checked)."""
    if h.device.type != "cpu":
        return
    h2 = h.detach().reshape(-1, h.shape[-1] if h.ndim else 1)
    # a fingerprint that moves when rows or columns are permuted: row sums weighted by position, and
    # a matrix-vector product with position weights (in h's dtype: no float64 copy of h)
    r = torch.nan_to_num(h2.sum(-1, dtype=torch.float64))
    pos = torch.arange(1, r.shape[0] + 1, dtype=torch.float64)
    cw = torch.arange(1, h2.shape[1] + 1, dtype=h2.dtype) / max(h2.shape[1], 1)
    c = torch.nan_to_num(torch.mv(h2, cw).double()) if h2.numel() else r.new_zeros(1)
    f = torch.stack([r.sum(), (r * pos).sum(), (c * pos).sum()])
    buf = torch.cat([f, -f])
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(buf[:3], -buf[3:]):
        raise ValueError(f"{name}: a plain tensor that differs across the ranks of mesh dim {dim}, where linear_weight "
                         "is Shard(0) (vocabulary-parallel needs the same tokens on each of them); pass it as a "
                         "DTensor (Shard(0) for data-parallel tokens) or replicate it")


def _linear_layout(hidden: Any, W: Any, labels: Any, bias: Any, mesh: Any, labels_follow: bool = False) -> _Layout:
    D = _dt().DTensor
    lay = _Layout(mesh)
    last = hidden.ndim - 1
    for i in range(mesh.ndim):
        kh = _shard_dim("input", hidden, mesh, i)
        kw = _shard_dim("linear_weight", W, mesh, i)
        kb = _shard_dim("linear_bias", bias, mesh, i)
        kl = kh if labels_follow else _shard_dim("target", labels, mesh, i)
        where = f"on mesh dim {_dim_name(mesh, i)}"
        if kw is not None:
            if kw != 0:
                raise NotImplementedError(f"linear_weight: Shard({kw}) {where} shards the hidden size (RowwiseParallel); "
                                          "only Shard(0), the vocabulary (ColwiseParallel), is supported")
            if bias is not None and kb != 0:
                raise ValueError(f"linear_bias: expected Shard(0) {where}, as linear_weight, got "
                                 f"{_pn(bias.placements[i]) if isinstance(bias, D) else 'a plain tensor'}")
            if kh is not None:
                # sequence parallel before a ColwiseParallel head: all-gather input (and target) on this
                # dim, as ColwiseParallel(input_layouts=Shard(d)) does; the ranks then hold the same tokens
                if kh == last:
                    raise NotImplementedError(f"input: Shard({kh}) {where} shards the hidden size, not supported")
                if kl is not None and kl != kh:
                    raise ValueError(f"target: Shard({kl}) {where}, where input is Shard({kh}): expected Shard({kh}) "
                                     "or Replicate()")
                lay.gather[i] = kl is not None
            elif kl is not None:
                raise ValueError(f"target: Shard({kl}) {where}, where input is Replicate(): expected Replicate()")
            if lay.vocab is not None:
                raise NotImplementedError(f"linear_weight: the vocabulary is sharded over two mesh dims "
                                          f"({_dim_name(mesh, lay.vocab)} and {_dim_name(mesh, i)}), not supported")
            lay.vocab = i
            continue
        if kb is not None:
            raise ValueError(f"linear_bias: Shard({kb}) {where}, where linear_weight is Replicate()")
        if kh is None:
            if kl is not None:
                raise ValueError(f"target: Shard({kl}) {where}, where input is Replicate(): shard both alike")
            continue
        if kh == last:
            raise NotImplementedError(f"input: Shard({kh}) {where} shards the hidden size, not supported; "
                                      "redistribute it")
        if kl != kh:
            got = "a plain tensor (Replicate())" if not isinstance(labels, D) else _pn(labels.placements[i])
            raise ValueError(f"target: {got} {where}, where input is Shard({kh}): expected Shard({kh}) "
                             "(the same tokens)")
        lay.tokens[i] = kh
    return lay


def _no_plain_params(lay: _Layout, W: Any, bias: Any) -> None:
    """With tokens sharded, a plain head that requires grad would get one rank's part of its gradient."""
    if not lay.tokens:
        return
    D = _dt().DTensor
    for name, t in (("linear_weight", W), ("linear_bias", bias)):
        if t is not None and not isinstance(t, D) and t.requires_grad:
            raise ValueError(f"{name}: a plain tensor that requires grad, with input sharded over tokens on mesh dim "
                             f"{_dim_name(lay.mesh, min(lay.tokens))}: its gradient would hold this rank's part "
                             "only; pass it as a DTensor (Replicate(): its gradient is then Partial()), or pass "
                             "plain tensors throughout (data parallel with DDP / FSDP)")


def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = None, weight: Any = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         options: Any = None, z_loss: float = 0.0, softcap: Optional[float] = None,
                         temperature: float = 1.0, chunk_size: Any = None, num_items_in_batch: Any = None) -> Any:
    """:func:`logitkit.torch.linear_cross_entropy` with DTensor / FSDP2 arguments or ``num_items_in_batch``."""
    from . import linear as _lin

    kw = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
              z_loss=z_loss, softcap=softcap, temperature=temperature, chunk_size=chunk_size)
    if not is_dtensor(input, linear_weight, target, linear_bias, weight):
        # plain tensors with num_items_in_batch: the sum, divided
        n = check_num_items(num_items_in_batch, reduction)
        return _divide(_lin.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                                 reduction="sum", **kw), n)
    D = _dt().DTensor
    if isinstance(linear_weight, D):
        g = _fsdp_group(linear_weight)
        if g is not None:
            for name, t in (("input", input), ("target", target), ("linear_bias", linear_bias)):
                if isinstance(t, D):
                    raise NotImplementedError(f"{name}: a DTensor with an FSDP2-sharded linear_weight is not "
                                              "supported; pass this rank's plain tensors")
            W = _gather_fsdp(linear_weight, g, "linear_weight")
            if num_items_in_batch is None:
                return _lin.linear_cross_entropy(input, W, target, linear_bias=linear_bias, reduction=reduction, **kw)
            return linear_cross_entropy(input, W, target, linear_bias=linear_bias, reduction=reduction,
                                        num_items_in_batch=num_items_in_batch, **kw)
    if isinstance(linear_bias, D) and _fsdp_group(linear_bias) is not None:
        raise NotImplementedError("linear_bias: an FSDP2-sharded bias outside the module's forward is not supported; "
                                  "call inside the FSDP module's forward or after module.unshard()")
    if not isinstance(target, Tensor) or target.is_floating_point():
        raise NotImplementedError("target: probability targets are not supported with DTensor arguments")
    mesh = _mesh([("input", input), ("linear_weight", linear_weight), ("target", target),
                  ("linear_bias", linear_bias), ("weight", weight)])
    lay = _linear_layout(input, linear_weight, target, linear_bias, mesh)
    dt = _dt()
    if lay.gather:
        # DTensor's all-gather, differentiable: its backward is the reduce-scatter of d loss / d input
        input = input.redistribute(mesh, [dt.Replicate() if i in lay.gather else p
                                          for i, p in enumerate(input.placements)])
        if any(lay.gather.values()):
            target = target.redistribute(mesh, [dt.Replicate() if i in lay.gather else p
                                                for i, p in enumerate(target.placements)])
    _no_plain_params(lay, linear_weight, linear_bias)
    w = _replicated("weight", weight, mesh)
    ii = -100 if ignore_index is None else ignore_index
    V = linear_weight.shape[0]
    # gradient placements: what DTensor's own matmul would give (see the module docstring)
    gw = [dt.Shard(0) if i == lay.vocab else (dt.Partial() if i in lay.tokens else dt.Replicate())
          for i in range(mesh.ndim)]
    gh = [dt.Partial() if i == lay.vocab else (dt.Shard(lay.tokens[i]) if i in lay.tokens else dt.Replicate())
          for i in range(mesh.ndim)]
    if lay.vocab is not None and not isinstance(input, D):
        # A plain input stands for a replicated one (as ColwiseParallel's input_layouts): checked on CPU,
        # then wrapped, so that its gradient's all-reduce is DTensor's, in input's dtype.
        _check_replicated(input, mesh.get_group(lay.vocab), "input", _dim_name(mesh, lay.vocab))
        input = dt.DTensor.from_local(input, mesh, [dt.Replicate()] * mesh.ndim, run_check=False)
    h = _local(input, gh)
    Wl = _local(linear_weight, gw)
    bl = _local(linear_bias, gw)
    y = _local(target)
    num_items = None if num_items_in_batch is None else check_num_items(num_items_in_batch, reduction)
    chunk = chunk_size
    if options is not None and chunk is None:
        chunk = getattr(options, "batch_chunk_size", None)

    def check() -> None:
        from .. import _validate

        if isinstance(ii, int) and isinstance(y, Tensor) and not y.is_floating_point():
            _validate.check_label_range(TORCH, y, V, ii, name="target")

    if lay.vocab is not None:
        from ..distributed import vocab_parallel_linear_cross_entropy

        i = lay.vocab
        group = mesh.get_group(i)
        start = _vocab_start(mesh, i, V, Wl.shape[0], "linear_weight")

        def call(red: str, z: float) -> Tensor:
            # d loss / d hidden leaves as a Partial() gradient: DTensor all-reduces it in hidden's dtype
            return vocab_parallel_linear_cross_entropy(h, Wl, y, local_bias=bl, group=group, vocab_start=start,
                                                       weight=w, ignore_index=ii, label_smoothing=label_smoothing,
                                                       reduction=red, z_loss=z, softcap=softcap,
                                                       temperature=temperature, chunk_size=chunk,
                                                       reduce_hidden_grad=False)
    else:
        def call(red: str, z: float) -> Tensor:
            return _lin.linear_cross_entropy(h, Wl, y, linear_bias=bl, weight=w, reduction=red, ignore_index=ii,
                                             label_smoothing=label_smoothing, z_loss=z, softcap=softcap,
                                             temperature=temperature, chunk_size=chunk)

    return _reduce(lay, call, reduction=reduction, z_loss=float(z_loss), num_items=num_items, check=check,
                   stats=lambda: _row_stats(y, w, ii, "index"), out_shape=tuple(target.shape), device=h.device,
                   smoothing=float(label_smoothing))


_LCE_KEYS = frozenset({"linear_bias", "weight", "ignore_index", "label_smoothing", "reduction", "z_loss", "softcap",
                       "temperature", "chunk_size"})


def linear_head(input: Any, linear_weight: Any, labels: Any = None, **kwargs: Any) -> Any:
    """:func:`logitkit.torch.linear_head` with DTensor arguments: the loss alone (any placements above),
    or every output (per-token outputs keep the labels' token placements), with a vocabulary-sharded
    weight through :func:`logitkit.distributed.vocab_parallel_linear_head`. A teacher and a per-token
    temperature are not supported with DTensors."""
    from .. import linear as _public

    outputs = tuple(kwargs.pop("outputs", ("loss",)))
    extra = [k for k in ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits", "teacher_topk")
             if kwargs.get(k) is not None]
    if extra:
        raise NotImplementedError(f"{extra[0]}: a teacher is not supported with DTensor arguments")
    temperature = kwargs.get("temperature", 1.0)
    if isinstance(temperature, Tensor):
        raise NotImplementedError("temperature: a per-token temperature is not supported with DTensor arguments")
    D = _dt().DTensor
    if isinstance(linear_weight, D) and _fsdp_group(linear_weight) is not None:
        g = _fsdp_group(linear_weight)
        return linear_head(input, _gather_fsdp(linear_weight, g, "linear_weight"), labels, outputs=outputs, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    if outputs == ("loss",):
        allowed = _LCE_KEYS
        bad = sorted(set(kwargs) - allowed - {"divergence", "beta", "teacher_temperature"})
        if bad:
            raise TypeError(f"linear_head() got an unexpected keyword argument {bad[0]!r}")
        if labels is None:
            raise ValueError("labels: outputs ('loss',) need labels")
        loss = linear_cross_entropy(input, linear_weight, labels, num_items_in_batch=num_items,
                                    **{k: v for k, v in kwargs.items() if k in allowed})
        return _public.HeadOutput(loss=loss)
    if not is_dtensor(input, linear_weight, labels, kwargs.get("linear_bias"), kwargs.get("weight")):
        from .head import linear_head as _plain

        return _plain(input, linear_weight, labels, outputs=outputs, num_items_in_batch=num_items, **kwargs)
    mesh = _mesh([("input", input), ("linear_weight", linear_weight), ("labels", labels),
                  ("linear_bias", kwargs.get("linear_bias")), ("weight", kwargs.get("weight"))])
    tok_shape = tuple(labels.shape) if labels is not None else tuple(input.shape[:-1])
    lay = _linear_layout(input, linear_weight, labels, kwargs.get("linear_bias"), mesh,
                         labels_follow=labels is None)
    _no_plain_params(lay, linear_weight, kwargs.get("linear_bias"))
    if lay.vocab is not None:
        return _vocab_head(input, linear_weight, labels, lay, mesh, outputs, num_items, tok_shape, kwargs)
    dt = _dt()
    gw = [dt.Partial() if i in lay.tokens else dt.Replicate() for i in range(mesh.ndim)]
    loc = dict(kwargs)
    loc["weight"] = _replicated("weight", kwargs.get("weight"), mesh)
    loc["linear_bias"] = _local(kwargs.get("linear_bias"), gw)
    reduction = kwargs.get("reduction", "mean")
    from .head import linear_head as _plain

    h, Wl, y = _local(input), _local(linear_weight, gw), _local(labels)
    if "loss" in outputs and reduction != "none" and (lay.tokens or num_items is not None):
        # one pass over the local head for every output; the loss reduced across the token dims
        res = _reduced_head(lay, lambda red, z: _plain(h, Wl, y, outputs=outputs, **{**loc, "reduction": red,
                                                                                       "z_loss": z})._asdict(),
                            y, loc["weight"], num_items, kwargs, V=linear_weight.shape[0], device=h.device)
    else:
        res = _plain(h, Wl, y, outputs=outputs, **loc)._asdict()
        if res.get("loss") is not None:
            if reduction == "none":
                res["loss"] = _wrap_tokens(res["loss"], lay, tok_shape)
            else:
                res["loss"] = dt.DTensor.from_local(res["loss"], mesh, lay.placements(False), run_check=False)
    for k in ("logprobs", "entropy", "lse", "argmax", "kl"):
        if res.get(k) is not None and not isinstance(res[k], D):
            res[k] = _wrap_tokens(res[k], lay, tok_shape)
    return _public.HeadOutput(**res)


def _vocab_head(input: Any, W: Any, labels: Any, lay: _Layout, mesh: Any, outputs: tuple, num_items: Any,
                tok_shape: tuple, kwargs: dict) -> Any:
    """``linear_head`` with ``linear_weight`` ``Shard(0)`` on mesh dim ``lay.vocab``: every output through
    :func:`logitkit.distributed.vocab_parallel_linear_head` over that dim's group (no gather of the weight
    or the logits). ``d / d input`` leaves as a ``Partial()`` gradient on that dim, as for the loss."""
    from .. import linear as _public
    from ..distributed import vocab_parallel_linear_head

    dt = _dt()
    D = dt.DTensor
    i = lay.vocab
    back = None
    if lay.gather:
        # sequence parallel before the head: all-gather input (and labels) on the vocabulary dim, as
        # linear_cross_entropy does (DTensor's differentiable all-gather; backward reduce-scatters);
        # the per-token outputs go back to input's sequence shard afterwards
        back = input.placements
        input = input.redistribute(mesh, [dt.Replicate() if j in lay.gather else p
                                          for j, p in enumerate(input.placements)])
        if labels is not None and any(lay.gather.values()):
            labels = labels.redistribute(mesh, [dt.Replicate() if j in lay.gather else p
                                                for j, p in enumerate(labels.placements)])
    gw = [dt.Shard(0) if j == i else (dt.Partial() if j in lay.tokens else dt.Replicate()) for j in range(mesh.ndim)]
    gh = [dt.Partial() if j == i else (dt.Shard(lay.tokens[j]) if j in lay.tokens else dt.Replicate())
          for j in range(mesh.ndim)]
    if not isinstance(input, D):
        # a plain input stands for a replicated one, as in linear_cross_entropy
        _check_replicated(input, mesh.get_group(i), "input", _dim_name(mesh, i))
        input = D.from_local(input, mesh, [dt.Replicate()] * mesh.ndim, run_check=False)
    h, Wl, y = _local(input, gh), _local(W, gw), _local(labels)
    bl = _local(kwargs.get("linear_bias"), gw)
    start = _vocab_start(mesh, i, W.shape[0], Wl.shape[0], "linear_weight")
    loc = {k: v for k, v in kwargs.items() if k != "linear_bias"}
    loc["weight"] = _replicated("weight", kwargs.get("weight"), mesh)
    reduction = kwargs.get("reduction", "mean")

    def head(outs: tuple, n: Any = None, red: Optional[str] = None, z: Optional[float] = None) -> dict:
        opts = dict(loc) if red is None else {**loc, "reduction": red, "z_loss": z}
        return vocab_parallel_linear_head(h, Wl, y, local_bias=bl, group=mesh.get_group(i), vocab_start=start,
                                          outputs=outs, reduce_hidden_grad=False, num_items_in_batch=n,
                                          **opts)._asdict()

    if "loss" in outputs and reduction != "none" and lay.tokens:
        # one vocabulary-parallel pass for every output; the loss reduced across the token dims
        res = _reduced_head(lay, lambda red, z: head(outputs, None, red, z), y, loc["weight"], num_items, kwargs,
                            V=W.shape[0], device=h.device)
    else:  # every token on every rank of the vocabulary dim: one pass, num_items_in_batch included
        res = head(outputs, num_items)
        if res.get("loss") is not None:
            res["loss"] = (_wrap_tokens(res["loss"], lay, tok_shape) if reduction == "none" else
                           D.from_local(res["loss"], mesh, lay.placements(False), run_check=False))
    for k in ("logprobs", "entropy", "lse", "argmax", "kl"):
        if res.get(k) is not None and not isinstance(res[k], D):
            res[k] = _wrap_tokens(res[k], lay, tok_shape)
            if back is not None:
                res[k] = _reshard_tokens(res[k], back, lay)
    if back is not None and reduction == "none" and res.get("loss") is not None:
        res["loss"] = _reshard_tokens(res["loss"], back, lay)
    return _public.HeadOutput(**{k: v for k, v in res.items() if k in _public.HeadOutput._fields})


def _reshard_tokens(t: Any, input_placements: Any, lay: _Layout) -> Any:
    """A per-token DTensor computed on every rank of the gathered (sequence-parallel) mesh dims, back
    on the sequence shard of ``input``'s own placements there (a local slice; its backward
    all-gathers the cotangent)."""
    want = list(t.placements)
    for j in lay.gather:
        want[j] = input_placements[j]
    return t.redistribute(t.device_mesh, want)


def _reduced_head(lay: _Layout, run: Any, y: Any, weight: Any, num_items: Any, kwargs: dict, *, V: int,
                  device: Any) -> dict:
    """Every output of one local head call ``run(reduction, z_loss) -> dict``, its loss reduced across
    the token-sharded mesh dims by :func:`_reduce` (the labels checked on every rank first, one small
    all-reduce of the global counts). The per-token outputs come from the same call, so backward
    runs the head once for all of them."""
    from .. import _validate

    ii = kwargs.get("ignore_index", -100)
    held: dict = {}

    def call(red: str, z: float) -> Tensor:
        held.update(run(red, z))
        return held["loss"]

    def check() -> None:
        if isinstance(ii, int) and isinstance(y, Tensor) and not y.is_floating_point():
            _validate.check_label_range(TORCH, y, V, ii, name="labels")

    reduction = kwargs.get("reduction", "mean")
    held_loss = _reduce(lay, call, reduction=reduction, z_loss=float(kwargs.get("z_loss", 0.0)), num_items=num_items,
                        check=check, stats=lambda: _row_stats(y, weight, ii, "index"), out_shape=tuple(y.shape),
                        device=device, smoothing=float(kwargs.get("label_smoothing", 0.0)))
    held["loss"] = held_loss
    return held


def _wrap_tokens(t: Tensor, lay: _Layout, shape: tuple) -> Any:
    return _dt().DTensor.from_local(t, lay.mesh, lay.placements(True), run_check=False, shape=torch.Size(shape),
                                    stride=_contiguous_stride(tuple(shape)))
