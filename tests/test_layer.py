"""SmearLayer on a tiny T5: placement, shapes, and the block's arithmetic against an independent computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model

from smear_peft import SmearConfig, SmearLayer

from .conftest import tiny_t5


def smear_t5(**config):
    values = dict(num_experts=4, reduction_factor=4)
    values.update(config)
    return get_peft_model(tiny_t5(), SmearConfig(**values)).eval()


def blocks(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SmearLayer)]


def test_blocks_wrap_t5_attention_and_ffn_before_dropout_and_residual():
    model = smear_t5()
    names = [n.removeprefix("base_model.model.") for n, _ in blocks(model)]
    assert names == [
        "encoder.block.0.layer.0.SelfAttention",
        "encoder.block.0.layer.1.DenseReluDense",
        "encoder.block.1.layer.0.SelfAttention",
        "encoder.block.1.layer.1.DenseReluDense",
        "decoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.1.EncDecAttention",
        "decoder.block.0.layer.2.DenseReluDense",
        "decoder.block.1.layer.0.SelfAttention",
        "decoder.block.1.layer.1.EncDecAttention",
        "decoder.block.1.layer.2.DenseReluDense",
    ]
    sides = [m.side for _, m in blocks(model)]
    assert sides == ["encoder"] * 4 + ["decoder"] * 6
    assert [m.block_index for _, m in blocks(model)] == list(range(10))


def test_expert_and_router_shapes_follow_the_config():
    layer = blocks(smear_t5(num_experts=4, reduction_factor=4))[0][1]
    experts = layer.smear_experts["default"]
    assert experts.down_weight.shape == (4, 32, 8)
    assert experts.down_bias.shape == (4, 8)
    assert experts.up_weight.shape == (4, 8, 32)
    assert layer.smear_router["default"].weight.shape == (32, 4)
    assert layer.smear_post_norm["default"].normalized_shape == (32,)
    assert dict(layer.smear_input_norm) == {}
    explicit = blocks(smear_t5(num_experts=3, bottleneck_size=5))[0][1].smear_experts["default"]
    assert explicit.down_weight.shape == (3, 32, 5)


def test_init_matches_the_authors():
    torch.manual_seed(0)
    config = SmearConfig(num_experts=8)
    model = get_peft_model(tiny_t5(d_model=256, d_ff=64, d_kv=8), config)
    layer = blocks(model)[0][1]
    experts, router = layer.smear_experts["default"], layer.smear_router["default"]
    assert experts.down_weight.shape == (8, 256, 8)  # 256 // 32
    assert abs(experts.down_weight.std().item() - 0.01) < 1e-3
    assert abs(experts.up_weight.std().item() - 0.01) < 1e-3
    assert torch.all(experts.down_bias == 0)
    assert torch.all(router.weight_norm_weight == 0.01) and torch.all(router.weight_norm_bias == 0)
    assert torch.all(router.input_norm_weight == 1)
    # gain 0.01 on standardised expert vectors: routing starts close to uniform
    probs = F.softmax(router(torch.randn(5, 256))[0], dim=-1)
    assert torch.allclose(probs, torch.full_like(probs, 1 / 8), atol=0.05)


def capture(layer):
    """Record the inputs and output of one SmearLayer call."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output)

    return seen, layer.register_forward_hook(hook, with_kwargs=True)


def reference_block(layer, y, routing_input, adapter="default"):
    """The SMEAR block computed from the layer's own parameters: y + LN(swish(y Wd(p) + bd(p)) Wu(p))."""
    router = layer.smear_router[adapter]
    experts = layer.smear_experts[adapter]
    norm = layer.smear_post_norm[adapter]
    v = F.layer_norm(routing_input, (routing_input.shape[-1],), router.input_norm_weight, router.input_norm_bias)
    w = F.layer_norm(router.weight.T, (router.weight.shape[0],), router.weight_norm_weight, router.weight_norm_bias)
    probs = F.softmax(v @ w.T, dim=-1)
    outputs = []
    for b in range(y.shape[0]):
        down = sum(probs[b, n] * experts.down_weight[n] for n in range(probs.shape[1]))
        bias = sum(probs[b, n] * experts.down_bias[n] for n in range(probs.shape[1]))
        up = sum(probs[b, n] * experts.up_weight[n] for n in range(probs.shape[1]))
        outputs.append(y[b] + F.layer_norm(F.silu(y[b] @ down + bias) @ up, (y.shape[-1],), norm.weight, norm.bias))
    return torch.stack(outputs), probs


