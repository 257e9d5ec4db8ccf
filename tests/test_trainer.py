"""Per-example losses, the Trainer integration (REINFORCE, ST-Gumbel, routing columns) and the Accelerate one-liner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from smear_peft import SmearConfig
from smear_peft.losses import (
    per_example_causal_lm_loss,
    per_example_classification_loss,
    has_reinforce_terms,
    per_example_seq2seq_loss,
    reinforce_loss,
    unwrap_smear_model,
)
from smear_peft import trainer as smear_trainer
from smear_peft.routing import gumbel_temperature_at
from smear_peft.trainer import RoutingColumnsCollator, SmearSeq2SeqTrainer, SmearTrainer

from .conftest import tiny_t5

TASKS = ["mnli", "rte", "sst2"]


# ------------------------------------------------------------------------------------------------------------------
# Per-example losses
# ------------------------------------------------------------------------------------------------------------------
def fairseq_batched_loss(lprobs, target, epsilon, ignore_index):
    """The authors' ``label_smoothed_nll_loss`` (``batched_loss``), written out."""
    target = target.unsqueeze(-1)
    pad = target.eq(ignore_index)
    nll = -lprobs.gather(-1, target.clamp_min(0)).masked_fill(pad, 0.0)
    smooth = -lprobs.sum(-1, keepdim=True).masked_fill(pad, 0.0)
    return ((1.0 - epsilon) * nll + epsilon / lprobs.size(-1) * smooth).sum(1).squeeze(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_per_example_seq2seq_loss_is_the_summed_label_smoothed_nll(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100
    labels[2, 1:] = -100
    got = per_example_seq2seq_loss(logits, labels, label_smoothing=smoothing)
    assert got.shape == (3,)
    torch.testing.assert_close(got, fairseq_batched_loss(F.log_softmax(logits, -1), labels, smoothing, -100))
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(got, per_token.sum(-1))
    # the sum over examples is the authors' summed batch loss; the mean over tokens is HF's usual loss
    if smoothing == 0.0:
        torch.testing.assert_close(got.sum() / (labels != -100).sum(), F.cross_entropy(logits.transpose(1, 2), labels))
    pad0 = per_example_seq2seq_loss(logits, labels.masked_fill(labels == -100, 0), ignore_index=0)
    assert pad0.shape == (3,)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        per_example_seq2seq_loss(logits[:, :, 0], labels)


def test_per_example_classification_and_causal_lm_losses():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    labels = torch.tensor([1, 0, 5, -100])
    torch.testing.assert_close(per_example_classification_loss(logits, labels),
                               F.cross_entropy(logits, labels, reduction="none"))
    assert per_example_classification_loss(logits, labels)[3] == 0
    smoothed = per_example_classification_loss(logits[:3], labels[:3], label_smoothing=0.1)
    torch.testing.assert_close(smoothed, fairseq_batched_loss(F.log_softmax(logits[:3, None], -1), labels[:3, None], 0.1, -100))

    lm_logits = torch.randn(2, 5, 7)
    lm_labels = torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(per_example_causal_lm_loss(lm_logits, lm_labels),
                               per_example_seq2seq_loss(lm_logits[:, :-1], lm_labels[:, 1:]))


# ------------------------------------------------------------------------------------------------------------------
# Trainer integration
# ------------------------------------------------------------------------------------------------------------------
def peft_t5(routing, **config):
    values = dict(num_experts=3, reduction_factor=4, routing=routing, tag_names=TASKS)
    values.update(config)
    model = tiny_t5()
    torch.manual_seed(0)
    return get_peft_model(model, SmearConfig(**values))


def rows(n=12, labels=True):
    generator = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        length = 3 + i % 4
        row = {
            "input_ids": torch.randint(2, 64, (length,), generator=generator).tolist() + [1],
            "routing_tags": TASKS[i % 3],  # strings: mapped through SmearConfig.tag_names
            "routing_keys": 1000 + i,
        }
        if labels:
            row["labels"] = torch.randint(2, 64, (2,), generator=generator).tolist() + [1]
        else:
            row["decoder_input_ids"] = [0, 5, 6]
        data.append(row)
    return data


def make_trainer(model, tmp_path, cls=SmearSeq2SeqTrainer, data=None, **args):
    from datasets import Dataset
    from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3,
                  learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                  use_cpu=True, seed=0)
    values.update(args)
    collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), model=model, padding=True)  # makes decoder_input_ids
    dataset = Dataset.from_list(data if data is not None else rows())
    return cls(model=model, args=Seq2SeqTrainingArguments(**values), train_dataset=dataset, eval_dataset=dataset,
               data_collator=collator)


