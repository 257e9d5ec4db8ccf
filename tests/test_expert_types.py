"""LoRA and (IA)³ experts (``SmearConfig(expert_type=...)``): every expert type with every routing method on tiny
models (forward, backward, generate with and without the KV cache, save / load), merging of monolithic experts, and
validation. Export to plain PEFT adapters is in ``test_export.py``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from smear_peft import ROUTING_METHODS, SmearConfig, SmearLayer
from smear_peft.expert_types import IA3Experts, LoraExperts
from smear_peft.losses import per_example_causal_lm_loss, reinforce_loss

from .conftest import tiny_t5

EXPERT_TYPES = ("lora", "ia3")
ROUTINGS = sorted(ROUTING_METHODS)
TAGS = [0, 2, 1]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=None, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                        eos_token_id=None, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def randomise(model, seed: int = 3):
    """Move experts and routers away from their init (LoRA's B = 0 and (IA)³'s ones make every routing equal)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "smear_" in name:
                param.normal_(0, 0.3)
                if "ia3_l" in name:
                    param.add_(1.0)
    return model


def config_for(expert_type: str, routing: str, **overrides) -> SmearConfig:
    values = dict(expert_type=expert_type, routing=routing, num_experts=4, r=4, lora_alpha=8)
    values.update(overrides)
    return SmearConfig(**values)


def routed(expert_type: str, routing: str, base=None, **overrides):
    base = tiny_llama() if base is None else base
    return randomise(get_peft_model(base, config_for(expert_type, routing, **overrides))).eval()


def tag_kwargs(routing: str, batch: int = 3) -> dict:
    return {"routing_tags": TAGS[:batch]} if routing == "tag" else {}


