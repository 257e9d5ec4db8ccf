"""Routing sources: what a block's router looks at, chosen per block by what the model is.

=================  =====================================================================================  ============
source             routing input of each example                                                         used for
=================  =====================================================================================  ============
`OwnInput`         the block's own input, averaged over the example's real positions (attention mask)    encoders, vision,
                                                                                                          other models
`EncoderOutput`    the encoder's final output, averaged over the example's real positions, for every     decoder blocks of
                   decoder block (routing is fixed while decoding)                                        encoder-decoders
`CausalPrompt`     the block's own input averaged over the example's prompt; every later token keeps     causal LMs
                   that routing (``causal_routing="prompt"``)                                            (default)
`CausalSegment`    segment k of the sequence routed on the block's input averaged over segment k-1       causal LMs
                   (Lory); segment 0 on an all-zero input (``causal_routing="segment"``)
=================  =====================================================================================  ============

A source turns a block's tokens and the call's `RoutingFrame` into a `RoutePlan`: the routing input of each *routing
unit* (an example, or an example's segment), how tokens map to units, and where a ``generate`` call keeps what the
block computed so that later decoding steps reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from .frames import RoutingFrame


class UnitLayout(NamedTuple):
    """Where each token goes when a batch is routed per segment: ``index[b * S + s]`` is the row of the token in a
    ``[units * slot_length]`` buffer (-1 for padding), and ``example[u]`` the example of unit ``u``."""

    index: torch.Tensor
    num_units: int
    slot_length: int
    example: torch.Tensor

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, S, C]`` -> ``[units, slot_length, C]`` (empty rows are zero)."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        valid = self.index >= 0
        buffer = flat.new_zeros(self.num_units * self.slot_length, flat.shape[-1])
        buffer = buffer.index_copy(0, self.index[valid], flat[valid])
        return buffer.view(self.num_units, self.slot_length, -1)

    def scatter(self, units: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of `gather`: ``[units, slot_length, C]`` -> ``[B, S, C]`` (padding positions get zero)."""
        flat = units.reshape(-1, units.shape[-1])
        valid = self.index >= 0
        out = flat.new_zeros(like.shape[0] * like.shape[1], flat.shape[-1])
        out = out.index_copy(0, valid.nonzero().squeeze(-1), flat[self.index[valid]])
        return out.view(*like.shape[:2], -1)


@dataclass
class RoutePlan:
    """What a source decided for one block call.

    ``pooled`` ``[U, C]``: routing input per unit (``None`` when ``cached`` holds the decision already).
    ``layout``: ``None`` when units are the examples of the batch, else a `UnitLayout`.
    ``cached``: ``(decision, expert parameters)`` kept from an earlier step of the same ``generate`` call.
    ``store``: where to keep this call's ``(decision, expert parameters)`` for the later steps (``(dict, key)``).
    """

    pooled: Optional[torch.Tensor] = None
    layout: Optional[UnitLayout] = None
    cached: Any = None
    store: Optional[tuple] = None

    @property
    def example(self) -> Optional[torch.Tensor]:
        return None if self.layout is None else self.layout.example


class RoutingSource:
    """Base class; one instance per (block, adapter)."""

    name: str = ""

    def plan(self, layer: Any, adapter: str, tokens: torch.Tensor, frame: RoutingFrame, needs_input: bool) -> RoutePlan:
        raise NotImplementedError


class OwnInput(RoutingSource):
    """The block's own input, pooled over the example's real positions (``pooling`` of the adapter's config)."""

    name = "input"

    def __init__(self, pooling: str) -> None:
        self.pooling = pooling

    def plan(self, layer, adapter, tokens, frame, needs_input):
        if not needs_input:
            return RoutePlan()
        mask = frame.input_mask
        if mask is not None and tokens.shape[1] == 1 and mask.shape[1] != 1:
            mask = None  # a block on a pooled [B, C] output: one position per example
        elif mask is None and frame.mask_error is not None and self.pooling == "masked_mean" and tokens.shape[1] != 1:
            raise ValueError(frame.mask_error)
        return RoutePlan(pooled=frame.pooled(tokens, mask, self.pooling))


