"""Reductions shared by every cross-entropy path (torch semantics, empty mean = 0).

The loss of a batch is built from per-row quantities only (``ce``, ``lse``, ``valid``, ``w_y``),
so reducing, and the per-row gradient multipliers ``g_ce``/``g_z`` of the kernels' contract, cost
O(rows) and never touch the logits again.
"""

from __future__ import annotations

from typing import Any

__all__ = ["row_weights", "denominators", "reduce_loss", "row_scales"]


def row_weights(xp: Any, labels: Any, weight: Any, ignore_index: int, acc: Any) -> tuple[Any, Any]:
    """``(valid, w_y)`` per row in the accumulation dtype (``w_y = 0`` for ignored rows)."""
    valid = labels != ignore_index
    validf = xp.astype(valid, acc)
    if weight is None:
        return validf, validf
    V = weight.shape[0]
    if V == 0:  # no class: every row is ignored (or bad, and NaN already)
        return validf, validf * 0.0
    # Out-of-range labels (only possible where they could not be checked first) gather class 0;
    # their rows' losses are NaN already.
    lab = xp.where(valid & (labels >= 0) & (labels < V), labels, 0)
    # xp.reshape, not the method: a tf.Tensor has none.
    wy = xp.reshape(xp.take_along_axis(xp.astype(weight, acc), xp.reshape(lab, (-1,)), axis=0), lab.shape)
    return validf, wy * validf


def _safe_recip(xp: Any, d: Any) -> Any:
    """1/d, and 0 where d == 0: a mean over nothing is 0 with a zero gradient.

    Only an exact zero is special: a negative Σ w_y (torch accepts negative class weights)
    divides as torch does, ``_safe_recip(-2) = -0.5``.
    """
    nonzero = d != 0
    return xp.where(nonzero, 1.0 / xp.where(nonzero, d, 1.0), 0.0)


def denominators(xp: Any, validf: Any, wy: Any) -> tuple[Any, Any]:
    """``(1 / Σ w_y, 1 / count)`` for ``reduction="mean"``: CE terms and z-loss terms."""
    return _safe_recip(xp, xp.sum(wy)), _safe_recip(xp, xp.sum(validf))


def reduce_loss(xp: Any, ce: Any, lse: Any, validf: Any, wy: Any, reduction: str, z_loss: float) -> Any:
    """Apply ``reduction`` to per-row ``ce`` plus ``z_loss·lse²`` on rows that are not ignored."""
    zterm = None
    if z_loss != 0.0:
        zterm = xp.where(validf > 0, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return ce if zterm is None else ce + zterm
    if reduction == "sum":
        total = xp.sum(ce)
        return total if zterm is None else total + xp.sum(zterm)
    inv_w, inv_n = denominators(xp, validf, wy)
    total = xp.sum(ce) * inv_w
    return total if zterm is None else total + xp.sum(zterm) * inv_n


def row_scales(xp: Any, validf: Any, wy: Any, reduction: str, grad_output: Any = 1.0) -> tuple[Any, Any]:
    """Per-row ``(g_ce, g_z)``: d loss / d ce_i and d loss / d (z_loss·lse_i²), zero on ignored rows."""
    if reduction == "none":
        g = validf * grad_output
        return g, g
    if reduction == "sum":
        g = validf * grad_output
        return g, g
    inv_w, inv_n = denominators(xp, validf, wy)
    return validf * (inv_w * grad_output), validf * (inv_n * grad_output)
