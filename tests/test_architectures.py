"""Architecture presets on tiny models built from configs: T5 / BART / ViT families, ResNet, and any model through
``target_modules``; backbone BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from smear_peft import (
    ArchitecturePreset,
    SmearConfig,
    SmearLayer,
    architectures,
    register_preset,
)
from smear_peft.batch_norm import BatchNormStatisticsWrapper

SEQ2SEQ = {
    "t5": {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "dropout_rate": 0.0},
    "bart": {"d_model": 16, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                 "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 32, "dropout": 0.0},
}
SEQ2SEQ |= {"mt5": SEQ2SEQ["t5"], "umt5": SEQ2SEQ["t5"], "longt5": SEQ2SEQ["t5"]}
SEQ2SEQ |= {t: SEQ2SEQ["bart"] for t in ("mbart", "marian", "pegasus", "plbart", "blenderbot", "blenderbot-small", "m2m_100", "mvp")}
#: Seq2seq model types that also get the training and save / load tests (all get block count, invariance, generation).
MAIN_SEQ2SEQ = ["t5", "mt5", "bart", "mbart", "marian", "pegasus"]
TOKENS = {"vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "decoder_start_token_id": 2}
VIT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "image_size": 8, "patch_size": 4,
           "num_labels": 3}
VISION = ["vit", "deit", "resnet"]


def build_seq2seq(model_type: str, seed: int = 0) -> nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **TOKENS, **SEQ2SEQ[model_type])
    torch.manual_seed(seed)
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def build_vision(model_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if model_type == "resnet":  # ResNet-18's layout (2 basic layers per stage) at small widths
        config = transformers.ResNetConfig(layer_type="basic", depths=[2, 2], hidden_sizes=[8, 16], embedding_size=8,
                                           num_labels=3)
        return transformers.ResNetForImageClassification(config).eval()
    model_class = {
        "vit": transformers.ViTForImageClassification,
        "deit": transformers.DeiTForImageClassification,
        "vit_msn": transformers.ViTMSNForImageClassification,
        "ijepa": transformers.IJepaForImageClassification,
    }[model_type]
    return model_class(model_class.config_class(**VIT)).eval()


def build(model_type: str, seed: int = 0) -> nn.Module:
    return build_seq2seq(model_type, seed) if model_type in SEQ2SEQ else build_vision(model_type, seed)


def smear(model_type: str, seed: int = 0, **config) -> PeftModel:
    values = {"num_experts": 3, "reduction_factor": 4}
    if model_type not in SEQ2SEQ:
        values["modules_to_save"] = ["classifier"]  # a new classification head, trained in full
    values.update(config)
    return get_peft_model(build(model_type, seed), SmearConfig(**values))


def seq2seq_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three right-padded examples of lengths 5, 7 and 3, with decoder inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    attention_mask[2, 3:] = 0
    decoder_input_ids = torch.randint(3, 64, (3, 4), generator=generator)
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids}


def batch_for(model_type: str, seed: int = 1) -> dict[str, torch.Tensor]:
    if model_type in SEQ2SEQ:
        return seq2seq_batch(seed)
    size = 16 if model_type == "resnet" else 8
    return {"pixel_values": torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))}


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return model(**batch, **kwargs).logits.float().pow(2).mean()


def randomise_trainable(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor (adapters, layer norms, heads) away from its init so tests can tell models apart."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)


def blocks(model: PeftModel) -> list[SmearLayer]:
    return list(model.base_model.smear_layers())


# -- presets: insertion points -----------------------------------------------------------------------------------------

BLOCKS_PER_MODEL = {t: 10 for t in SEQ2SEQ} | {"vit": 4, "deit": 4, "vit_msn": 4, "ijepa": 4, "resnet": 4}


@pytest.mark.parametrize("model_type", sorted(BLOCKS_PER_MODEL))
def test_preset_inserts_the_documented_blocks_and_trains_only_adapters_norms_and_head(model_type):
    model = smear(model_type)
    layers = blocks(model)
    assert len(layers) == BLOCKS_PER_MODEL[model_type]
    if model_type in SEQ2SEQ:  # 2 blocks per encoder layer, 3 per decoder layer
        assert [layer.side for layer in layers].count("encoder") == 4
    preset = architectures.find_preset(model_type)
    norm_names = preset.layer_norms + ("classifier",)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert ".smear_" in name or any(f"{n}.modules_to_save" in name for n in norm_names), name


def test_bart_blocks_sit_on_attention_outputs_and_fc2_before_each_residual_add():
    model = smear("bart")
    names = [layer.block_name for layer in blocks(model)]
    assert names[:3] == ["model.encoder.layers.0.self_attn", "model.encoder.layers.0.fc2", "model.encoder.layers.1.self_attn"]
    assert names[4:7] == ["model.decoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn", "model.decoder.layers.0.fc2"]
    # Post-LN layer: LN(h + block(attention(h))), then LN(h' + block(fc2(act(fc1(h'))))); blocks change each branch.
    layer = model.base_model.model.model.encoder.layers[0]
    hidden = torch.randn(2, 5, 16)
    randomise_trainable(model)
    with torch.no_grad():
        attention = layer.self_attn(hidden)[0]
        assert not torch.allclose(attention, layer.self_attn.base_layer(hidden)[0])
        after_attention = layer.self_attn_layer_norm(hidden + attention)
        ffn = layer.fc2(layer.activation_fn(layer.fc1(after_attention)))
        assert not torch.allclose(ffn, layer.fc2.base_layer(layer.activation_fn(layer.fc1(after_attention))))
        expected = layer.final_layer_norm(after_attention + ffn)
        torch.testing.assert_close(layer(hidden, attention_mask=None), expected)


def test_resnet18_gets_eight_blocks_of_the_authors_shape_before_each_final_relu():
    config = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
    model = get_peft_model(transformers.ResNetForImageClassification(config), SmearConfig(num_experts=6))
    layers = blocks(model)
    assert [layer.block_name.split("resnet.encoder.")[1] for layer in layers[:2]] == [
        "stages.0.layers.0.activation", "stages.0.layers.1.activation"]
    assert [layer.hidden_size for layer in layers] == [64, 64, 128, 128, 256, 256, 512, 512]
    for layer in layers:  # input BatchNorm, C -> 32 -> C experts, no post-LN, block on the ReLU's input
        assert layer.position == "input" and layer.channel_dim == 1
        assert layer.smear_experts["default"].down_weight.shape == (6, layer.hidden_size, 32)
        assert isinstance(layer.smear_input_norm["default"], nn.BatchNorm1d) and "default" not in layer.smear_post_norm
    assert model.peft_config["default"].bottleneck_size == 32  # saved with the adapter


def test_resnet_block_is_the_authors_conv_block():
    """relu(x + W_up(swish(W_down(BN(x)) + b))) with x the residual sum, routed on the spatial mean of BN(x)."""
    model = smear("resnet")
    randomise_trainable(model)
    model.eval()
    basic = model.base_model.model.resnet.encoder.stages[1].layers[0]
    block = basic.activation
    stage_input = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        residual_sum = basic.layer(stage_input) + basic.shortcut(stage_input)
        norm = block.smear_input_norm["default"]
        tokens = norm(residual_sum.flatten(2).transpose(1, 2).reshape(-1, 16)).view(2, 9, 16)
        probs = block.smear_router["default"](tokens.mean(1))[0].softmax(-1)
        experts = block.smear_experts["default"]
        down = torch.einsum("bn,ncr->bcr", probs, experts.down_weight)
        up = torch.einsum("bn,nrc->brc", probs, experts.up_weight)
        delta = torch.nn.functional.silu(tokens @ down + (probs @ experts.down_bias)[:, None]) @ up
        expected = torch.relu(residual_sum + delta.transpose(1, 2).reshape(2, 16, 3, 3))
        torch.testing.assert_close(basic(stage_input), expected)


@pytest.mark.parametrize(
    ("config", "expected"),
    [({}, 32), ({"bottleneck_size": 12}, 12), ({"reduction_factor": 8}, 2)],
    ids=["preset-default", "explicit-size", "explicit-reduction"],
)
def test_resnet_preset_bottleneck_never_overrides_the_user(config, expected):
    model = get_peft_model(build("resnet"), SmearConfig(num_experts=3, **config))
    assert {layer.smear_experts["default"].down_weight.shape[-1] for layer in blocks(model)[-2:]} == {expected}


def test_explicit_targets_on_a_preset_model_transform_those_modules_outputs():
    model = smear("resnet", target_modules=["resnet.encoder.stages.1"])
    (layer,) = blocks(model)
    assert (layer.position, layer.channel_dim, layer.hidden_size) == ("output", 1, 16)


def test_register_preset_adds_an_architecture(monkeypatch):
    monkeypatch.setattr(architectures, "PRESETS", list(architectures.PRESETS))
    register_preset(ArchitecturePreset(
        model_types=("gpt2",),
        targets={"self_attention": ("attn",), "feed_forward": ("mlp",)},
        layer_norms=("ln_1", "ln_2", "ln_f"),
    ))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    model = get_peft_model(
        transformers.GPT2LMHeadModel(config),
        SmearConfig(num_experts=2, reduction_factor=4, causal_routing="segment", segment_length=2),
    )
    assert [layer.block_name for layer in blocks(model)] == [
        "transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp"]
    assert model.peft_config["default"].modules_to_save == ["ln_1", "ln_2", "ln_f"]
    loss_of(model, {"input_ids": torch.randint(0, 64, (2, 5))}).backward()
    assert blocks(model)[0].smear_router["default"].weight.grad.abs().sum() > 0


def test_preset_rejects_sublayers_it_does_not_have():
    with pytest.raises(ValueError, match="selects no insertion point"):
        architectures.find_preset("vit").target_modules(["cross_attention"])


# -- every preset: training, save / load ----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", MAIN_SEQ2SEQ + VISION)
def test_gradients_reach_every_router_and_expert_and_nothing_frozen(model_type):
    model = smear(model_type)
    model.train()
    loss_of(model, batch_for(model_type)).backward()
    for layer in blocks(model):
        assert layer.smear_router["default"].weight.grad.abs().sum() > 0, layer.block_name
        for param in layer.smear_experts["default"].parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, layer.block_name
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


@pytest.mark.parametrize("model_type", MAIN_SEQ2SEQ + VISION)
def test_save_and_load_on_a_fresh_base_model_reproduce_outputs(model_type, tmp_path):
    model = smear(model_type)
    batch = batch_for(model_type)
    randomise_trainable(model)
    model.train()
    with torch.no_grad():
        model(**batch)  # a train-mode pass updates the BatchNorm statistics that must be saved (ResNet)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(model_type), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        assert not torch.allclose(build(model_type)(**batch).logits, expected)


# -- seq2seq presets: batch invariance and generation ------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(SEQ2SEQ))
def test_example_alone_equals_example_in_a_padded_batch(model_type):
    model = smear(model_type).eval()
    randomise_trainable(model)
    batch = seq2seq_batch()
    with torch.no_grad():
        together = model(**batch).logits
        for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone = model(input_ids=batch["input_ids"][i : i + 1, :length],
                          attention_mask=batch["attention_mask"][i : i + 1, :length],
                          decoder_input_ids=batch["decoder_input_ids"][i : i + 1]).logits
            torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-5)


def _pad(sequences: list[torch.Tensor], pad: int) -> torch.Tensor:
    width = max(s.shape[-1] for s in sequences)
    return torch.cat([nn.functional.pad(s, (0, width - s.shape[-1]), value=pad) for s in sequences])


@pytest.mark.parametrize("model_type", sorted(SEQ2SEQ))
def test_beam_search_with_return_sequences_and_tags_equals_per_example_generation(model_type):
    model = smear(model_type, routing="tag").eval()
    randomise_trainable(model)
    input_ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(3))
    tags = [2, 0, 1]
    options = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        batched = model.generate(input_ids=input_ids, routing_tags=tags, **options)
        single = [model.generate(input_ids=input_ids[i : i + 1], routing_tags=[tag], **options) for i, tag in enumerate(tags)]
        greedy = model.generate(input_ids=input_ids, routing_tags=tags, max_new_tokens=4, do_sample=False)
        single_greedy = [model.generate(input_ids=input_ids[i : i + 1], routing_tags=[t], max_new_tokens=4, do_sample=False)
                         for i, t in enumerate(tags)]
        logits = model(input_ids=input_ids, decoder_input_ids=input_ids[:, :3], routing_tags=tags).logits
        swapped = model(input_ids=input_ids, decoder_input_ids=input_ids[:, :3], routing_tags=[1, 2, 0]).logits
    pad = model.config.pad_token_id
    assert batched.shape[0] == 6 and torch.equal(batched, _pad(single, pad))
    assert torch.equal(greedy, _pad(single_greedy, pad)[:, : greedy.shape[1]])
    assert (logits - swapped).abs().amax(dim=(1, 2)).min() > 1e-3  # every example's tag changes its output


# -- gradient checkpointing and bf16 -------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["bart", "vit"])
def test_gradient_checkpointing_gives_the_same_gradients(model_type):
    def gradients(use_reentrant):
        base = build(model_type)
        if use_reentrant is not None:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model = get_peft_model(base, SmearConfig(num_experts=3, reduction_factor=4))
        randomise_trainable(model)
        model.train()
        loss_of(model, batch_for(model_type)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reference = gradients(None)
    for use_reentrant in (True, False):
        grads = gradients(use_reentrant)
        assert grads.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ["bart", "t5", "vit", "resnet"])
def test_bf16_base_model_runs_forward_backward_and_generate(model_type):
    model = get_peft_model(build(model_type).to(torch.bfloat16), SmearConfig(num_experts=3, reduction_factor=4))
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch_for(model_type).items()}
    model.train()
    logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    assert blocks(model)[0].smear_router["default"].weight.grad.abs().sum() > 0
    if model_type in SEQ2SEQ:
        generated = model.eval().generate(input_ids=batch["input_ids"], num_beams=2, max_new_tokens=3)
        assert generated.shape[0] == 3


# -- vision: tags with pixel values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", VISION)
def test_vision_routing_tags_are_per_example(model_type):
    model = smear(model_type, routing="tag").eval()
    randomise_trainable(model)
    pixels = batch_for(model_type)["pixel_values"]
    with torch.no_grad():
        together = model(pixel_values=pixels, routing_tags=[2, 0, 1]).logits
        alone = torch.cat([model(pixel_values=pixels[i : i + 1], routing_tags=[t]).logits for i, t in enumerate([2, 0, 1])])
        swapped = model(pixel_values=pixels, routing_tags=[0, 1, 2]).logits
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    assert (swapped - together).abs().amax(1).min() > 1e-4


# -- backbone BatchNorm statistics -----------------------------------------------------------------------------------

def _backbone_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of the base model's own BatchNorm layers (not of adapter copies or routing blocks)."""
    return {n.replace(".original_module", "").replace("base_model.model.", ""): b.clone() for n, b in model.named_buffers()
            if ("running" in n or "num_batches" in n) and "modules_to_save" not in n and "smear_" not in n}


