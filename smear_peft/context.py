"""Per-call routing state shared by all blocks of one model: masks, decoder routing inputs, tags, keys.

`SmearModel` fills it from hooks on the model (never by editing model code):

* a pre-forward hook on the encoder (or on the whole model, for encoder-only and vision models) stores the 2-D
  attention mask, so encoder blocks pool over real tokens only;
* a pre-forward hook on the decoder pools the encoder's final hidden states once per decoder call; every decoder block
  routes on that vector, so routing is fixed while decoding (the inputs are already beam-expanded in ``generate``);
* ``routing_tags`` / ``routing_keys`` given to ``forward`` or ``generate`` are stored per example and expanded to the
  decoder's batch (beams, ``num_return_sequences``) on use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def pool(states: torch.Tensor, mask: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """Mean of ``states`` ``[B, S, C]`` over positions: over unmasked ones for ``masked_mean`` (when a matching mask is
    given), over all of them for ``mean`` (the authors' unmasked mean over the padded batch)."""
    if mode == "masked_mean" and mask is not None and mask.shape == states.shape[:2]:
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return states.mean(1)


def expand_to_batch(values: Optional[torch.Tensor], batch_size: int, what: str) -> Optional[torch.Tensor]:
    """Per-example values for a batch that repeats each example k times in a row (beams, return sequences)."""
    if values is None or values.shape[0] == batch_size:
        return values
    if batch_size % values.shape[0]:
        raise ValueError(
            f"Got {values.shape[0]} {what} for a batch of {batch_size} examples: pass one per example of the batch."
        )
    return values.repeat_interleave(batch_size // values.shape[0], dim=0)


class _RelayRoutingGradient(torch.autograd.Function):
    """Identity on the decoder's hidden states that hands the gradients collected on detached routing inputs back to
    the encoder states they were pooled from.

    Decoder blocks route on a detached leaf copy of the pooled encoder states, so gradient checkpointing (reentrant or
    not) never backpropagates into the encoder graph from inside a checkpointed block. This function sits on the input
    of the first decoder block: its backward runs after every decoder block's, when the leaves hold their full
    gradient, and passes it on to the attached pooled states. Gradients are thus those of the plain model in every
    checkpointing mode.
    """

    @staticmethod
    def forward(ctx, hidden_states, leaves, *sources):
        ctx.leaves = leaves
        return hidden_states.clone()

    @staticmethod
    def backward(ctx, grad_hidden):
        grads = []
        for leaf in ctx.leaves:
            grads.append(leaf.grad)
            leaf.grad = None
        return (grad_hidden, None, *grads)


@dataclass
class RoutingContext:
    """State for the current call; see the module docstring."""

    input_mask: Optional[torch.Tensor] = None
    decoder_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    tags: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    content_keys: Optional[torch.Tensor] = None
    recorder: Any = None
    #: The tags / keys came with this forward call's keyword arguments (cleared when it returns).
    set_by_forward: bool = False
    #: REINFORCE terms of the current forward: adapter -> list of (log_prob, entropy, predicted loss).
    reinforce_terms: dict[str, list] = field(default_factory=dict)
    #: Within one ``generate`` call, decoder blocks keep their routing and merged experts (see `SmearLayer`).
    decode_cache: Optional[dict] = None
    _pending_relay: list = field(default_factory=list)
    _decoder_source: Any = None

    def start_forward(self) -> None:
        """Reset what belongs to one forward pass."""
        self.reinforce_terms = {}

    def set_decoder_inputs(self, encoder_states: Optional[torch.Tensor], mask: Optional[torch.Tensor], modes) -> None:
        """Pool the encoder's final hidden states once for all decoder blocks (one vector per pooling mode)."""
        if encoder_states is None:
            self.decoder_inputs = {}
            return
        if self.decode_cache is not None and self._decoder_source is encoder_states:
            return  # same encoder states as the previous decoding step: routing is unchanged
        self._decoder_source = encoder_states if self.decode_cache is not None else None
        if self.decode_cache is not None:
            self.decode_cache.clear()
        self._pending_relay = []
        self.decoder_inputs = {}
        for mode in modes:
            pooled = pool(encoder_states, mask, mode)
            if torch.is_grad_enabled() and pooled.requires_grad:
                leaf = pooled.detach().requires_grad_(True)
                self._pending_relay.append((pooled, leaf))
                pooled = leaf
            self.decoder_inputs[mode] = pooled

    def relay_into(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Attach the pending gradient relay to the first decoder block's input (see `_RelayRoutingGradient`)."""
        if not self._pending_relay:
            return hidden_states
        sources, leaves = zip(*self._pending_relay)
        self._pending_relay = []
        return _RelayRoutingGradient.apply(hidden_states, list(leaves), *sources)

    def decoder_input(self, mode: str, batch_size: int) -> torch.Tensor:
        if mode not in self.decoder_inputs:
            raise RuntimeError(
                "A decoder routing block ran without the encoder's hidden states: call the model with encoder outputs "
                "(as seq2seq forward and generate do), or wrap only encoder modules."
            )
        return expand_to_batch(self.decoder_inputs[mode], batch_size, "decoder routing inputs")

    def tags_for(self, batch_size: int) -> Optional[torch.Tensor]:
        return expand_to_batch(self.tags, batch_size, "routing_tags")

    def keys_for(self, batch_size: int) -> Optional[torch.Tensor]:
        keys = self.keys if self.keys is not None else self.content_keys
        return expand_to_batch(keys, batch_size, "routing_keys")
