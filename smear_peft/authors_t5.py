"""The authors' T5-v1.1 backbone on a transformers-5 T5, with hooks and module attributes only.

The SMEAR authors trained on their own fork of transformers 3.5's T5 (r-three/smear,
``hyperformer/hyperformer/third_party/models/modeling_t5_v1_1.py``). Two of its differences from a transformers-5
`T5ForConditionalGeneration` change every output:

1. **Decoder output scaling.** The fork always multiplies the decoder output by ``d_model ** -0.5`` before the LM
   head. transformers 5 does so only for tied embeddings (``config.scale_decoder_outputs``), which T5-v1.1 is not:
   its logits come out ``sqrt(d_model)`` (27.7 for the base model) times larger.
2. **A cross-attention relative position bias.** The fork builds decoder block 0's cross-attention with
   ``has_relative_attention_bias=True`` and ``is_bidirectional=True``, and passes the bias it computes to every
   decoder layer's cross-attention (query position = decoder position, key position = encoder position, T5's
   bidirectional buckets). transformers 5 has no such weight and ignores the checkpoint key
   ``decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`` on load.

`apply_authors_backbone` restores both on a loaded model:

* (1) sets ``config.scale_decoder_outputs = True``, transformers' own switch for this scaling;
* (2) adds ``relative_attention_bias`` (an ``nn.Embedding(num_buckets, num_heads)``) to decoder block 0's
  ``EncDecAttention``, so its state-dict key is the checkpoint's, and a forward pre-hook on that cross-attention
  layer that supplies the bias as ``position_bias``. T5's decoder stack then hands it on to the later layers, as it
  does for every layer's own position bias.

The weight comes from the checkpoint when its files hold the key (`checkpoint_tensor`). Otherwise it is initialised
as in the fork: ``nn.Embedding``'s default N(0, 1), because transformers 3.5's ``_init_weights`` only recognises its
own ``T5Attention`` class, not the fork's. In both cases it is **frozen**, as in the fork (``freezing_params``
freezes the whole backbone, then unfreezes the adapter controllers and the layer norms). A randomly initialised
weight is part of the model the adapter was trained on, so save it next to the adapter
(`save_authors_backbone`) and pass that folder back to `apply_authors_backbone` when reloading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

CROSS_ATTENTION_BIAS_KEY = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
WEIGHTS_NAME = "authors_backbone.safetensors"


def cross_attention_bias(
    embedding: nn.Embedding,
    query_length: int,
    key_length: int,
    query_offset: int = 0,
    max_distance: int = 128,
) -> torch.Tensor:
    """The fork's cross-attention position bias, shape (1, heads, query_length, key_length): bidirectional T5
    buckets of ``key_position - query_position``, with queries at positions ``query_offset, ...``."""
    from transformers.models.t5.modeling_t5 import T5Attention

    device = embedding.weight.device
    query = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + query_offset
    key = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    buckets = T5Attention._relative_position_bucket(
        key - query, bidirectional=True, num_buckets=embedding.num_embeddings, max_distance=max_distance
    )
    return embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    self_attention = getattr(cache, "self_attention_cache", cache)
    length = self_attention.get_seq_length(0)
    return int(length)


def _record_decoder_position(block, args, kwargs):
    """Before decoder block 0: the number of tokens already decoded (0 without a cache) is the first query's
    position. It is read before block 0's self-attention adds the current tokens to the cache."""
    block.layer[1]._authors_query_offset = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))


