"""PEFT's API conventions for SMEAR adapters: empty (meta) creation, adapter dtype, device of targets without
parameters, unload."""

from __future__ import annotations

import torch
import transformers
from peft import PeftModel, get_peft_model, inject_adapter_in_model

from smear_peft import SmearConfig

from .conftest import tiny_t5


def smear_params(model):
    return {n: p for n, p in model.named_parameters() if "smear_" in n}


def t5_inputs():
    torch.manual_seed(0)
    return {"input_ids": torch.randint(2, 64, (2, 5)), "decoder_input_ids": torch.zeros(2, 2, dtype=torch.long)}


def test_low_cpu_mem_usage_creates_adapters_on_meta_and_loads_them_exactly(tmp_path):
    config = SmearConfig(num_experts=3, reduction_factor=4, init_weights=False)
    model = get_peft_model(tiny_t5(), config).eval()
    with torch.no_grad():
        reference = model(**t5_inputs()).logits
    model.save_pretrained(tmp_path)
    empty = get_peft_model(tiny_t5(), SmearConfig(num_experts=3, reduction_factor=4), low_cpu_mem_usage=True)
    assert {p.device.type for p in smear_params(empty).values()} == {"meta"}
    injected = inject_adapter_in_model(SmearConfig(num_experts=3, reduction_factor=4), tiny_t5(), low_cpu_mem_usage=True)
    assert {p.device.type for p in smear_params(injected).values()} == {"meta"}
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path, low_cpu_mem_usage=True).eval()
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**t5_inputs()).logits, reference)


def test_adapter_dtype_follows_peft_autocast_adapter_dtype():
    upcast = get_peft_model(tiny_t5().to(torch.bfloat16), SmearConfig(num_experts=3, reduction_factor=4))
    assert {p.dtype for p in smear_params(upcast).values()} == {torch.float32}
    kept = get_peft_model(
        tiny_t5().to(torch.bfloat16), SmearConfig(num_experts=3, reduction_factor=4), autocast_adapter_dtype=False
    )
    assert {p.dtype for p in smear_params(kept).values()} == {torch.bfloat16}
    with torch.no_grad():
        assert kept(**t5_inputs()).logits.dtype == torch.bfloat16


def resnet():
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return transformers.ResNetForImageClassification(config).eval()


def test_adapters_on_targets_without_parameters_follow_the_model():
    """ResNet blocks wrap the activation module (no parameters): they take the model's device and dtype."""
    model = get_peft_model(resnet().to(torch.bfloat16), SmearConfig(num_experts=2), autocast_adapter_dtype=False)
    layers = list(model.base_model.smear_layers())
    assert layers and all(next(layer.base_layer.parameters(), None) is None for layer in layers)
    dtypes = {t.dtype for layer in layers for t in (*layer.smear_experts.parameters(), *layer.smear_input_norm.buffers())
              if t.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).logits).all()


def test_unload_keeps_trained_modules_to_save_or_restores_the_untouched_base_model():
    original = {k: v.clone() for k, v in tiny_t5().state_dict().items()}

    def trained():
        model = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, reduction_factor=4))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(0.5)  # "training" changes adapters and the trained layer norms
        return model

    peft_convention = trained().unload()
    assert not any("smear" in n or "modules_to_save" in n for n in peft_convention.state_dict())
    changed = [k for k, v in peft_convention.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all("layer_norm" in k for k in changed)  # PEFT: the trained copies of modules_to_save
    untouched = trained().unload(restore_modules_to_save=True).state_dict()
    assert untouched.keys() == original.keys()
    assert all(torch.equal(untouched[k], original[k]) for k in original)


def test_mixed_adapter_batches_are_refused_not_ignored():
    import pytest

    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, reduction_factor=4)).eval()
    model.add_adapter("other", SmearConfig(num_experts=2, reduction_factor=4))
    with pytest.raises(ValueError, match="adapter_names"):
        model(**t5_inputs(), adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="adapter_names"):
        model.generate(input_ids=t5_inputs()["input_ids"], adapter_names=["default", "other"], max_new_tokens=2)
