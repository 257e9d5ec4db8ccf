"""`SmearModel`: the PEFT tuner that injects expert routing blocks and feeds them their routing context."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper, _get_submodules
from torch import nn

from .architectures import ArchitecturePreset, block_layout, find_preset, supported_model_types
from .batch_norm import backbone_batch_norms, keep_in_eval_mode, wrap_batch_norm_statistics
from .config import FEEDFORWARD_PRESET, SUBLAYERS, SmearConfig, check_layer_selection
from .expert_types import linear_shape, matches_modules, preset_targets
from .frames import CarryFrames, FrameStack, GenerationSession
from .hooks import ROUTING_KWARGS, FrameHooks, batch_size_of
from .layer import SmearLayer
from .losses import reinforce_loss
from .mixed_batch import MixedModulesToSave, check_adapter_names
from .routing import RoutingMethod, build_routing_method

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
    """Injects `SmearLayer` blocks into a model (see `SmearConfig`) and gives every call its routing frame.

    Beyond the usual PEFT tuner API it offers:

    * ``routing_tags`` / ``routing_keys`` (and, for causal LMs, ``routing_mask``) keyword arguments on ``forward`` and
      ``generate``, and the `routing_inputs` context manager, for tag and hash routing and as metadata for
      `smear_peft.analysis.RoutingRecorder`;
    * `reinforce_loss` (the auxiliary loss of REINFORCE routing) and `set_training_step` (ST-Gumbel annealing).

    Routing state belongs to one call (`smear_peft.frames`): concurrent calls from threads are exact, and nothing a
    forward sets outlives it.
    """

    prefix: str = "smear_"
    tuner_layer_cls = SmearLayer
    target_module_mapping = PresetTargets()

    def __init__(self, model: nn.Module, config, adapter_name: str, low_cpu_mem_usage: bool = False, state_dict=None):
        # Tuner-level state must exist before BaseTuner.__init__ injects the adapter.
        object.__setattr__(self, "frames", FrameStack())
        object.__setattr__(self, "_mixed_modules_to_save", MixedModulesToSave(self.frames))
        object.__setattr__(self, "_routing_methods", {})
        object.__setattr__(self, "_hook_handles", [])
        object.__setattr__(self, "_batch_norm_hook_handles", [])
        object.__setattr__(self, "_num_blocks", 0)
        object.__setattr__(self, "_stack_names", None)
        object.__setattr__(self, "_checkpointing_modules", None)
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- configuration and injection -------------------------------------------------------------------------------
    @property
    def preset(self) -> Optional[ArchitecturePreset]:
        """The architecture preset of the base model's ``model_type`` (``None`` for models without one)."""
        return find_preset(getattr(getattr(self.model, "config", None), "model_type", None))

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    @property
    def is_causal_lm(self) -> bool:
        """A decoder-only model that generates text (its blocks get causal routing by default)."""
        can_generate = getattr(self.model, "can_generate", None)
        return not self.is_encoder_decoder and callable(can_generate) and bool(can_generate())

    def _prepare_adapter_config(self, peft_config: SmearConfig, model_config: dict) -> SmearConfig:
        preset = find_preset(model_config.get("model_type"))
        if peft_config.expert_type != "adapter" and peft_config.target_modules is None:
            targets = preset_targets(model_config.get("model_type"), peft_config.expert_type)
            if targets is None:
                raise ValueError(
                    f"smear-peft has no {peft_config.expert_type} targets for model_type="
                    f"{model_config.get('model_type')!r}. Pass SmearConfig(target_modules=[...]) naming its Linear layers "
                    "(e.g. ['q_proj', 'v_proj']" + (", with feedforward_modules=[...] for input-scaled FFN layers"
                    if peft_config.expert_type == "ia3" else "") + ")."
                )
            peft_config.target_modules, feedforward = targets
            if peft_config.expert_type == "ia3" and peft_config.feedforward_modules in (None, FEEDFORWARD_PRESET):
                peft_config.feedforward_modules = feedforward
        if peft_config.expert_type == "ia3" and peft_config.feedforward_modules == FEEDFORWARD_PRESET:
            # As PEFT's IA3Config: the table's feed-forward modules also for explicit target_modules. Saved resolved.
            table = preset_targets(model_config.get("model_type"), "ia3")
            feedforward = table[1] if table else []
            if isinstance(peft_config.target_modules, list):  # kept a subset of the targets (SmearConfig.validate)
                feedforward = [t for t in peft_config.target_modules if matches_modules(t, feedforward)]
            peft_config.feedforward_modules = feedforward
        if preset is None and peft_config.target_modules is None:
            raise ValueError(
                f"smear-peft has no preset for model_type={model_config.get('model_type')!r} (presets: "
                f"{', '.join(supported_model_types())}). Pass SmearConfig(target_modules=[...]) naming the modules "
                "whose output gets a routing block, e.g. the attention and MLP modules of each layer, or register a "
                "preset with smear_peft.register_preset(ArchitecturePreset(...))."
            )
        if preset is not None:
            preset.prepare_config(peft_config)
        check_layer_selection(peft_config)  # a preset may fill in a regular expression
        if peft_config.causal_routing is not None and self.is_encoder_decoder:
            raise ValueError(
                "SmearConfig.causal_routing applies to decoder-only models; the decoder blocks of an encoder-decoder "
                "model route on the encoder's output. Leave causal_routing=None."
            )
        if peft_config.causal_routing is None and self.is_causal_lm:
            peft_config.causal_routing = "prompt"
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
        side = self._side_of(current_key)
        role = "encoder_output" if side == "decoder" else "causal" if peft_config.causal_routing else "input"
        if peft_config.expert_type != "adapter":  # LoRA / (IA)³ experts on a Linear (or Conv1D) target
            shape = linear_shape(target, current_key)
            placement = dict(hidden_size=shape.in_features, position="linear", post_norm=False, linear_shape=shape)
        else:  # the paper's block on a sublayer's output (or input)
            layout = block_layout(preset, current_key, parent, target)
            placement = dict(
                hidden_size=layout.hidden_size,
                channel_dim=layout.channel_dim,
                position=layout.position,
                flattened=layout.flattened,
                post_norm=preset.post_norm if preset else True,
                input_norm=preset.input_norm if preset else "none",
            )
        new_module = SmearLayer(
            target,
            adapter_name,
            peft_config,
            routing,
            frames=self.frames,
            role=role,
            source_size=self._encoder_output_size() if role == "encoder_output" else None,
            side=side,
            block_index=self._num_blocks,
            block_name=current_key,
            reference=_first_floating_tensor(self.model),
            **placement,
        )
        object.__setattr__(self, "_num_blocks", self._num_blocks + 1)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _encoder_output_size(self) -> Optional[int]:
        """Width of the encoder output the decoder reads (after any encoder-to-decoder projection)."""
        _, decoder = _stacks(self.model)
        config = getattr(decoder, "config", None) or getattr(self.model, "config", None)
        width = getattr(config, "cross_attention_hidden_size", None) or getattr(config, "hidden_size", None)
        return width if isinstance(width, int) else None

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
            # Tuner-level buffers are saved with the adapter: a routing method's temperature, one per adapter.
            self.smear_gumbel_temperature = BufferDict({}, persistent=True)

    def _routing_method(self, adapter_name: str, config: SmearConfig) -> RoutingMethod:
        """One routing method object per adapter, shared by all of its blocks."""
        if adapter_name not in self._routing_methods:
            method = build_routing_method(config)
            temperature = method.initial_temperature()
            if temperature is not None:
                self.smear_gumbel_temperature[adapter_name] = torch.tensor([temperature])
                method.bind_temperature(self.smear_gumbel_temperature, adapter_name)
            self._routing_methods[adapter_name] = method
        return self._routing_methods[adapter_name]

    def _side_of(self, key: str) -> str:
        """``encoder`` / ``decoder`` for modules inside an encoder-decoder model's stacks, else ``any``."""
        if self._stack_names is None:
            object.__setattr__(self, "_stack_names", _stack_names(self.model))
        for side, name in self._stack_names.items():
            if name is not None and (key == name or key.startswith(name + ".")):
                return side
        return "any"

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's default copies `.weight` onto the module put back on unload, which sublayers don't have; SmearLayer
        # puts its adapters on the device of the wrapped module (or of the model) itself.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: SmearConfig, adapter_name: str) -> None:
        if not self._hook_handles:
            self._hook_handles.extend(FrameHooks(self).install(self.model, *_stacks(self.model)))
            if callable(getattr(type(self.model), "generate", None)) and "generate" not in vars(self.model):
                # However generate is reached (PeftModel, this tuner, the base model itself), it runs in one session.
                self.model.generate = GenerateInSession(self, self.model.generate)
        if hasattr(model, "add_model_tags"):  # shown in the model card PEFT writes on save_pretrained
            model.add_model_tags(["smear-peft", "smear"])

    def _check_merge_allowed(self) -> None:
        configs = list(self.peft_config.values())
        if configs and all(c.expert_type != "adapter" and c.routing == "monolithic" for c in configs):
            return  # plain LoRA / (IA)³: one expert for every input
        raise NotImplementedError(
            "SMEAR adapters cannot be merged into the base model: routing is input-dependent, so every example uses its "
            "own mixture of experts. Keep the PeftModel for inference, or call unload(restore_modules_to_save=True) to "
            "get the unchanged base model back. (Only monolithic LoRA / (IA)³ experts, which are plain LoRA / (IA)³, "
            "merge; to serve a fixed routing as a plain PEFT adapter use smear_peft.export.export_adapter.)"
        )

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        for handles in (self._hook_handles, self._batch_norm_hook_handles):
            for handle in handles:
                handle.remove()
            handles.clear()
        if isinstance(vars(self.model).get("generate"), GenerateInSession):
            del self.model.generate
        for module in self._checkpointing_modules or ():
            function = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(function, CarryFrames):
                module._gradient_checkpointing_func = function.checkpoint
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """As PEFT: adapters start in the base layer's dtype and fp16 / bf16 ones are upcast to fp32 when
        ``autocast_adapter_dtype`` (the default). PEFT casts parameters only; the adapters' BatchNorm statistics follow
        their parameters here."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for layer in self.smear_layers():
            for name in layer.adapter_layer_names:
                container = getattr(layer, name)
                module = container[adapter_name] if adapter_name in container else None
                parameter = next(module.parameters(), None) if module is not None else None
                if parameter is None or parameter.device.type == "meta":
                    continue
                for owner in module.modules():
                    for key, buffer in owner._buffers.items():
                        if buffer is not None and buffer.is_floating_point() and buffer.dtype != parameter.dtype:
                            owner._buffers[key] = buffer.to(parameter.dtype)

    def unload(self, restore_modules_to_save: bool = False) -> nn.Module:
        """The base model without routing blocks, hooks or wrappers (not in place: use the returned model).

        PEFT's convention for ``modules_to_save`` applies by default: each such module (the backbone layer norms that
        ``train_layer_norms`` trains, a new head) comes back as the active adapter's **trained** copy. With
        ``restore_modules_to_save=True`` they come back as they were in the base model, which is then the untouched
        base model. Backbone BatchNorm statistics (``batch_norm_statistics``) always come back untouched."""
        if restore_modules_to_save:
            for name, module in list(self.model.named_modules()):
                if isinstance(module, ModulesToSaveWrapper):
                    parent, _, child = _get_submodules(self.model, name)
                    setattr(parent, child, module.original_module)
        return self._unload_and_optionally_merge(merge=False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._routing_methods.pop(adapter_name, None)
        if adapter_name in self.smear_gumbel_temperature:
            del self.smear_gumbel_temperature[adapter_name]

    # -- what the frame hooks ask --------------------------------------------------------------------------------
    def _active_methods(self) -> list[RoutingMethod]:
        """Routing methods of the active adapters and, in a mixed adapter batch, of the adapters it names (what a call
        must prepare for: content keys, pooling modes, the causal prompt)."""
        names = list(self.active_adapters)
        frame = self.frames.current()
        if frame is not None and frame.adapter_names is not None:
            names += [name for name in dict.fromkeys(frame.adapter_names) if name not in names]
        return [self._routing_methods[a] for a in names if a in self._routing_methods]

    def needs_keys(self) -> bool:
        return any(m.needs_keys for m in self._active_methods())

    def pooling_modes(self) -> set[str]:
        return {m.config.pooling for m in self._active_methods()} or {"masked_mean"}

    @property
    def has_causal_blocks(self) -> bool:
        return any(m.config.causal_routing for m in self._routing_methods.values()) and not self.is_encoder_decoder

    def carry_frames_into_checkpoints(self) -> None:
        """Wrap the model's gradient-checkpointing functions so that recomputed layers see their call's frame
        (`smear_peft.frames.CarryFrames`); a function set later (``gradient_checkpointing_enable``) is wrapped at the
        next call."""
        modules = self._checkpointing_modules
        if modules is None:
            modules = [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]
            object.__setattr__(self, "_checkpointing_modules", modules)
        for module in modules:
            function = getattr(module, "_gradient_checkpointing_func", None)
            if function is not None and not isinstance(function, CarryFrames):
                module._gradient_checkpointing_func = CarryFrames(function)

    def index_tensor(self, values: TagsLike, what: str, batch_size: Optional[int] = None) -> Optional[torch.Tensor]:
        """Per-example ``routing_tags`` / ``routing_keys`` as a ``[B]`` long tensor on the model's device.

        Integers (or tag names, for tags) only, one per example: floats, booleans and nested lists are errors."""
        if values is None:
            return None
        if isinstance(values, torch.Tensor):
            if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
                raise ValueError(f"{what} must be integers (got a {values.dtype} tensor); pass a LongTensor or ints.")
            if values.dim() != 1:
                raise ValueError(f"{what} must be one value per example, a 1-D tensor; got shape {tuple(values.shape)}.")
            tensor = values.long()
        else:
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"{what} must be a list or 1-D tensor with one value per example, got {values!r}.")
            indices = []
            for value in values:
                if isinstance(value, str) and what == "routing_tags":
                    named = next((c for c in self._active_configs() if c.tag_names), None)
                    indices.append(named.tag_index(value) if named else self._unknown_tag(value))
                elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
                    indices.append(int(value))
                else:
                    raise ValueError(
                        f"{what} must hold one integer{' or tag name' if what == 'routing_tags' else ''} per example; "
                        f"got {value!r} ({type(value).__name__}). Floats are not truncated and lists are not flattened."
                    )
            tensor = torch.tensor(indices, dtype=torch.long)
        if batch_size is not None and tensor.shape[0] != batch_size:
            raise ValueError(
                f"Got {tensor.shape[0]} {what} for a batch of {batch_size} examples: pass exactly one per example "
                "(only generate() repeats them for beams and return sequences)."
            )
        device = _first_floating_tensor(self.model)
        return tensor.to(device.device) if device is not None else tensor

    def _active_configs(self) -> list[SmearConfig]:
        return [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]

    @staticmethod
    def _unknown_tag(tag: str) -> int:
        raise ValueError(f"Unknown routing tag {tag!r}: string tags need SmearConfig(tag_names=[...]) listing it.")

    # -- per-call options ------------------------------------------------------------------------------------------
    @contextmanager
    def routing_inputs(self, routing_tags: TagsLike = None, routing_keys: TagsLike = None):
        """Use these per-example tags / keys for every call inside the block (e.g. around a custom decoding loop).

        Nested blocks, and tags passed to a call inside, override the outer ones until they end. The state belongs to
        the calling thread."""
        tags = self.index_tensor(routing_tags, "routing_tags")
        keys = self.index_tensor(routing_keys, "routing_keys")
        with self.frames.scope(tags=tags, keys=keys):
            yield

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """PEFT enters this around ``forward`` / ``generate`` with the call's keyword arguments."""
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        merged = any(getattr(m, "merged_adapters", None) for m in self.model.modules() if isinstance(m, SmearLayer))
        names = check_adapter_names(names, self.peft_config, self.training, merged)
        self._mixed_modules_to_save.attach(self.model)
        with self.frames.scope(adapter_names=names):
            yield

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        """``generate`` of the base model with per-example ``routing_tags`` / ``routing_keys`` (repeated for beams and
        return sequences) and, for causal LMs, an optional ``routing_mask`` [B, S] marking the part of the prompt to
        route on.

        Routing is computed once per call and kept for every generated token: decoder blocks of encoder-decoder models
        route on the encoder output, causal LMs on the prompt. Each block merges its experts once per call (the
        decode-time cache; ``routing_cache=False`` merges again at every step, with the same outputs). The base
        model's own ``generate`` behaves the same (see `GenerateInSession`)."""
        return self.model.generate(*args, **kwargs)

    def generate_in_session(self, generate, args: tuple, kwargs: dict):
        tags = self.index_tensor(kwargs.pop("routing_tags", None), "routing_tags")
        keys = self.index_tensor(kwargs.pop("routing_keys", None), "routing_keys")
        mask = kwargs.pop("routing_mask", None)
        mask = None if mask is None else torch.as_tensor(mask).bool()
        outer = self.frames.current()
        reuse = kwargs.pop("routing_cache", True)
        # One session per generate call; a session opened around it (several calls sharing one) is kept.
        session = outer.session if outer is not None and outer.session is not None else GenerationSession(reuse_experts=reuse)
        self._check_generation(kwargs, keys_given=keys is not None)
        examples = generation_batch_size(args, kwargs)
        if examples is not None:
            names = outer.adapter_names if outer is not None else None
            for what, values in (("routing_tags", tags), ("routing_keys", keys), ("routing_mask", mask),
                                 ("adapter_names", names)):
                if values is not None and len(values) != examples:
                    raise ValueError(
                        f"generate() got {len(values)} {what} for {examples} examples: pass exactly one per example "
                        "(generate repeats each example's value for its beams and return sequences)."
                    )
        with self.frames.scope(tags=tags, keys=keys, routing_mask=mask, session=session):
            return generate(*args, **kwargs)

    def _check_generation(self, kwargs: dict, keys_given: bool) -> None:
        """Generation strategies that cannot keep causal routing exact are refused with the fix."""
        if not self.has_causal_blocks:
            return
        methods = self._active_methods()
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)

        def option(name: str, default: Any = None) -> Any:
            return kwargs[name] if name in kwargs else getattr(config, name, default)

        prompt_routed = any(
            m.config.causal_routing == "prompt" and (m.uses_router or (m.needs_keys and not keys_given)) for m in methods
        )
        if prompt_routed and option("prefill_chunk_size") is not None:
            raise ValueError(
                "generate(prefill_chunk_size=...) feeds the prompt in chunks, but causal_routing='prompt' routes every "
                "block on the whole prompt before the first token: drop prefill_chunk_size (or use "
                "causal_routing='segment')."
            )
        if option("assistant_model") is not None:
            raise ValueError(
                "Assisted generation (assistant_model=...) re-feeds candidate tokens through a cropped KV cache, which "
                "causal routing does not follow: generate without assistant_model."
            )
        if _cache_length(kwargs.get("past_key_values")) or _cache_length(kwargs.get("cache")):
            raise ValueError(
                "generate() was given a filled KV cache (a prefix cache): causal routing needs the whole prompt in "
                "the call. Pass the full prompt without past_key_values / cache."
            )
        if not any(m.config.causal_routing == "segment" for m in methods) or option("use_cache") is False:
            return
        if (option("num_beams", 1) or 1) > 1:
            raise ValueError(
                "causal_routing='segment' keeps per-sequence routing state that beam search would have to reorder "
                "with its KV cache: pass use_cache=False to generate with beams (same results, slower)."
            )
        if option("prompt_lookup_num_tokens") is not None:
            raise ValueError(
                "causal_routing='segment' keeps per-sequence routing state that prompt-lookup decoding would have to "
                "roll back with its KV cache: pass use_cache=False, or generate without prompt_lookup_num_tokens."
            )

    # -- training-time API -----------------------------------------------------------------------------------------
    def set_training_step(self, step: int) -> dict[str, float]:
        """Apply each adapter's temperature schedule (ST-Gumbel: the authors') at a training step; returns the
        temperatures."""
        temperatures = {}
        for name, method in self._routing_methods.items():
            tau = method.temperature_at(step)
            if tau is None:
                continue
            self.smear_gumbel_temperature[name].fill_(tau)
            temperatures[name] = tau
        return temperatures

    def reinforce_loss(self, example_losses: Optional[torch.Tensor], outputs: Any) -> torch.Tensor:
        """Auxiliary loss of REINFORCE routing for the forward that returned ``outputs`` (0 when it used none); see
        `smear_peft.losses.reinforce_loss`."""
        return reinforce_loss(outputs, example_losses)

    def smear_layers(self) -> Iterable[SmearLayer]:
        """Every routing block, in model order."""
        return (m for m in self.model.modules() if isinstance(m, SmearLayer))


def generation_batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """Number of examples a ``generate`` call was given (before beams / return sequences), or None if unknown: its
    main input (``inputs``, the first positional argument, or a named one), else its attention mask or encoder
    output."""
    encoder_outputs = kwargs.get("encoder_outputs")
    fallbacks = (kwargs.get("attention_mask"), encoder_outputs[0] if encoder_outputs is not None else None)
    return batch_size_of({**kwargs, "__args__": (kwargs.get("inputs"), *args, *fallbacks)})


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class GenerateInSession:
    """The base model's ``generate``, run in one routing session per call (set on the model instance by the tuner,
    removed by ``unload``)."""

    def __init__(self, tuner: SmearModel, generate: Any) -> None:
        self.tuner = tuner
        self.generate = generate
        functools.update_wrapper(self, generate)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.tuner.generate_in_session(self.generate, args, kwargs)


def _first_floating_tensor(model: nn.Module) -> Optional[torch.Tensor]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


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
