"""Expert types on Linear layers: routed LoRA experts and routed (IA)³ experts (``SmearConfig(expert_type=...)``).

``expert_type="adapter"`` (the default) is the paper's bottleneck adapter after a sublayer (`smear_peft.experts`).
The two types here wrap ``nn.Linear`` (and transformers' GPT-2-style ``Conv1D``) modules, as PEFT's LoRA and IA3 do:

==========  =================================================================  ======================================
type        expert n                                                           output of the wrapped Linear
==========  =================================================================  ======================================
``lora``    ``A_n [in, r]`` (PEFT's kaiming-uniform init), ``B_n [r, out]``     ``base(x) + s * drop(x) A B``
            (zeros: the model starts exactly at the base model)                 (``s = lora_alpha / r``, or
                                                                               ``/ sqrt(r)`` with ``use_rslora``)
``ia3``     ``l_n [out]`` (keys / values: output scaling) or ``l_n [in]``       ``base(x) * l`` or ``base(x * l)``
            (``feedforward_modules``: input scaling), ones at init
==========  =================================================================  ======================================

How a routing decision uses the experts (one code path per kind, as for adapters):

* ``merge`` (SMEAR): per example ``A = Σ p_n A_n`` and ``B = Σ p_n B_n`` (a rank-r LoRA: ``x (Σ p A)(Σ p B)``), or
  ``l = Σ p_n l_n`` (MoV);
* ``select`` (discrete methods): the chosen expert's parameters are gathered;
* ``mix`` (ensemble, top-k with k > 1): LoRA mixes the experts' outputs; (IA)³ experts are linear in ``l``, so mixing
  their outputs equals merging their vectors (the weights sum to 1), which is what is computed;
* ``shared`` (monolithic): one expert, i.e. plain LoRA / (IA)³ (and mergeable into the base weights).

An expert's *effect* is what a ``select`` weight scales (top-k's ``p_argmax``, ST-Gumbel's straight-through
multiplier): the LoRA update ``s x A B``, and for (IA)³ the deviation from identity, ``l - 1``. Both expert modules
therefore return a *delta*: LoRA's additive update, and (IA)³'s ``l - 1`` per position (zero at padding positions
of segment routing, so those keep the base output).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from .routing import RoutingDecision

EXPERT_TYPES = ("adapter", "lora", "ia3")
LINEAR_EXPERT_TYPES = ("lora", "ia3")

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_T5_LORA = ("q", "v", "wi", "wi_0", "wi_1", "wo")
_BART_LORA = ("q_proj", "v_proj", "fc1", "fc2")

#: LoRA targets per ``model_type``: attention q/k/v/o and MLP projections for causal LMs (what PEFT users target with
#: ``target_modules="all-linear"``), q, v and the FFN for T5 and BART-like encoder-decoders.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    **{t: _T5_LORA for t in ("t5", "mt5", "umt5", "longt5")},
    **{t: _BART_LORA for t in ("bart", "mbart", "marian", "pegasus", "plbart", "whisper")},
}

#: (IA)³ targets and feed-forward (input-scaled) modules per ``model_type`` where PEFT has none.
_IA3_EXTRA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{t: (("k_proj", "v_proj", "down_proj"), ("down_proj",)) for t in ("qwen3", "gemma", "gemma2")},
    "whisper": (("k_proj", "v_proj", "fc2"), ("fc2",)),
    "umt5": (("k", "v", "wo"), ("wo",)),
    "longt5": (("k", "v", "wo"), ("wo",)),
}


def preset_targets(model_type: Optional[str], expert_type: str) -> Optional[tuple[list[str], Optional[list[str]]]]:
    """``(target_modules, feedforward_modules)`` of a linear expert type for a ``model_type``, or ``None``.

    (IA)³ follows PEFT's own IA3 tables (keys, values and the FFN's input-scaled output projection)."""
    if expert_type == "lora":
        targets = LORA_TARGETS.get(model_type)
        return (sorted(targets), None) if targets else None
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as IA3_FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_TARGETS,
    )

    if model_type in IA3_TARGETS:
        return list(IA3_TARGETS[model_type]), list(IA3_FEEDFORWARD.get(model_type, []))
    if model_type in _IA3_EXTRA:
        targets, feedforward = _IA3_EXTRA[model_type]
        return list(targets), list(feedforward)
    return None


def matches_modules(key: str, names: Union[list[str], str, None]) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches a module named ``name`` or ending in ``.name``."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith("." + name) for name in names)


class LinearShape(NamedTuple):
    in_features: int
    out_features: int
    #: transformers' ``Conv1D`` stores its weight as ``[in, out]`` (PEFT's ``fan_in_fan_out``).
    fan_in_fan_out: bool


def linear_shape(module: nn.Module, name: str = "") -> LinearShape:
    """Shape of a Linear-like target, or a `ValueError` saying which modules LoRA / (IA)³ experts can wrap."""
    if isinstance(module, nn.Linear):
        return LinearShape(module.in_features, module.out_features, False)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
        return LinearShape(module.weight.shape[0], module.weight.shape[1], True)
    raise ValueError(
        f"SmearConfig(expert_type='lora'/'ia3') wraps nn.Linear (or transformers' Conv1D) modules, but "
        f"{name or 'a target'} is a {type(module).__name__}. Name Linear layers in target_modules (e.g. "
        "['q_proj', 'v_proj', 'down_proj']), or use expert_type='adapter' to put a bottleneck adapter after a sublayer."
    )


def lora_scaling(config, rank: Optional[int] = None) -> float:
    """PEFT's LoRA scaling for a rank (default ``config.r``): ``lora_alpha / r``, or ``lora_alpha / sqrt(r)``."""
    rank = rank or config.r
    return config.lora_alpha / math.sqrt(rank) if config.use_rslora else config.lora_alpha / rank


