"""PEFT's API conventions for SMEAR adapters: empty (meta) creation, adapter dtype, device of targets without
parameters, unload, mixed adapter batches."""

from __future__ import annotations

import pytest
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


def two_adapters(base, **config):
    """``base`` with adapters "default" and "other" (random experts; "other" also moves its trained copies)."""
    model = get_peft_model(base, SmearConfig(num_experts=2, init_weights=False, **config))
    model.add_adapter("other", SmearConfig(num_experts=3, init_weights=False, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".other" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def run_as(model, name, fn):
    """``fn()`` with adapter ``name`` active ("__base__": adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


NAMES = ["other", "__base__", "default", "other"]


def test_mixed_adapter_batch_forward_takes_each_example_from_its_adapter():
    """Each example equals its row of the whole batch run with its adapter (bitwise) and the example run alone; the
    trained layer norms (modules_to_save) are mixed too."""
    model = two_adapters(tiny_t5(), reduction_factor=4)
    torch.manual_seed(3)
    ids = torch.randint(2, 64, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.zeros(4, 3, dtype=torch.long)}
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            whole = run_as(model, name, lambda: model(**inputs).logits)
            assert torch.equal(mixed[i], whole[i]), name
            alone = run_as(model, name, lambda: model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits)
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        # the adapters really differ, so the rows above prove the selection
        model.set_adapter("default")
        assert (model(**inputs).logits[0] - mixed[0]).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["masked_mean", "mean"])
def test_a_mixed_batch_prepares_what_each_named_adapter_needs_whichever_is_active(pooling):
    """Content keys (hash routing) and pooling modes are prepared for the adapters a mixed batch names, not only for
    the active one."""
    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, reduction_factor=4, init_weights=False))
    model.add_adapter("hashed", SmearConfig(num_experts=3, reduction_factor=4, routing="hash", init_weights=False,
                                            pooling=pooling))
    model.add_adapter("pooled", SmearConfig(num_experts=3, reduction_factor=4, init_weights=False, pooling=pooling))
    model.eval()
    torch.manual_seed(3)
    ids = torch.randint(2, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.zeros(3, 3, dtype=torch.long)}
    names = ["hashed", "default", "pooled"]
    with torch.no_grad():
        model.set_adapter("default")
        mixed = model(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            assert torch.equal(mixed[i], run_as(model, name, lambda: model(**inputs).logits)[i]), name


def test_mixed_adapter_batch_generate_with_beams_and_a_causal_lm_with_lora_experts():
    from .test_causal import tiny_causal

    t5 = two_adapters(tiny_t5(), reduction_factor=4)
    llama = two_adapters(tiny_causal("llama"), expert_type="lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(4)
    ids = torch.randint(2, 64, (4, 5))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # left padding (causal LM)
    for model, options in ((t5, {"num_beams": 2}), (llama, {"use_cache": True}), (llama, {"use_cache": False})):
        with torch.no_grad():
            mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=4, do_sample=False, **options)
            for i, name in enumerate(NAMES):
                whole = run_as(model, name, lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **options))
                assert torch.equal(mixed[i], whole[i]), (name, options)


def test_mixed_adapter_batches_refuse_what_they_cannot_do_exactly():
    model = two_adapters(tiny_t5(), reduction_factor=4)
    inputs = t5_inputs()
    for names, message in (
        (["default", "nope"], "unknown adapters"),
        ("default", "list of adapter names"),
        (["default"], "exactly one per example"),
    ):
        with pytest.raises(ValueError, match=message):
            model(**inputs, adapter_names=names)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        model(**inputs, adapter_names=["default", "other"])
    assert model.base_model.frames.current() is None


def test_mixed_adapter_batches_belong_to_their_call_across_threads():
    import threading

    model = two_adapters(tiny_t5(), reduction_factor=4)
    inputs = {**t5_inputs(), "decoder_input_ids": torch.zeros(2, 2, dtype=torch.long)}
    calls = [{"adapter_names": ["other", "__base__"]}, {}]  # a mixed batch, and a plain call of the active adapter
    with torch.no_grad():
        expected = [model(**inputs, **extra).logits for extra in calls]
    failures = []

    def worker(index: int):
        with torch.no_grad():
            for call in range(20):
                if not torch.equal(model(**inputs, **calls[index]).logits, expected[index]):
                    failures.append((index, call))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and not torch.equal(expected[0], expected[1])