class EncoderOutput(RoutingSource):
    """The encoder's final output pooled over real positions, the same for every decoder block and decoding step."""

    name = "encoder_output"

    def __init__(self, pooling: str) -> None:
        self.pooling = pooling

    def plan(self, layer, adapter, tokens, frame, needs_input):
        session = frame.session
        key = (id(layer), adapter)
        if session is not None and key in session.blocks:
            return RoutePlan(cached=session.blocks[key])
        pooled = frame.decoder_source(self.pooling, tokens.shape[0]).to(tokens.dtype) if needs_input else None
        return RoutePlan(pooled=pooled, store=_store(session, key))


class CausalPrompt(RoutingSource):
    """Each example routed on the mean of the block input over its prompt, kept for every later position.

    The prompt is what ``generate`` receives (its first forward), else an explicit ``routing_mask``, else the leading
    positions whose ``labels`` are -100 (see `hooks.causal_prompt_mask`)."""

    name = "prompt"

    def plan(self, layer, adapter, tokens, frame, needs_input):
        session = frame.session
        key = (id(layer), adapter)
        if session is not None and key in session.blocks:
            return RoutePlan(cached=session.blocks[key])
        if session is not None and key in session.prompt_inputs:
            return RoutePlan(pooled=session.prompt_inputs[key], store=_store(session, key))
        if not needs_input:  # tags, explicit keys, monolithic: nothing to read from the prompt
            return RoutePlan(store=_store(session, key))
        if frame.prompt_mask is None:
            raise ValueError(frame.prompt_error or _NO_PROMPT)
        pooled = frame.pooled(tokens, frame.prompt_mask, "masked_mean")
        if session is not None:
            session.prompt_inputs[key] = pooled
        return RoutePlan(pooled=pooled, store=_store(session, key))


def _store(session, key) -> Optional[tuple]:
    """Where a block keeps its decision and expert for the rest of a ``generate`` call (``None``: it doesn't)."""
    return (session.blocks, key) if session is not None and session.reuse_experts else None


_NO_PROMPT = (
    "causal_routing='prompt' routes each example on its prompt, but this call marks none: pass labels with -100 on "
    "the prompt positions (instruction tuning), routing_mask=[B, S] marking the prompt, or call generate(); or use "
    "SmearConfig(causal_routing='segment'), which needs no prompt."
)


@dataclass
class SegmentState:
    """Causal segment routing of one block across the forwards of one ``generate`` call (per example)."""

    positions: int  # positions processed so far (cache length)
    count: torch.Tensor  # [B] real tokens so far
    partial_sum: torch.Tensor  # [B, C] sum of the block input over the current, unfinished segment
    partial_count: torch.Tensor  # [B]
    previous: torch.Tensor  # [B, C] mean over the previous segment (zeros before segment 1)


