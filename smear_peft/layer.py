"""`SmearLayer`: wraps one sublayer of the base model and adds an expert routing block to its output."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import SmearConfig
from .context import RoutingContext, pool
from .experts import Experts, ExpertParameters
from .routers import ReinforceBaseline, Router
from .routing import RoutingDecision, RoutingInputs, RoutingMethod


def bottleneck_size(config: SmearConfig, hidden_size: int) -> int:
    """The experts' bottleneck: explicit, or hidden // reduction_factor; N times wider for "1x params" monolithic."""
    size = config.bottleneck_size or max(1, hidden_size // config.reduction_factor)
    if config.routing == "monolithic" and config.monolithic_params == "params":
        size *= config.num_experts
    return size


class SmearLayer(nn.Module, BaseTunerLayer):
    """An expert routing block around one sublayer.

    ``forward`` runs the wrapped sublayer and transforms its output ``y`` (the first element when it returns a tuple)::

        y' = y + post_norm(experts(input_norm(y); routing(router(pool(...)))))

    With ``position="input"`` the block transforms the sublayer's first input instead (the authors' ResNet block sits
    after the residual add and before the final ReLU, which is the input of the stage's activation module).

    Per-adapter state lives in `nn.ModuleDict`s of leaf modules, so checkpoint keys are
    ``<attr>.<adapter>.<param>`` and load under any adapter name.
    """

    adapter_layer_names = ("smear_router", "smear_experts", "smear_post_norm", "smear_input_norm", "smear_baseline")
    other_param_names = ("smear_routing",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SmearConfig,
        routing: RoutingMethod,
        *,
        hidden_size: int,
        context: RoutingContext,
        side: str = "any",
        block_index: int = 0,
        block_name: str = "",
        channel_dim: int = -1,
        position: str = "output",
        post_norm: bool = True,
        input_norm: str = "none",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.side = side
        self.block_index = block_index
        self.block_name = block_name
        self.channel_dim = channel_dim
        self.position = position
        self._default_post_norm = post_norm
        self._default_input_norm = input_norm
        self._context = context  # plain attribute: not a submodule, never saved
        self.smear_router = nn.ModuleDict()
        self.smear_experts = nn.ModuleDict()
        self.smear_post_norm = nn.ModuleDict()
        self.smear_input_norm = nn.ModuleDict()
        self.smear_baseline = nn.ModuleDict()
        self.smear_routing: dict[str, RoutingMethod] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, routing)

    # -- adapters --------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: SmearConfig, routing: RoutingMethod) -> None:
        """Create the router, experts and norms of one adapter."""
        hidden = self.hidden_size
        self.smear_routing[adapter_name] = routing
        experts = Experts(routing.num_expert_slots(), hidden, bottleneck_size(config, hidden), config.activation)
        experts.reset_parameters(config.expert_init_std)
        self.smear_experts[adapter_name] = experts
        if routing.uses_router:
            self.smear_router[adapter_name] = Router(hidden, config.num_experts, config.router_init_scale)
        if config.routing == "reinforce":
            self.smear_baseline[adapter_name] = ReinforceBaseline(hidden, config.router_init_scale)
        if (config.post_norm if config.post_norm is not None else self._default_post_norm):
            self.smear_post_norm[adapter_name] = nn.LayerNorm(hidden)
        if (config.input_norm or self._default_input_norm) == "batch_norm":
            self.smear_input_norm[adapter_name] = nn.BatchNorm1d(hidden)
        if not config.init_weights:
            self._randomise_for_tests(adapter_name)
        self._move_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def _randomise_for_tests(self, adapter_name: str) -> None:
        for container in (self.smear_router, self.smear_post_norm, self.smear_experts):
            if adapter_name in container:
                for param in container[adapter_name].parameters():
                    param.normal_(0.0, 0.5)

    def _move_to_base_device(self, adapter_name: str) -> None:
        reference = next(self.base_layer.parameters(), None)
        if reference is None:
            return
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name].to(reference.device)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.smear_experts]
        if not active:
            return self.base_layer(*args, **kwargs)
        if self.position == "input":
            hidden = args[0]
            for adapter in active:
                hidden = self.apply_block(adapter, hidden)
            return self.base_layer(hidden, *args[1:], **kwargs)
        output = self.base_layer(*args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        for adapter in active:
            hidden = self.apply_block(adapter, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def apply_block(self, adapter: str, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + post_norm(experts(...))`` for one adapter; ``hidden`` has the sublayer's layout and dtype."""
        experts: Experts = self.smear_experts[adapter]
        tokens = self._to_tokens(hidden.to(experts.down_weight.dtype))  # [B, S, C]
        if adapter in self.smear_input_norm:
            batch, positions, channels = tokens.shape
            tokens = self.smear_input_norm[adapter](tokens.reshape(-1, channels)).view(batch, positions, channels)
        decision, params = self._route(adapter, tokens)
        delta = self._run_experts(experts, tokens, decision, params)
        if adapter in self.smear_post_norm:
            delta = self.smear_post_norm[adapter](delta)
        return hidden + self._from_tokens(delta, hidden).to(hidden.dtype)

    def _route(self, adapter: str, tokens: torch.Tensor) -> tuple[RoutingDecision, Optional[ExpertParameters]]:
        cache = self._context.decode_cache if self.side == "decoder" else None
        if cache is not None and (self, adapter) in cache:
            return cache[(self, adapter)]
        routing = self.smear_routing[adapter]
        batch = tokens.shape[0]
        tags = self._context.tags_for(batch)
        pooled = None
        logits = None
        if routing.uses_router:
            pooled = self._routing_input(routing.config.pooling, tokens)
            logits = self.smear_router[adapter](pooled)
        decision = routing.decide(
            RoutingInputs(
                logits=logits,
                batch_size=batch,
                device=tokens.device,
                training=self.training,
                side=self.side,
                block_index=self.block_index,
                tags=tags,
                keys=self._context.keys_for(batch) if routing.name == "hash" else None,
            )
        )
        if decision.log_prob is not None:
            router = self.smear_router[adapter]
            baseline = self.smear_baseline[adapter](router.normalized_input(pooled))
            self._context.reinforce_terms.setdefault(adapter, []).append((decision.log_prob, decision.entropy, baseline))
        recorder = self._context.recorder
        if recorder is not None:
            recorder.record(self, adapter, decision, tags)
        experts: Experts = self.smear_experts[adapter]
        if decision.kind == "merge":
            params = experts.merged(decision.weights)
        elif decision.kind == "select":
            params = experts.selected(decision.index)
        else:
            params = None
        if cache is not None:
            cache[(self, adapter)] = (decision, params)
        return decision, params

    def _routing_input(self, pooling: str, tokens: torch.Tensor) -> torch.Tensor:
        if self.side == "decoder":
            return self._context.decoder_input(pooling, tokens.shape[0]).to(tokens.dtype)
        return pool(tokens, self._context.input_mask, pooling)

    @staticmethod
    def _run_experts(
        experts: Experts, tokens: torch.Tensor, decision: RoutingDecision, params: Optional[ExpertParameters]
    ) -> torch.Tensor:
        if decision.kind == "shared":
            return experts.run_shared(tokens)
        if decision.kind in ("merge", "select"):
            output = experts.run(tokens, params)
            if decision.kind == "select" and decision.weights is not None:
                output = output * decision.weights.to(output.dtype)[:, None, None]
            return output
        if decision.index is None:  # every expert (ensemble): mixed inside the contractions
            return experts.run_mixture(tokens, decision.weights)
        outputs = experts.run_each(tokens, decision.index)  # [B, K, S, C]
        return torch.einsum("bk,bksc->bsc", decision.weights.to(outputs.dtype), outputs)

    # -- layouts ---------------------------------------------------------------------------------------------------
    def _to_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, positions, C]`` view of a sublayer output with channels at ``channel_dim``."""
        if hidden.dim() == 2:
            return hidden.unsqueeze(1)
        moved = hidden.movedim(self.channel_dim, -1) if self.channel_dim not in (-1, hidden.dim() - 1) else hidden
        return moved.reshape(hidden.shape[0], -1, moved.shape[-1])

    def _from_tokens(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2:
            return tokens.squeeze(1)
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
