"""Tiny random causal LMs built from their config classes (no downloads)."""

import torch
import transformers as tf

V = 160
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)


def _cfg(name):
    if name == "llama":
        return tf.LlamaConfig(**_COMMON)
    if name == "llama_tied":
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=True)
    if name == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if name == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if name == "gemma2":  # final_logit_softcapping; small so the tanh matters at these logit sizes
        return tf.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=0.5, attn_implementation="eager")
    if name == "cohere":  # logit_scale multiplies the logits
        return tf.CohereConfig(**_COMMON, logit_scale=3.0)
    if name == "granite":  # logits_scaling divides them
        return tf.GraniteConfig(**_COMMON, logits_scaling=0.25)
    if name == "phi3":
        return tf.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0)
    if name == "phi":  # head with a bias
        return tf.PhiConfig(**{**_COMMON, "num_key_value_heads": 4})
    if name == "gpt2":  # tied head
        return tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    raise KeyError(name)


ARCHS = ["llama", "llama_tied", "qwen2", "mistral", "gemma2", "cohere", "granite", "phi3", "phi", "gpt2"]
CLASSES = {"llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM", "cohere": "CohereForCausalLM",
           "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM", "phi": "PhiForCausalLM",
           "gpt2": "GPT2LMHeadModel"}


def make(name, seed=0):
    torch.manual_seed(seed)
    model = getattr(tf, CLASSES[name])(_cfg(name))
    with torch.no_grad():  # HF's init draws the head small; larger logits make the comparison sharper
        model.get_output_embeddings().weight.mul_(8.0)
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.normal_(0, 1.0)
    return model.eval()


def batch(seed=1, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 7:] = 0
    return ids, labels, mask
