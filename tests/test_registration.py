"""Registration with PEFT: the enum member, the mappings, idempotence, and PEFT left as it ships for other methods."""

from __future__ import annotations

import copy
import pickle

import pytest

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


PEFT_BEHAVIOUR = r"""
import hashlib, json, os, sys, tempfile
from unittest import mock
import torch
import peft
from peft import LoraConfig, TaskType, get_peft_model
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from transformers import T5Config, T5ForConditionalGeneration

assert "smear_peft" not in sys.modules


def tiny_t5():
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def behaviour():
    result = {"task classes": {}, "files": {}, "uploaded": {}}
    for task in [None, *TaskType]:
        torch.manual_seed(0)
        model = get_peft_model(tiny_t5(), LoraConfig(task_type=task, target_modules=["q", "v"], init_lora_weights=False))
        result["task classes"][str(task)] = type(model).__qualname__
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        for name in sorted(os.listdir(folder)):
            result["files"][name] = hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()

    def upload(self, folder, repo_id, **kwargs):
        for name in sorted(os.listdir(folder)):
            result["uploaded"][name] = hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()

    with mock.patch("transformers.utils.hub.hf_api") as api, mock.patch.object(
        type(model), "_upload_modified_files", upload
    ), mock.patch("transformers.utils.hub.ModelCard.load", side_effect=__import__("huggingface_hub").errors.EntryNotFoundError("none")):
        api.return_value.create_repo.return_value.repo_id = "someone/lora"
        model.push_to_hub("someone/lora")
    result["methods"] = {name: getattr(peft.PeftModel, name).__qualname__ for name in ("push_to_hub", "save_pretrained", "forward", "generate")}
    result["task mapping"] = sorted(map(str, MODEL_TYPE_TO_PEFT_MODEL_MAPPING))
    result["mappings"] = {n: sorted(getattr(k, "value", k) for k in m) for n, m in (("config", PEFT_TYPE_TO_CONFIG_MAPPING), ("tuner", PEFT_TYPE_TO_TUNER_MAPPING), ("prefix", PEFT_TYPE_TO_PREFIX_MAPPING))}
    return result


before = behaviour()
import smear_peft  # noqa: E402
after = behaviour()
for name in ("config", "tuner", "prefix"):  # the registration adds SMEAR and nothing else
    assert sorted(set(after["mappings"][name]) - set(before["mappings"][name])) == ["SMEAR"], name
    before["mappings"][name] = after["mappings"][name]
print(json.dumps({"same": before == after, "before": before, "after": after}))
"""


def test_importing_smear_peft_leaves_peft_as_it_ships_for_other_methods():
    """LoRA's get_peft_model with every task type, save_pretrained and push_to_hub (intercepted) give the same classes
    and byte-identical files before and after `import smear_peft`, in a fresh process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", PEFT_BEHAVIOUR], capture_output=True, text=True, cwd=repo,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"]["uploaded"] and report["before"]["files"]
    assert report["same"], (report["before"], report["after"])


def test_unsupported_peft_versions_get_a_clear_error():
    from smear_peft.registration import SUPPORTED_PEFT, check_peft_version

    check_peft_version(SUPPORTED_PEFT[0])
    with pytest.raises(ImportError, match="pip install 'peft>="):
        check_peft_version("0.20.1")
    with pytest.raises(ImportError, match="supports peft"):
        check_peft_version(SUPPORTED_PEFT[1])

