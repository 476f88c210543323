r"""Hugging Face transformers: one call makes a causal LM train through logitkit's fused head.

:func:`apply` patches one model instance (``PreTrainedModel``, a PEFT model, or a ``Trainer``'s
model) so that ``model(..., labels=...)`` computes HF's causal-LM loss (shift, ``ignore_index=-100``,
``shift_labels``, sum / ``num_items_in_batch``) by :func:`logitkit.torch.linear_cross_entropy` on the
last hidden states and the head's weight, never making the (B, T, V) logits; :func:`revert` undoes
it. :func:`token_logprobs` gives per-token log-probabilities (and entropies) for RL losses.

>>> import torch, transformers, logitkit.transformers as lkt
>>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).eval()
>>> ids = torch.randint(0, 64, (2, 8)); ref = m(ids, labels=ids).loss
>>> torch.allclose(lkt.apply(m)(ids, labels=ids).loss, ref, rtol=1e-5)
True
"""

from ._patch import LogitkitPatchError, apply, is_applied, revert, token_logprobs

__all__ = ["apply", "revert", "is_applied", "token_logprobs", "LogitkitPatchError"]
