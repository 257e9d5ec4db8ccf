"""Registration with PEFT: the enum member, the mappings, AUTO task types, idempotence."""

from __future__ import annotations

import copy
import pickle

from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch import nn

import smear_peft
from smear_peft import SmearConfig, SmearModel

from .conftest import tiny_t5


def test_smear_is_a_peft_type_with_mappings():
    assert PeftType("SMEAR") is PeftType.SMEAR and PeftType.SMEAR.value == "SMEAR"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SMEAR] is SmearConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SMEAR] is SmearModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SMEAR] == "smear_"
    config = SmearConfig()
    assert pickle.loads(pickle.dumps(config)).peft_type == "SMEAR" and copy.deepcopy(config).peft_type == "SMEAR"


def test_register_is_idempotent():
    members = list(PeftType)
    smear_peft.register()
    smear_peft.register()
    assert list(PeftType) == members


def test_auto_task_type_is_resolved_from_the_model():
    seq2seq = get_peft_model(tiny_t5(), SmearConfig(num_experts=2))
    assert seq2seq.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    plain = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), SmearConfig(num_experts=2, target_modules=["0"]))
    assert type(plain) is PeftModel and plain.peft_config["default"].task_type is None
    explicit = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, task_type="SEQ_2_SEQ_LM"))
    assert explicit.peft_config["default"].task_type == "SEQ_2_SEQ_LM"


def test_other_peft_methods_keep_their_push_to_hub():
    assert PeftModel.push_to_hub._smear_original.__qualname__.endswith("push_to_hub")
