"""transformers ``Trainer`` / ``Seq2SeqTrainer`` that know about routing.

Swap the trainer class and everything else stays as usual::

    from smear_peft.trainer import SmearSeq2SeqTrainer
    trainer = SmearSeq2SeqTrainer(model=peft_model, args=Seq2SeqTrainingArguments(...), train_dataset=..., ...)

What `SmearTrainerMixin` adds to a ``Trainer``:

* **REINFORCE routing**: after the usual loss it computes each example's task loss (`smear_example_losses`: summed
  label-smoothed token NLL for sequence models, cross-entropy for classifiers; smoothing from
  ``args.label_smoothing_factor``) and adds `SmearModel.reinforce_loss`. A batch without ``labels`` is an error.
  Nothing changes for other routing methods or in evaluation.
* **ST-Gumbel routing**: ``set_training_step(state.global_step)`` before every training step (the temperature
  schedule; it is also saved with the adapter, and recomputed from the step on resume).
* **Routing columns**: ``routing_tags`` and ``routing_keys`` survive ``remove_unused_columns`` and the data collator
  (string tags stay a list of strings), and reach ``forward`` and ``generate``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import Seq2SeqTrainer, Trainer

from .losses import (
    per_example_causal_lm_loss,
    per_example_classification_loss,
    per_example_seq2seq_loss,
    has_reinforce_terms,
    reinforce_loss,
    unwrap_smear_model,
)

#: Batch columns consumed by smear-peft.
ROUTING_COLUMNS = ("routing_tags", "routing_keys")


class RoutingColumnsCollator:
    """Wraps a data collator: takes ``routing_tags`` / ``routing_keys`` out of the features before collating and puts
    them back as a ``LongTensor`` (ints) or a list (strings), so any collator (padding, seq2seq) accepts them."""

    def __init__(self, data_collator: Callable):
        self.data_collator = data_collator

    def __call__(self, features: list) -> Any:
        if not features or not isinstance(features[0], dict):
            return self.data_collator(features)
        columns = [c for c in ROUTING_COLUMNS if c in features[0]]
        if not columns:
            return self.data_collator(features)
        features = [dict(f) for f in features]
        taken = {c: [f.pop(c) for f in features] for c in columns}
        batch = self.data_collator(features)
        for column, values in taken.items():
            values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
            batch[column] = values if any(isinstance(v, str) for v in values) else torch.tensor(values, dtype=torch.long)
        return batch


class SmearTrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass (before it): REINFORCE loss, ST-Gumbel schedule, routing columns."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.smear_model = unwrap_smear_model(self.model)
        if not isinstance(self.data_collator, RoutingColumnsCollator):
            self.data_collator = RoutingColumnsCollator(self.data_collator)

    # -- keep the routing columns ----------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in ROUTING_COLUMNS if c not in self._signature_columns]

    # -- ST-Gumbel schedule ----------------------------------------------------------------------------------------
    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        self.smear_model.set_training_step(self.state.global_step)
        return super().training_step(model, inputs, *args, **kwargs)

    # -- REINFORCE -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None and model.training and self._uses_reinforce():
            raise ValueError(
                "REINFORCE routing needs each example's task loss, but this training batch has no `labels`. Add labels "
                "to the batch, or override SmearTrainerMixin.smear_example_losses(outputs, labels) (and compute_loss) "
                "to return a [batch] tensor of per-example losses."
            )
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if has_reinforce_terms(outputs):
            auxiliary = reinforce_loss(outputs, self.smear_example_losses(outputs, labels))
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # The task loss is already normalised over the accumulated batch; the auxiliary loss is a per-batch
                # mean, which the Trainer would otherwise divide by the number of accumulation steps.
                auxiliary = auxiliary / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            loss = loss + auxiliary.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def smear_example_losses(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """``[batch]`` task loss of every example, the reward of REINFORCE routing. Override for other heads."""
        smoothing = float(getattr(self.args, "label_smoothing_factor", 0.0) or 0.0)
        return example_losses(self.smear_model, outputs, labels, smoothing)

    def _uses_reinforce(self) -> bool:
        smear = self.smear_model
        return any(method.has_baseline for method in smear._active_methods())

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )


class SmearTrainer(SmearTrainerMixin, Trainer):
    """``transformers.Trainer`` with `SmearTrainerMixin`."""


class SmearSeq2SeqTrainer(SmearTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with `SmearTrainerMixin` (``routing_tags`` also reach ``generate``)."""


def example_losses(model: torch.nn.Module, outputs: Any, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``[batch]`` task loss of every example from a model's outputs: cross-entropy for ``[B, C]`` logits, summed token
    NLL for encoder-decoder models, shifted summed token NLL for decoder-only language models."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
    if logits.dim() == 2:
        return per_example_classification_loss(logits, labels, label_smoothing)
    config = getattr(unwrap_smear_model(model).model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return per_example_seq2seq_loss(logits, labels, label_smoothing)
    return per_example_causal_lm_loss(logits, labels, label_smoothing)
