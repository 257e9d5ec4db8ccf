"""Per-example task losses (the reward of REINFORCE routing) and the one-line auxiliary loss for custom loops.

REINFORCE routing trains its routers with a policy-gradient term whose reward is minus each example's task loss,
so it needs a ``[batch]`` tensor of losses rather than the usual batch mean. As in the authors' code, the
per-example loss of a sequence-to-sequence model is the **sum** over target tokens of the (label-smoothed) token NLL;
for a classifier it is the example's cross-entropy.

In a plain PyTorch / Accelerate loop, REINFORCE is one extra line::

    out = model(**batch)
    loss = out.loss + reinforce_loss(out, per_example_seq2seq_loss(out.logits, batch["labels"]))
    accelerator.backward(loss)

`reinforce_loss` is zero for every other routing method (and in evaluation), so the line can stay in any loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

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


def reinforce_loss(outputs: Any, example_losses: Optional[torch.Tensor]) -> torch.Tensor:
    """The REINFORCE auxiliary loss of the forward that returned ``outputs`` (0 for other routing methods and in
    evaluation).

    ``outputs`` is the model's output: REINFORCE terms travel on it, so no other call can change or lose them.
    ``example_losses`` is the ``[batch]`` task loss of each example (e.g. `per_example_seq2seq_loss`). Summed over
    active REINFORCE adapters, averaged over blocks and examples, as in the authors' code, with each block's baseline
    ``b`` predicted from the detached router input::

        policy_weight * mean(log p(chosen) * (L - b).detach())
      + entropy_weight * mean(-sum_n p_n log p_n)        # added to the loss, i.e. entropy is penalised (authors)
      + value_weight * mean(huber_delta=1(L - b))
    """
    if isinstance(outputs, nn.Module):
        raise TypeError(
            "reinforce_loss(outputs, example_losses): pass the model's output, not the model (the REINFORCE terms "
            "belong to the forward that produced them): `loss = out.loss + reinforce_loss(out, per_example)`."
        )
    terms = {a: t for a, t in (reinforce_terms_of(outputs) or {}).items() if t[1]}
    device = example_losses.device if isinstance(example_losses, torch.Tensor) else None
    total = torch.zeros((), device=device)
    if not terms:
        return total
    if example_losses is None:
        raise ValueError(
            "REINFORCE routing needs the per-example task loss: pass a [batch] tensor of losses (e.g. the summed "
            "token NLL of each example, see smear_peft.losses.per_example_seq2seq_loss)."
        )
    losses = example_losses.detach().float().reshape(-1)
    for config, block_terms in terms.values():
        count = len(block_terms)
        for log_prob, entropy, baseline, example in block_terms:
            examples = log_prob.shape[0] if example is None else int(example.max()) + 1
            if examples != losses.shape[0]:
                raise ValueError(f"Got {losses.shape[0]} example losses for a batch of {examples} examples.")
            target = losses if example is None else losses[example]
            advantage = target - baseline
            total = total + config.reinforce_policy_weight * (log_prob * advantage.detach()).mean() / count
            total = total + config.reinforce_entropy_weight * entropy.mean() / count
            total = total + config.reinforce_value_weight * F.huber_loss(baseline, target, delta=1.0) / count
    return total


def has_reinforce_terms(outputs: Any) -> bool:
    """Whether a forward recorded REINFORCE terms (a training forward of a REINFORCE adapter)."""
    return any(t[1] for t in (reinforce_terms_of(outputs) or {}).values())


def reinforce_terms_of(outputs: Any) -> Optional[dict]:
    """The REINFORCE terms a forward recorded: on the output, else on one of its tensors (a wrapper such as FSDP1's
    root or DDP may return a rebuilt copy of the output, which keeps the tensors but not the output's attribute)."""
    terms = getattr(outputs, "smear_reinforce_terms", None)
    if terms is not None:
        return terms
    for value in output_tensors(outputs):
        terms = getattr(value, "smear_reinforce_terms", None)
        if terms is not None:
            return terms
    return None


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors a model output holds: itself when it is a bare tensor, else its values (a ``ModelOutput`` or dict)
    or items (a tuple or list)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    values = outputs.values() if isinstance(outputs, Mapping) else outputs if isinstance(outputs, (tuple, list)) else ()
    return [value for value in values if isinstance(value, torch.Tensor)]
