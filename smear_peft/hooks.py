"""Hooks that open and fill routing frames (see `smear_peft.frames`); model code is never edited.

* On the model: a call opens a forward frame with its per-call inputs (tags, keys, routing mask, attention mask,
  causal prompt, KV-cache length) and closes it when it returns; REINFORCE terms go onto the output.
* On the encoder and decoder stacks of encoder-decoder models: the encoder's attention mask, and the pooled encoder
  output that every decoder block routes on (with the gradient relay into the encoder). Called on their own (as
  ``generate`` calls the encoder), a stack opens a frame of its own.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .losses import output_tensors
from .frames import GenerationSession, RelayRoutingGradient, RoutingFrame, pool
from .routing import content_keys

if TYPE_CHECKING:
    from .model import SmearModel

#: Per-call keyword arguments consumed by smear-peft (never passed on to the base model).
ROUTING_KWARGS = ("routing_tags", "routing_keys", "routing_mask")
#: Keyword arguments whose first dimension is the batch, in order of preference.
MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values", "x")

_SIGNATURES: dict = {}


def named_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name (positional ones bound to the forward signature)."""
    if not args:
        return kwargs
    forward = type(module).forward
    signature = _SIGNATURES.get(forward)
    if signature is None:
        signature = _SIGNATURES[forward] = inspect.signature(forward)
    try:
        bound = signature.bind_partial(module, *args, **kwargs).arguments
    except TypeError:
        return kwargs
    named = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    named.setdefault("__args__", args)
    return named


def batch_size_of(named: dict) -> Optional[int]:
    for name in MAIN_INPUTS:
        value = named.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in named.get("__args__", ()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def past_length_of(named: dict) -> int:
    """Positions already in the KV cache of this call."""
    cache = named.get("past_key_values", named.get("cache"))
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])
    position = named.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    return 0


def two_d_mask(value: Any) -> Optional[torch.Tensor]:
    return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None


def unreadable_mask_error(value: Any, causal_prompt: bool, in_generate: bool, name: str = "attention_mask") -> Optional[str]:
    """Why routing cannot read each example's padding from ``value`` (an attention mask given to a model or stack),
    and how to fix it; ``None`` when it can (a 2-D padding mask, or no mask: every position is real)."""
    if value is None or two_d_mask(value) is not None:
        return None
    what = f"a {value.dim()}-D tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else (
        f"a {type(value).__name__}"
    )
    fixes = f"pass the 2-D padding mask [batch, positions] (1 = real token) as {name}; the model builds its own "
    fixes += "attention masks from it"
    if causal_prompt:
        fixes += ", or routing_mask=[batch, positions] marking each example's prompt tokens (never padding)"
    message = (
        f"Routing needs to know which positions of each example are padding, but the {name} is {what}, from "
        f"which smear-peft cannot read it (4-D masks, mask dicts and BlockMasks are not padding masks): {fixes}."
    )
    if in_generate:
        message += (
            " generate() builds such masks for static (compilable) caches when prompts are padded: use the default "
            "dynamic cache" + (", or generate(..., routing_mask=attention_mask)" if causal_prompt else "") + "."
        )
    return message


