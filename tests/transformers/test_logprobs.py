"""logitkit.transformers.token_logprobs against log_softmax of the unpatched model's logits."""

import pytest
import torch

import logitkit.transformers as lkt

from _hf_models import V, batch, make


def _reference(model, ids, mask, temperature):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _grads(model, lp, ent, adv):
    model.zero_grad(set_to_none=True)
    ((lp * adv).sum() + 0.1 * ent.sum()).backward()  # a policy-gradient-like objective with an entropy bonus
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,patched", [("llama", False), ("gemma2", True), ("phi", False), ("cohere", True)])
def test_token_logprobs_and_entropy_match_logits(arch, patched):
    model = make(arch)
    ids, _, mask = batch()
    adv = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lp_ref, ent_ref = _reference(model, ids, mask, 0.7)
    g_ref = _grads(model, lp_ref, ent_ref, adv)
    if patched:
        lkt.apply(model)
    lp, ent = lkt.token_logprobs(model, ids, mask, temperature=0.7, entropy=True)
    assert lp.shape == ent.shape == (3, 10)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=2e-5)
    g = _grads(model, lp.double(), ent.double(), adv)
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        scale = g_ref[n].abs().max().item()
        assert (g[n] - g_ref[n]).abs().max().item() <= 1e-4 * scale + 1e-7, n
    assert lkt.is_applied(model) == patched
    with pytest.raises(ValueError, match="temperature"):
        lkt.token_logprobs(model, ids, temperature=0.0)
