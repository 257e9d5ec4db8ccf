"""Routing frames: the state of one call, visible to the routing blocks of that call only.

Everything a call needs for routing (per-example tags and keys, masks, the pooled encoder output that decoder
blocks route on, the causal prompt, REINFORCE terms, the decode-time cache) lives in a `RoutingFrame`. Frames are
held in a `contextvars.ContextVar` of the model (`FrameStack`):

* a forward call opens a frame when it starts and closes it when it returns (hooks on the model, see `hooks.py`);
* ``generate``, `SmearModel.routing_inputs`, PEFT's ``_enable_peft_forward_hooks`` and `RoutingRecorder` open
  *scopes*: frames that only carry options (tags, keys, the recorder, the generation session) to the forward frames
  opened inside them;
* each thread (and each asyncio task) has its own context, so concurrent calls never see each other's frames, and a
  nested scope restores the outer one when it ends.

Gradient checkpointing recomputes a layer after its call has returned: the checkpoint functions of the model's layers
are wrapped (`CarryFrames`) so that the recomputation runs in the context of the original call, and sees its frame.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch


def pool(states: torch.Tensor, mask: Optional[torch.Tensor], mode: str = "masked_mean") -> torch.Tensor:
    """Mean of ``states`` ``[B, S, C]`` over positions: over the positions where ``mask`` ``[B, S]`` is set for
    ``masked_mean`` (when a mask is given), over all of them for ``mean`` (the authors' unmasked mean).

    Sums and counts accumulate in at least float32 (a float16 sum of a few thousand positions overflows, and float16
    counts past 2048 are inexact); the mean comes back in the dtype of ``states``."""
    total = torch.promote_types(states.dtype, torch.float32)
    if mode == "masked_mean" and mask is not None:
        if mask.shape != states.shape[:2]:
            raise ValueError(
                f"The routing mask has shape {tuple(mask.shape)} but the routed states have {tuple(states.shape[:2])} "
                "(batch, positions): pass an attention_mask / routing_mask with one entry per input position."
            )
        weights = mask.to(states.dtype).unsqueeze(-1)
        summed = (states * weights).sum(1, dtype=total) / weights.sum(1, dtype=total).clamp_min(1.0)
        return summed.to(states.dtype)
    return states.mean(1, dtype=total).to(states.dtype)


@dataclass(eq=False)
class GenerationSession:
    """State of one ``generate`` call, shared by its forward frames.

    ``blocks`` keeps, per (block, adapter), what the block computed for the whole call: its routing decision and
    merged / gathered expert (decoder blocks of encoder-decoder models, causal prompt routing) or its causal segment
    state. ``encoder_states`` is the encoder output the decoder entries belong to (a new one clears them).
    """

    blocks: dict = field(default_factory=dict)
    #: ``False`` (``generate(..., routing_cache=False)``): blocks decide and merge again at every step (same outputs;
    #: for benchmarks and checks). Causal prompt routing still keeps each block's pooled prompt.
    reuse_experts: bool = True
    prompt_inputs: dict = field(default_factory=dict)
    encoder_states: Optional[torch.Tensor] = None
    decoder_sources: dict = field(default_factory=dict)
    content_keys: Optional[torch.Tensor] = None
    forwards: int = 0


@dataclass(eq=False)
class RoutingFrame:
    """Routing state of one call (``kind="forward"``) or the options of a scope (``kind="scope"``)."""

    kind: str = "scope"
    #: Per-example routing tags / hash keys ``[B]`` (long), an optional ``[B, S]`` causal routing mask, PEFT's
    #: per-example adapter names.
    tags: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    routing_mask: Optional[torch.Tensor] = None
    adapter_names: Optional[list] = None
    recorder: Any = None
    session: Optional[GenerationSession] = None
    #: Filled when a forward starts: the batch size of its inputs, the 2-D attention mask, the causal prompt mask, the
    #: number of positions already in the KV cache, content keys of the inputs (hash routing without keys).
    batch_size: Optional[int] = None
    input_mask: Optional[torch.Tensor] = None
    prompt_mask: Optional[torch.Tensor] = None
    prompt_error: Optional[str] = None
    #: Why the padding of this call is unknown (an attention mask that is not a 2-D padding mask); raised by the
    #: routing that needs it.
    mask_error: Optional[str] = None
    past_length: int = 0
    content_keys: Optional[torch.Tensor] = None
    #: Pooled encoder output per pooling mode, for the decoder blocks of encoder-decoder models.
    decoder_sources: dict = field(default_factory=dict)
    #: REINFORCE terms of this forward: adapter -> list of `AuxiliaryTerms`.
    reinforce_terms: dict = field(default_factory=dict)
    #: The module whose call opened this frame (its end closes it), and whether it has ended.
    owner: Any = None
    closed: bool = False
    grad_enabled: bool = True
    #: Pooled routing inputs of this forward, shared by the blocks that route on the same tensor (`pooled`).
    pools: dict = field(default_factory=dict)

    def child(self, kind: str = "forward", **options: Any) -> "RoutingFrame":
        """A frame inside this one: options not given are inherited."""
        inherited = {
            name: getattr(self, name)
            for name in ("tags", "keys", "routing_mask", "adapter_names", "recorder", "session")
        }
        inherited.update({k: v for k, v in options.items() if v is not None})
        return RoutingFrame(kind=kind, **inherited)

    # -- per-example values for a batch ------------------------------------------------------------------------------
    def per_example(self, values: Optional[torch.Tensor], batch_size: int, what: str) -> Optional[torch.Tensor]:
        """``values`` for a batch of ``batch_size`` rows. Inside ``generate`` (and only there) each example's value is
        repeated for its beams / return sequences, which follow each other in the batch."""
        if values is None or values.shape[0] == batch_size:
            return values
        if self.session is not None and values.shape[0] and batch_size % values.shape[0] == 0:
            return values.repeat_interleave(batch_size // values.shape[0], dim=0)
        raise ValueError(
            f"Got {values.shape[0]} {what} for a batch of {batch_size} examples: pass exactly one per example "
            "(only generate() repeats them for beams and return sequences)."
        )

    def adapter_rows(self, batch_size: int) -> Optional[dict]:
        """PEFT's mixed adapter batch of this call: ``{adapter: bool [batch_size] rows}`` (`mixed_batch`), or None."""
        if self.adapter_names is None:
            return None
        from .mixed_batch import example_rows

        return example_rows(self.adapter_names, batch_size, self.per_example)

    def tags_for(self, batch_size: int) -> Optional[torch.Tensor]:
        return self.per_example(self.tags, batch_size, "routing_tags")

    def keys_for(self, batch_size: int) -> Optional[torch.Tensor]:
        keys = self.keys
        if keys is None:
            keys = self.content_keys
        if keys is None and self.session is not None:
            keys = self.session.content_keys
        return self.per_example(keys, batch_size, "routing_keys")

    def decoder_source(self, mode: str, batch_size: int) -> torch.Tensor:
        if mode not in self.decoder_sources:
            raise RuntimeError(
                "A decoder routing block ran without the encoder's output: call the whole encoder-decoder model (its "
                "forward or generate), or the decoder with encoder_hidden_states=..., so that its routing input exists."
            )
        return self.per_example(self.decoder_sources[mode], batch_size, "decoder routing inputs")

    def pooled(self, states: torch.Tensor, mask: Optional[torch.Tensor], mode: str) -> torch.Tensor:
        """``pool(states, mask, mode)``, computed once per forward for the blocks that route on the same tensor (the
        q / k / v projections of a layer read one hidden state, gate / up another): the same value and the same
        autograd graph as pooling it again, so outputs and gradients are unchanged.

        ``states`` is recognised by the tensor it views (alive, same storage position, shape, strides, dtype and
        version counter) under the same mask and pooling mode, with gradients enabled or not as at the first call.
        An open forward frame shares across its blocks; inside a gradient-checkpointed layer, only the blocks of that
        layer call share (`CarryFrames`), in its forward and in its recomputation alike. Otherwise (the shared
        `EMPTY_FRAME`, tensors made under ``torch.inference_mode``) nothing is shared."""
        pools = _LAYER_POOLS.get()
        if pools is None:
            pools = self.pools if self.records else None
        if pools is None or states.is_inference():  # inference tensors have no version counter to check
            return pool(states, mask, mode)
        owner = states._base if states._base is not None else states
        key = (
            id(owner), states.storage_offset(), tuple(states.shape), states.stride(), states.dtype, states._version,
            states.requires_grad, torch.is_grad_enabled(), id(mask) if mask is not None else None, mode,
        )
        entry = pools.get(key)
        if entry is not None and entry[0]() is owner and (mask is None or entry[1]() is mask):
            return entry[2]
        pooled = pool(states, mask, mode)
        # Weak references: the cache never keeps a layer input (or a mask) alive; a freed one cannot be matched.
        pools[key] = (weakref.ref(owner), weakref.ref(mask) if mask is not None else None, pooled)
        return pooled

    @property
    def records(self) -> bool:
        """Whether blocks record into this frame (not when a checkpoint recomputes a layer after the call)."""
        return self.kind == "forward" and not self.closed


#: The frame a block sees when it runs outside any model call (e.g. a sublayer called directly): no options.
EMPTY_FRAME = RoutingFrame(kind="forward", closed=True)


class FrameStack:
    """One model's current routing frame, per thread / task (a `contextvars.ContextVar`).

    Copies of a model (``copy.deepcopy``, pickling) get a stack of their own."""

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[Optional[RoutingFrame]] = contextvars.ContextVar(
            f"smear_routing_frame_{id(self):x}", default=None
        )

    def __deepcopy__(self, memo: dict) -> "FrameStack":
        return FrameStack()

    def __reduce__(self):
        return (FrameStack, ())

    def current(self) -> Optional[RoutingFrame]:
        return self._var.get()

    def enter(self, frame: RoutingFrame) -> contextvars.Token:
        return self._var.set(frame)

    def leave(self, token: contextvars.Token) -> None:
        self._var.reset(token)

    @contextmanager
    def scope(self, **options: Any) -> Iterator[RoutingFrame]:
        """Open a scope carrying ``options`` to the calls made inside it; it ends (and the outer state is back) when
        the block exits."""
        outer = self.current()
        frame = outer.child(kind="scope", **options) if outer is not None else RoutingFrame(kind="scope", **{
            k: v for k, v in options.items() if v is not None
        })
        token = self.enter(frame)
        try:
            yield frame
        finally:
            self.leave(token)


class CarryFrames:
    """A layer's gradient-checkpointing function that recomputes the layer in the context of the original call.

    transformers calls ``layer._gradient_checkpointing_func(forward, *args)``; the recomputation runs during the
    backward pass, after the call (and its frame) has ended, possibly on another thread. This wrapper runs the layer
    in a copy of the calling context, so the recomputation sees the frame of the call it belongs to."""

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        context = contextvars.copy_context()
        return self.checkpoint(functools.partial(_run_in, context, function), *args, **kwargs)


#: Pooled routing inputs shared by the blocks of one checkpointed layer call (`RoutingFrame.pooled`). Its forward and
#: its recomputation each get a fresh scope, so both share exactly the same way and save the same tensors, as
#: non-reentrant checkpointing requires.
_LAYER_POOLS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("smear_layer_pools", default=None)


def _run_in(context: contextvars.Context, function: Any, *args: Any, **kwargs: Any) -> Any:
    return context.run(_in_layer_scope, function, *args, **kwargs)


def _in_layer_scope(function: Any, *args: Any, **kwargs: Any) -> Any:
    token = _LAYER_POOLS.set({})
    try:
        return function(*args, **kwargs)
    finally:
        _LAYER_POOLS.reset(token)


class RelayRoutingGradient(torch.autograd.Function):
    """Identity on the encoder output the decoder reads, which hands the gradients collected on the decoder blocks'
    detached routing inputs back to the pooled encoder output they came from.

    Decoder blocks route on a detached leaf copy of the pooled encoder output, so gradient checkpointing (reentrant or
    not) never backpropagates into the encoder's graph from inside a recomputed decoder layer. This function is applied
    to the ``encoder_hidden_states`` the decoder receives, before any decoder layer runs: in the backward pass it runs
    after every decoder layer (all of which read it, and all of which were recorded after it), when the leaves hold
    their full gradient, and passes that on. Gradients are thus those of the plain model in every checkpointing mode.
    """

    @staticmethod
    def forward(ctx, hidden_states, leaves, *sources):
        ctx.leaves = leaves
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad_hidden):
        grads = []
        for leaf in ctx.leaves:
            grads.append(leaf.grad)
            leaf.grad = None
        return (grad_hidden, None, *grads)
