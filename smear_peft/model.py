"""`SmearModel`: the PEFT tuner that injects expert routing blocks and feeds them their routing context."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import ArchitecturePreset, block_layout, find_preset, supported_model_types
from .batch_norm import backbone_batch_norms, keep_in_eval_mode, wrap_batch_norm_statistics
from .config import SUBLAYERS, SmearConfig
from .context import RoutingContext
from .layer import SmearLayer
from .routing import RoutingMethod, build_routing_method, content_keys, gumbel_temperature_at

#: Per-call keyword arguments consumed by smear-peft (never passed on to the base model).
ROUTING_KWARGS = ("routing_tags", "routing_keys")

TagsLike = Union[torch.Tensor, Sequence[Union[int, str]], None]


class PresetTargets(Mapping):
    """``model_type -> target modules`` of all sublayers, read live from the registered presets (PEFT's
    ``target_module_mapping`` protocol; includes presets registered after import)."""

    def __getitem__(self, model_type: str):
        preset = find_preset(model_type)
        if preset is None:
            raise KeyError(model_type)
        return preset.target_modules(list(SUBLAYERS))

    def __iter__(self):
        return iter(supported_model_types())

    def __len__(self) -> int:
        return len(supported_model_types())


class SmearModel(BaseTuner):
    """Injects `SmearLayer` blocks into a model (see `SmearConfig`) and manages their routing context.

    Beyond the usual PEFT tuner API it offers:

    * ``routing_tags`` / ``routing_keys`` keyword arguments on ``forward`` and ``generate`` (and the `routing_inputs`
      context manager) for tag and hash routing, and as metadata for `smear_peft.analysis.RoutingRecorder`;
    * `reinforce_loss` (the auxiliary loss of REINFORCE routing) and `set_training_step` (ST-Gumbel annealing).
    """

    prefix: str = "smear_"
    tuner_layer_cls = SmearLayer
    target_module_mapping = PresetTargets()

    def __init__(self, model: nn.Module, config, adapter_name: str, low_cpu_mem_usage: bool = False, state_dict=None):
        # Tuner-level state must exist before BaseTuner.__init__ injects the adapter.
        object.__setattr__(self, "_context", RoutingContext())
        object.__setattr__(self, "_routing_methods", {})
        object.__setattr__(self, "_hook_handles", [])
        object.__setattr__(self, "_batch_norm_hook_handles", [])
        object.__setattr__(self, "_num_blocks", 0)
        object.__setattr__(self, "_sides", {})
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- configuration and injection -------------------------------------------------------------------------------
    @property
    def preset(self) -> Optional[ArchitecturePreset]:
        """The architecture preset of the base model's ``model_type`` (``None`` for models without one)."""
        return find_preset(getattr(getattr(self.model, "config", None), "model_type", None))

    def _prepare_adapter_config(self, peft_config: SmearConfig, model_config: dict) -> SmearConfig:
        preset = find_preset(model_config.get("model_type"))
        if preset is None and peft_config.target_modules is None:
            raise ValueError(
                f"smear-peft has no preset for model_type={model_config.get('model_type')!r} (presets: "
                f"{', '.join(supported_model_types())}). Pass SmearConfig(target_modules=[...]) naming the modules "
                "whose output gets a routing block, e.g. the attention and MLP modules of each layer, or register a "
                "preset with smear_peft.register_preset(ArchitecturePreset(...))."
            )
        if preset is not None:
            preset.prepare_config(peft_config)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: SmearConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        routing = self._routing_method(adapter_name, peft_config)
        if isinstance(target, SmearLayer):
            target.update_layer(adapter_name, peft_config, routing)
            return
        preset = self.preset
        layout = block_layout(preset, current_key, parent, target)
        new_module = SmearLayer(
            target,
            adapter_name,
            peft_config,
            routing,
            hidden_size=layout.hidden_size,
            context=self._context,
            side=self._side_of(current_key),
            block_index=self._num_blocks,
            block_name=current_key,
            channel_dim=layout.channel_dim,
            position=layout.position,
            post_norm=preset.post_norm if preset else True,
            input_norm=preset.input_norm if preset else "none",
        )
        object.__setattr__(self, "_num_blocks", self._num_blocks + 1)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: SmearConfig) -> None:
        super()._check_new_adapter_config(config)
        policies = {c.batch_norm_statistics for c in self.peft_config.values()}
        if len(policies) > 1 and backbone_batch_norms(self.model):
            raise ValueError(
                f"All SMEAR adapters of a model with BatchNorm layers must use the same batch_norm_statistics (got "
                f"{sorted(policies)}): the backbone's BatchNorm layers are shared. Pass "
                "SmearConfig(batch_norm_statistics=...) matching the other adapters, or use another copy of the model."
            )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._handle_batch_norm_statistics(model, adapter_name)

    def _handle_batch_norm_statistics(self, model: nn.Module, adapter_name: str) -> None:
        """Apply ``batch_norm_statistics`` to the backbone's BatchNorm layers (see `smear_peft.batch_norm`)."""
        config = self.peft_config[adapter_name]
        norms = backbone_batch_norms(model)
        if not norms:
            return
        if config.batch_norm_statistics == "update":
            wrap_batch_norm_statistics(
                model, norms, adapter_name, inference_mode=config.inference_mode, activate=adapter_name in self.active_adapters
            )
        elif not self._batch_norm_hook_handles:
            self._batch_norm_hook_handles.extend(keep_in_eval_mode(norms.values()))

    def _pre_injection_hook(self, model: nn.Module, config: SmearConfig, adapter_name: str) -> None:
        if "smear_gumbel_temperature" not in self._modules:
            # Tuner-level buffers are saved with the adapter: ST-Gumbel's annealed temperature, one per adapter.
            self.smear_gumbel_temperature = BufferDict({}, persistent=True)

    def _routing_method(self, adapter_name: str, config: SmearConfig) -> RoutingMethod:
        """One routing method object per adapter, shared by all of its blocks."""
        if adapter_name not in self._routing_methods:
            method = build_routing_method(config)
            if config.routing == "st_gumbel":
                self.smear_gumbel_temperature[adapter_name] = torch.tensor([config.gumbel_temperature])
                method.bind_temperature(self.smear_gumbel_temperature, adapter_name)
            self._routing_methods[adapter_name] = method
        return self._routing_methods[adapter_name]

    def _side_of(self, key: str) -> str:
        """``encoder`` / ``decoder`` for modules inside an encoder-decoder model's stacks, else ``any``."""
        if not self._sides:
            self._sides.update(_stack_names(self.model))
        for side, name in self._sides.items():
            if name is not None and (key == name or key.startswith(name + ".")):
                return side
        return "any"

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's default copies `.weight` onto the module put back on unload, which sublayers don't have.
        setattr(parent, child_name, new_module)
        reference = next(child.parameters(), None)
        if isinstance(new_module, SmearLayer) and reference is not None:
            for name in SmearLayer.adapter_layer_names:
                for module in getattr(new_module, name).values():
                    if not any(p.device.type == "meta" for p in module.parameters()):
                        module.to(reference.device)

    def _post_injection_hook(self, model: nn.Module, config: SmearConfig, adapter_name: str) -> None:
        if not self._hook_handles:
            self._install_hooks()
        if hasattr(model, "add_model_tags"):  # shown in the model card PEFT writes on save_pretrained
            model.add_model_tags(["smear-peft", "smear"])

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "SMEAR adapters cannot be merged into the base model: routing is input-dependent, so every example uses its "
            "own mixture of experts. Keep the PeftModel for inference, or call unload() to get the unchanged base model."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        for handles in (self._hook_handles, self._batch_norm_hook_handles):
            for handle in handles:
                handle.remove()
            handles.clear()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar, adapter_names=adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._routing_methods.pop(adapter_name, None)
        if adapter_name in self.smear_gumbel_temperature:
            del self.smear_gumbel_temperature[adapter_name]

    # -- routing context from hooks --------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        """Permanent hooks that fill the routing context (removed by ``unload``)."""
        handles = self._hook_handles
        handles.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        handles.append(self.model.register_forward_hook(self._on_model_end, with_kwargs=True, always_call=True))
        encoder, decoder = _stacks(self.model)
        if encoder is not None and decoder is not None:
            handles.append(encoder.register_forward_pre_hook(self._on_encoder_start, with_kwargs=True))
            handles.append(decoder.register_forward_pre_hook(self._on_decoder_start, with_kwargs=True))
            first_layer = _first_layer(decoder)
            if first_layer is not None:
                handles.append(first_layer.register_forward_pre_hook(self._on_first_decoder_layer, with_kwargs=True))

    def _on_model_start(self, module, args, kwargs):
        context = self._context
        context.start_forward()
        routing = {name: kwargs.pop(name) for name in ROUTING_KWARGS if name in kwargs}
        context.set_by_forward = bool(routing)
        if routing:
            self._set_routing_inputs(routing.get("routing_tags"), routing.get("routing_keys"))
        if self._sides.get("encoder") is None:  # not an encoder-decoder model: this call's inputs feed routing
            self._capture_inputs(kwargs.get("attention_mask"), kwargs.get("input_ids"), kwargs.get("pixel_values", args[0] if args else None))
        return args, kwargs

    def _on_model_end(self, module, args, kwargs, output):
        if self._context.set_by_forward:
            self._set_routing_inputs(None, None)
            self._context.set_by_forward = False

    def _on_encoder_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._capture_inputs(kwargs.get("attention_mask"), input_ids, None)

    def _capture_inputs(self, attention_mask, input_ids, pixel_values) -> None:
        context = self._context
        context.input_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        content = input_ids if isinstance(input_ids, torch.Tensor) else pixel_values
        needs_keys = any(m.name == "hash" for m in self._routing_methods.values()) and context.keys is None
        context.content_keys = content_keys(content, context.input_mask) if needs_keys and isinstance(content, torch.Tensor) else None

    def _on_decoder_start(self, module, args, kwargs):
        modes = {self.peft_config[a].pooling for a in self.active_adapters if a in self.peft_config}
        self._context.set_decoder_inputs(kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask"), modes)

    def _on_first_decoder_layer(self, module, args, kwargs):
        if args:
            return (self._context.relay_into(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self._context.relay_into(kwargs["hidden_states"])
        return args, kwargs

    # -- tags and keys ---------------------------------------------------------------------------------------------
    def _set_routing_inputs(self, tags: TagsLike, keys: TagsLike) -> None:
        device = next(self.model.parameters()).device  # once per call, not once per block
        self._context.tags = None if tags is None else self._tag_tensor(tags).to(device)
        self._context.keys = None if keys is None else torch.as_tensor(keys, dtype=torch.long).reshape(-1)

    def _tag_tensor(self, tags: TagsLike) -> torch.Tensor:
        configs = [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]
        if isinstance(tags, torch.Tensor):
            tensor = tags.reshape(-1).long()
        else:
            named = next((c for c in configs if c.tag_names), configs[0] if configs else None)
            tensor = torch.tensor([named.tag_index(t) if named else int(t) for t in tags], dtype=torch.long)
        for config in configs:
            if config.routing == "tag" and tensor.numel() and (tensor.min() < 0 or tensor.max() >= config.resolved_num_tags):
                raise ValueError(
                    f"routing_tags must be in [0, {config.resolved_num_tags}) for this adapter, got {tensor.tolist()}; "
                    "set SmearConfig(num_tags=...) or tag_names to cover every tag."
                )
        return tensor

    @contextmanager
    def routing_inputs(self, routing_tags: TagsLike = None, routing_keys: TagsLike = None):
        """Use these per-example tags / keys for every call inside the block (e.g. around a custom decoding loop)."""
        previous = (self._context.tags, self._context.keys)
        self._set_routing_inputs(routing_tags, routing_keys)
        try:
            yield
        finally:
            self._context.tags, self._context.keys = previous

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, routing_tags: TagsLike = None, routing_keys: TagsLike = None, **kwargs: Any):
        """``generate`` of the base model with per-example tags / keys (expanded to beams and return sequences).

        Decoder routing depends only on the encoder's output, so within one call every decoder block computes its
        routing and merged expert once and reuses them at every step (the decode-time cache)."""
        with self.routing_inputs(routing_tags, routing_keys):
            self._context.decode_cache = {}
            try:
                return self.model.generate(*args, **kwargs)
            finally:
                self._context.decode_cache = None
                self._context._decoder_source = None

    # -- training-time API -----------------------------------------------------------------------------------------
    def set_training_step(self, step: int) -> dict[str, float]:
        """Apply the authors' ST-Gumbel temperature schedule at a training step; returns each adapter's temperature."""
        temperatures = {}
        for name, method in self._routing_methods.items():
            if method.name != "st_gumbel":
                continue
            c = method.config
            # The authors' DomainNet loop applies an update one step later than their T5 trainer.
            schedule = "resnet" if getattr(self.model.config, "model_type", None) == "resnet" else "t5"
            tau = gumbel_temperature_at(step, c.gumbel_temperature, c.gumbel_min_temperature, c.gumbel_anneal_rate, c.gumbel_anneal_every, schedule)
            self.smear_gumbel_temperature[name].fill_(tau)
            temperatures[name] = tau
        return temperatures

    def reinforce_loss(self, example_losses: Optional[torch.Tensor]) -> torch.Tensor:
        """Auxiliary loss of REINFORCE routing for the last forward pass (0 when no active adapter uses it).

        With per-example task losses ``L`` ``[B]`` and each block's baseline ``b`` (predicted from the detached router
        input), summed over active REINFORCE adapters, averaged over blocks and examples, as in the authors' code::

            policy_weight * mean(log p(chosen) * (L - b).detach())
          + entropy_weight * mean(-sum_n p_n log p_n)        # added to the loss, i.e. entropy is penalised (authors)
          + value_weight * mean(huber_delta=1(L - b))

        Add it to the task loss before ``backward``: ``loss = loss + model.base_model.reinforce_loss(per_example)``.
        """
        terms = {a: t for a, t in self._context.reinforce_terms.items() if t}
        device = next(self.model.parameters()).device
        total = torch.zeros((), device=device)
        if not terms:
            return total
        if example_losses is None:
            raise ValueError(
                "REINFORCE routing needs the per-example task loss: pass a [batch] tensor of losses (e.g. the summed "
                "token NLL of each example, see smear_peft.losses.per_example_seq2seq_loss)."
            )
        losses = example_losses.detach().float().reshape(-1)
        for adapter, block_terms in terms.items():
            config = self.peft_config[adapter]
            log_prob, entropy, baseline = (torch.stack(t) for t in zip(*block_terms))  # [blocks, B]
            if log_prob.shape[-1] != losses.shape[0]:
                raise ValueError(f"Got {losses.shape[0]} example losses for a batch of {log_prob.shape[-1]} examples.")
            advantage = losses[None] - baseline
            total = total + config.reinforce_policy_weight * (log_prob * advantage.detach()).mean()
            total = total + config.reinforce_entropy_weight * entropy.mean()
            total = total + config.reinforce_value_weight * F.huber_loss(baseline, losses[None].expand_as(baseline), delta=1.0)
        return total

    @property
    def routing_context(self) -> RoutingContext:
        return self._context

    def smear_layers(self) -> Iterable[SmearLayer]:
        """Every routing block, in model order."""
        return (m for m in self.model.modules() if isinstance(m, SmearLayer))


def _stacks(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """Encoder and decoder stacks of an encoder-decoder model (``None`` otherwise)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None, None
    try:
        return model.get_encoder(), model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None, None


def _stack_names(model: nn.Module) -> dict[str, Optional[str]]:
    encoder, decoder = _stacks(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {
        "encoder": names.get(id(encoder)) if encoder is not None else None,
        "decoder": names.get(id(decoder)) if decoder is not None else None,
    }


def _first_layer(stack: nn.Module) -> Optional[nn.Module]:
    """First block of a stack's first layer list (``block`` in T5, ``layers`` in BART)."""
    for child in stack.children():
        if isinstance(child, nn.ModuleList) and len(child):
            return child[0]
    return None