def test_trainer_adds_the_reinforce_loss_from_per_example_losses(tmp_path, monkeypatch):
    model = peft_t5("reinforce")
    trainer = make_trainer(model, tmp_path, label_smoothing_factor=0.1)
    calls = []
    original = smear_trainer.reinforce_loss

    def spy(outputs, example_losses):
        assert has_reinforce_terms(outputs)  # the terms travel on the forward's output
        value = original(outputs, example_losses)
        calls.append((example_losses.detach().clone(), value.detach()))
        return value

    monkeypatch.setattr(smear_trainer, "reinforce_loss", spy)
    router = next(p for n, p in model.named_parameters() if "smear_router" in n and n.endswith(".weight"))
    baseline = next(p for n, p in model.named_parameters() if "smear_baseline" in n and "weight1" in n)
    router0, baseline0 = router.detach().clone(), baseline.detach().clone()
    trainer.train()
    assert len(calls) == 3
    assert all(losses.shape == (4,) and (losses > 0).all() and aux != 0 for losses, aux in calls)
    assert not torch.equal(router, router0) and not torch.equal(baseline, baseline0)  # trained via the auxiliary loss

    # the per-example losses are the summed label-smoothed NLL of each example
    batch = trainer.data_collator(rows()[:4])
    assert isinstance(batch["routing_tags"], list) and batch["routing_tags"] == ["mnli", "rte", "sst2", "mnli"]
    assert batch["routing_keys"].tolist() == [1000, 1001, 1002, 1003]
    model.train()
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    example_losses, aux = calls[-1]
    torch.testing.assert_close(example_losses, per_example_seq2seq_loss(outputs.logits, batch["labels"], label_smoothing=0.1))
    torch.testing.assert_close(trainer.smear_example_losses(outputs, batch["labels"]), example_losses)
    torch.testing.assert_close(loss, trainer.label_smoother(outputs, batch["labels"]) + aux)


def test_trainer_errors_clearly_without_labels_for_reinforce(tmp_path):
    trainer = make_trainer(peft_t5("reinforce"), tmp_path, data=rows(labels=False))
    with pytest.raises(ValueError, match="REINFORCE routing needs each example's task loss"):
        trainer.train()


def test_trainer_keeps_routing_columns_for_forward_and_generate(tmp_path):
    model = peft_t5("tag")  # fails without routing_tags: proves they reach forward and generate
    trainer = make_trainer(model, tmp_path, predict_with_generate=True, generation_max_length=4, max_steps=2)
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    predictions = trainer.predict(trainer.eval_dataset)
    assert predictions.predictions.shape[0] == 12
    assert "routing_tags" in trainer._signature_columns and "routing_keys" in trainer._signature_columns
    assert isinstance(trainer.data_collator, RoutingColumnsCollator)


def test_trainer_applies_the_gumbel_temperature_schedule_each_step(tmp_path, monkeypatch):
    model = peft_t5("st_gumbel", gumbel_anneal_rate=0.05, gumbel_anneal_every=1)
    smear = unwrap_smear_model(model)
    steps = []
    original = type(smear).set_training_step
    monkeypatch.setattr(type(smear), "set_training_step", lambda self, step: steps.append(step) or original(self, step))
    trainer = make_trainer(model, tmp_path, cls=SmearTrainer)
    trainer.train()
    assert steps == [0, 1, 2]
    expected = gumbel_temperature_at(2, 10.0, 0.5, 0.05, 1)
    assert smear.smear_gumbel_temperature["default"].item() == pytest.approx(expected)
    assert expected == pytest.approx(10.0 * 2.718281828 ** (-0.05 * 3))


def test_plain_accelerate_loop_needs_one_line_for_reinforce():
    from accelerate import Accelerator

    model = peft_t5("reinforce")
    data = RoutingColumnsCollator(lambda feats: {k: torch.tensor([f[k] for f in feats]) for k in feats[0]})
    batch = data([{"input_ids": [5, 6, 7, 1], "labels": [8, 9, 1]}, {"input_ids": [9, 9, 2, 1], "labels": [4, 3, 1]}])
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    router = next(p for n, p in model.named_parameters() if "smear_router" in n and n.endswith(".weight"))
    before = router.detach().clone()
    model.train()
    for _ in range(2):
        out = model(**batch)
        loss = out.loss + reinforce_loss(out, per_example_seq2seq_loss(out.logits, batch["labels"]))  # the line
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(router, before)
    with pytest.raises(ValueError, match="per-example task loss"):
        reinforce_loss(model(**batch), None)
    with pytest.raises(TypeError, match="pass the model's output"):
        reinforce_loss(model, per_example_seq2seq_loss(out.logits, batch["labels"]))
