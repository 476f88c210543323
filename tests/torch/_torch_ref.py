"""float64 references built from ``torch.nn.functional`` (independent of logitkit's code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transform64(x: torch.Tensor, softcap=None, temperature=1.0) -> torch.Tensor:
    z = x.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_cross_entropy(x, y, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      z_loss=0.0, softcap=None, temperature=1.0):
    """F.cross_entropy in float64 on the transformed logits, plus z-loss; an empty mean is 0.

    ``x`` has the class at dim 1 (or is 1-D); differentiable in ``x`` (and in float ``y``).
    """
    z = transform64(x, softcap, temperature)
    w = None if weight is None else weight.double()
    index = not y.dtype.is_floating_point
    yy = y if index else y.double()
    cdim = 0 if z.ndim == 1 else 1
    lse = torch.logsumexp(z, dim=cdim)
    if index:
        valid = (y != ignore_index).double()
        wy = valid if w is None else w[torch.where(y == ignore_index, 0, y)] * valid
    else:
        valid = torch.ones_like(lse)
        wy = valid
    zt = z_loss * lse * lse * valid
    if reduction == "none":
        return F.cross_entropy(z, yy, weight=w, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing) + zt
    if reduction == "sum":
        return F.cross_entropy(z, yy, weight=w, ignore_index=ignore_index, reduction="sum",
                               label_smoothing=label_smoothing) + zt.sum()
    if float(wy.sum()) == 0.0:
        ce = (z * 0.0).sum()  # torch's NaN: logitkit defines an empty mean as 0
    else:
        ce = F.cross_entropy(z, yy, weight=w, ignore_index=ignore_index, reduction="mean",
                             label_smoothing=label_smoothing)
    n = float(valid.sum())
    return ce + (zt.sum() / n if n > 0 else 0.0 * zt.sum())


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol scale)`` for comparing a result in ``dtype`` with its float64 reference."""
    return {torch.float64: (1e-11, 1e-13), torch.float32: (4e-6, 2e-7),
            torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]


def assert_close(actual, expected, dtype, what="", scale=None):
    """``actual`` (any dtype) against float64 ``expected`` within ``dtype``'s tolerance.

    The absolute tolerance is relative to ``scale`` (default: the largest ``|expected|``).
    """
    rtol, atol = tolerances(dtype)
    a, e = actual.double(), expected.double()
    if scale is None:
        scale = float(e.detach().abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-30) + 1e-300, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