class LoraParameters(NamedTuple):
    """One LoRA expert per routing unit: ``A`` ``[U, in, r]``, ``B`` ``[U, r, out]`` with the scaling ``s`` folded in
    (``s B``: scaling the small ``[r, out]`` matrix instead of every output position's update)."""

    a: torch.Tensor
    b: torch.Tensor


class LoraExperts(nn.Module):
    """``num_experts`` LoRA experts as stacked tensors (a leaf module): ``lora_A`` ``[N, in, r]``, ``lora_B``
    ``[N, r, out]``. ``forward`` returns the update ``s * x A B`` (``x`` already through ``lora_dropout``)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, scaling: float):
        super().__init__()
        self.num_experts = num_experts  # an int, not a parameter shape: FSDP1 / ZeRO-3 shards flatten the stacks
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, in_features, rank))
        self.lora_B = nn.Parameter(torch.empty(num_experts, rank, out_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's init: ``A`` as ``kaiming_uniform_(a=sqrt(5))`` on a ``[r, in]`` weight (U(-1/sqrt(in), 1/sqrt(in))),
        independently per expert; ``B`` zero, so every expert's update starts at exactly zero."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        self.lora_A.uniform_(-bound, bound)
        self.lora_B.zero_()

    def forward(
        self, inputs: torch.Tensor, decision: "RoutingDecision", params: Optional[LoraParameters] = None
    ) -> tuple[torch.Tensor, Optional[LoraParameters]]:
        """The update ``[U, S, out]`` for ``inputs`` ``[U, S, in]`` as ``decision`` says; returns the per-unit
        parameters it merged or gathered (for decoding steps), as `smear_peft.experts.Experts` does.

        The scaling ``s`` multiplies the smallest operand (the merged / gathered ``B``, or the mixing weights), not the
        ``[U, S, out]`` update: one small multiply instead of one over every position, forward and backward."""
        if decision.kind == "shared":
            flat = inputs.reshape(-1, inputs.shape[-1])
            out = (flat @ self.lora_A[0]) @ (self.lora_B[0] * self.scaling)
            return out.view(*inputs.shape[:-1], -1), None
        if decision.kind in ("merge", "select"):
            if params is None:
                if decision.kind == "merge":
                    probs = decision.weights.to(self.dtype)
                    units = probs.shape[0]
                    params = LoraParameters(
                        (probs @ self.lora_A.flatten(1)).view(units, *self.lora_A.shape[1:]),
                        ((probs * self.scaling) @ self.lora_B.flatten(1)).view(units, *self.lora_B.shape[1:]),
                    )
                else:
                    params = LoraParameters(self.lora_A[decision.index], self.lora_B[decision.index] * self.scaling)
            b = params.b
            if decision.kind == "select" and decision.weights is not None:
                b = b * decision.weights.to(b.dtype)[:, None, None]
            return torch.bmm(torch.bmm(inputs, params.a), b), params
        weights = decision.weights.to(inputs.dtype) * self.scaling
        if decision.index is None:  # every expert (ensemble), mixed inside the two contractions
            num, in_features, rank = self.lora_A.shape
            hidden = inputs.reshape(-1, in_features) @ self.lora_A.permute(1, 0, 2).reshape(in_features, num * rank)
            hidden = hidden.view(inputs.shape[0], -1, num, rank) * weights[:, None, :, None]
            out = hidden.reshape(-1, num * rank) @ self.lora_B.reshape(num * rank, -1)
            return out.view(*inputs.shape[:-1], -1), None
        hidden = torch.einsum("bsi,bkir->bksr", inputs, self.lora_A[decision.index])
        return torch.einsum("bk,bksr,bkro->bso", weights, hidden, self.lora_B[decision.index]), None

    def delta_weight(self, expert: int = 0) -> torch.Tensor:
        """``[in, out]`` weight update of one expert (for merging monolithic experts into the base layer)."""
        return (self.lora_A[expert] @ self.lora_B[expert]) * self.scaling

    @torch.no_grad()
    def merge_into(self, base: nn.Module, shape: LinearShape, sign: float = 1.0) -> None:
        delta = self.delta_weight().to(base.weight.dtype) * sign
        base.weight.add_(delta if shape.fan_in_fan_out else delta.T)


class IA3Experts(nn.Module):
    """``num_experts`` (IA)³ scaling vectors ``ia3_l`` ``[N, features]`` (a leaf module), ones at init.

    ``feedforward`` experts scale the wrapped layer's input (``features = in``), the others its output. ``forward``
    returns the scaling's deviation from one, ``l - 1``, per position (``[U, S, features]``, a broadcast view)."""

    def __init__(self, num_experts: int, features: int, feedforward: bool):
        super().__init__()
        self.num_experts = num_experts  # an int, not a parameter shape: FSDP1 / ZeRO-3 shards flatten the stacks
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.empty(num_experts, features))

    @property
    def dtype(self) -> torch.dtype:
        return self.ia3_l.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def forward(
        self, inputs: torch.Tensor, decision: "RoutingDecision", params: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        units, positions = inputs.shape[:2]
        if decision.kind == "shared":
            delta = (self.ia3_l[0] - 1.0).expand(units, positions, -1)
            return delta, None
        if params is None:
            deviation = self.ia3_l - 1.0
            if decision.kind == "merge":
                params = decision.weights.to(self.dtype) @ deviation
            elif decision.kind == "select":
                params = deviation[decision.index]
            elif decision.index is None:
                params = decision.weights.to(self.dtype) @ deviation
            else:
                params = torch.einsum("bk,bkf->bf", decision.weights.to(self.dtype), deviation[decision.index])
        delta = params
        if decision.kind == "select" and decision.weights is not None:
            delta = delta * decision.weights.to(delta.dtype)[:, None]
        cacheable = params if decision.kind in ("merge", "select") else None
        return delta[:, None, :].expand(units, positions, -1), cacheable

    @torch.no_grad()
    def merge_into(self, base: nn.Module, shape: LinearShape, sign: float = 1.0) -> None:
        scale = self.ia3_l[0].to(base.weight.dtype)
        if sign < 0:
            scale = 1.0 / scale
        if self.feedforward:  # base(x * l): columns of the [out, in] weight (rows of Conv1D's [in, out])
            base.weight.mul_(scale[:, None] if shape.fan_in_fan_out else scale[None, :])
        else:  # base(x) * l: rows of the weight and the bias
            base.weight.mul_(scale[None, :] if shape.fan_in_fan_out else scale[:, None])
            if getattr(base, "bias", None) is not None:
                base.bias.mul_(scale)


def build_linear_experts(config, routing, shape: LinearShape, feedforward: bool) -> nn.Module:
    """The expert stack of one adapter on one Linear layer."""
    slots = routing.num_expert_slots()
    if config.expert_type == "lora":
        rank = config.r * routing.bottleneck_multiplier()
        experts = LoraExperts(slots, shape.in_features, shape.out_features, rank, lora_scaling(config, rank))
    else:
        experts = IA3Experts(slots, shape.in_features if feedforward else shape.out_features, feedforward)
    experts.reset_parameters()
    return experts
