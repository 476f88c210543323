"""logitkit.transformers.apply against transformers' own loss (the unpatched model is the reference)."""

import pytest
import torch

import logitkit.transformers as lkt

from _hf_models import ARCHS, V, batch, make


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads(got, want):
    assert got.keys() == want.keys()
    for n in want:
        scale = want[n].abs().max().item() + 1e-30
        err = (got[n] - want[n]).abs().max().item()
        assert err <= 2e-5 * scale + 1e-7, (n, err, scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_grads_equal_hf(arch):
    model = make(arch)
    ids, labels, mask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_g = _loss_and_grads(model, **kw)
    assert ref.logits.shape == (3, 11, V)
    ref_nib, ref_nib_g = _loss_and_grads(model, **kw, num_items_in_batch=torch.tensor(37))

    assert lkt.apply(model) is model and lkt.is_applied(model)
    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    out, g = _loss_and_grads(model, **kw)
    assert out.logits is None
    assert shapes == [(3, 0, V)]  # the head only ever saw an empty slice: no (B, T, V) logits
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    _assert_grads(g, ref_g)
    out, g = _loss_and_grads(model, **kw, num_items_in_batch=torch.tensor(37))
    torch.testing.assert_close(out.loss, ref_nib.loss, rtol=2e-6, atol=0)
    _assert_grads(g, ref_nib_g)
    # the sum / num_items_in_batch is not the mean: the case does tell them apart
    assert abs(ref_nib.loss.item() - ref.loss.item()) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_generation_and_logits_unchanged_then_revert(arch):
    model = make(arch)
    ids, _, mask = batch()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(ids[:1, :5], max_new_tokens=5, do_sample=False, pad_token_id=0)
    lkt.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref_logits, rtol=0, atol=0)
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=5, do_sample=False, pad_token_id=0), ref_gen)
    fwd = model.forward
    lkt.revert(model)
    assert not lkt.is_applied(model) and "forward" not in vars(model) and model.forward != fwd
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 11, V)  # HF's own path again
    with pytest.raises(ValueError, match="not patched"):
        lkt.revert(model)


def test_shift_labels_return_logits_tuple_and_positional_labels():
    model = make("llama")
    ids, labels, mask = batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    lkt.apply(model, return_logits=True)
    out = model(input_ids=ids, attention_mask=mask, shift_labels=shift)  # pre-shifted labels alone give the loss
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    # positional labels (input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
    out = model(ids, mask, None, None, None, labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], ref.loss, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="shift_labels: expected 33 elements"):
        model(input_ids=ids, shift_labels=shift[:, 1:])


def test_apply_twice_replaces_and_trainer_like_object():
    model = make("qwen2")
    ids, labels, _ = batch()
    ref = model(input_ids=ids, labels=labels).loss
    lkt.apply(model, chunk_size=4)
    lkt.apply(model, chunk_size=8)  # re-applies over the original forward, not over the patch
    assert model.forward.__func__.__wrapped__ is type(model).forward
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref, rtol=2e-6, atol=0)
    lkt.revert(model)
    assert "forward" not in vars(model)


def test_gradient_checkpointing():
    model = make("llama")
    model.train()
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels, mask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_g = _loss_and_grads(model, **kw)
    lkt.apply(model)
    out, g = _loss_and_grads(model, **kw)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    _assert_grads(g, ref_g)


def test_bf16_autocast():
    model = make("llama")
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        lkt.apply(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert out.dtype == torch.float32
    # both run the head in bfloat16; the fused loss is rounded to bfloat16 once (2^-8 relative)
    torch.testing.assert_close(out, ref, rtol=8e-3, atol=0)
    out.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_refuses_an_unannounced_logit_transform():
    model = make("llama")
    model.config.logit_scale = 0.5  # Llama's forward ignores it: the config reading is wrong for this model
    with pytest.raises(lkt.LogitkitPatchError, match=r"logit_scale=0.5.*logits are not"):
        lkt.apply(model)
    assert not lkt.is_applied(model)

    class Scaled(type(make("llama"))):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    m2 = Scaled(make("llama").config)
    with pytest.raises(lkt.LogitkitPatchError, match="transforms the logits"):
        lkt.apply(m2)


def test_refuses_another_loss_and_another_head():
    model = make("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab_size).float(), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    with pytest.raises(lkt.LogitkitPatchError, match="computes a loss logitkit does not reproduce"):
        lkt.apply(model)

    model = make("llama")

    class Head(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    old = model.lm_head
    model.lm_head = Head(old.in_features, old.out_features, bias=False)
    with pytest.raises(lkt.LogitkitPatchError, match="not a plain torch.nn.Linear"):
        lkt.apply(model)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        lkt.apply(object())


def test_torch_compile_of_the_patched_model():
    # dynamo traces the patched forward (the fused loss runs as a graph break); the eager backend keeps the
    # test fast, inductor gave the same loss in a manual run
    model = make("llama")
    ids, labels, mask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_g = _loss_and_grads(model, **kw)
    lkt.apply(model)
    compiled = torch.compile(model, backend="eager")
    out, g = _loss_and_grads(compiled, **kw)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    _assert_grads({n.removeprefix("_orig_mod."): v for n, v in g.items()}, ref_g)


def test_deepcopy_of_a_patched_model_uses_its_own_weights_and_wrappers_are_kept():
    import copy

    model = make("llama")
    ids, labels, _ = batch()
    lkt.apply(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(0.5)
    got = twin(input_ids=ids, labels=labels).loss
    lkt.revert(twin)
    torch.testing.assert_close(got, twin(input_ids=ids, labels=labels).loss, rtol=2e-6, atol=0)
    assert abs(got.item() - model(input_ids=ids, labels=labels).loss.item()) > 1e-2
    patched = model.forward
    model.forward = lambda *a, **k: patched(*a, **k)  # someone wraps the patched forward
    with pytest.raises(ValueError, match="replaced after logitkit.transformers.apply"):
        lkt.revert(model)


def test_refuses_a_moe_model_whose_loss_adds_the_router_loss():
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(cfg)
    with pytest.raises(lkt.LogitkitPatchError, match="aux_loss|loss logitkit does not reproduce"):
        lkt.apply(model)
    cfg.output_router_logits = False  # without router logits its loss is the plain causal-LM loss
    lkt.apply(model)
    ids, labels, _ = batch()
    with pytest.raises(lkt.LogitkitPatchError, match="aux_loss"):
        model(input_ids=ids, labels=labels, output_router_logits=True)
