"""PyTorch drop-ins with ``torch.nn.functional`` signatures and fused autograd.

``cross_entropy``, ``softmax`` and ``log_softmax`` take exactly torch's arguments (class dim 1,
``dim=``, ``dtype=``, the deprecated ``size_average``/``reduce``); the extras are keyword-only.
Cross-entropy saves no ``N×V`` buffer for backward and can write its gradient over the logits
(``inplace_backward=True``). CPU tensors run the numba kernels when they are installed, CUDA
tensors the Triton kernels, anything else the core on torch ops. A bad class index on CUDA raises
at the next call without a host sync, or at once in :func:`check_labels`. The stages are registered as
``torch.ops.logitkit.*`` custom operators, so ``torch.compile`` traces through without a graph
break.

>>> import torch, logitkit.torch as lt
>>> x = torch.randn(8, 100, requires_grad=True); y = torch.randint(0, 100, (8,))
>>> lt.cross_entropy(x, y, label_smoothing=0.1).backward()
"""

from ..kernels.triton._labels import check_labels, deferred_label_check  # torch only, no triton import
from ._autograd import InplaceError
from ._dtensor import global_num_items
from ._functional import cross_entropy, log_softmax, softmax
from ._modules import CrossEntropyLoss, LogSoftmax, Softmax
from .linear import LinearCrossEntropyLoss, linear_cross_entropy, linear_entropy, linear_token_logprobs

__all__ = ["cross_entropy", "softmax", "log_softmax", "CrossEntropyLoss", "Softmax", "LogSoftmax",
           "InplaceError", "linear_cross_entropy", "LinearCrossEntropyLoss", "linear_token_logprobs",
           "linear_entropy", "linear_head", "global_num_items", "check_labels", "deferred_label_check"]
from .head import linear_head  # noqa: E402
