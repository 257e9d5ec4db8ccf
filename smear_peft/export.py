"""Export a fixed routing of LoRA / (IA)³ experts as a plain PEFT adapter, for serving stacks that load PEFT adapters.

::

    from smear_peft.export import export_adapter

    export_adapter(model, "out/expert3", expert=3)                 # one expert in every block
    export_adapter(model, "out/rte", tag="rte")                     # tag routing: that tag's expert (Tag+ per side)
    export_adapter(model, "out/mean", probs=recorder, tag="rte")    # what the routing did for rte's examples, on average
    # later, anywhere, with no smear_peft import:
    PeftModel.from_pretrained(base_model, "out/expert3")           # a vanilla LoraConfig / IA3Config adapter

What each routing exports, per block with LoRA experts ``A_n [in, r]``, ``B_n [r, out]`` and weights ``p``:

* ``mixture="parameters"`` (SMEAR's merge): ``A = Σ p_n A_n``, ``B = Σ p_n B_n``, a rank-r LoRA that is *exactly* what
  a SMEAR block computes for an input routed with ``p``;
* ``mixture="outputs"`` (ensemble, top-k): ``Σ p_n s x A_n B_n`` written exactly as one LoRA whose rank is r times the
  number of experts with a nonzero weight (``A = [p_i A_i | ...]``, ``B = [B_i; ...]`` over those experts; blocks
  with fewer are padded with zeros to one rank);
* (IA)³: ``l = 1 + Σ p_n (l_n - 1)`` (equal to ``Σ p_n l_n`` for a distribution).

A `RoutingRecorder` (or its `RoutingMeans`) gives, per block, the mean of what the routing *did* with its experts
(`RoutingRecorder.weights`) and the mixture that says how: SMEAR's merge weights (parameters), the ensemble's
probabilities, top-k's renormalised weights at its k experts (k=1: ``p_argmax`` at the argmax, which scales that
expert's output), or the one-hot of the expert a discrete method used (ST-Gumbel, REINFORCE, tag, hash). For one
recorded example (or examples that all routed alike) the export reproduces that routing exactly; over many it is
their mean. The recording must be of the exported adapter, and of whole examples: a ``causal_routing="segment"``
recording has one routing per segment and needs ``average_segments=True`` to export their mean.

``expert=i`` and ``tag=...`` are one-hot ``p``, so both mixtures give that expert itself (top-k's *unscaled* expert).
Monolithic adapters export their single expert with no routing argument.
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
    average_segments: bool = False,
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
            `RoutingRecorder` reports them; ``"<block>@<adapter>"`` keys are taken for that adapter), or a
            `RoutingMeans` / `RoutingRecorder` of this adapter: the mean, per block, of what the routing did with its
            experts (`RoutingRecorder.weights`: SMEAR's merge weights, top-k's output weights, a discrete method's
            chosen expert), for ``tag`` or the only row. For one recorded example this is exactly its routing.
        mixture: ``parameters`` (merge the experts, SMEAR) or ``outputs`` (mix their outputs, ensemble); LoRA only.
            Default: the recorded routing's for a `RoutingRecorder` / `RoutingMeans` (naming another is an error
            unless both are equal), else the routing method's (`RoutingMethod.export_mixture`).
        adapter_name: The SMEAR adapter to export (default: the active one).
        average_segments: With ``causal_routing="segment"`` a recording holds one routing per segment, which no
            fixed adapter reproduces; ``True`` exports their mean anyway (an approximation, as a task's mean is).

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
    if mixture not in (None, "parameters", "outputs"):
        raise ValueError(f"mixture must be 'parameters' or 'outputs', got {mixture!r}.")
    layers = [m for m in smear.model.modules() if isinstance(m, SmearLayer) and adapter in m.smear_experts]
    if not layers:
        raise ValueError(f"Adapter {adapter!r} has no routing blocks to export.")
    routing = layers[0].smear_routing[adapter]
    weights_for, mixture = _routing_weights(config, routing, adapter, expert, tag, probs, mixture, average_segments)

    state: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    targets, feedforward, conv1d, expert_rank, scaling = [], [], False, None, None
    for layer in layers:
        experts = layer.smear_experts[adapter]
        name = layer.block_name
        targets.append(name)
        conv1d = conv1d or layer.linear_shape.fan_in_fan_out
        weights = weights_for(layer).to(device=_device(experts), dtype=experts.dtype)
        with torch.no_grad():
            if isinstance(experts, LoraExperts):
                factors[name] = _lora_factors(experts, weights, mixture)
                expert_rank, scaling = experts.lora_A.shape[-1], experts.scaling
            else:
                vector = 1.0 + weights @ (experts.ia3_l - 1.0)
                if experts.feedforward:
                    feedforward.append(name)
                    state[f"base_model.model.{name}.ia3_l"] = vector[None, :].contiguous()
                else:
                    state[f"base_model.model.{name}.ia3_l"] = vector[:, None].contiguous()
    # One rank for all blocks (a LoraConfig has one r): pad each block's factors with zero columns / rows, which add 0.
    rank = max((a.shape[1] for a, _ in factors.values()), default=None)
    for name, (a, b) in factors.items():
        pad = rank - a.shape[1]
        if pad:
            a = torch.cat([a, a.new_zeros(a.shape[0], pad)], dim=1)
            b = torch.cat([b, b.new_zeros(pad, b.shape[1])], dim=0)
        state[f"base_model.model.{name}.lora_A.weight"] = a.T.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous()
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
                   "probs": _describe(probs), "average_segments": average_segments}, handle, indent=2)
    return peft_config


#: Names by expert type, for readability at call sites.
export_lora = export_adapter
export_ia3 = export_adapter


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _lora_factors(experts: LoraExperts, weights: torch.Tensor, mixture: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [in, R]``, ``B [R, out]`` of the exported LoRA (R = r for merged parameters; for mixed outputs r times the
    number of experts with a nonzero weight, which add nothing otherwise: top-k's k, one for a one-hot)."""
    num, in_features, rank = experts.lora_A.shape
    if mixture == "parameters" or num == 1:
        a = (weights @ experts.lora_A.flatten(1)).view(in_features, rank)
        b = (weights @ experts.lora_B.flatten(1)).view(rank, -1)
        return a, b
    used = torch.nonzero(weights).reshape(-1)
    if used.numel() == 0:
        used = torch.zeros(1, dtype=torch.long, device=weights.device)  # all zero: one (zero-weighted) expert, rank r
    a = (experts.lora_A[used] * weights[used, None, None]).permute(1, 0, 2).reshape(in_features, used.numel() * rank)
    b = experts.lora_B[used].reshape(used.numel() * rank, -1)
    return a, b