class CausalSegment(RoutingSource):
    """Lory-style causal segment routing: the real tokens of each example are cut into segments of
    ``segment_length``; segment k uses experts routed on the block input averaged over segment k-1, and segment 0 on
    an all-zero routing input (the router's learned input-norm bias: a prior that no token influences). No position
    ever depends on a later token. Padding is skipped, so segments are the same alone or in a padded batch.
    """

    name = "segment"

    def __init__(self, segment_length: int) -> None:
        self.segment_length = segment_length

    def plan(self, layer, adapter, tokens, frame, needs_input):
        if not needs_input:  # tags, hashes: one routing per example, segments change nothing
            return RoutePlan()
        batch, positions, channels = tokens.shape
        length = self.segment_length
        mask = frame.input_mask
        if mask is None and frame.mask_error is not None:  # segments count real tokens only
            raise ValueError(frame.mask_error)
        if mask is None:
            mask = torch.ones(batch, positions, dtype=torch.bool, device=tokens.device)
        else:  # with a KV cache the attention mask also covers the cached positions: keep this call's
            mask = mask[:, mask.shape[1] - positions :].bool()
        session, key = frame.session, (id(layer), adapter)
        state = None
        if frame.past_length:
            state = session.blocks.get(key) if session is not None else None
            if state is None or state.positions != frame.past_length:
                raise ValueError(
                    "causal_routing='segment' continued from a KV cache outside generate(): the routing of earlier "
                    "segments is not known here. Use generate(), or run the whole sequence without past_key_values."
                )
        zeros = torch.zeros(batch, dtype=torch.long, device=tokens.device)
        start = state.count if state is not None else zeros  # [B] real tokens before this call
        token_index = start[:, None] + mask.long().cumsum(1) - 1  # [B, S]
        segment = torch.div(token_index, length, rounding_mode="floor")
        first_segment = torch.div(start, length, rounding_mode="floor")
        slot = (segment - first_segment[:, None]).clamp_min(0)
        within = token_index - torch.maximum(segment * length, start[:, None])
        num_slots = int(slot[mask].max()) + 1 if mask.any() else 1
        slot_length = int(within[mask].max()) + 1 if mask.any() else 1
        unit = torch.arange(batch, device=tokens.device)[:, None] * num_slots + slot
        index = torch.where(mask, unit * slot_length + within, torch.full_like(unit, -1)).reshape(-1)

        flat = tokens.reshape(-1, channels)
        valid = mask.reshape(-1)
        units = unit.reshape(-1)[valid]
        # Sums and counts accumulate in at least float32 (float16 overflows on long segments), means are in the
        # tokens' dtype; the running state across decoding steps keeps the float32 sums.
        total = torch.promote_types(tokens.dtype, torch.float32)
        sums = torch.zeros(batch * num_slots, channels, dtype=total, device=tokens.device).index_add(
            0, units, flat[valid].to(total)
        )
        counts = torch.zeros(batch * num_slots, dtype=total, device=tokens.device).index_add(
            0, units, torch.ones_like(units, dtype=total)
        )
        if state is not None:  # the current segment began in an earlier call
            carried = torch.zeros_like(sums).view(batch, num_slots, channels)
            carried[:, 0] = state.partial_sum.to(total)
            sums = sums + carried.view_as(sums)
            carried_counts = torch.zeros_like(counts).view(batch, num_slots)
            carried_counts[:, 0] = state.partial_count.to(total)
            counts = counts + carried_counts.view_as(counts)
        means = (sums / counts.clamp_min(1.0)[:, None]).to(tokens.dtype).view(batch, num_slots, channels)
        previous = state.previous.to(tokens.dtype) if state is not None else tokens.new_zeros(batch, channels)
        pooled = torch.cat([previous[:, None], means[:, :-1]], dim=1)  # slot j routes on slot j-1
        example = torch.arange(batch, device=tokens.device).repeat_interleave(num_slots)
        layout = UnitLayout(index, batch * num_slots, slot_length, example)
        if session is not None:
            session.blocks[key] = self._next_state(
                frame.past_length + positions, start, mask, sums.view(batch, num_slots, channels),
                counts.view(batch, num_slots), means, pooled, state,
            )
        return RoutePlan(pooled=pooled.reshape(batch * num_slots, channels), layout=layout)

    def _next_state(self, positions, start, mask, sums, counts, means, pooled, state) -> SegmentState:
        """The segment state after this call, for the next decoding step."""
        with torch.no_grad():
            length = self.segment_length
            batch = start.shape[0]
            added = mask.long().sum(1)
            count = start + added
            rows = torch.arange(batch, device=start.device)
            last = (torch.div((count - 1).clamp_min(0), length, rounding_mode="floor")
                    - torch.div(start, length, rounding_mode="floor")).clamp_min(0)
            finished = (count % length == 0)[:, None]
            partial_sum = torch.where(finished, torch.zeros_like(sums[rows, last]), sums[rows, last])
            partial_count = torch.where(finished[:, 0], torch.zeros_like(counts[rows, last]), counts[rows, last])
            previous = torch.where(finished, means[rows, last], pooled[rows, last])
            if state is not None:  # examples with no new token keep their state
                keep = (added == 0)
                partial_sum = torch.where(keep[:, None], state.partial_sum.to(sums.dtype), partial_sum)
                partial_count = torch.where(keep, state.partial_count.to(counts.dtype), partial_count)
                previous = torch.where(keep[:, None], state.previous.to(means.dtype), previous)
            return SegmentState(positions, count, partial_sum.detach(), partial_count, previous.detach())


def routing_source(role: str, config: Any) -> RoutingSource:
    """The source of a block with role ``input``, ``encoder_output`` or ``causal`` under an adapter's config."""
    if role == "encoder_output":
        return EncoderOutput(config.pooling)
    if role == "causal":
        if config.causal_routing == "segment":
            return CausalSegment(config.segment_length)
        return CausalPrompt()
    return OwnInput(config.pooling)
