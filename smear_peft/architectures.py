"""Where expert routing blocks go, per model architecture (keyed by ``config.model_type``).

An `ArchitecturePreset` names the modules whose output (or input) a block transforms, the backbone norms trained
beside the adapters, and the block's defaults for that architecture. `get_peft_model` picks the preset of the base
model's ``config.model_type``; any other model works with explicit ``SmearConfig(target_modules=...)``, where each
block transforms the first output of its module (see `block_layout`).

Adding an architecture takes one call::

    from smear_peft import ArchitecturePreset, register_preset

    register_preset(ArchitecturePreset(
        model_types=("my_model",),
        targets={"self_attention": ("attn",), "feed_forward": ("mlp",)},
        layer_norms=("ln_1", "ln_2"),
    ))

See ``docs/architectures.md`` for the table of presets and their insertion points.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from .config import SUBLAYERS, SmearConfig

Targets = tuple[str, ...] | str


@dataclass(frozen=True)
class ArchitecturePreset:
    """Insertion points and block defaults for a family of models.

    Attributes:
        model_types: ``config.model_type`` values this preset serves.
        targets: Insertion points by kind. Transformer presets use the kinds ``self_attention``, ``cross_attention``
            and ``feed_forward``, which ``SmearConfig.sublayers`` selects from; any other kind (e.g. ``residual_layer``
            of a CNN) is always wrapped. A value is a tuple of module names, each matching a module whose name is it or
            ends with ``"." + name``, or a string: a regular expression that must match the whole module name.
        layer_norms: Names (suffixes, as in PEFT's ``modules_to_save``) of the backbone norms trained beside the
            adapters when ``SmearConfig.train_layer_norms`` is on.
        position: ``output``: the block transforms the module's (first) output; ``input``: its first input, i.e. it
            runs just before the module.
        channel_dim: Dimension of channels in the transformed tensor (-1 for token sequences, 1 for feature maps).
        post_norm: Default of ``SmearConfig.post_norm``: LayerNorm on the expert output.
        input_norm: Default of ``SmearConfig.input_norm``: ``none`` or ``batch_norm`` on the block input.
        bottleneck_size: Default bottleneck of this architecture, used when the config gives no ``bottleneck_size``
            and leaves ``reduction_factor`` at its default (the authors' ResNet blocks are C -> 32 -> C at every width).
        hidden_size: Function ``(parent, target) -> channels`` for targets whose width `infer_layout` cannot read
            (``parent`` is the module holding the target).
        flattened_outputs: Insertion points (names, as in ``targets``) whose output is ``[batch * positions, C]``.
        gumbel_schedule: Default of ``SmearConfig.gumbel_schedule`` (the authors' loop for this family).
        encoder_reads_attention_mask: ``False`` for encoders that attend to every position whatever the attention
            mask says (Whisper: the mask counts input frames, and the model ignores it). Their blocks then pool over
            every position, as the encoder sees them, instead of reading the mask.
    """

    model_types: tuple[str, ...]
    targets: dict[str, Targets]
    layer_norms: tuple[str, ...] = ()
    position: str = "output"
    channel_dim: int = -1
    post_norm: bool = True
    input_norm: str = "none"
    bottleneck_size: int | None = None
    hidden_size: Callable[[nn.Module, nn.Module], int] | None = field(default=None, compare=False)
    flattened_outputs: tuple[tuple[str, ...], ...] = ()
    gumbel_schedule: str = "t5"
    encoder_reads_attention_mask: bool = True

    def __post_init__(self) -> None:
        if self.position not in ("output", "input"):
            raise ValueError(f"ArchitecturePreset.position must be 'output' or 'input', got {self.position!r}.")
        if self.input_norm not in ("none", "batch_norm"):
            raise ValueError(f"ArchitecturePreset.input_norm must be 'none' or 'batch_norm', got {self.input_norm!r}.")
        if not self.targets:
            raise ValueError("ArchitecturePreset.targets must name at least one insertion point.")

    def target_modules(self, sublayers: list[str]) -> list[str] | str:
        """``target_modules`` for the requested transformer sublayers (plus any always-wrapped kinds).

        A sorted list of names when every chosen insertion point is a list of names, else one regular expression.
        """
        chosen = [t for kind, t in self.targets.items() if kind in sublayers or kind not in SUBLAYERS]
        if not chosen:
            raise ValueError(
                f"SmearConfig.sublayers={sublayers} selects no insertion point of the {'/'.join(self.model_types)} "
                f"preset, which has {sorted(self.targets)}; choose among those."
            )
        if all(isinstance(t, tuple) for t in chosen):
            return sorted({name for names in chosen for name in names})
        return "|".join(f"(?:{_as_regex(t)})" for t in chosen)

    def is_insertion_point(self, key: str) -> bool:
        """Whether the module named ``key`` is one of this preset's insertion points (of any kind)."""
        return any(_matches(key, t) for t in self.targets.values())

    def prepare_config(self, config: SmearConfig) -> None:
        """Fill what the user left open in ``config`` (in place, idempotently) with this preset's choices.

        * ``target_modules``: the preset's insertion points for ``config.sublayers``;
        * ``modules_to_save``: gains the preset's layer norms when ``train_layer_norms`` is on;
        * ``bottleneck_size``: the preset's, if it has one, when the config sets neither ``bottleneck_size`` nor a
          non-default ``reduction_factor``.

        The filled-in values are saved in the adapter's config.
        """
        if config.target_modules is None:
            config.target_modules = self.target_modules(config.sublayers)
        if config.train_layer_norms and self.layer_norms:
            current = list(config.modules_to_save or [])
            config.modules_to_save = current + [m for m in self.layer_norms if m not in current]
        if config.gumbel_schedule is None:
            config.gumbel_schedule = self.gumbel_schedule
        default_reduction = type(config).__dataclass_fields__["reduction_factor"].default
        if self.bottleneck_size and config.bottleneck_size is None and config.reduction_factor == default_reduction:
            config.bottleneck_size = self.bottleneck_size


class BlockLayout(NamedTuple):
    """How one block reads the module it wraps."""

    hidden_size: int
    channel_dim: int
    position: str
    #: The module's output is ``[batch * positions, C]`` (OPT's FFN flattens its tokens): the block restores
    #: ``[batch, positions, C]`` from the call's batch size before routing.
    flattened: bool = False


def _as_regex(targets: Targets) -> str:
    if isinstance(targets, str):
        return targets
    return "|".join(rf"(?:.*\.)?{re.escape(name)}" for name in targets)


def _matches(key: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == name or key.endswith("." + name) for name in targets)


def _resnet_layer_channels(parent: nn.Module, target: nn.Module) -> int:
    """Output channels of a transformers ResNet basic / bottleneck layer (``parent``): those of its last conv."""
    return parent.layer[-1].convolution.out_channels


def _config_hidden_size(parent: nn.Module, target: nn.Module) -> int:
    """Width of a transformer sublayer's output: its config's ``hidden_size`` (fused projections such as Phi-3's
    ``qkv_proj`` make the last Linear a poor guide), else what `infer_layout` reads."""
    size = getattr(getattr(target, "config", None), "hidden_size", None)
    return size if isinstance(size, int) else infer_layout(target).hidden_size


#: T5 family: pre-LN sublayers whose residual add is inside the sublayer module. The inner attention / FFN modules
#: return the sublayer output before T5's dropout and residual add, exactly where the authors put their blocks.
T5_PRESET = ArchitecturePreset(
    model_types=("t5", "mt5", "umt5", "longt5"),
    targets={
        # LongT5's encoder uses local or transient-global attention in place of full self-attention.
        "self_attention": ("SelfAttention", "LocalSelfAttention", "TransientGlobalSelfAttention"),
        "cross_attention": ("EncDecAttention",),
        "feed_forward": ("DenseReluDense",),
    },
    layer_norms=("layer_norm", "final_layer_norm"),
)

#: BART family: post-LN layers with inline residual adds. The attention modules (tuple outputs; the block transforms
#: element 0) and ``fc2`` end each sublayer's residual branch, so a block there runs before dropout and the residual
#: add, as in T5. (Not FSMT, whose layers take time-major tensors.)
BART_PRESET = ArchitecturePreset(
    model_types=("bart", "mbart", "marian", "pegasus", "plbart", "blenderbot", "blenderbot-small", "m2m_100", "mvp"),
    targets={
        "self_attention": ("self_attn",),
        "cross_attention": ("encoder_attn",),
        "feed_forward": ("fc2",),
    },
    layer_norms=(
        "self_attn_layer_norm",
        "encoder_attn_layer_norm",
        "final_layer_norm",
        "layernorm_embedding",
        "layer_norm",
    ),
)

#: ViT family (transformers >= 5 layout ``<model>.layers.N.{attention, mlp, layernorm_before, layernorm_after}``):
#: pre-LN; ``attention`` and ``mlp`` return the sublayer output before the residual add. Routing pools over tokens.
VIT_PRESET = ArchitecturePreset(
    model_types=("vit", "deit", "vit_msn", "ijepa"),
    targets={"self_attention": ("attention",), "feed_forward": ("mlp",)},
    layer_norms=("layernorm_before", "layernorm_after", "layernorm"),
)

#: transformers' ResNet: the authors' conv block after every basic / bottleneck layer, after the residual add and
#: before the layer's final ReLU, i.e. on the input of the layer's own ``activation`` module (the regex skips the
#: ``activation`` of the conv sub-layers). BatchNorm on the block input, per-pixel C -> 32 -> C experts, no post-LN.
RESNET_PRESET = ArchitecturePreset(
    model_types=("resnet",),
    targets={"residual_layer": r"(?:.*\.)?encoder\.stages\.\d+\.layers\.\d+\.activation"},
    position="input",
    channel_dim=1,
    post_norm=False,
    input_norm="batch_norm",
    bottleneck_size=32,
    hidden_size=_resnet_layer_channels,
    gumbel_schedule="resnet",  # the authors' DomainNet loop applies each update one step later than their T5 trainer
)

#: Whisper: BART-like encoder-decoder layers (``self_attn`` / ``encoder_attn`` return the attention output before
#: dropout and the residual add; ``fc2`` ends the FFN branch). Decoder blocks route on the encoder's output.
WHISPER_PRESET = ArchitecturePreset(
    model_types=("whisper",),
    targets={"self_attention": ("self_attn",), "cross_attention": ("encoder_attn",), "feed_forward": ("fc2",)},
    layer_norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layer_norm"),
    encoder_reads_attention_mask=False,  # Whisper's encoder attends to all 1500 positions; its mask counts 3000 frames
)

#: Causal LMs with Llama-style layers: ``self_attn`` and ``mlp`` return their sublayer output before the residual
#: add. Blocks route causally (`SmearConfig.causal_routing`: on the prompt by default, or by segments).
LLAMA_PRESET = ArchitecturePreset(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"),
    targets={"self_attention": ("self_attn",), "feed_forward": ("mlp",)},
    layer_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "model.norm",
    ),
    hidden_size=_config_hidden_size,
)

#: GPT-2: ``attn`` and ``mlp`` return the sublayer output before the residual add.
GPT2_PRESET = ArchitecturePreset(
    model_types=("gpt2",),
    targets={"self_attention": ("attn",), "feed_forward": ("mlp",)},
    layer_norms=("ln_1", "ln_2", "ln_f"),
)

#: GPT-NeoX (Pythia): ``attention`` and ``mlp`` (parallel or sequential residual; both return the branch output).
GPT_NEOX_PRESET = ArchitecturePreset(
    model_types=("gpt_neox",),
    targets={"self_attention": ("attention",), "feed_forward": ("mlp",)},
    layer_norms=("input_layernorm", "post_attention_layernorm", "final_layer_norm"),
)

#: OPT: ``self_attn`` (tuple output) and ``fc2`` end the two residual branches, as in BART.
OPT_PRESET = ArchitecturePreset(
    model_types=("opt",),
    targets={"self_attention": ("self_attn",), "feed_forward": ("fc2",)},
    layer_norms=("self_attn_layer_norm", "final_layer_norm"),
    flattened_outputs=(("fc2",),),
)

#: Presets searched by `find_preset`, most recently registered first.
PRESETS: list[ArchitecturePreset] = [
    T5_PRESET, BART_PRESET, WHISPER_PRESET, VIT_PRESET, RESNET_PRESET,
    LLAMA_PRESET, GPT2_PRESET, GPT_NEOX_PRESET, OPT_PRESET,
]


def register_preset(preset: ArchitecturePreset) -> None:
    """Add a preset; it takes precedence over earlier ones for its model types."""
    PRESETS.insert(0, preset)


def find_preset(model_type: str | None) -> ArchitecturePreset | None:
    """The preset serving ``model_type``, if any."""
    for preset in PRESETS:
        if model_type in preset.model_types:
            return preset
    return None


def supported_model_types() -> list[str]:
    """Every ``model_type`` with a preset."""
    return sorted({t for preset in PRESETS for t in preset.model_types})


def block_layout(preset: ArchitecturePreset | None, key: str, parent: nn.Module, target: nn.Module) -> BlockLayout:
    """Layout of the block wrapping module ``target`` (named ``key``, child of ``parent``).

    The preset's layout applies at its own insertion points; any other target (explicit ``target_modules``) gets a
    block on its first output, with width and channel dimension read from the module by `infer_layout`.
    """
    if preset is not None and preset.is_insertion_point(key):
        hidden = preset.hidden_size(parent, target) if preset.hidden_size else infer_layout(target).hidden_size
        flattened = any(_matches(key, names) for names in preset.flattened_outputs)
        return BlockLayout(hidden, preset.channel_dim, preset.position, flattened)
    return infer_layout(target)


#: Width attributes of common layers and where each puts channels in its output.
_WIDTH_ATTRIBUTES = (("out_features", -1), ("nf", -1), ("out_channels", 1), ("num_features", 1), ("num_channels", 1))


def infer_layout(module: nn.Module) -> BlockLayout:
    """Layout of a block on ``module``'s output, from the module or, failing that, its last Linear / Conv / norm.

    ``Linear`` (and transformers' GPT-2-style ``Conv1D``) and ``LayerNorm`` outputs have channels last (token
    sequences, or ``[B, C]``); ``Conv``, ``BatchNorm`` and ``GroupNorm`` outputs have them at dim 1 (``[B, C, ...]``).
    """
    for candidate in [module, *reversed(list(module.modules()))]:
        for attribute, channel_dim in _WIDTH_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int):
                return BlockLayout(value, channel_dim, "output")
        shape = getattr(candidate, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1:
            return BlockLayout(shape[0], -1, "output")
    raise ValueError(
        f"Cannot tell the output channels of {type(module).__name__}: target a module that ends in a Linear, Conv or "
        "norm layer, or register an ArchitecturePreset with a hidden_size function (see smear_peft.architectures)."
    )