@pytest.fixture
def lm_batch():
    """Three right-padded examples: a 3-token prompt (labels -100) and an answer."""
    torch.manual_seed(1)
    input_ids = torch.randint(2, 64, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- injection -----------------------------------------------------------------------------------------------------
def test_presets_wrap_linear_layers_and_start_at_the_base_model(lm_batch):
    base = tiny_llama()
    with torch.no_grad():
        expected = base(**lm_batch).logits
    for expert_type, names in (("lora", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
                               ("ia3", {"k_proj", "v_proj", "down_proj"})):
        model = get_peft_model(copy.deepcopy(base), SmearConfig(expert_type=expert_type, num_experts=4)).eval()
        layers = [m for m in model.modules() if isinstance(m, SmearLayer)]
        assert {layer.block_name.rsplit(".", 1)[-1] for layer in layers} == names
        assert all(layer.position == "linear" and layer.role == "causal" for layer in layers)
        assert not model.peft_config["default"].modules_to_save  # no layer norms trained by default (as PEFT)
        with torch.no_grad():
            torch.testing.assert_close(model(**lm_batch).logits, expected, rtol=0, atol=0)
    ia3 = get_peft_model(copy.deepcopy(base), SmearConfig(expert_type="ia3", num_experts=4))
    experts = {l.block_name.rsplit(".", 1)[-1]: l.smear_experts["default"] for l in ia3.modules() if isinstance(l, SmearLayer)}
    assert experts["down_proj"].feedforward and experts["down_proj"].ia3_l.shape == (4, 48)  # FFN input scaled
    assert not experts["v_proj"].feedforward and experts["v_proj"].ia3_l.shape == (4, 16)  # values: output scaled


def test_ia3_feedforward_modules_default_to_peft_table_with_explicit_targets(lm_batch, tmp_path):
    """As PEFT's IA3Config: explicit target_modules without feedforward_modules still input-scale the model type's FFN
    modules (down_proj), and the resolved list is saved; a saved null (earlier versions) keeps loading as before."""
    from peft import IA3Config, PeftConfig, PeftModel

    targets = ["k_proj", "v_proj", "down_proj"]
    assert SmearConfig(expert_type="ia3").feedforward_modules == "preset"
    assert SmearConfig(expert_type="lora").feedforward_modules is None  # nothing for other types (saved as null)
    model = randomise(get_peft_model(tiny_llama(), SmearConfig(expert_type="ia3", routing="monolithic",
                                                               target_modules=targets))).eval()
    peft = get_peft_model(tiny_llama(), IA3Config(target_modules=targets)).eval()
    assert model.peft_config["default"].feedforward_modules == ["down_proj"]
    assert sorted(peft.peft_config["default"].feedforward_modules) == ["down_proj"]
    modules = dict(peft.base_model.model.named_modules())
    layers = [l for l in model.modules() if isinstance(l, SmearLayer)]
    with torch.no_grad():
        for layer in layers:
            experts = layer.smear_experts["default"]
            assert experts.feedforward == layer.block_name.endswith("down_proj")
            target = modules[layer.block_name].ia3_l["default"]
            assert target.numel() == experts.ia3_l[0].numel()  # down_proj: [48] (its input), not [32]
            target.copy_(experts.ia3_l[0].reshape(target.shape))
        inputs = {k: v for k, v in lm_batch.items() if k != "labels"}
        expected = model(**inputs, routing_mask=torch.ones_like(inputs["input_ids"])).logits
        torch.testing.assert_close(expected, peft(**inputs).logits, rtol=1e-6, atol=1e-6)

    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["feedforward_modules"] == ["down_proj"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "new").eval()
    assert loaded.peft_config["default"].feedforward_modules == ["down_proj"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs, routing_mask=torch.ones_like(inputs["input_ids"])).logits, expected, rtol=0, atol=0)

    # An adapter of an earlier version: explicit targets, feedforward_modules saved as null, down_proj output-scaled
    old = randomise(get_peft_model(tiny_llama(), SmearConfig(expert_type="ia3", routing="monolithic",
                                                             target_modules=targets, feedforward_modules=None))).eval()
    old.save_pretrained(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "adapter_config.json").read_text())["feedforward_modules"] is None
    assert PeftConfig.from_pretrained(str(tmp_path / "old")).feedforward_modules is None
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "old").eval()
    down = reloaded.base_model.model.model.layers[0].mlp.down_proj.smear_experts["default"]
    assert not down.feedforward and down.ia3_l.shape == (1, 32)
    with torch.no_grad():
        call = dict(inputs, routing_mask=torch.ones_like(inputs["input_ids"]))
        torch.testing.assert_close(reloaded(**call).logits, old(**call).logits, rtol=0, atol=0)

    # An unresolved config saved before get_peft_model keeps the default; a model type without a table gets none
    SmearConfig(expert_type="ia3", target_modules=targets).save_pretrained(tmp_path / "config")
    assert PeftConfig.from_pretrained(str(tmp_path / "config")).feedforward_modules == "preset"
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    custom = get_peft_model(mlp, SmearConfig(expert_type="ia3", target_modules=["0", "2"], num_experts=2))
    assert custom.peft_config["default"].feedforward_modules == []


def test_lora_init_is_peft_init():
    model = get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", num_experts=3, r=4, lora_alpha=16))
    experts = model.base_model.model.model.layers[0].self_attn.q_proj.smear_experts["default"]
    assert isinstance(experts, LoraExperts) and experts.lora_A.shape == (3, 32, 4) and experts.lora_B.shape == (3, 4, 32)
    assert torch.all(experts.lora_B == 0) and experts.lora_A.abs().max() <= 1 / 32**0.5
    assert not torch.equal(experts.lora_A[0], experts.lora_A[1])  # experts differ
    assert experts.scaling == 4.0
    rs = get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", num_experts=3, r=4, lora_alpha=16, use_rslora=True))
    assert rs.base_model.model.model.layers[0].self_attn.q_proj.smear_experts["default"].scaling == 8.0


