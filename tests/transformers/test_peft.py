"""PEFT (LoRA) models: on the body, and on the output head itself."""

import pytest
import torch

import logitkit.transformers as lkt

from _hf_models import batch, make

peft = pytest.importorskip("peft")


def _lora(targets, dropout=0.0, seed=0):
    model = make("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                    target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():  # LoRA's B starts at zero; random B makes the adapters count
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pm


def _run(pm, **kw):
    pm.zero_grad(set_to_none=True)
    out = pm(**kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_loss_and_adapter_grads_match(targets):
    pm = _lora(targets).train()
    ids, labels, mask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(29))
    ref, ref_g = _run(pm, **kw)
    assert any("lora" in n for n in ref_g) and all("lora" in n for n in ref_g)  # only adapters train
    lkt.apply(pm)
    loss, g = _run(pm, **kw)
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=0)
    assert g.keys() == ref_g.keys()
    for n in ref_g:
        scale = ref_g[n].abs().max().item()
        assert (g[n] - ref_g[n]).abs().max().item() <= 2e-5 * scale + 1e-7, n
    lkt.revert(pm)


def test_lora_head_with_dropout_is_refused_in_training():
    pm = _lora(["lm_head"], dropout=0.1)
    ids, labels, _ = batch()
    lkt.apply(pm)  # verified in eval mode, where the dropout is off
    with torch.no_grad():
        pm.eval()
        pm(input_ids=ids, labels=labels)
    pm.train()
    with pytest.raises(lkt.LogitkitPatchError, match="lora_dropout p=0.1 in training"):
        pm(input_ids=ids, labels=labels)


def test_lora_head_disabled_adapter_is_the_base_head():
    pm = _lora(["lm_head"])
    ids, labels, _ = batch()
    with pm.disable_adapter():
        ref = pm(input_ids=ids, labels=labels).loss
    lkt.apply(pm)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=ids, labels=labels).loss, ref, rtol=2e-6, atol=0)
    assert abs(pm(input_ids=ids, labels=labels).loss.item() - ref.item()) > 1e-3  # the adapter does change it
