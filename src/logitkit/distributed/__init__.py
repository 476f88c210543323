"""Vocabulary-parallel cross-entropy: each rank holds a slice of the vocabulary, no logits gathered.

- :func:`vocab_parallel_cross_entropy` (torch): logits already sharded over the vocabulary.
- :func:`vocab_parallel_linear_cross_entropy` (torch): hidden states and a vocabulary-sharded head.
- :func:`vocab_parallel_linear_head` (torch): every output of :func:`logitkit.linear_head` (loss,
  logprobs, entropy, lse, argmax, teacher divergences) with a vocabulary-sharded head.
- :func:`jax_vocab_parallel_cross_entropy` (JAX): inside ``shard_map`` with a named mesh axis.
- :func:`jax_vocab_parallel_linear_head` (JAX): the fused head's every output, inside ``shard_map``.
- :mod:`logitkit.distributed.stages`: the maths once, against ``xp``, with the collectives injected.

Forward: a fixed-size header all-reduce (what the ranks must agree on: tokens, dtype, options,
labels, shard layout; on CPU tensors every rank raises the same error before any per-token
collective when a rank's arguments are wrong or the ranks disagree), then one MAX and one SUM
all-reduce of per-token scalars (16 bytes per token, 20 with label smoothing); backward: no
communication (the linear version all-reduces ``d loss / d hidden`` once). Importing this package
imports neither torch nor jax; each binding is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_parallel_linear_head",
           "jax_vocab_parallel_cross_entropy", "jax_vocab_parallel_linear_head", "TorchCollectives", "stages"]

_LAZY = {
    "vocab_parallel_cross_entropy": "._torch",
    "vocab_parallel_linear_cross_entropy": "._torch",
    "vocab_parallel_linear_head": "._torch_head",
    "TorchCollectives": "._torch",
    "jax_vocab_parallel_cross_entropy": "._jax",
    "jax_vocab_parallel_linear_head": "._jax_head",
    "stages": ".stages",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'logitkit.distributed' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(mod, __name__)
    value = module if name == "stages" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(__all__)
