"""TRL's SFTTrainer: its own fused LM head against logitkit serving the same calls."""

import pytest
import torch

import logitkit.transformers as lkt

from _hf_models import V, make

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1")


def _dataset():
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(3, V, (int(n),), generator=g).tolist()} for n in (9, 6, 12, 7, 10, 8, 11, 5)]
    return datasets.Dataset.from_list(rows)


def _train(tmp_path, patch):
    model = make("llama").train()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                         bf16=False)  # SFTConfig's default is bf16 autocast: float32 here, to compare at float32 rounding
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    if patch:
        lkt.apply(trainer)  # after the trainer put TRL's fused head on the model: logitkit serves its calls
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sft_trainer_matches_trl(tmp_path):
    ref, ref_params = _train(tmp_path / "trl", False)
    got, params = _train(tmp_path / "lk", True)
    assert len(got) == len(ref) == 3
    for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy"):
        torch.testing.assert_close(torch.tensor([h[key] for h in got]), torch.tensor([h[key] for h in ref]),
                                   rtol=2e-5, atol=1e-6, msg=key)
    for n in ref_params:  # AdamW: see test_trainer
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-3, atol=1e-4)


def test_fused_lm_head_call_matches_trl():
    from trl.trainer.utils import add_fused_lm_head

    model = make("gemma2")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :4] = -100
    ref = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(11))
    lkt.apply(model)
    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(11))
    assert shapes == [(2, 0, V)]
    for key in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(out.is_top1, ref.is_top1) and torch.equal(out.label_mask, ref.label_mask)
    lkt.revert(model)
    assert model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.shape == (2, 8)  # TRL's head again