def _routing_weights(config, routing, adapter, expert, tag, probs, mixture, average_segments):
    """``(layer -> [N] weights, mixture)`` of the requested fixed routing."""
    num = routing.num_expert_slots()
    if num == 1:
        if expert not in (None, 0) or probs is not None or tag is not None:
            raise ValueError("This adapter has one expert: export it with no expert / tag / probs argument.")
        return (lambda layer: torch.ones(1)), mixture or "parameters"
    given = sum(x is not None for x in (expert, probs)) + (tag is not None and probs is None)
    if given != 1:
        raise ValueError(
            "Say which fixed routing to export: exactly one of expert=i, tag=t (tag routing) or probs=... (with "
            "tag=t to pick a RoutingMeans / RoutingRecorder row)."
        )
    default_mixture = mixture or routing.export_mixture()
    if expert is not None:
        if not 0 <= int(expert) < num:
            raise ValueError(f"expert must be in [0, {num}), got {expert}.")
        return (lambda layer: _one_hot(int(expert), num)), default_mixture
    if probs is None:  # a tag's expert
        if not routing.needs_tags:
            raise ValueError(
                f"tag= alone exports tag routing's expert, but this adapter uses routing={config.routing!r}; pass "
                "probs=RoutingRecorder/RoutingMeans with tag= to export the mean routing of a tag's examples."
            )
        index = config.tag_index(tag)
        return (lambda layer: _one_hot(config.tag_expert_table(layer.side)[index], num)), default_mixture
    if isinstance(probs, RoutingRecorder):
        recorded = probs.adapters
        if adapter not in recorded:
            raise ValueError(
                f"The RoutingRecorder recorded adapter(s) {recorded}, not {adapter!r}, which is being exported: record "
                f"it (RoutingRecorder(model, adapter={adapter!r}) with it active) or export one of {recorded} "
                "(adapter_name=...)."
            )
        probs = probs.mean_probs_per_tag([b for b, r in probs.records.items() if r.adapter == adapter])
    if isinstance(probs, RoutingMeans):
        return _recorded_weights(probs, adapter, tag, num, mixture, average_segments)
    if isinstance(probs, Mapping):
        table = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in probs.items()}
        return (lambda layer: _check_probs(_lookup(table, layer, adapter), num, layer.block_name)), default_mixture
    vector = torch.as_tensor(probs, dtype=torch.float32)
    return (lambda layer: _check_probs(vector, num, layer.block_name)), default_mixture


