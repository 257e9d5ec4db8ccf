"""`SmearLayer`: wraps one sublayer of the base model and adds an expert routing block to its output."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import SmearConfig
from .experts import Experts
from .expert_types import IA3Experts, LinearShape, LoraExperts, build_linear_experts, matches_modules
from .frames import EMPTY_FRAME, FrameStack, RoutingFrame
from .mixed_batch import active_for, select_rows
from .routers import ReinforceBaseline, Router
from .routing import RoutingInputs, RoutingMethod
from .sources import RoutePlan, RoutingSource, routing_source


def bottleneck_size(config: SmearConfig, routing: RoutingMethod, hidden_size: int) -> int:
    """The experts' bottleneck: explicit, or hidden // reduction_factor, times the method's width factor."""
    size = config.bottleneck_size or max(1, hidden_size // config.reduction_factor)
    return size * routing.bottleneck_multiplier()


def _scale_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values`` ``[..., F]`` (``B * P`` rows) times an (IA)³ ``scale`` ``[B, P, F]`` or ``[B, 1, F]`` (broadcast over
    positions), computed in the scale's dtype and returned in the values' dtype and shape."""
    rows = values.to(scale.dtype).reshape(scale.shape[0], -1, values.shape[-1])
    return (rows * scale).reshape(values.shape).to(values.dtype)


class AuxiliaryTerms(tuple):
    """One block's REINFORCE terms for one forward: ``(log_prob, entropy, baseline, example)``, each ``[units]``
    (``example``: the example of each routing unit, ``None`` when units are the examples)."""

    __slots__ = ()

    def __new__(cls, log_prob, entropy, baseline, example):
        return super().__new__(cls, (log_prob, entropy, baseline, example))


