"""transformers.Trainer (gradient accumulation: num_items_in_batch) with and without the patch."""

import pytest
import torch

import logitkit.transformers as lkt

from _hf_models import V, make

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


def _data(n=8, T=10):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (T,), generator=g)
        labels = ids.clone()
        labels[: 1 + (3 * i) % 7] = -100  # prompts of different lengths: micro-batches count different tokens
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(T, dtype=torch.long)})
    return rows


def _train(tmp_path, patch):
    model = make("llama").train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data())
    if patch:
        lkt.apply(trainer)  # a Trainer: its model is patched
        assert lkt.is_applied(trainer.model)
    assert trainer.model_accepts_loss_kwargs  # the patched forward keeps the signature: num_items_in_batch is passed
    trainer.train()
    losses = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_gradient_accumulation_matches_hf(tmp_path):
    ref_losses, ref_params = _train(tmp_path / "hf", False)
    losses, params = _train(tmp_path / "lk", True)
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    # AdamW moves every weight by about lr per step whatever the gradient's size, so a float32 rounding
    # difference on a near-zero gradient shows as up to ~1e-5 here: 1e-3 of one step
    for n in ref_params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-3, atol=1e-4)
