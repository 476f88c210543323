"""logitkit: logits -> softmax -> softmax cross-entropy with logits, exact and fused.

One API over NumPy arrays, torch tensors and JAX arrays (each call returns its input's kind).
Importing logitkit imports neither torch nor jax; ``logitkit.torch`` and ``logitkit.jax`` hold
the framework drop-ins.
"""

from .functional import (
    cross_entropy,
    cross_entropy_with_grad,
    entropy,
    kl_divergence,
    log_softmax,
    logsumexp,
    softmax,
    softmax_cross_entropy_with_logits,
    sparse_softmax_cross_entropy_with_logits,
    token_logprobs,
)
from .linear import (
    linear_cross_entropy,
    linear_cross_entropy_with_grad,
    linear_entropy,
    linear_token_logprobs,
)
from .linear import HeadOutput, linear_head

__version__ = "0.1.0"

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "cross_entropy_with_grad",
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
    "token_logprobs",
    "entropy",
    "kl_divergence",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "linear_token_logprobs",
    "linear_entropy",
    "linear_head", "HeadOutput",
    "__version__",
]