def causal_prompt(frame: RoutingFrame, named: dict) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The prompt mask ``[B, S]`` of a causal LM call (or ``None`` and why not).

    In ``generate``: the prompt of the first forward (its real tokens, or the ``routing_mask`` given to generate);
    later forwards reuse what the blocks computed then. Otherwise an explicit ``routing_mask``, else the real positions
    before the first one whose label is not -100 (the prompt of instruction tuning)."""
    input_ids = named.get("input_ids")
    if input_ids is None:  # generate(inputs_embeds=...) passes input_ids=None
        input_ids = named.get("inputs_embeds")
    if frame.input_mask is not None:
        real = frame.input_mask.bool()
    elif isinstance(input_ids, torch.Tensor):
        real = torch.ones(input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
    else:
        return None, None
    session = frame.session
    if session is not None and session.forwards > 1:
        return None, "the routing of this generate() call was lost; start a new generate() call."
    if frame.past_length:
        return None, (
            "causal_routing='prompt' continued from a KV cache outside the first step of generate(): the prompt is "
            "not known here. Use generate(), or run the whole sequence (with labels or routing_mask) without "
            "past_key_values."
        )
    has_tokens = real.any(1)
    routing_mask = frame.routing_mask
    if routing_mask is None and frame.mask_error is not None:  # the prompt's padding is unknown
        return None, frame.mask_error
    if routing_mask is not None:
        if session is not None:  # one row per example: repeated for its beams / return sequences
            routing_mask = frame.per_example(routing_mask, real.shape[0], "routing_mask rows")
        if routing_mask.shape != real.shape:
            raise ValueError(
                f"routing_mask has shape {tuple(routing_mask.shape)}, but the inputs have {tuple(real.shape)} "
                "(batch, positions): mark the prompt positions of each input position."
            )
        marked = routing_mask.to(real.device).bool()
        if frame.mask_error is not None:
            # No readable padding mask: routing_mask marks a prefix of each example's real tokens, so the positions
            # before an example's first marked one are its (left) padding.
            real = real & (marked.long().cumsum(1) > 0)
        prompt = real & marked
        later = (real & ~prompt).long().cumsum(1) > 0
        if (later & prompt).any():
            raise ValueError(
                "routing_mask must mark a prefix of each example's tokens: a routed position after a non-routed one "
                "would let earlier tokens depend on later ones. Mark only the prompt that precedes the response."
            )
    elif session is not None:
        prompt = real
    else:
        labels = named.get("labels")
        if not (isinstance(labels, torch.Tensor) and labels.shape == real.shape):
            return None, None
        supervised = (labels.to(real.device) != -100) & real
        prompt = real & (supervised.long().cumsum(1) == 0)
    empty = has_tokens & ~prompt.any(1)
    if empty.any():
        raise ValueError(
            f"Examples {empty.nonzero().squeeze(-1).tolist()} have no prompt to route on (their first real token is "
            "supervised, or the routing_mask marks none). Mark the prompt with labels=-100 or routing_mask=[B, S], or "
            "use SmearConfig(causal_routing='segment'), which needs no prompt."
        )
    return prompt, None


class FrameHooks:
    """The hooks of one `SmearModel` (installed by it, removed by ``unload``)."""

    def __init__(self, tuner: "SmearModel") -> None:
        self.tuner = tuner

    @property
    def frames(self):
        return self.tuner.frames

    def install(self, model: nn.Module, encoder: Optional[nn.Module], decoder: Optional[nn.Module]) -> list:
        handles = [
            model.register_forward_pre_hook(self.on_model_start, with_kwargs=True),
            model.register_forward_hook(self.on_end, with_kwargs=True, always_call=True),
        ]
        for stack, start in ((encoder, self.on_encoder_start), (decoder, self.on_decoder_start)):
            if stack is not None:
                handles.append(stack.register_forward_pre_hook(start, with_kwargs=True))
                handles.append(stack.register_forward_hook(self.on_end, with_kwargs=True, always_call=True))
        return handles

    # -- frames ----------------------------------------------------------------------------------------------------
    def _open(self, module: nn.Module, **options: Any) -> RoutingFrame:
        parent = self.frames.current()
        frame = parent.child("forward", **options) if parent is not None else RoutingFrame(kind="forward", **{
            k: v for k, v in options.items() if v is not None
        })
        frame.owner = module
        frame.grad_enabled = torch.is_grad_enabled()
        frame._token = self.frames.enter(frame)
        if frame.grad_enabled:  # checkpointing only recomputes layers when there is a backward pass
            self.tuner.carry_frames_into_checkpoints()
        return frame

    def _joinable(self) -> Optional[RoutingFrame]:
        frame = self.frames.current()
        return frame if frame is not None and frame.kind == "forward" and not frame.closed else None

    def on_end(self, module, args, kwargs, output):
        frame = self.frames.current()
        if frame is None or frame.owner is not module:
            return None
        frame.closed = True
        self.frames.leave(frame._token)
        if frame.reinforce_terms:
            if isinstance(output, tuple) and not hasattr(output, "keys"):
                raise ValueError(
                    "REINFORCE routing returns its auxiliary terms on the model output, which a plain tuple cannot "
                    "carry: call the model with return_dict=True."
                )
            object.__setattr__(output, "smear_reinforce_terms", frame.reinforce_terms)
            # Wrappers that rebuild the output (FSDP1's root and DDP copy a dataclass output field by field) keep its
            # tensors but drop the attribute: the terms also ride on the output's tensors (`losses.reinforce_terms_of`).
            for value in output_tensors(output):
                value.smear_reinforce_terms = frame.reinforce_terms
        return None

    # -- the model -------------------------------------------------------------------------------------------------
    def on_model_start(self, module, args, kwargs):
        tuner = self.tuner
        routing = {name: kwargs.pop(name) for name in ROUTING_KWARGS if name in kwargs}
        named = named_inputs(module, args, kwargs)
        batch = batch_size_of(named)
        tags = tuner.index_tensor(routing.get("routing_tags"), "routing_tags", batch)
        keys = tuner.index_tensor(routing.get("routing_keys"), "routing_keys", batch)
        routing_mask = routing.get("routing_mask")
        if routing_mask is not None:
            routing_mask = torch.as_tensor(routing_mask).bool()
        frame = self._open(module, tags=tags, keys=keys, routing_mask=routing_mask)
        frame.batch_size = batch
        frame.input_mask = two_d_mask(named.get("attention_mask"))
        frame.past_length = past_length_of(named)
        session = frame.session
        if session is not None:
            session.forwards += 1
        # generate()'s decoding steps only add real tokens (static caches pass them 4-D masks): nothing to read there
        if not (session is not None and frame.past_length):
            frame.mask_error = self._mask_error(named.get("attention_mask"), session is not None)
        if tuner.has_causal_blocks:
            frame.prompt_mask, frame.prompt_error = causal_prompt(frame, named)
        if frame.keys is None and tuner.needs_keys():
            frame.content_keys = self._causal_content_keys(frame, named) if tuner.has_causal_blocks else (
                self._content_keys(named, frame.input_mask, frame.mask_error)
            )
        return args, kwargs

    def _mask_error(self, value: Any, in_generate: bool = False, name: str = "attention_mask") -> Optional[str]:
        prompt = self.tuner.has_causal_blocks and any(
            m.config.causal_routing == "prompt" for m in self.tuner._active_methods()
        )
        return unreadable_mask_error(value, prompt, in_generate, name)

    def _causal_content_keys(self, frame: RoutingFrame, named: dict) -> Optional[torch.Tensor]:
        """Hash keys of a causal LM come from the prompt only (fixed for a whole generate call), so no token's routing
        depends on a later token. Segment routing has no prompt: hash routing then needs explicit routing_keys."""
        session = frame.session
        if session is not None and session.content_keys is not None:
            return session.content_keys
        if frame.prompt_mask is None or any(m.config.causal_routing == "segment" for m in self.tuner._active_methods()):
            return None
        value = next((named[n] for n in ("input_ids", "inputs_embeds") if isinstance(named.get(n), torch.Tensor)), None)
        keys = content_keys(value, frame.prompt_mask) if value is not None else None
        if session is not None:
            session.content_keys = keys
        return keys

    def _content_keys(self, named: dict, mask: Optional[torch.Tensor], mask_error: Optional[str] = None) -> Optional[torch.Tensor]:
        for name in MAIN_INPUTS:
            value = named.get(name)
            if isinstance(value, torch.Tensor):
                # Token ids and embeddings are per position: padding is left out (a mask with one entry per position)
                if name not in ("input_ids", "inputs_embeds"):
                    return content_keys(value)
                if mask is None and mask_error is not None:
                    raise ValueError(f"routing='hash' hashes each example's real tokens. {mask_error}")
                return content_keys(value, mask)
        return None

    # -- encoder-decoder stacks ------------------------------------------------------------------------------------
    def on_encoder_start(self, module, args, kwargs):
        named = named_inputs(module, args, kwargs)
        frame = self._joinable() or self._open(module)
        mask = two_d_mask(named.get("attention_mask"))
        preset = self.tuner.preset
        if preset is not None and not preset.encoder_reads_attention_mask:  # every position counts, as in the model
            frame.input_mask, frame.mask_error, mask = None, None, None
        elif mask is not None or frame.owner is module:
            frame.input_mask = mask
            frame.mask_error = self._mask_error(named.get("attention_mask"), frame.session is not None)
        if frame.keys is None and self.tuner.needs_keys():
            frame.content_keys = self._content_keys(named, mask, frame.mask_error)
            if frame.session is not None:
                frame.session.content_keys = frame.content_keys
        return args, kwargs

    def on_decoder_start(self, module, args, kwargs):
        named = named_inputs(module, args, kwargs)
        frame = self._joinable() or self._open(module)
        states = named.get("encoder_hidden_states")
        if not isinstance(states, torch.Tensor):
            return args, kwargs
        mask = two_d_mask(named.get("encoder_attention_mask"))
        session = frame.session
        if session is not None and session.encoder_states is states:
            frame.decoder_sources = session.decoder_sources
            return args, kwargs
        error = self._mask_error(named.get("encoder_attention_mask"), name="encoder_attention_mask")
        if error is not None and any(m.uses_router and m.config.pooling == "masked_mean" for m in self.tuner._active_methods()):
            raise ValueError(f"Decoder routing averages the encoder output over each example's real positions. {error}")
        leaves, sources = [], []
        pooled_by_mode = {}
        for mode in self.tuner.pooling_modes():
            pooled = pool(states, mask, mode)
            if torch.is_grad_enabled() and pooled.requires_grad:
                leaf = pooled.detach().requires_grad_(True)
                leaves.append(leaf)
                sources.append(pooled)
                pooled = leaf
            pooled_by_mode[mode] = pooled
        frame.decoder_sources = pooled_by_mode
        if session is not None:
            session.encoder_states, session.decoder_sources = states, pooled_by_mode
            session.blocks.clear()
        if leaves:
            relayed = RelayRoutingGradient.apply(states, leaves, *sources)
            if "encoder_hidden_states" in kwargs:
                kwargs["encoder_hidden_states"] = relayed
            else:
                position = list(inspect.signature(type(module).forward).parameters).index("encoder_hidden_states") - 1
                args = (*args[:position], relayed, *args[position + 1:])
        return args, kwargs
