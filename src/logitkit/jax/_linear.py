r"""A linear map whose transpose is a given function: forward mode and lean reverse mode at once.

The losses and softmaxes of :mod:`logitkit.jax._rows` are ``jax.custom_jvp`` functions. Their
tangent rules produce the tangent of the output as ``L(res)·t``, linear in the input tangent ``t``
with residuals ``res`` (the inputs and a few numbers per row). ``jax.grad`` transposes that linear
map; written in plain ``jax.numpy`` its transpose would be XLA code that keeps an ``N×V``
intermediate (e.g. the softmax) as a residual or makes several passes. :func:`linear` binds one
primitive instead, so that

* evaluating it (forward mode: ``jax.jvp``, ``jax.jacfwd``) runs ``fwd(opts, *res, *t)``;
* transposing it (reverse mode) runs ``bwd(opts, *res, *cotangents)``, the existing one-pass
  backward (the numba kernel on the CPU), with only ``res`` saved;
* differentiating it again (second order) uses the JVP of ``fwd``, which is plain JAX;
* ``vmap`` folds the mapped axis into the rows (every operand is row-aligned: logits-shaped,
  per-row, or a class vector that is not mapped), or else maps the primitive with ``lax.map``.

``fwd`` must be linear in its last ``len(t)`` arguments and ``bwd`` its transpose; both are looked
up by name in :data:`RULES`, so the primitive's parameters stay hashable.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["Rule", "RULES", "linear"]


class Rule(NamedTuple):
    """``fwd(opts, *res, *lin) -> tuple`` (linear in ``lin``; absent entries are ``None``) and
    its transpose ``bwd(opts, need, *res, *cts) -> tuple``: one cotangent per entry of ``lin``,
    computed where ``need`` (a tuple of bools, one per ``lin``) says so, ``None`` elsewhere."""

    fwd: Callable[..., tuple]
    bwd: Callable[..., tuple]


RULES: dict[str, Rule] = {}

_p = Primitive("logitkit_linear")
_p.multiple_results = True


def linear(name: str, opts: Any, res: tuple, lin: tuple, rows: str) -> tuple:
    """``RULES[name].fwd(opts, *res, *lin)`` as one transposable primitive.

    ``res`` may hold ``None`` (an absent optional input); ``rows`` gives one letter per entry of
    ``res + lin``: ``"x"`` (same number of axes as the logits, broadcastable to them), ``"r"``
    (per row: the logits' leading axes) or ``"w"`` (a class vector, not row-aligned).
    """
    items = tuple(res) + tuple(lin)
    if len(rows) != len(items):
        raise ValueError(f"rows: expected {len(items)} letters, got {rows!r}")
    present = tuple(a is not None for a in items)
    args = [a for a in items if a is not None]
    kinds = "".join(k for k, a in zip(rows, items) if a is not None)
    return tuple(_p.bind(*args, name=name, opts=opts, present=present, n_res=len(res), kinds=kinds))


def _unpack(args: tuple, present: tuple[bool, ...]) -> list:
    it = iter(args)
    return [next(it) if p else None for p in present]


def _fwd(*args: Any, name: str, opts: Any, present: tuple, n_res: int, kinds: str) -> list:
    return list(RULES[name].fwd(opts, *_unpack(args, present)))


_p.def_impl(_fwd)
mlir.register_lowering(_p, mlir.lower_fun(_fwd, multiple_results=True))


@_p.def_abstract_eval
def _abstract(*avals: Any, **params: Any) -> list:
    # traced on the operands' own types, so that e.g. shard_map's varying axes carry over
    return list(jax.make_jaxpr(lambda *a: _fwd(*a, **params))(*avals).out_avals)


def _jvp(primals: list, tangents: list, **params: Any) -> tuple[list, list]:
    out = _p.bind(*primals, **params)
    # Only floating operands have tangents; integer and boolean ones (labels, masks) stay fixed.
    diff = [i for i, p in enumerate(primals) if jnp.issubdtype(p.dtype, jnp.inexact)]

    def f(*d: Any) -> list:
        full = list(primals)
        for i, v in zip(diff, d):
            full[i] = v
        return _fwd(*full, **params)

    tans = [ad.instantiate_zeros(tangents[i]) for i in diff]
    _, t_out = jax.jvp(f, [primals[i] for i in diff], tans)
    return out, list(t_out)


ad.primitive_jvps[_p] = _jvp


def _transpose(cts: list, *args: Any, name: str, opts: Any, present: tuple, n_res: int,
               kinds: str) -> list:
    n_args_res = sum(present[:n_res])
    res_args, lin_args = args[:n_args_res], args[n_args_res:]
    if any(ad.is_undefined_primal(a) for a in res_args):
        raise NotImplementedError("logitkit.jax: a residual of a linear rule was differentiated")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    res = _unpack(res_args, present[:n_res])
    need = tuple(present[n_res:])
    lin_cts = [c for c, p in zip(RULES[name].bwd(opts, need, *res, *cts), need) if p]
    return [None] * n_args_res + [c.astype(a.aval.dtype) for c, a in zip(lin_cts, lin_args)]


ad.primitive_transposes[_p] = _transpose


def _batch(args: list, dims: list, **params: Any) -> tuple[list, list]:
    kinds = params["kinds"]
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if all(d is None for d, k in zip(dims, kinds) if k == "w"):
        # every mapped operand is row-aligned: the mapped axis becomes one more leading row axis
        moved = []
        for a, d, k in zip(args, dims, kinds):
            if k == "w":
                moved.append(a)
            elif d is None:
                moved.append(jnp.broadcast_to(a, (size,) + a.shape))
            else:
                moved.append(jnp.moveaxis(a, d, 0))
        return _p.bind(*moved, **params), [0] * len(_abstract(*moved, **params))
    # a mapped class vector: one call per element
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(vals: Any) -> list:
        full = list(args)
        for i, v in zip(mapped, vals):
            full[i] = v
        return _p.bind(*full, **params)

    out = jax.lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
    return list(out), [0] * len(out)


batching.primitive_batchers[_p] = _batch
