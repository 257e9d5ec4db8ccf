"""Export a fixed routing of LoRA / (IA)³ experts as a plain PEFT adapter, for serving stacks that load PEFT adapters.

::

    from smear_peft.export import export_adapter

    export_adapter(model, "out/expert3", expert=3)                 # one expert in every block
    export_adapter(model, "out/rte", tag="rte")                     # tag routing: that tag's expert (Tag+ per side)
    export_adapter(model, "out/mean", probs=recorder.mean_probs_per_tag(), tag="rte")   # SMEAR's merged expert
    # later, anywhere, with no smear_peft import:
    PeftModel.from_pretrained(base_model, "out/expert3")           # a vanilla LoraConfig / IA3Config adapter

What each routing exports, per block with LoRA experts ``A_n [in, r]``, ``B_n [r, out]`` and weights ``p``:

* ``mixture="parameters"`` (SMEAR's merge; the default): ``A = Σ p_n A_n``, ``B = Σ p_n B_n``, a rank-r LoRA that is
  *exactly* what a SMEAR block computes for an input routed with ``p``;
* ``mixture="outputs"`` (the default for ``routing="ensemble"``): ``Σ p_n s x A_n B_n`` written exactly as one LoRA of
  rank ``N r`` (``A = [p_1 A_1 | ... | p_N A_N]``, ``B = [B_1; ...; B_N]``);
* (IA)³: ``l = 1 + Σ p_n (l_n - 1)`` (equal to ``Σ p_n l_n`` for a distribution).

``expert=i`` and ``tag=...`` are one-hot ``p``, so both mixtures give that expert itself. Monolithic adapters export
their single expert with no routing argument. Top-k routing scales its expert's output by a per-example probability,
which a fixed adapter cannot reproduce; export ``expert=i`` for its unscaled expert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from .analysis import RoutingMeans, RoutingRecorder
from .expert_types import IA3Experts, LoraExperts
from .layer import SmearLayer
from .losses import unwrap_smear_model

ProbsLike = Union[torch.Tensor, Mapping, RoutingMeans, RoutingRecorder, None]


def export_adapter(
    model: nn.Module,
    output_dir: str,
    *,
    expert: Optional[int] = None,
    tag: Union[int, str, None] = None,
    probs: ProbsLike = None,
    mixture: Optional[str] = None,
    adapter_name: Optional[str] = None,
):
    """Write ``output_dir/adapter_config.json`` (a vanilla PEFT `LoraConfig` or `IA3Config`) and
    ``output_dir/adapter_model.safetensors`` (PEFT's key names) for one fixed routing of a LoRA / (IA)³ SMEAR adapter.

    Args:
        model: A `PeftModel` (or `SmearModel`) with a SMEAR adapter of ``expert_type="lora"`` or ``"ia3"``.
        output_dir: Folder to write (created if needed).
        expert: Use expert ``expert`` in every block.
        tag: Alone: tag routing's expert for this tag (index or one of ``tag_names``; Tag+ mappings per side apply).
            With ``probs`` given as a `RoutingMeans` / `RoutingRecorder`: which tag's row of mean routing to use.
        probs: Routing weights: a tensor ``[N]`` for every block, a mapping ``block name -> [N]`` (names as the
            `RoutingRecorder` reports them), or a `RoutingMeans` / `RoutingRecorder` (mean routing per block, for
            ``tag`` or the only row).
        mixture: ``parameters`` (merge the experts, SMEAR) or ``outputs`` (mix their outputs, ensemble); LoRA only.
        adapter_name: The SMEAR adapter to export (default: the active one).

    Returns:
        The PEFT config written.
    """
    from peft import IA3Config, LoraConfig
    from safetensors.torch import save_file

    smear = unwrap_smear_model(model)
    adapter = adapter_name or smear.active_adapters[0]
    config = smear.peft_config[adapter]
    if config.expert_type not in ("lora", "ia3"):
        raise ValueError(
            f"export_adapter writes plain LoRA / IA3 adapters, but adapter {adapter!r} has expert_type="
            f"{config.expert_type!r}; bottleneck adapters have no plain PEFT counterpart."
        )
    if config.modules_to_save:
        raise ValueError(
            f"Adapter {adapter!r} also trains {config.modules_to_save} in full (modules_to_save / train_layer_norms), "
            "which export_adapter does not write; train with train_layer_norms=False and no modules_to_save to export."
        )
    if mixture is None:
        mixture = "outputs" if config.routing == "ensemble" else "parameters"
    if mixture not in ("parameters", "outputs"):
        raise ValueError(f"mixture must be 'parameters' or 'outputs', got {mixture!r}.")
    layers = [m for m in smear.model.modules() if isinstance(m, SmearLayer) and adapter in m.smear_experts]
    weights_for = _routing_weights(smear, config, layers, expert, tag, probs)

    state: dict[str, torch.Tensor] = {}
    targets, feedforward, conv1d, rank = [], [], False, None
    for layer in layers:
        experts = layer.smear_experts[adapter]
        name = layer.block_name
        targets.append(name)
        conv1d = conv1d or layer.linear_shape.fan_in_fan_out
        weights = weights_for(layer).to(device=_device(experts), dtype=experts.dtype)
        with torch.no_grad():
            if isinstance(experts, LoraExperts):
                a, b = _lora_factors(experts, weights, mixture)
                rank, expert_rank, scaling = a.shape[1], experts.lora_A.shape[-1], experts.scaling
                state[f"base_model.model.{name}.lora_A.weight"] = a.T.contiguous()
                state[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous()
            else:
                vector = 1.0 + weights @ (experts.ia3_l - 1.0)
                if experts.feedforward:
                    feedforward.append(name)
                    state[f"base_model.model.{name}.ia3_l"] = vector[None, :].contiguous()
                else:
                    state[f"base_model.model.{name}.ia3_l"] = vector[:, None].contiguous()
    if not layers:
        raise ValueError(f"Adapter {adapter!r} has no routing blocks to export.")
    task_type = None if config.task_type in (None, "AUTO") else config.task_type
    common = dict(
        target_modules=targets,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=task_type,
        fan_in_fan_out=conv1d,
    )
    if config.expert_type == "lora":
        # The same alpha reproduces the experts' scaling at their own rank; a rank-N*r mixture gets the alpha that does.
        alpha = config.lora_alpha if rank == expert_rank else scaling * (rank**0.5 if config.use_rslora else rank)
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            use_rslora=config.use_rslora,
            lora_dropout=config.lora_dropout,
            bias="none",
            **common,
        )
    else:
        peft_config = IA3Config(feedforward_modules=feedforward, **common)
    os.makedirs(output_dir, exist_ok=True)
    peft_config.save_pretrained(output_dir)
    save_file({k: v.detach().cpu() for k, v in state.items()}, os.path.join(output_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(output_dir, "smear_export.json"), "w") as handle:  # provenance only; PEFT ignores it
        json.dump({"adapter": adapter, "routing": config.routing, "expert": expert, "tag": tag, "mixture": mixture,
                   "probs": _describe(probs)}, handle, indent=2)
    return peft_config


#: Names by expert type, for readability at call sites.
export_lora = export_adapter
export_ia3 = export_adapter


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _lora_factors(experts: LoraExperts, weights: torch.Tensor, mixture: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [in, R]``, ``B [R, out]`` of the exported LoRA (R = r for merged parameters, N r for mixed outputs)."""
    num, in_features, rank = experts.lora_A.shape
    if mixture == "parameters" or num == 1:
        a = (weights @ experts.lora_A.flatten(1)).view(in_features, rank)
        b = (weights @ experts.lora_B.flatten(1)).view(rank, -1)
        return a, b
    a = (experts.lora_A * weights[:, None, None]).permute(1, 0, 2).reshape(in_features, num * rank)
    b = experts.lora_B.reshape(num * rank, -1)
    return a, b


def _routing_weights(smear, config, layers, expert, tag, probs):
    """A function ``layer -> [N]`` weights of the requested fixed routing."""
    num = config.num_experts
    if config.routing == "monolithic":
        if expert not in (None, 0) or probs is not None or tag is not None:
            raise ValueError("A monolithic adapter has one expert: export it with no expert / tag / probs argument.")
        return lambda layer: torch.ones(1)
    given = sum(x is not None for x in (expert, probs)) + (tag is not None and probs is None)
    if given != 1:
        raise ValueError(
            "Say which fixed routing to export: exactly one of expert=i, tag=t (tag routing) or probs=... (with "
            "tag=t to pick a RoutingMeans / RoutingRecorder row)."
        )
    if expert is not None:
        if not 0 <= int(expert) < num:
            raise ValueError(f"expert must be in [0, {num}), got {expert}.")
        return lambda layer: _one_hot(int(expert), num)
    if probs is None:  # a tag's expert
        if config.routing != "tag":
            raise ValueError(
                f"tag= alone exports tag routing's expert, but this adapter uses routing={config.routing!r}; pass "
                "probs=RoutingRecorder/RoutingMeans with tag= to export the mean routing of a tag's examples."
            )
        index = config.tag_index(tag)
        return lambda layer: _one_hot(config.tag_expert_table(layer.side)[index], num)
    if isinstance(probs, RoutingRecorder):
        probs = probs.mean_probs_per_tag()
    if isinstance(probs, RoutingMeans):
        row = _means_row(probs, tag)
        table = {block: probs.means[i, row] for i, block in enumerate(probs.blocks)}
        return lambda layer: _check_probs(_lookup(table, layer), num, layer.block_name)
    if isinstance(probs, Mapping):
        table = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in probs.items()}
        return lambda layer: _check_probs(_lookup(table, layer), num, layer.block_name)
    vector = torch.as_tensor(probs, dtype=torch.float32)
    return lambda layer: _check_probs(vector, num, layer.block_name)


