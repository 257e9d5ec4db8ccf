"""`SmearLayer`: wraps one sublayer of the base model and adds an expert routing block to its output."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import SmearConfig
from .experts import Experts
from .frames import EMPTY_FRAME, FrameStack, RoutingFrame
from .routers import ReinforceBaseline, Router
from .routing import RoutingInputs, RoutingMethod
from .sources import RoutePlan, RoutingSource, routing_source


def bottleneck_size(config: SmearConfig, routing: RoutingMethod, hidden_size: int) -> int:
    """The experts' bottleneck: explicit, or hidden // reduction_factor, times the method's width factor."""
    size = config.bottleneck_size or max(1, hidden_size // config.reduction_factor)
    return size * routing.bottleneck_multiplier()


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

    ``role`` says where the router's input comes from (see `smear_peft.sources`): ``input`` (the block's own input),
    ``encoder_output`` (decoder blocks of encoder-decoder models) or ``causal`` (causal LMs: prompt or segments).

    Every module owning adapter parameters (router, experts, norms, baseline) uses them only in its own ``forward``, so
    any FSDP / ZeRO-3 wrap policy works. Per-adapter state lives in `nn.ModuleDict`s of leaf modules, so checkpoint
    keys are ``<attr>.<adapter>.<param>`` and load under any adapter name.
    """

    adapter_layer_names = ("smear_router", "smear_experts", "smear_post_norm", "smear_input_norm", "smear_baseline")
    other_param_names = ("smear_routing", "smear_source")

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
    ) -> None:
        super().__init__()
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
        experts = Experts(routing.num_expert_slots(), hidden, bottleneck_size(config, routing, hidden), config.activation)
        experts.reset_parameters(config.expert_init_std)
        self.smear_experts[adapter_name] = experts
        if routing.uses_router:
            self.smear_router[adapter_name] = Router(self.source_size, config.num_experts, config.router_init_scale)
        if routing.has_baseline:
            self.smear_baseline[adapter_name] = ReinforceBaseline(self.source_size, config.router_init_scale)
        if (config.post_norm if config.post_norm is not None else self._default_post_norm):
            self.smear_post_norm[adapter_name] = nn.LayerNorm(hidden)
        if (config.input_norm or self._default_input_norm) == "batch_norm":
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
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.smear_experts]
        if not active:
            return self.base_layer(*args, **kwargs)
        frame = self._frames.current() or EMPTY_FRAME
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

    def apply_block(self, adapter: str, hidden: torch.Tensor, frame: RoutingFrame = EMPTY_FRAME) -> torch.Tensor:
        """``hidden + post_norm(experts(...))`` for one adapter; ``hidden`` has the sublayer's layout and dtype."""
        experts: Experts = self.smear_experts[adapter]
        tokens = self._to_tokens(hidden.to(experts.dtype), frame)  # [B, S, C]
        if adapter in self.smear_input_norm:
            batch, positions, channels = tokens.shape
            tokens = self.smear_input_norm[adapter](tokens.reshape(-1, channels)).view(batch, positions, channels)
        routing = self.smear_routing[adapter]
        plan = self.smear_source[adapter].plan(self, adapter, tokens, frame, needs_input=routing.uses_router)
        if plan.cached is not None:
            decision, params = plan.cached
            delta, _ = experts(tokens, decision, params)
        else:
            decision = self._decide(adapter, routing, plan, tokens, frame)
            units = tokens if plan.layout is None else plan.layout.gather(tokens)
            delta, params = experts(units, decision)
            if plan.layout is not None:
                delta = plan.layout.scatter(delta, tokens)
            if plan.store is not None:
                store, key = plan.store
                store[key] = (decision, params)
        if adapter in self.smear_post_norm:
            delta = self.smear_post_norm[adapter](delta)
        return hidden + self._from_tokens(delta, hidden).to(hidden.dtype)

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
        if decision.log_prob is not None and frame.records:
            if not torch.is_grad_enabled() and frame.grad_enabled:
                raise RuntimeError(
                    f"routing='{routing.name}' trains its router from terms recorded in the forward pass, which "
                    "reentrant gradient checkpointing runs without gradients. Use non-reentrant checkpointing: "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
                )
            baseline = self.smear_baseline[adapter](normalized)
            terms = AuxiliaryTerms(decision.log_prob, decision.entropy, baseline, example)
            frame.reinforce_terms.setdefault(adapter, (routing.config, []))[1].append(terms)
        if frame.recorder is not None and frame.records:
            frame.recorder.record(self, adapter, decision, tags)
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

    # -- merging is impossible -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "Routed expert adapters cannot be merged into the base weights: each example gets its own mixture of experts "
            "from its routing input. Keep the adapter, or use unload() to get the base model back."
        )

    def unmerge(self) -> None:
        """Nothing to undo: SMEAR layers are never merged."""

    def __repr__(self) -> str:
        return f"smear.{super().__repr__()}"