def _unwrapped(module: nn.Module) -> nn.Module:
    """The attention module itself, also when a PEFT tuner layer wraps it (``base_layer``)."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def _supply_cross_attention_bias(layer, args, kwargs):
    """Before decoder block 0's cross-attention: give it the fork's position bias (later layers receive it from
    T5's decoder stack)."""
    if kwargs.get("position_bias") is not None:
        return None
    hidden_states = args[0] if args else kwargs["hidden_states"]
    key_value_states = args[1] if len(args) > 1 else kwargs["key_value_states"]
    attention = _unwrapped(layer.EncDecAttention)
    bias = cross_attention_bias(
        attention.relative_attention_bias,
        hidden_states.shape[1],
        key_value_states.shape[1],
        query_offset=getattr(layer, "_authors_query_offset", 0),
        max_distance=attention.relative_attention_max_distance,
    ).to(hidden_states.dtype)
    return args, {**kwargs, "position_bias": bias}


def find_t5(model) -> nn.Module:
    """The `T5ForConditionalGeneration` inside ``model`` (itself, or wrapped by PEFT)."""
    for module in model.modules():
        if hasattr(module, "decoder") and hasattr(module, "lm_head") and hasattr(module.decoder, "block"):
            return module
    raise ValueError("apply_authors_backbone needs a T5ForConditionalGeneration")


def checkpoint_tensor(model_name_or_path: str, key: str = CROSS_ATTENTION_BIAS_KEY) -> Optional[torch.Tensor]:
    """``key`` from the weight files of a checkpoint (a folder or a Hub id already in the cache), or None when they
    don't hold it. Looks in safetensors files first, then in PyTorch ``.bin`` files (old uploads kept the key)."""
    from transformers.utils import cached_file

    def locate(name):
        try:
            return cached_file(model_name_or_path, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            return None

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        files = []
        index_path = locate(index)
        if index_path:
            shard = json.loads(Path(index_path).read_text())["weight_map"].get(key)
            files = [locate(shard)] if shard else []
        elif locate(single):
            files = [locate(single)]
        for path in filter(None, files):
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    if key in f.keys():
                        return f.get_tensor(key)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if key in state:
                    return state[key]
    return None


def apply_authors_backbone(
    model: nn.Module,
    model_name_or_path: Optional[str] = None,
    weights_dir: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
) -> str:
    """Turn a transformers-5 T5 into the authors' fork (module docstring). Idempotent.

    The cross-attention bias weight comes from ``weights_dir`` (a folder written by `save_authors_backbone`) when
    given, else from the checkpoint ``model_name_or_path`` when its files hold the key, else a N(0, 1) draw (from
    ``generator`` when given). Returns where it came from: ``"weights_dir"``, ``"checkpoint"`` or ``"initialised"``.
    """
    t5 = find_t5(model)
    config = t5.config
    if not hasattr(config, "scale_decoder_outputs"):
        raise ValueError("this transformers version has no config.scale_decoder_outputs; the scaling can't be set")
    config.scale_decoder_outputs = True

    layer = t5.decoder.block[0].layer[1]
    attention = _unwrapped(layer.EncDecAttention)
    weight, source = None, "initialised"
    if weights_dir is not None:
        from safetensors.torch import load_file

        weight, source = load_file(os.path.join(weights_dir, WEIGHTS_NAME))[CROSS_ATTENTION_BIAS_KEY], "weights_dir"
    elif model_name_or_path is not None:
        weight = checkpoint_tensor(model_name_or_path)
        source = "checkpoint" if weight is not None else source
    reference = attention.q.weight
    if not isinstance(getattr(attention, "relative_attention_bias", None), nn.Embedding):
        attention.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads, device=reference.device, dtype=reference.dtype
        )
        with torch.no_grad():
            attention.relative_attention_bias.weight.normal_(0.0, 1.0, generator=generator)  # nn.Embedding's init
    if weight is not None:
        with torch.no_grad():
            attention.relative_attention_bias.weight.copy_(weight)
    attention.relative_attention_bias.weight.requires_grad_(False)  # frozen, as the fork's backbone

    block = t5.decoder.block[0]
    if not getattr(layer, "_authors_bias_hooked", False):
        block.register_forward_pre_hook(_record_decoder_position, with_kwargs=True)
        layer.register_forward_pre_hook(_supply_cross_attention_bias, with_kwargs=True)
        layer._authors_bias_hooked = True
    return source


def authors_backbone_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen tensor the authors' backbone adds (decoder block 0's cross-attention position bias), by its key in
    ``authors_backbone.safetensors``: a copy on CPU. Under ZeRO-3 / FSDP take it before ``accelerator.prepare``: the
    weight is frozen, so it never changes, and afterwards a process holds only a shard of it."""
    attention = _unwrapped(find_t5(model).decoder.block[0].layer[1].EncDecAttention)
    return {CROSS_ATTENTION_BIAS_KEY: attention.relative_attention_bias.weight.detach().cpu().clone().contiguous()}


def save_authors_backbone(source, output_dir: str) -> str:
    """Save the cross-attention bias weight into ``output_dir/authors_backbone.safetensors`` (reload it with
    ``apply_authors_backbone(base, weights_dir=output_dir)``). ``source``: the model, or the tensors
    `authors_backbone_weights` took from it (before sharding). Raises on an empty tensor (a shard's)."""
    from safetensors.torch import save_file

    weights = source if isinstance(source, dict) else authors_backbone_weights(source)
    if any(tensor.numel() == 0 for tensor in weights.values()):
        raise RuntimeError(
            "The cross-attention bias is empty here: the model is sharded (ZeRO-3 / FSDP). Take the weights with "
            "authors_backbone_weights(model) before accelerator.prepare and save those."
        )
    path = os.path.join(output_dir, WEIGHTS_NAME)
    save_file(weights, path)
    return path
