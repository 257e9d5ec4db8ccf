"""Where expert routing blocks go, per model architecture (keyed by ``config.model_type``).

A preset names, for each sublayer kind, the modules whose output a block transforms, plus how to read those outputs.
Adding an architecture is one `ArchitecturePreset` entry; any other model works with explicit ``target_modules``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn


@dataclass(frozen=True)
class ArchitecturePreset:
    """Insertion points and block layout for a family of models.

    Attributes:
        model_types: ``config.model_type`` values this preset serves.
        targets: For each sublayer kind (``self_attention``, ``cross_attention``, ``feed_forward``), module names (or
            suffixes) whose output gets a block. A string is a full-match regex instead.
        layer_norms: Names of the backbone's normalisation modules trained with ``train_layer_norms``.
        batch_norms: Names of the backbone's BatchNorm modules (their statistics, see ``batch_norm_statistics``).
        channel_dim: Dimension of channels in the wrapped outputs (-1 for transformers, 1 for CNN feature maps).
        position: ``output``: the block transforms the module's output; ``input``: its first input.
        post_norm: Default of ``SmearConfig.post_norm``.
        input_norm: Default of ``SmearConfig.input_norm``.
        hidden_size: Optional function ``(parent, target) -> channels`` when the wrapped module does not reveal it.
    """

    model_types: tuple[str, ...]
    targets: dict[str, tuple[str, ...] | str]
    layer_norms: tuple[str, ...] = ()
    batch_norms: tuple[str, ...] = ()
    channel_dim: int = -1
    position: str = "output"
    post_norm: bool = True
    input_norm: str = "none"
    hidden_size: Optional[Callable[[nn.Module, nn.Module], int]] = field(default=None, compare=False)

    def target_modules(self, sublayers: list[str]) -> list[str] | str:
        """Target modules of the requested sublayer kinds."""
        chosen = [self.targets[s] for s in sublayers if s in self.targets]
        if any(isinstance(t, str) for t in chosen):
            return "|".join(f"(?:{t})" if isinstance(t, str) else "|".join(rf"(?:.*\.)?{re.escape(n)}" for n in t) for t in chosen)
        return sorted({name for names in chosen for name in names})


#: Generic layout for models wrapped through explicit ``target_modules``.
GENERIC_PRESET = ArchitecturePreset(model_types=(), targets={})

PRESETS: list[ArchitecturePreset] = [
    # T5 family: pre-LN; the inner attention / FFN modules return the sublayer output before T5's dropout and
    # residual add, exactly where the authors put their blocks. The sublayer norms stay outside the wrapper.
    ArchitecturePreset(
        model_types=("t5", "mt5", "umt5"),
        targets={
            "self_attention": ("SelfAttention",),
            "cross_attention": ("EncDecAttention",),
            "feed_forward": ("DenseReluDense",),
        },
        layer_norms=("layer_norm", "final_layer_norm"),
    ),
]


def register_preset(preset: ArchitecturePreset) -> None:
    """Add a preset (later registrations win for a model type)."""
    PRESETS.insert(0, preset)


def find_preset(model_type: Optional[str]) -> Optional[ArchitecturePreset]:
    """The preset serving ``model_type``, if any."""
    for preset in PRESETS:
        if model_type in preset.model_types:
            return preset
    return None


def supported_model_types() -> list[str]:
    return sorted({t for preset in PRESETS for t in preset.model_types})


def infer_hidden_size(module: nn.Module) -> int:
    """Channels of a module's output: its own ``out_features``/``out_channels``/``num_features``/``normalized_shape``,
    or those of its last Linear / Conv / norm submodule."""
    for candidate in [module, *reversed(list(module.modules()))]:
        for attr in ("out_features", "out_channels", "num_features"):
            if isinstance(getattr(candidate, attr, None), int):
                return getattr(candidate, attr)
        shape = getattr(candidate, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1:
            return shape[0]
    raise ValueError(
        f"Cannot tell the output channels of {type(module).__name__}: target a module that ends in a Linear, Conv or "
        "norm layer, or add an ArchitecturePreset with a hidden_size function (see smear_peft.architectures)."
    )
