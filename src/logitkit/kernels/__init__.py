"""Fused kernels and the registry that picks them.

Every kernel implements one *stage* of the maths whose reference definition lives in
:mod:`logitkit.core` (written once against the array namespace ``xp``). The registry
(:mod:`logitkit.kernels.registry`) returns a kernel when one supports the array's library,
device and dtype, and the core stage otherwise, so callers never care which one ran.

Stage contract (all kernels, any backend)
-----------------------------------------
Inputs are 2-D ``x`` of shape ``(N, V)``, rows contiguous (the class axis is last), floating
(float16, bfloat16, float32, float64); ``labels`` are ``(N,)`` int64 class indices. Statistics
are returned in the *accumulation dtype*: float64 for float64 input, float32 otherwise.

Transform (shared by every stage)::

    z = softcap * tanh(x / softcap)   if softcap is not None
    z = z / temperature

Row statistics: ``m = max_c z_c`` and ``r = log(sum_c exp(z_c - m))`` computed as ``log1p`` of the
sum *without* one maximal term (ties counted exactly), so that confident rows keep their ~1e-13
losses. ``lse = m + r``. A row that is all ``-inf`` has ``m = -inf, r = 0`` and softmax 0.

``z - max z`` is always formed from ``x``: ``(x - max x) / temperature`` and, with a softcap,
``(s - s_max) / temperature`` for ``s = softcap·tanh(x / softcap)`` with the difference kept
accurate (never ``x / T - max(x) / T``, which near a common offset of 1e4 rounds by 1e-4,
230x the float32 contract). With ``temperature != 1`` or a softcap, ``m`` is ``max z`` rounded
to the accumulation dtype and ``r`` is relative to the exact ``max z``, so ``lse = m + r`` holds
to half an ulp of ``m``. A backward stage given ``(m, r)`` recomputes ``max z`` from ``x`` and
takes ``z - m - r = (z - max z) + ((max z - m) - r)``, with ``max z - m = 0`` where ``m`` is its
own rounded max (as the forward stored it) and the difference otherwise (a max from elsewhere).

``ce_forward(x, labels, *, weight, ignore_index, label_smoothing, softcap, temperature)
-> (ce, m, r)``::

    ce_i = 0                                              if labels_i == ignore_index
    ce_i = (1-eps) * w[y] * (m - z[y] + r)
           + eps/V * sum_c w[c] * (m - z[c] + r)          otherwise   (w = 1 without weight)

``ce_backward(x, labels, m, r, g_ce, g_z, *, weight, ignore_index, label_smoothing, z_loss,
softcap, temperature, out) -> out`` where ``g_ce``/``g_z`` are per-row multipliers (reduction
scale times grad_output; the caller zeroes them for ignored rows)::

    p_c = exp(z_c - m - r)
    dL/dz_c = g_ce * [(1-eps) * w[y] * (p_c - [c == y]) + eps/V * (W * p_c - w[c])]
              + g_z * 2 * z_loss * (m + r) * p_c                    (W = sum_c w[c])
    dL/dx_c = dL/dz_c / temperature * sech(x_c/softcap)**2          (softcap factor if set)

The label entry's ``p_y - 1`` is computed as ``expm1((z_y - m) - r)`` (a confident row's
gradient is ~1e-13, not 0), and ``sech²`` as ``4t/(1+t)²`` with ``t = exp(-2|x/softcap|)``, which
does not cancel the way ``1 - tanh²`` does for large ``|x/softcap|``.

Ignored rows get an exact zero gradient. ``out`` has ``x``'s dtype and may be ``x`` itself
(in place); the label term is subtracted in the accumulation dtype before rounding.

``ce_forward_backward(x, labels, g_ce, g_z, *, ..., out) -> (ce, m, r, out)`` does both in one
pass over ``x`` (possible because ``g_ce``/``g_z`` are known from the labels before the pass).

``softmax_forward(x, *, temperature, out)``, ``log_softmax_forward(x, *, temperature, out)``,
``logsumexp_forward(x) -> (N,)``, ``softmax_backward(y, dy, out)`` (``y * (dy - sum(y*dy))``),
``log_softmax_backward(y, dy, out)`` (``dy - exp(y) * sum(dy)``).

Probability labels (CPU kernels, used by JAX): ``prob_forward`` gives per row ``ce = mass·r -
Σ_c t_c (z_c - m)``, ``m``, ``r`` and ``mass = Σ_c t_c`` with targets ``t = ((1-eps) y + eps/V) w``;
``prob_backward`` writes ``dz = p (g_ce·mass + g_lse) - g_ce·t`` (times the transform's
derivative).

Class-index validation (label in ``[0, V)`` or equal to ``ignore_index``) happens before any
kernel runs on host arrays; device kernels write NaN for a bad row and set a device-side flag.
The CPU kernels also write a NaN row for an index outside ``[0, V)`` that reaches them
unvalidated (traced JAX labels through the XLA FFI handlers), rather than read outside the row.
"""