class SmearLayer(nn.Module, BaseTunerLayer):
    """An expert routing block around one sublayer.

    ``forward`` runs the wrapped sublayer and transforms its output ``y`` (the first element when it returns a tuple)::

        y' = y + post_norm(experts(input_norm(y); routing(router(source(...)))))

    With ``position="input"`` the block transforms the sublayer's first input instead (the authors' ResNet block sits
    after the residual add and before the final ReLU, which is the input of the stage's activation module).

    With ``position="linear"`` (``expert_type="lora"`` / ``"ia3"``) the wrapped module is a Linear layer ``base`` and
    the experts change it in place: ``base(x) + s * drop(x) A B`` (LoRA) or ``base(x) * l`` / ``base(x * l)`` ((IA)³),
    routed on the layer's input ``x`` (or the source of its ``role``); see `smear_peft.expert_types`.

    ``role`` says where the router's input comes from (see `smear_peft.sources`): ``input`` (the block's own input),
    ``encoder_output`` (decoder blocks of encoder-decoder models) or ``causal`` (causal LMs: prompt or segments).

    Every module owning adapter parameters (router, experts, norms, baseline) uses them only in its own ``forward``, so
    any FSDP / ZeRO-3 wrap policy works. Per-adapter state lives in `nn.ModuleDict`s of leaf modules, so checkpoint
    keys are ``<attr>.<adapter>.<param>`` and load under any adapter name.
    """

    adapter_layer_names = ("smear_router", "smear_experts", "smear_post_norm", "smear_input_norm", "smear_baseline")
    other_param_names = ("smear_routing", "smear_source", "smear_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SmearConfig,
        routing: RoutingMethod,
        *,
        hidden_size: int,
        frames: FrameStack,
        role: str = "input",
        source_size: Optional[int] = None,
        side: str = "any",
        block_index: int = 0,
        block_name: str = "",
        channel_dim: int = -1,
        position: str = "output",
        flattened: bool = False,
        post_norm: bool = True,
        input_norm: str = "none",
        reference: Optional[torch.Tensor] = None,
        linear_shape: Optional[LinearShape] = None,
    ) -> None:
        super().__init__()
        self.linear_shape = linear_shape  # the wrapped Linear's shape (position="linear")
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        # PEFT's layers expose their widths; a block keeps its module's, or its own channel width.
        self.in_features = getattr(base_layer, "in_features", None) or hidden_size
        self.out_features = getattr(base_layer, "out_features", None) or getattr(base_layer, "nf", None) or hidden_size
        self.role = role
        self.source_size = source_size or hidden_size
        self.side = side
        self.block_index = block_index
        self.block_name = block_name
        self.channel_dim = channel_dim
        self.position = position
        self.flattened = flattened
        self._default_post_norm = post_norm
        self._default_input_norm = input_norm
        self._frames = frames  # plain attribute: not a submodule, never saved
        self._reference = (reference,)  # the model's device / dtype for targets without parameters (a tuple: not registered)
        self.smear_router = nn.ModuleDict()
        self.smear_experts = nn.ModuleDict()
        self.smear_post_norm = nn.ModuleDict()
        self.smear_input_norm = nn.ModuleDict()
        self.smear_baseline = nn.ModuleDict()
        self.smear_dropout = nn.ModuleDict()  # LoRA experts' input dropout (no parameters, never saved)
        self.smear_routing: dict[str, RoutingMethod] = {}
        self.smear_source: dict[str, RoutingSource] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, routing)

    # -- adapters --------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: SmearConfig, routing: RoutingMethod) -> None:
        """Create the router, experts and norms of one adapter."""
        hidden = self.hidden_size
        self.smear_routing[adapter_name] = routing
        self.smear_source[adapter_name] = routing_source(self.role, config)
        if (self.position == "linear") != (config.expert_type != "adapter"):
            raise ValueError(
                f"{self.block_name or 'This module'} already has {'LoRA / (IA)³' if self.position == 'linear' else 'adapter'} "
                f"experts; an adapter with expert_type={config.expert_type!r} cannot share it. Give the new adapter "
                "other target_modules (or the same expert_type)."
            )
        if self.position == "linear":
            feedforward = config.expert_type == "ia3" and matches_modules(self.block_name, config.feedforward_modules)
            self.smear_experts[adapter_name] = build_linear_experts(config, routing, self.linear_shape, feedforward)
        else:
            experts = Experts(routing.num_expert_slots(), hidden, bottleneck_size(config, routing, hidden), config.activation)
            experts.reset_parameters(config.expert_init_std)
            self.smear_experts[adapter_name] = experts
        if config.expert_type != "adapter" and config.lora_dropout > 0:
            self.smear_dropout[adapter_name] = nn.Dropout(config.lora_dropout)
        if routing.uses_router:
            self.smear_router[adapter_name] = Router(self.source_size, config.num_experts, config.router_init_scale)
        if routing.has_baseline:
            self.smear_baseline[adapter_name] = ReinforceBaseline(self.source_size, config.router_init_scale)
        if self.position == "linear":
            pass  # LoRA / (IA)³ experts have no norms
        elif (config.post_norm if config.post_norm is not None else self._default_post_norm):
            self.smear_post_norm[adapter_name] = nn.LayerNorm(hidden)
        if self.position != "linear" and (config.input_norm or self._default_input_norm) == "batch_norm":
            self.smear_input_norm[adapter_name] = nn.BatchNorm1d(hidden)
        if not config.init_weights:
            self._randomise_for_tests(adapter_name)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def _randomise_for_tests(self, adapter_name: str) -> None:
        for container in (self.smear_router, self.smear_post_norm, self.smear_experts):
            if adapter_name in container:
                for param in container[adapter_name].parameters():
                    if param.device.type != "meta":
                        param.normal_(0.0, 0.5)

    def reference_tensor(self) -> Optional[torch.Tensor]:
        """A tensor of the base layer (its first parameter or buffer), else of the model: adapters live on its device
        and, before PEFT's ``autocast_adapter_dtype`` upcast, in its floating dtype."""
        for tensor in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            if tensor.is_floating_point():
                return tensor
        return self._reference[0]

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        reference = self.reference_tensor()
        if reference is None or reference.device.type == "meta":
            return
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container:
                module = container[adapter_name]
                if any(p.device.type == "meta" for p in module.parameters()):
                    continue  # created empty (low_cpu_mem_usage): materialised when the weights are loaded
                module.to(device=reference.device, dtype=reference.dtype)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        frame = self._frames.current() or EMPTY_FRAME
        if frame.adapter_names is not None and not self.disable_adapters:
            return self._forward_mixed(frame, args, kwargs)
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.smear_experts]
        if self.merged_adapters:
            active = [a for a in active if a not in self.merged_adapters]
        if not active:
            return self.base_layer(*args, **kwargs)
        if self.position == "linear":
            return self._forward_linear(active, frame, *args, **kwargs)
        if self.position == "input":
            hidden = args[0]
            for adapter in active:
                hidden = self.apply_block(adapter, hidden, frame)
            return self.base_layer(hidden, *args[1:], **kwargs)
        output = self.base_layer(*args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        for adapter in active:
            hidden = self.apply_block(adapter, hidden, frame)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _forward_mixed(self, frame: RoutingFrame, args: tuple, kwargs: dict) -> Any:
        """PEFT's mixed adapter batch (`mixed_batch`): each example's rows from its adapter's block. The base layer
        runs once (it may hold state, e.g. an attention layer's KV cache); a Linear layer with LoRA / (IA)3 experts
        runs once per adapter."""
        if frame.recorder is not None:
            raise ValueError("RoutingRecorder cannot record a mixed adapter batch: record one adapter at a time.")
        rows = frame.adapter_rows(frame.batch_size or _first_tensor(args, kwargs).shape[0])
        adapters = {name: active_for(name, self.smear_experts) for name in rows}

        def blocks(hidden: torch.Tensor) -> torch.Tensor:
            results = {name: self.apply_block(active[0], hidden, frame) if active else hidden for name, active in adapters.items()}
            return select_rows(results, rows)

        if self.position == "linear":
            results = {
                name: self._forward_linear(active, frame, *args, **kwargs) if active else self.base_layer(*args, **kwargs)
                for name, active in adapters.items()
            }
            return select_rows(results, rows)
        if self.position == "input":
            return self.base_layer(blocks(args[0]), *args[1:], **kwargs)
        output = self.base_layer(*args, **kwargs)
        if isinstance(output, tuple):
            return (blocks(output[0]), *output[1:])
        return blocks(output)

    def apply_block(self, adapter: str, hidden: torch.Tensor, frame: RoutingFrame = EMPTY_FRAME) -> torch.Tensor:
        """``hidden + post_norm(experts(...))`` for one adapter; ``hidden`` has the sublayer's layout and dtype."""
        experts: Experts = self.smear_experts[adapter]
        tokens = self._to_tokens(hidden.to(experts.dtype), frame)  # [B, S, C]
        if adapter in self.smear_input_norm:
            batch, positions, channels = tokens.shape
            tokens = self.smear_input_norm[adapter](tokens.reshape(-1, channels)).view(batch, positions, channels)
        delta = self._run_experts(adapter, tokens, tokens, frame)
        if adapter in self.smear_post_norm:
            delta = self.smear_post_norm[adapter](delta)
        return hidden + self._from_tokens(delta, hidden).to(hidden.dtype)

    def _run_experts(self, adapter: str, route_tokens: torch.Tensor, tokens: torch.Tensor, frame: RoutingFrame) -> torch.Tensor:
        """Route on ``route_tokens`` ``[B, S, C]`` (by the adapter's source) and apply the experts to ``tokens``
        ``[B, S, C']``: the output ``[B, S, out]`` (for adapters both are the block input)."""
        experts = self.smear_experts[adapter]
        routing = self.smear_routing[adapter]
        plan = self.smear_source[adapter].plan(self, adapter, route_tokens, frame, needs_input=routing.uses_router)
        if plan.cached is not None:
            decision, params = plan.cached
            delta, _ = experts(tokens, decision, params)
            return delta
        decision = self._decide(adapter, routing, plan, route_tokens, frame)
        units = tokens if plan.layout is None else plan.layout.gather(tokens)
        delta, params = experts(units, decision)
        if plan.layout is not None:
            delta = plan.layout.scatter(delta, tokens)
        if plan.store is not None:
            store, key = plan.store
            store[key] = (decision, params)
        return delta

    def _forward_linear(self, active: list[str], frame: RoutingFrame, x: torch.Tensor, *args: Any, **kwargs: Any):
        """A Linear layer with LoRA / (IA)³ experts of every active adapter (each routed on the layer's input)."""
        tokens = self._linear_tokens(x, frame)
        lora_updates, output_scales, input_scale = [], [], None
        for adapter in active:
            experts = self.smear_experts[adapter]
            routed = tokens.to(experts.dtype)
            if isinstance(experts, LoraExperts):
                inputs = self.smear_dropout[adapter](routed) if adapter in self.smear_dropout else routed
                lora_updates.append(self._run_experts(adapter, routed, inputs, frame))
            else:
                delta = self._run_experts(adapter, routed, routed, frame)
                if delta.shape[1] > 1 and delta.stride(1) == 0:
                    delta = delta[:, :1]  # one vector per example (an expanded view): broadcast, never materialised
                scale = 1.0 + delta
                if experts.feedforward:
                    input_scale = scale if input_scale is None else input_scale * scale
                else:
                    output_scales.append(scale)
        if input_scale is not None:
            x = _scale_rows(x, input_scale)
        result = self.base_layer(x, *args, **kwargs)
        for scale in output_scales:
            result = _scale_rows(result, scale)
        # As PEFT's LoRA: the updates are added in their own (possibly higher) precision, and the sum is rounded to
        # the layer's dtype once.
        dtype = result.dtype
        for update in lora_updates:
            result = result + update.reshape(*result.shape[:-1], -1)
        return result.to(dtype)

    def _linear_tokens(self, x: torch.Tensor, frame: RoutingFrame) -> torch.Tensor:
        """``[B, positions, in]`` view of a Linear layer's input (``[B, in]``: one position; ``[B * S, in]`` when the
        call's batch size says the tokens were flattened)."""
        if x.dim() == 2:
            batch = frame.batch_size
            if batch and x.shape[0] != batch and x.shape[0] % batch == 0:
                return x.view(batch, -1, x.shape[-1])
            return x.unsqueeze(1)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _decide(self, adapter: str, routing: RoutingMethod, plan: RoutePlan, tokens: torch.Tensor, frame: RoutingFrame):
        batch = tokens.shape[0]
        example = plan.example
        units = batch if example is None else example.shape[0]

        def per_unit(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return values if values is None or example is None else values[example]

        tags = per_unit(frame.tags_for(batch)) if (routing.needs_tags or frame.recorder is not None) else None
        keys = per_unit(frame.keys_for(batch)) if routing.needs_keys else None
        logits = normalized = None
        if routing.uses_router:
            logits, normalized = self.smear_router[adapter](plan.pooled.to(tokens.dtype))
        decision = routing.decide(
            RoutingInputs(
                logits=logits,
                batch_size=units,
                device=tokens.device,
                training=self.training,
                side=self.side,
                block_index=self.block_index,
                tags=tags,
                keys=keys,
            )
        )
        if decision.log_prob is not None and frame.records and not torch.is_grad_enabled() and frame.grad_enabled:
            raise RuntimeError(
                f"routing='{routing.name}' trains its router from terms recorded in the forward pass, which "
                "reentrant gradient checkpointing runs without gradients. Use non-reentrant checkpointing: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
            )
        if decision.log_prob is not None and (frame.records or torch.is_grad_enabled()):
            # A checkpoint's recomputation runs the baseline too (it must save the same tensors as the forward did),
            # but the terms belong to the original forward only.
            baseline = self.smear_baseline[adapter](normalized)
            if frame.records:
                terms = AuxiliaryTerms(decision.log_prob, decision.entropy, baseline, example)
                frame.reinforce_terms.setdefault(adapter, (routing.config, []))[1].append(terms)
        if frame.recorder is not None and frame.records:
            frame.recorder.record(self, adapter, decision, tags, segmented=example is not None)
        return decision

    # -- layouts ---------------------------------------------------------------------------------------------------
    def _to_tokens(self, hidden: torch.Tensor, frame: RoutingFrame = EMPTY_FRAME) -> torch.Tensor:
        """``[B, positions, C]`` view of a sublayer output with channels at ``channel_dim``."""
        if hidden.dim() == 2 and self.flattened:
            if not frame.batch_size or hidden.shape[0] % frame.batch_size:
                raise ValueError(
                    f"{self.block_name} returns [batch * positions, C] tokens, but the call's batch size is unknown: "
                    "call the whole model (not a submodule) so its routing blocks know the batch."
                )
            return hidden.view(frame.batch_size, -1, hidden.shape[-1])
        if hidden.dim() == 2:
            return hidden.unsqueeze(1)
        moved = hidden.movedim(self.channel_dim, -1) if self.channel_dim not in (-1, hidden.dim() - 1) else hidden
        return moved.reshape(hidden.shape[0], -1, moved.shape[-1])

    def _from_tokens(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2:
            return tokens.reshape(like.shape)
        if self.channel_dim in (-1, like.dim() - 1):
            return tokens.reshape(like.shape)
        moved_shape = like.movedim(self.channel_dim, -1).shape
        return tokens.reshape(moved_shape).movedim(-1, self.channel_dim)

    # -- merging: monolithic LoRA / (IA)³ experts only ---------------------------------------------------------------
    def is_mergeable(self, adapter: str) -> bool:
        """Whether an adapter is a plain LoRA / (IA)³ (one expert for every input: ``routing="monolithic"``)."""
        return self.position == "linear" and self.smear_routing[adapter].name == "monolithic"

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapters = [a for a in (adapter_names or self.active_adapters) if a in self.smear_experts]
        if not all(self.is_mergeable(a) for a in adapters):
            raise NotImplementedError(
                "Routed expert adapters cannot be merged into the base weights: each example gets its own mixture of "
                "experts from its routing input. Keep the adapter, or use unload() to get the base model back "
                "(monolithic LoRA / (IA)³ experts, which are plain LoRA / (IA)³, can be merged)."
            )
        for adapter in adapters:
            if adapter in self.merged_adapters:
                continue
            base = self.get_base_layer()
            original = base.weight.detach().clone() if safe_merge else None
            self.smear_experts[adapter].merge_into(base, self.linear_shape)
            if original is not None and not torch.isfinite(base.weight).all():
                with torch.no_grad():
                    base.weight.copy_(original)
                raise ValueError(f"NaNs detected in the merged weights of {self.block_name}; adapter {adapter!r} is broken.")
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo `merge` (monolithic LoRA / (IA)³ experts; other SMEAR layers are never merged)."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self.smear_experts[adapter].merge_into(self.get_base_layer(), self.linear_shape, sign=-1.0)

    def __repr__(self) -> str:
        return f"smear.{super().__repr__()}"


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
