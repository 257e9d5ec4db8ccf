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


def test_task_type_is_peft_s_and_configs_of_0_1_still_load():
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    assert "AUTO" not in MODEL_TYPE_TO_PEFT_MODEL_MAPPING  # PEFT's task-type mapping is left as PEFT ships it
    plain = get_peft_model(tiny_t5(), SmearConfig(num_experts=2))
    assert type(plain) is PeftModel and plain.peft_config["default"].task_type is None
    explicit = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, task_type="SEQ_2_SEQ_LM"))
    assert explicit.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert SmearConfig(task_type="AUTO").task_type is None


def test_other_peft_methods_keep_their_push_to_hub():
    assert PeftModel.push_to_hub._smear_original.__qualname__.endswith("push_to_hub")