def randomise_routers(model, scale=3.0):
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in blocks(model):
            router = layer.smear_router["default"]
            router.weight.normal_()
            router.weight_norm_weight.fill_(scale)


def test_encoder_block_equals_merged_expert_on_masked_mean(t5_batch):
    model = smear_t5()
    randomise_routers(model)
    layer = dict(blocks(model))["base_model.model.encoder.block.1.layer.1.DenseReluDense"]
    seen, handle = capture(layer)
    with torch.no_grad():
        model(**t5_batch)
    handle.remove()
    y = layer.base_layer(*seen["args"], **seen["kwargs"])
    mask = t5_batch["attention_mask"].float()
    pooled = (y * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected, probs = reference_block(layer, y, pooled)
    assert probs.std() > 0.05  # routing is far from uniform, so the merge matters
    torch.testing.assert_close(seen["output"], expected, rtol=1e-5, atol=1e-5)


def test_decoder_blocks_route_on_the_encoder_output(t5_batch):
    model = smear_t5()
    randomise_routers(model)
    layer = dict(blocks(model))["base_model.model.decoder.block.1.layer.1.EncDecAttention"]
    seen, handle = capture(layer)
    with torch.no_grad():
        encoder_states = model.get_encoder()(
            input_ids=t5_batch["input_ids"], attention_mask=t5_batch["attention_mask"]
        ).last_hidden_state
        model(**t5_batch)
    handle.remove()
    y = layer.base_layer(*seen["args"], **seen["kwargs"])[0]
    mask = t5_batch["attention_mask"].float()
    pooled = (encoder_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected, _ = reference_block(layer, y, pooled)
    torch.testing.assert_close(seen["output"][0], expected, rtol=1e-5, atol=1e-5)
    assert seen["output"][1] is not None  # T5's position bias passes through the tuple untouched


def test_saturated_router_gives_exactly_one_expert(t5_batch):
    model = smear_t5()
    layer = dict(blocks(model))["base_model.model.encoder.block.0.layer.1.DenseReluDense"]
    router, experts, norm = layer.smear_router["default"], layer.smear_experts["default"], layer.smear_post_norm["default"]
    torch.manual_seed(3)
    with torch.no_grad():
        router.weight.normal_()
        router.weight_norm_weight.fill_(1e4)  # logit gaps of thousands: softmax is exactly one-hot in fp32
    seen, handle = capture(layer)
    with torch.no_grad():
        model(**t5_batch)
    handle.remove()
    y = layer.base_layer(*seen["args"], **seen["kwargs"])
    pooled = (y * t5_batch["attention_mask"][..., None]).sum(1) / t5_batch["attention_mask"].sum(1, keepdim=True)
    probs = F.softmax(router(pooled)[0], dim=-1)
    chosen = probs.argmax(-1)
    assert torch.all(probs.max(-1).values == 1.0)
    for b in range(y.shape[0]):
        n = chosen[b]
        single = F.layer_norm(
            F.silu(y[b] @ experts.down_weight[n] + experts.down_bias[n]) @ experts.up_weight[n], (32,), norm.weight, norm.bias
        )
        torch.testing.assert_close(seen["output"][b], y[b] + single, rtol=0, atol=1e-6)


def test_bf16_base_model_runs_with_fp32_adapters(t5_batch):
    reference = smear_t5()(**t5_batch).logits
    model = get_peft_model(tiny_t5().to(torch.bfloat16), SmearConfig(num_experts=4, reduction_factor=4)).eval()
    layer = blocks(model)[0][1]
    assert layer.smear_experts["default"].down_weight.dtype == torch.float32
    assert layer.base_layer.o.weight.dtype == torch.bfloat16
    logits = model(**t5_batch).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).norm() / reference.norm() < 0.02
    generated = model.generate(input_ids=t5_batch["input_ids"], attention_mask=t5_batch["attention_mask"], max_new_tokens=3)
    assert generated.shape == (3, 4)