def _train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, batch).backward()
    optimizer.step()
    model.eval()


def test_updated_batch_norm_statistics_are_saved_while_affine_parameters_stay_frozen(tmp_path):
    model = smear("resnet", batch_norm_statistics="update")
    base_statistics = _backbone_statistics(build("resnet"))
    wrappers = [m for m in model.modules() if isinstance(m, BatchNormStatisticsWrapper)]
    assert len(wrappers) == 1 + 2 * 4 + 1  # stem, 2 convs per basic layer, 1 projection shortcut
    assert not any("normalization" in n or "shortcut" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = batch_for("resnet")
    _train_step(model, batch)
    for wrapper in wrappers:  # the adapter's copy tracked the data; its affine stayed the base model's
        copy = wrapper.modules_to_save["default"]
        assert copy.num_batches_tracked == 1 and not torch.equal(copy.running_mean, wrapper.original_module.running_mean)
        assert torch.equal(copy.weight, wrapper.original_module.weight) and not list(copy.parameters())
    assert _backbone_statistics(model).keys() == base_statistics.keys()
    for name, value in _backbone_statistics(model).items():
        assert torch.equal(value, base_statistics[name]), name
    with torch.no_grad():
        expected = model(**batch).logits
        with model.disable_adapter():  # the base model itself never changed
            torch.testing.assert_close(model(**batch).logits, build("resnet")(**batch).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.resnet.embedder.embedder.normalization.running_mean" in saved
    loaded = PeftModel.from_pretrained(build("resnet"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    unloaded = loaded.unload()
    for name, value in _backbone_statistics(unloaded).items():
        assert torch.equal(value, base_statistics[name]), name


def test_frozen_batch_norm_statistics_never_change_while_the_blocks_norm_trains(tmp_path):
    model = smear("resnet", batch_norm_statistics="frozen")
    base_statistics = _backbone_statistics(build("resnet"))
    block_norm = blocks(model)[0].smear_input_norm["default"]
    batch = batch_for("resnet")
    _train_step(model, batch)
    assert model.training is False and block_norm.num_batches_tracked == 1
    model.train()
    assert all(m.training for m in model.modules())  # the model's mode is untouched; only the forward runs in eval
    model.eval()
    for name, value in _backbone_statistics(model).items():
        assert torch.equal(value, base_statistics[name]), name
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert not any("normalization" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(build("resnet"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    unloaded = model.unload().train()  # unloading removes the eval-mode hooks: the plain model's usual behaviour
    unloaded(**batch)
    assert unloaded.resnet.embedder.embedder.normalization.num_batches_tracked == 1


def test_adapters_with_different_batch_norm_policies_cannot_share_a_model():
    model = smear("resnet", batch_norm_statistics="update")
    with pytest.raises(ValueError, match="same batch_norm_statistics"):
        model.add_adapter("other", SmearConfig(num_experts=3, batch_norm_statistics="frozen", modules_to_save=["classifier"]))


# -- any model through target_modules --------------------------------------------------------------------------------

def tiny_sequential(seed: int = 0) -> nn.Sequential:
    """A conv net as one plain `nn.Sequential` (no config, no preset)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),  # [B, 8, 4, 4]
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4),  # [B, 16]
    ).eval()


def test_plain_sequential_with_target_modules_gets_blocks_on_feature_map_and_2d_outputs(tmp_path):
    config = SmearConfig(num_experts=3, bottleneck_size=4, target_modules=["3", "5"])
    model = get_peft_model(tiny_sequential(), config)
    conv_block, linear_block = blocks(model)
    assert (conv_block.hidden_size, conv_block.channel_dim, conv_block.position) == (8, 1, "output")
    assert (linear_block.hidden_size, linear_block.channel_dim, linear_block.position) == (16, -1, "output")
    randomise_trainable(model)
    pixels = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    model.train()
    model(pixels).pow(2).mean().backward()  # also updates the backbone BatchNorm's statistics, saved below
    for layer in (conv_block, linear_block):
        assert layer.smear_router["default"].weight.grad.abs().sum() > 0
        assert layer.smear_experts["default"].down_weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(pixels)
        # the conv block routes each example on its own spatial mean: batch invariant
        torch.testing.assert_close(torch.cat([model(pixels[i : i + 1]) for i in range(3)]), expected, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_sequential(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), expected)
        assert not torch.allclose(tiny_sequential()(pixels), expected)


def test_model_without_preset_or_targets_gets_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"no preset for model_type.*presets: .*resnet.*target_modules"):
        get_peft_model(tiny_sequential(), SmearConfig(num_experts=2))
