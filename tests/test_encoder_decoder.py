"""Every encoder-decoder routes its decoder blocks on the encoder output, with exact gradients into the encoder.

Gradients are checked against central finite differences in float64 on T5, Whisper and VisionEncoderDecoder (ViT
encoder + GPT-2 decoder with cross-attention), with and without gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

from smear_peft import SmearConfig

from .conftest import tiny_t5


def tiny_whisper():
    config = transformers.WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[], dropout=0.0,
    )
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


def tiny_vision_encoder_decoder():
    encoder = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4,
        num_channels=3,
    )
    decoder = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16, add_cross_attention=True, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    return transformers.VisionEncoderDecoderModel(config=config).eval()


CASES = {
    "t5": (lambda: tiny_t5(), None),
    "whisper": (tiny_whisper, None),
    "vision_encoder_decoder": (tiny_vision_encoder_decoder, ["attention", "mlp", "attn", "crossattention"]),
}


def inputs_for(name: str) -> dict:
    torch.manual_seed(4)
    labels = torch.randint(3, 64, (2, 3))
    if name == "t5":
        ids = torch.randint(2, 64, (2, 5))
        mask = torch.ones_like(ids)
        mask[1, 3:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if name == "whisper":
        return {"input_features": torch.randn(2, 8, 16, dtype=torch.float64), "labels": labels}
    return {"pixel_values": torch.randn(2, 3, 8, 8, dtype=torch.float64), "labels": labels}


def smear_model(name: str, dtype=torch.float64):
    build, targets = CASES[name]
    config = SmearConfig(num_experts=3, reduction_factor=4, target_modules=targets, train_layer_norms=False)
    model = get_peft_model(build(), config).to(dtype)
    torch.manual_seed(5)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "smear_" in param_name:
                param.normal_(0.0, 0.5)
    return model


def blocks(model):
    return list(model.base_model.smear_layers())


@pytest.mark.parametrize("name", list(CASES))
def test_decoder_blocks_route_on_the_encoder_output(name):
    model = smear_model(name)
    sides = {layer.block_name: (layer.side, layer.role) for layer in blocks(model)}
    assert {role for side, role in sides.values() if side == "decoder"} == {"encoder_output"}
    assert {role for side, role in sides.values() if side == "encoder"} == {"input"}


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", list(CASES))
def test_router_and_encoder_expert_gradients_equal_finite_differences(name, checkpointing, monkeypatch):
    if name == "t5":  # T5's RMS norm computes its variance in float32; finite differences need float64 throughout
        from transformers.models.t5 import modeling_t5

        def exact_norm(self, hidden):
            return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

        monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", exact_norm)
    model = smear_model(name)
    model.train()
    if checkpointing is not None:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    batch = inputs_for(name)
    if checkpointing and name != "t5":
        # Reentrant checkpointing needs a layer input that requires grad (transformers enables that for token inputs
        # only); audio / pixel inputs need it set, with or without SMEAR.
        next(v for k, v in batch.items() if k != "labels").requires_grad_(True)
    decoder_router = next(l for l in blocks(model) if l.side == "decoder").smear_router["default"].weight
    encoder_expert = next(l for l in blocks(model) if l.side == "encoder").smear_experts["default"].down_weight
    model(**batch).loss.backward()
    for param in (decoder_router, encoder_expert):
        analytic = param.grad.reshape(-1)[:4].clone()
        numeric = []
        for index in range(4):
            flat = param.data.view(-1)
            original = flat[index].item()
            values = []
            for sign in (1, -1):
                flat[index] = original + sign * 1e-6
                with torch.no_grad():
                    values.append(model(**batch).loss.item())
            flat[index] = original
            numeric.append((values[0] - values[1]) / 2e-6)
        torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=analytic.dtype), rtol=1e-4, atol=1e-7)


def test_whisper_forward_and_generate_with_defaults():
    model = get_peft_model(tiny_whisper(), SmearConfig(num_experts=3))
    assert [l.block_name.split(".")[-1] for l in blocks(model)][:2] == ["self_attn", "fc2"]
    features = torch.randn(2, 8, 16)
    with torch.no_grad():
        out = model(input_features=features, decoder_input_ids=torch.ones(2, 1, dtype=torch.long))
        generated = model.generate(input_features=features, max_new_tokens=3)
    assert out.logits.shape == (2, 1, 64) and torch.isfinite(out.logits).all()
    assert generated.shape[0] == 2


def test_whisper_ignores_the_attention_mask_as_its_encoder_does():
    """Whisper's feature extractor can return an attention mask over input frames, which the model ignores (its encoder
    attends to every position): routing does the same instead of failing on the length mismatch."""
    model = get_peft_model(tiny_whisper(), SmearConfig(num_experts=3, init_weights=False)).eval()
    features = torch.randn(2, 8, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    decoder_input_ids = torch.tensor([[1, 5, 7], [1, 6, 9]])
    with torch.no_grad():
        without = model(input_features=features, decoder_input_ids=decoder_input_ids).logits
        masked = model(input_features=features, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
        with model.disable_adapter():
            base = model(input_features=features, decoder_input_ids=decoder_input_ids).logits
            base_masked = model(input_features=features, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
        generated = model.generate(input_features=features, max_new_tokens=3)
        generated_masked = model.generate(input_features=features, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(base, base_masked)  # the model ignores the mask ...
    assert torch.equal(masked, without) and not torch.allclose(without, base)  # ... and so does routing
    assert torch.equal(generated, generated_masked)


def test_vision_encoder_decoder_generate_equals_step_by_step_decoding():
    model = smear_model("vision_encoder_decoder", dtype=torch.float32).eval()
    pixels = inputs_for("vision_encoder_decoder")["pixel_values"]
    with torch.no_grad():
        generated = model.generate(pixel_values=pixels, max_new_tokens=4, do_sample=False)
        decoded = generated[:, :1]
        for _ in range(4):
            logits = model(pixel_values=pixels, decoder_input_ids=decoded).logits
            decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, decoded[:, : generated.shape[1]])