def test_t5_and_gpt2_presets():
    t5 = get_peft_model(tiny_t5(), SmearConfig(expert_type="lora", num_experts=2))
    names = {l.block_name.rsplit(".", 1)[-1] for l in t5.modules() if isinstance(l, SmearLayer)}
    assert names == {"q", "v", "wi_0", "wi_1", "wo"}
    decoder = [l for l in t5.modules() if isinstance(l, SmearLayer) and l.side == "decoder"]
    wo = next(l for l in decoder if l.block_name.endswith("wo"))
    assert wo.role == "encoder_output" and wo.hidden_size == 64 and wo.source_size == 32
    assert wo.smear_router["default"].weight.shape == (32, 2)  # routes on the encoder output's width
    gpt2 = get_peft_model(tiny_gpt2(), SmearConfig(expert_type="lora", num_experts=2))
    layers = [l for l in gpt2.modules() if isinstance(l, SmearLayer)]
    assert len(layers) == 8 and all(l.linear_shape.fan_in_fan_out for l in layers)  # Conv1D


def test_validation_errors():
    with pytest.raises(ValueError, match="nn.Linear"):
        get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", target_modules=["mlp"]))
    with pytest.raises(ValueError, match="expert_type"):
        SmearConfig(expert_type="dora")
    with pytest.raises(ValueError, match="feedforward_modules"):
        SmearConfig(expert_type="lora", feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="subset"):
        SmearConfig(expert_type="ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="post_norm"):
        SmearConfig(expert_type="lora", post_norm=True)
    with pytest.raises(ValueError, match="r:"):
        SmearConfig(expert_type="lora", r=0)
    model = get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", num_experts=2))
    with pytest.raises(ValueError, match="cannot share"):
        model.add_adapter("bottleneck", SmearConfig(target_modules=["q_proj"], num_experts=2))


# -- every expert type x every routing method ----------------------------------------------------------------------
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_forward_backward(lm_batch, expert_type, routing):
    model = routed(expert_type, routing, expert_dropout=0.1 if routing in ("smear", "top_k") else 0.0).train()
    out = model(**lm_batch, **tag_kwargs(routing))
    loss = out.loss + reinforce_loss(out, per_example_causal_lm_loss(out.logits, lm_batch["labels"]))
    loss.backward()
    layers = [m for m in model.modules() if isinstance(m, SmearLayer)]
    for layer in layers:
        experts = layer.smear_experts["default"]
        for param in experts.parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (layer.block_name, routing)
        if routing in ("tag", "hash", "monolithic"):
            assert "default" not in layer.smear_router
        else:
            grad = layer.smear_router["default"].weight.grad
            assert grad is not None and grad.abs().sum() > 0, (layer.block_name, routing)
    assert all(p.grad is None for n, p in model.named_parameters() if "smear_" not in n)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_generate_with_and_without_kv_cache(expert_type, routing):
    model = routed(expert_type, routing)
    torch.manual_seed(5)
    inputs = {"input_ids": torch.randint(2, 64, (2, 5))}
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **options, **tag_kwargs(routing, 2))
        uncached = model.generate(**inputs, **options, use_cache=False, **tag_kwargs(routing, 2))
        # the first step's logits are those of a forward routed on the prompt
        forward = model(**inputs, routing_mask=torch.ones_like(inputs["input_ids"]), **tag_kwargs(routing, 2)).logits
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.scores[0], forward[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_segment_routing_generate_with_and_without_cache(expert_type):
    model = routed(expert_type, "smear", causal_routing="segment", segment_length=3)
    torch.manual_seed(5)
    inputs = {"input_ids": torch.randint(2, 64, (2, 5))}
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **options)
        uncached = model.generate(**inputs, **options, use_cache=False)
        full = model(input_ids=cached.sequences).logits
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, full[:, 4 + step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_save_and_load_exact(tmp_path, lm_batch, expert_type, routing):
    model = routed(expert_type, routing)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.peft_config["default"].expert_type == expert_type
    with torch.no_grad():
        expected = model(**lm_batch, **tag_kwargs(routing)).logits
        got = loaded(**lm_batch, **tag_kwargs(routing)).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_encoder_decoder_forward_backward_and_generate(t5_batch, expert_type):
    model = randomise(get_peft_model(tiny_t5(), config_for(expert_type, "smear")))
    out = model.train()(**t5_batch)
    out.loss.backward()
    decoder = [m for m in model.modules() if isinstance(m, SmearLayer) and m.side == "decoder"]
    assert decoder and all(m.smear_router["default"].weight.grad.abs().sum() > 0 for m in decoder)
    model.eval()
    inputs = {k: t5_batch[k] for k in ("input_ids", "attention_mask")}
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **options)
        uncached = model.generate(**inputs, **options, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- merging -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_monolithic_experts_merge_and_unload(lm_batch, expert_type, family):
    base = tiny_llama() if family == "llama" else tiny_gpt2()
    model = routed(expert_type, "monolithic", base=base)
    with torch.no_grad():
        expected = model(**lm_batch).logits
        merged = model.merge_and_unload()
        got = merged(**lm_batch).logits
    assert not any(isinstance(m, SmearLayer) for m in merged.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_merge_adapter_and_unmerge(lm_batch):
    model = routed("lora", "monolithic")
    with torch.no_grad():
        expected = model(**lm_batch).logits
        model.base_model.merge_adapter()
        torch.testing.assert_close(model(**lm_batch).logits, expected, rtol=1e-5, atol=1e-5)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(**lm_batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_routed_experts_refuse_to_merge(expert_type):
    model = routed(expert_type, "smear")
    with pytest.raises(NotImplementedError, match="export_adapter"):
        model.merge_and_unload()


def test_ia3_mixture_equals_merged_vector(lm_batch):
    """(IA)³ experts are linear in their vectors: the ensemble equals SMEAR with the same probabilities."""
    ensemble = routed("ia3", "ensemble")
    smear = routed("ia3", "smear")
    with torch.no_grad():
        assert torch.allclose(ensemble(**lm_batch).logits, smear(**lm_batch).logits, atol=1e-5)
    assert isinstance(next(m for m in smear.modules() if isinstance(m, IA3Experts)), IA3Experts)


# -- the expert stacks against naive references --------------------------------------------------------------------
def test_lora_experts_every_decision_kind_matches_a_naive_reference():
    from smear_peft.routing import RoutingDecision

    torch.manual_seed(0)
    experts = LoraExperts(4, 6, 5, 3, scaling=0.5)
    with torch.no_grad():
        experts.lora_A.normal_()
        experts.lora_B.normal_()
    x = torch.randn(2, 7, 6)
    probs = torch.softmax(torch.randn(2, 4), -1)

    def one(b, n):
        return 0.5 * x[b] @ experts.lora_A[n] @ experts.lora_B[n]

    merged, _ = experts(x, RoutingDecision("merge", weights=probs))
    for b in range(2):
        a = sum(probs[b, n] * experts.lora_A[n] for n in range(4))
        bb = sum(probs[b, n] * experts.lora_B[n] for n in range(4))
        torch.testing.assert_close(merged[b], 0.5 * x[b] @ a @ bb)
    mixed, _ = experts(x, RoutingDecision("mix", weights=probs))
    index = torch.tensor([[1, 3], [2, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    top2, _ = experts(x, RoutingDecision("mix", index=index, weights=weights))
    selected, _ = experts(x, RoutingDecision("select", index=torch.tensor([2, 1]), weights=torch.tensor([0.5, 2.0])))
    shared, _ = experts(x, RoutingDecision("shared", batch_size=2))
    for b in range(2):
        torch.testing.assert_close(mixed[b], sum(probs[b, n] * one(b, n) for n in range(4)))
        torch.testing.assert_close(top2[b], sum(weights[b, k] * one(b, int(index[b, k])) for k in range(2)))
        torch.testing.assert_close(shared[b], one(b, 0))
    torch.testing.assert_close(selected[0], 0.5 * one(0, 2))
    torch.testing.assert_close(selected[1], 2.0 * one(1, 1))


def test_ia3_experts_every_decision_kind_matches_a_naive_reference():
    from smear_peft.routing import RoutingDecision

    torch.manual_seed(0)
    experts = IA3Experts(4, 5, feedforward=False)
    with torch.no_grad():
        experts.ia3_l.normal_(1.0, 0.3)
    x = torch.randn(2, 3, 8)
    probs = torch.softmax(torch.randn(2, 4), -1)
    merged, _ = experts(x, RoutingDecision("merge", weights=probs))
    torch.testing.assert_close(1 + merged[:, 0], probs @ experts.ia3_l)
    index = torch.tensor([[1, 3], [2, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    top2, _ = experts(x, RoutingDecision("mix", index=index, weights=weights))
    torch.testing.assert_close(1 + top2[:, 0], torch.einsum("bk,bkf->bf", weights, experts.ia3_l[index]))
    selected, _ = experts(x, RoutingDecision("select", index=torch.tensor([2, 1]), weights=torch.tensor([0.5, 1.0])))
    torch.testing.assert_close(selected[0, 0], 0.5 * (experts.ia3_l[2] - 1))
    torch.testing.assert_close(selected[1, 2], experts.ia3_l[1] - 1)


def test_top2_routing_with_lora_experts(lm_batch):
    model = routed("lora", "top_k", top_k=2).train()
    model(**lm_batch).loss.backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.smear_router["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("autocast", [True, False])
def test_monolithic_lora_experts_on_a_bfloat16_model_round_as_peft_lora(autocast):
    """A bf16 base with LoRA weights: the update is added in the adapter's precision and rounded once, as PEFT's LoRA
    (bitwise equal with bf16 adapters; with autocast fp32 adapters, equal up to fp32 summation order, far inside the
    bf16 rounding error both have against an fp32 model)."""
    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"]
    smear = get_peft_model(tiny_llama().to(torch.bfloat16), config_for("lora", "monolithic", target_modules=targets),
                           autocast_adapter_dtype=autocast)
    randomise(smear)
    lora = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                          autocast_adapter_dtype=autocast)
    copied = 0
    with torch.no_grad():
        for name, module in lora.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                experts = smear.get_submodule(name).smear_experts["default"]
                module.lora_A["default"].weight.copy_(experts.lora_A[0].T)
                module.lora_B["default"].weight.copy_(experts.lora_B[0].T)
                assert module.lora_A["default"].weight.dtype == experts.lora_A.dtype
                copied += 1
    assert copied == 6
    reference = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))  # float32
    reference.load_state_dict({k: v.float() for k, v in lora.state_dict().items()})
    ids = torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = smear(input_ids=ids).logits, lora(input_ids=ids).logits
        exact = reference(input_ids=ids).logits
    assert ours.dtype == torch.bfloat16
    if not autocast:
        assert torch.equal(ours, theirs)
    else:  # rounding the update to bf16 before adding it (as before) gave 5.0e-4 here, more than PEFT's own 4.4e-4
        assert (ours.float() - theirs.float()).abs().mean() < 0.2 * (theirs.float() - exact).abs().mean()


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_gradient_checkpointing_with_a_padded_batch_gives_the_same_gradients(family, expert_type, t5_batch, lm_batch):
    """Blocks of one layer share their pooled routing input (q / k / v): a checkpointed layer shares the same way when
    it is recomputed, so non-reentrant checkpointing (transformers' default) saves the same tensors and is exact."""

    def gradients(checkpointing):
        base = (tiny_t5(dropout_rate=0.0) if family == "t5" else tiny_llama()).double()  # float64: compare exactly
        model = randomise(get_peft_model(base, config_for(expert_type, "smear"))).train()
        if checkpointing is not None:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model(**(t5_batch if family == "t5" else lm_batch)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients(None)
    assert len(plain) > 0 and all(g is not None for g in plain.values())
    for checkpointing in ({"use_reentrant": False}, {"use_reentrant": True}):
        checkpointed = gradients(checkpointing)
        assert checkpointed.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-9, atol=1e-12)
