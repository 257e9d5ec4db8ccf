"""Fixes found by PEFT's own test suite (tests/peft_suite): the enum member and regex + layer selection."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from peft.utils import PeftType
from torch import nn

from smear_peft import SmearConfig


def test_peft_type_is_the_enum_member():
    config = SmearConfig()
    assert config.peft_type is PeftType.SMEAR and config.peft_type.value == "SMEAR"
    assert config.to_dict()["peft_type"] == "SMEAR"


@pytest.mark.parametrize("field", ["layers_to_transform", "layers_pattern"])
def test_regex_target_modules_refuse_layer_selection(field):
    value = [0] if field == "layers_to_transform" else "layers"
    with pytest.raises(ValueError, match=f"SmearConfig.{field}: cannot be used when target_modules is a regular"):
        SmearConfig(target_modules=r"layers\.\d+\.lin", **{field: value})


def test_regex_filled_in_by_a_preset_refuses_layer_selection():
    from transformers import ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    with pytest.raises(ValueError, match="layers_to_transform: cannot be used"):
        get_peft_model(model, SmearConfig(num_experts=2, layers_to_transform=[0], layers_pattern="layers"))


def test_list_target_modules_keep_layer_selection():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
    peft_model = get_peft_model(model, SmearConfig(num_experts=2, target_modules=["0"], layers_to_transform=[1], layers_pattern="layers"))
    from smear_peft import SmearLayer

    assert [n for n, m in peft_model.named_modules() if isinstance(m, SmearLayer)] == ["base_model.model.layers.1.0"]