def _recorded_weights(means: RoutingMeans, adapter, tag, num, mixture, average_segments):
    """Weights and mixture of what a recorded routing did (the means of `RoutingRecorder.weights`)."""
    if means.weights is None or not means.adapters:
        raise ValueError(
            "These RoutingMeans carry no record of what the routing did with its experts (built by hand?): pass "
            "RoutingRecorder.mean_probs_per_tag() or the recorder itself, or a {block: weights} mapping with mixture=."
        )
    rows = [i for i, name in enumerate(means.adapters) if name == adapter]
    if not rows:
        recorded = list(dict.fromkeys(means.adapters))
        raise ValueError(
            f"The routing means are of adapter(s) {recorded}, not {adapter!r}, which is being exported: record it "
            f"(RoutingRecorder(model, adapter={adapter!r})) or export one of {recorded} (adapter_name=...)."
        )
    if any(means.segmented[i] for i in rows) and not average_segments:
        raise ValueError(
            "The recording is of causal_routing='segment': every segment of an example has its own routing (segment 0 "
            "on an all-zero input), and no fixed adapter reproduces that for an input longer than one segment. Pass "
            "average_segments=True to export the mean over the recorded segments (an approximation), or a "
            "{block: weights} mapping of one segment's routing (RoutingRecorder.weights(block)[row]) with mixture="
            f"{means.mixtures[rows[0]]!r}."
        )
    row = _means_row(means, tag)
    table = {means.modules[i]: means.weights[i, row] for i in rows}
    recorded = {means.mixtures[i] for i in rows} - {None}
    if len(recorded) > 1:  # pragma: no cover - one routing method per adapter
        raise ValueError(f"The recording mixes {sorted(recorded)}: record one adapter's routing.")
    kind = recorded.pop() if recorded else "parameters"
    if mixture is not None and mixture != kind and not all(_is_unit_one_hot(means.weights[i, row]) for i in rows):
        raise ValueError(
            f"This routing combines its experts' {kind} (what the recording holds), so mixture={mixture!r} would "
            f"export something the model never computed. Leave mixture unset (or {kind!r}); to export other weights, "
            "pass them as a tensor or {block: weights} mapping with mixture=."
        )

    def weights_for(layer):
        if layer.block_name not in table:
            raise ValueError(
                f"The recording has no routing for block {layer.block_name!r} of adapter {adapter!r}: run inputs "
                "through every block while recording."
            )
        vector = table[layer.block_name]
        if not torch.isfinite(vector).all():
            raise ValueError(
                f"Block {layer.block_name!r} recorded no example of tag {means.tag_labels[row]!r}: record some, or "
                "pick another tag."
            )
        return _check_probs(vector, num, layer.block_name)

    return weights_for, mixture or kind


def _is_unit_one_hot(vector: torch.Tensor) -> bool:
    """One expert at weight 1: merging parameters and mixing outputs are then the same."""
    return bool(((vector == 0) | (vector == 1)).all()) and float(vector.sum()) == 1.0


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


def _lookup(table: Mapping, layer: SmearLayer, adapter: str) -> torch.Tensor:
    """The weights of ``layer`` for ``adapter``: key ``"<block>@<adapter>"``, else ``"<block>"`` (a RoutingRecorder's
    name for the ``default`` adapter's blocks, or a plain per-block mapping). A mapping with ``@`` keys holds several
    adapters' routings, so there ``"<block>"`` is ``default``'s and only serves ``default``."""
    name = layer.block_name
    own = f"{name}@{adapter}"
    if own in table:
        return table[own]
    several = any("@" in str(key) for key in table)
    if name in table and (adapter == "default" or not several):
        return table[name]
    raise ValueError(
        f"probs has no routing for block {name!r} of adapter {adapter!r} (looked for {own!r}"
        + ("" if several and adapter != "default" else f" and {name!r}") + f"; it has {list(table)[:3]}...)."
    )


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
