"""Export of a fixed routing as a plain PEFT LoRA / IA3 adapter (`smear_peft.export`).

Each case exports an adapter, and a fresh Python process that never imports smear_peft loads it with
``PeftModel.from_pretrained`` (a vanilla `LoraConfig` / `IA3Config`); its outputs must equal smear-peft's outputs for
inputs routed that way, to 1e-5. All cases share one subprocess to keep the test fast."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

from smear_peft import SmearConfig
from smear_peft.analysis import RoutingMeans, RoutingRecorder
from smear_peft.export import export_adapter

from .conftest import tiny_t5
from .test_expert_types import randomise, tiny_gpt2, tiny_llama

LOADER = r"""
import json, sys, torch
from peft import LoraConfig, IA3Config, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
cases = json.load(open(sys.argv[1]))
results = {}
for case in cases:
    auto = AutoModelForSeq2SeqLM if case["seq2seq"] else AutoModelForCausalLM
    base = auto.from_pretrained(case["base"]).eval()
    model = PeftModel.from_pretrained(base, case["adapter"]).eval()
    config = model.peft_config["default"]
    assert type(config) in (LoraConfig, IA3Config), type(config)
    inputs = torch.load(case["inputs"])
    with torch.no_grad():
        results[case["name"]] = model(**inputs).logits
    results[case["name"] + ":type"] = type(config).__name__
assert "smear_peft" not in sys.modules
torch.save(results, sys.argv[2])
"""


def single_example(seq2seq: bool):
    torch.manual_seed(11)
    ids = torch.randint(2, 64, (1, 6))
    if seq2seq:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": torch.randint(2, 64, (1, 4))}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_case(tmp_path, name, family, expert_type, routing, export_kwargs, forward_kwargs=None, config=None):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}[family]()
    base_dir = tmp_path / f"base-{family}"
    if not base_dir.exists():
        base.save_pretrained(base_dir)
    model = randomise(get_peft_model(copy.deepcopy(base), SmearConfig(
        expert_type=expert_type, routing=routing, num_experts=3, r=4, lora_alpha=8,
        tag_to_expert={1: 2} if routing == "tag" else None, **(config or {}),
    ))).eval()
    seq2seq = family == "t5"
    inputs = single_example(seq2seq)
    call = dict(inputs, **(forward_kwargs or {}))
    if not seq2seq:
        call["routing_mask"] = torch.ones_like(inputs["input_ids"])  # route on the whole input as a prompt
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        expected = model(**call).logits
    kwargs = dict(export_kwargs)
    kwargs.pop("rank", None)
    if kwargs.pop("recorded", False):
        kwargs["probs"] = recorder
    adapter_dir = tmp_path / name
    peft_config = export_adapter(model, str(adapter_dir), **kwargs)
    if "rank" in export_kwargs:
        assert peft_config.r == export_kwargs["rank"], (name, peft_config.r)
    torch.save(inputs, tmp_path / f"{name}.pt")
    case = {"name": name, "base": str(base_dir), "adapter": str(adapter_dir), "inputs": str(tmp_path / f"{name}.pt"),
            "seq2seq": seq2seq}
    return case, expected


CASES = [
    # name, family, expert type, routing, export arguments, forward arguments
    ("lora-smear", "llama", "lora", "smear", {"recorded": True}, None),
    ("ia3-smear", "llama", "ia3", "smear", {"recorded": True}, None),
    ("lora-ensemble", "llama", "lora", "ensemble", {"recorded": True}, None),
    ("lora-tag-plus", "llama", "lora", "tag", {"tag": 1}, {"routing_tags": [1]}),
    ("ia3-hash", "llama", "ia3", "hash", {"recorded": True}, {"routing_keys": [0]}),  # one expert per block
    ("lora-monolithic", "llama", "lora", "monolithic", {}, None),
    ("lora-gpt2-conv1d", "gpt2", "lora", "smear", {"recorded": True}, None),
    ("ia3-gpt2-conv1d", "gpt2", "ia3", "smear", {"recorded": True}, None),
    ("lora-t5", "t5", "lora", "smear", {"recorded": True}, None),
    ("ia3-t5", "t5", "ia3", "smear", {"recorded": True}, None),
    # routings whose decision is not a merge: the recording's weights are what they did (rank: only used experts)
    ("lora-top1", "llama", "lora", "top_k", {"recorded": True, "rank": 4}, None),  # p_argmax * expert, rank r
    ("lora-top2", "llama", "lora", "top_k", {"recorded": True, "rank": 8}, None, {"top_k": 2}),
    ("lora-st-gumbel", "llama", "lora", "st_gumbel", {"recorded": True, "rank": 4}, None),
    ("lora-reinforce", "llama", "lora", "reinforce", {"recorded": True, "rank": 4}, None),
    ("ia3-top1", "llama", "ia3", "top_k", {"recorded": True}, None),
    ("ia3-top2-t5", "t5", "ia3", "top_k", {"recorded": True}, None, {"top_k": 2}),
    ("lora-hash", "llama", "lora", "hash", {"recorded": True, "rank": 4}, {"routing_keys": [5]}),
]


def test_exported_adapters_load_in_plain_peft_and_reproduce_outputs(tmp_path):
    cases, expected = [], {}
    for name, family, expert_type, routing, export_kwargs, forward_kwargs, *config in CASES:
        case, logits = build_case(tmp_path, name, family, expert_type, routing, export_kwargs, forward_kwargs, *config)
        cases.append(case)
        expected[name] = logits
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "cases.json"), str(tmp_path / "out.pt")],
                   check=True, env=env, cwd=str(tmp_path))
    results = torch.load(tmp_path / "out.pt")
    for name, logits in expected.items():
        assert results[name + ":type"] == ("IA3Config" if name.startswith("ia3") else "LoraConfig")
        torch.testing.assert_close(results[name], logits, rtol=1e-5, atol=1e-5, msg=name)


def test_exported_expert_equals_routing_to_it(tmp_path):
    """``expert=i`` is the one-hot routing: a SMEAR model whose router is forced to expert i gives the same output."""
    model = randomise(get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", num_experts=3, r=4))).eval()
    config = export_adapter(model, str(tmp_path / "e2"), expert=2)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "e2" / "adapter_model.safetensors")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(a, q.smear_experts["default"].lora_A[2].T) and torch.equal(b, q.smear_experts["default"].lora_B[2].T)
    assert config.r == 4 and config.lora_alpha == 8 and len(config.target_modules) == 14


def test_export_errors(tmp_path):
    model = randomise(get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", num_experts=3)))
    with pytest.raises(ValueError, match="exactly one"):
        export_adapter(model, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="tag routing"):
        export_adapter(model, str(tmp_path / "x"), tag=1)
    with pytest.raises(ValueError, match="3 finite values"):
        export_adapter(model, str(tmp_path / "x"), probs=torch.ones(2))
    bottleneck = get_peft_model(tiny_llama(), SmearConfig(num_experts=2))
    with pytest.raises(ValueError, match="expert_type"):
        export_adapter(bottleneck, str(tmp_path / "x"), expert=0)


def exported_factors(folder, block):
    """``A [in, R]``, ``B [R, out]`` of one block of an exported LoRA."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "adapter_model.safetensors"))
    return state[f"base_model.model.{block}.lora_A.weight"].T, state[f"base_model.model.{block}.lora_B.weight"].T


