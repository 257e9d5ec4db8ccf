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
from smear_peft.analysis import RoutingRecorder
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


def build_case(tmp_path, name, family, expert_type, routing, export_kwargs, forward_kwargs=None):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}[family]()
    base_dir = tmp_path / f"base-{family}"
    if not base_dir.exists():
        base.save_pretrained(base_dir)
    model = randomise(get_peft_model(copy.deepcopy(base), SmearConfig(
        expert_type=expert_type, routing=routing, num_experts=3, r=4, lora_alpha=8,
        tag_to_expert={1: 2} if routing == "tag" else None,
    ))).eval()
    seq2seq = family == "t5"
    inputs = single_example(seq2seq)
    call = dict(inputs, **(forward_kwargs or {}))
    if not seq2seq:
        call["routing_mask"] = torch.ones_like(inputs["input_ids"])  # route on the whole input as a prompt
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        expected = model(**call).logits
    kwargs = dict(export_kwargs)
    if kwargs.pop("recorded", False):
        kwargs["probs"] = recorder
    adapter_dir = tmp_path / name
    export_adapter(model, str(adapter_dir), **kwargs)
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
]


def test_exported_adapters_load_in_plain_peft_and_reproduce_outputs(tmp_path):
    cases, expected = [], {}
    for name, family, expert_type, routing, export_kwargs, forward_kwargs in CASES:
        case, logits = build_case(tmp_path, name, family, expert_type, routing, export_kwargs, forward_kwargs)
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