def _one_hot(index: int, num: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), num).float()


def _means_row(means: RoutingMeans, tag) -> int:
    if tag is None:
        if len(means.tags) != 1:
            raise ValueError(f"The routing means have rows for tags {means.tag_labels}: pass tag= to pick one.")
        return 0
    for i, (value, label) in enumerate(zip(means.tags, means.tag_labels)):
        if tag == value or str(tag) == label:
            return i
    raise ValueError(f"No routing means for tag {tag!r} (rows: {means.tag_labels}).")


def _lookup(table: Mapping, layer: SmearLayer) -> torch.Tensor:
    for key in (layer.block_name, f"{layer.block_name}@{next(iter(layer.smear_experts))}"):
        if key in table:
            return table[key]
    raise ValueError(f"probs has no routing for block {layer.block_name!r} (it has {list(table)[:3]}...).")


def _check_probs(vector: torch.Tensor, num: int, name: str) -> torch.Tensor:
    vector = vector.detach().float().cpu().reshape(-1)
    if vector.shape[0] != num or not torch.isfinite(vector).all():
        raise ValueError(f"Routing weights of block {name!r} must be {num} finite values, got {vector.tolist()}.")
    return vector


def _describe(probs: Any) -> Any:
    if probs is None:
        return None
    if isinstance(probs, torch.Tensor):
        return probs.tolist()
    return type(probs).__name__