Q_PROJ = "model.layers.0.self_attn.q_proj"


def recorded_llama(routing, **config):
    model = randomise(get_peft_model(tiny_llama(), SmearConfig(
        expert_type="lora", routing=routing, num_experts=3, r=4, lora_alpha=8, **config))).eval()
    inputs = single_example(False)
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model(**inputs, routing_mask=torch.ones_like(inputs["input_ids"]))
    return model, recorder


@pytest.mark.parametrize("routing,top_k", [("top_k", 1), ("top_k", 2), ("st_gumbel", 1), ("reinforce", 1)])
def test_recorded_discrete_and_top_k_routing_exports_the_experts_it_used_not_the_soft_probs(tmp_path, routing, top_k):
    model, recorder = recorded_llama(routing, top_k=top_k)
    experts = model.base_model.model.model.layers[0].self_attn.q_proj.smear_experts["default"]
    probs = recorder.probs(Q_PROJ)[0]
    config = export_adapter(model, str(tmp_path / "x"), probs=recorder)
    a, b = exported_factors(tmp_path / "x", Q_PROJ)
    weight, index = probs.topk(top_k)
    if routing == "top_k" and top_k == 2:  # the renormalised top-2 mixture of outputs, rank 2 r
        weight = weight / weight.sum()
        assert config.r == 8 and config.lora_alpha == 16  # scaling 8 / 4 = 16 / 8 kept
    elif routing == "top_k":  # p_argmax times the argmax expert's update (in A; B unscaled), rank r
        assert config.r == 4 and config.lora_alpha == 8
    else:  # the argmax expert, unscaled (evaluation)
        weight = torch.ones(1)
        assert config.r == 4
    order = index.sort().values  # experts in index order
    weight = weight[index.argsort()]
    expected_a = torch.cat([w * experts.lora_A[i] for w, i in zip(weight, order)], dim=1)
    expected_b = torch.cat([experts.lora_B[i] for i in order], dim=0)
    torch.testing.assert_close(a, expected_a.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(b, expected_b.detach(), rtol=0, atol=0)
    # SMEAR's merge of the soft probabilities (what was exported before) is far from it
    merged = (probs @ experts.lora_A.detach().flatten(1)).view(32, 4)
    assert a.shape != merged.shape or (a - merged).abs().max() > 1e-2


def test_export_uses_the_exported_adapters_recording(tmp_path):
    config = dict(expert_type="lora", num_experts=3, r=4, lora_alpha=8)
    model = get_peft_model(tiny_llama(), SmearConfig(**config))
    model.add_adapter("b", SmearConfig(**config))
    model.base_model.set_adapter(["default", "b"])
    model = randomise(model).eval()
    inputs = dict(single_example(False), routing_mask=torch.ones(1, 6, dtype=torch.long))
    with torch.no_grad(), RoutingRecorder(model) as both:
        model(**inputs)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    for adapter, key in (("b", Q_PROJ + "@b"), ("default", Q_PROJ)):
        export_adapter(model, str(tmp_path / adapter), probs=both, adapter_name=adapter)
        a, _ = exported_factors(tmp_path / adapter, Q_PROJ)
        expected = both.weights(key)[0] @ layer.smear_experts[adapter].lora_A.detach().flatten(1)
        torch.testing.assert_close(a, expected.view(32, 4), rtol=0, atol=1e-7)
        assert not torch.allclose(both.weights(Q_PROJ + "@b"), both.weights(Q_PROJ))  # the two adapters differ
        # the same through RoutingMeans and through the recorder's names as a mapping
        export_adapter(model, str(tmp_path / "means"), probs=both.mean_probs_per_tag(), adapter_name=adapter)
        assert torch.equal(exported_factors(tmp_path / "means", Q_PROJ)[0], a)
        table = {name: both.weights(name)[0] for name in both.block_names}
        export_adapter(model, str(tmp_path / "map"), probs=table, adapter_name=adapter)
        assert torch.equal(exported_factors(tmp_path / "map", Q_PROJ)[0], a)
    # a recording of one adapter is never used for another
    with torch.no_grad(), RoutingRecorder(model, adapter="default") as only_default:
        model(**inputs)
    with pytest.raises(ValueError, match=r"recorded adapter\(s\) \['default'\], not 'b'"):
        export_adapter(model, str(tmp_path / "y"), probs=only_default, adapter_name="b")
    with pytest.raises(ValueError, match=r"of adapter\(s\) \['default'\], not 'b'"):
        export_adapter(model, str(tmp_path / "y"), probs=only_default.mean_probs_per_tag(), adapter_name="b")
    with pytest.raises(ValueError, match="no routing for block .* of adapter 'b'"):  # "<block>" is default's here
        export_adapter(model, str(tmp_path / "y"), probs={Q_PROJ: torch.ones(3) / 3, Q_PROJ + "@c": torch.ones(3)},
                       adapter_name="b")
    # only b active: the recorder names its blocks "<block>@b", which export finds
    model.base_model.set_adapter("b")
    with torch.no_grad(), RoutingRecorder(model) as only_b:
        model(**inputs)
    export_adapter(model, str(tmp_path / "b2"), probs=only_b)
    a, _ = exported_factors(tmp_path / "b2", Q_PROJ)
    expected = only_b.weights(Q_PROJ + "@b")[0] @ layer.smear_experts["b"].lora_A.detach().flatten(1)
    torch.testing.assert_close(a, expected.view(32, 4), rtol=0, atol=1e-7)


def test_segment_routing_recordings_need_an_explicit_average(tmp_path):
    model = randomise(get_peft_model(tiny_llama(), SmearConfig(
        expert_type="lora", num_experts=3, r=4, lora_alpha=8, causal_routing="segment", segment_length=4))).eval()
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model(input_ids=torch.randint(2, 64, (1, 12)))
    assert recorder.weights(Q_PROJ).shape == (3, 3)  # one routing per segment
    with pytest.raises(ValueError, match="average_segments=True"):
        export_adapter(model, str(tmp_path / "x"), probs=recorder)
    export_adapter(model, str(tmp_path / "x"), probs=recorder, average_segments=True)
    a, _ = exported_factors(tmp_path / "x", Q_PROJ)
    experts = model.base_model.model.model.layers[0].self_attn.q_proj.smear_experts["default"]
    expected = recorder.weights(Q_PROJ).mean(0) @ experts.lora_A.detach().flatten(1)
    torch.testing.assert_close(a, expected.view(32, 4), rtol=0, atol=1e-7)


def test_recorded_routing_keeps_its_mixture(tmp_path):
    model, recorder = recorded_llama("smear")
    with pytest.raises(ValueError, match="combines its experts' parameters"):
        export_adapter(model, str(tmp_path / "x"), probs=recorder, mixture="outputs")
    model, recorder = recorded_llama("top_k", top_k=2)
    with pytest.raises(ValueError, match="combines its experts' outputs"):
        export_adapter(model, str(tmp_path / "x"), probs=recorder, mixture="parameters")
    model, recorder = recorded_llama("st_gumbel")  # a unit one-hot: both mixtures are that expert
    assert export_adapter(model, str(tmp_path / "x"), probs=recorder, mixture="parameters").r == 4
    means = recorder.mean_probs_per_tag()
    hand_made = RoutingMeans(means.blocks, means.tags, means.tag_labels, means.means, means.counts)
    with pytest.raises(ValueError, match="no record of what the routing did"):
        export_adapter(model, str(tmp_path / "x"), probs=hand_made)
