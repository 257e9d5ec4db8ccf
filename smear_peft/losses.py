"""Per-example task losses (the reward of REINFORCE routing) and the one-line auxiliary loss for custom loops.

REINFORCE routing trains its routers with a policy-gradient term whose reward is minus each example's task loss,
so it needs a ``[batch]`` tensor of losses rather than the usual batch mean. As in the authors' code, the
per-example loss of a sequence-to-sequence model is the **sum** over target tokens of the (label-smoothed) token NLL;
for a classifier it is the example's cross-entropy.

In a plain PyTorch / Accelerate loop, REINFORCE is one extra line::

    out = model(**batch)
    loss = out.loss + reinforce_loss(model, per_example_seq2seq_loss(out.logits, batch["labels"]))
    accelerator.backward(loss)

`reinforce_loss` is zero for every other routing method (and in evaluation), so the line can stay in any loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import SmearModel


def per_example_seq2seq_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Summed (label-smoothed) token NLL of every example: ``[batch]``.

    ``logits`` ``[B, T, V]`` and ``labels`` ``[B, T]`` are aligned (as in encoder-decoder models, whose logits at step
    ``t`` predict ``labels[:, t]``). Positions whose label is ``ignore_index`` count zero. With smoothing ``eps`` each
    token costs ``(1 - eps) * nll + eps / V * sum_v(-log p_v)``, fairseq's ``label_smoothed_nll_loss`` that the
    authors sum per example (their ``batched_loss``).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"per_example_seq2seq_loss expects logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    log_probs = F.log_softmax(logits.float(), dim=-1)
    mask = labels.ne(ignore_index)
    targets = labels.masked_fill(~mask, 0).long()
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        smooth = -log_probs.sum(-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing / logits.shape[-1] * smooth
    return (nll * mask).sum(-1)


def per_example_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """`per_example_seq2seq_loss` for decoder-only models, whose logits at position ``t`` predict ``labels[:, t+1]``."""
    return per_example_seq2seq_loss(logits[:, :-1], labels[:, 1:], label_smoothing, ignore_index)


def per_example_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy of every example: ``[batch]`` (the authors' ResNet reward). ``logits`` ``[B, C]``, ``labels`` ``[B]``.

    Examples labelled ``ignore_index`` get a loss of 0.
    """
    if logits.dim() != 2 or labels.reshape(-1).shape[0] != logits.shape[0]:
        raise ValueError(
            f"per_example_classification_loss expects logits [B, C] and labels [B], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    return F.cross_entropy(
        logits.float(), labels.reshape(-1).long(), reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index
    )


def unwrap_smear_model(model: nn.Module) -> "SmearModel":
    """The `SmearModel` inside a `PeftModel`, a DDP / FSDP / ``torch.compile`` wrapper, or the `SmearModel` itself."""
    from .model import SmearModel

    seen = 0
    current = model
    while not isinstance(current, SmearModel):
        seen += 1
        nxt = None
        for attribute in ("module", "_orig_mod", "base_model"):
            candidate = getattr(current, attribute, None)
            if isinstance(candidate, nn.Module) and candidate is not current:
                nxt = candidate
                break
        if nxt is None or seen > 8:
            raise TypeError(
                f"{type(model).__name__} holds no SMEAR adapter: pass the model returned by "
                "get_peft_model(base, SmearConfig(...)) (or its DDP / compiled wrapper)."
            )
        current = nxt
    return current


def reinforce_loss(model: nn.Module, example_losses: Optional[torch.Tensor]) -> torch.Tensor:
    """The REINFORCE auxiliary loss of ``model``'s last forward pass (0 for other routing methods and in evaluation).

    ``example_losses`` is the ``[batch]`` task loss of each example (e.g. `per_example_seq2seq_loss`); see
    `SmearModel.reinforce_loss` for the terms and their signs. Works on a `PeftModel` and its wrappers.
    """
    return unwrap_smear_model(model).reinforce_loss(example_losses)
