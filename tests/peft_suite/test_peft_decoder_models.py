"""PEFT's ``TestDecoderModels`` (tests/test_decoder_models.py of the installed PEFT's sdist) run on SMEAR configs, on
tiny GPT-2 / Llama models built from configs. Expected failures: `expectations.py`."""

from __future__ import annotations

import pytest

from smear_peft import SmearConfig

from . import upstream
from .adopt import adopt
from .models import TinyModels

tdm = upstream.load("test_decoder_models")

BASE = {"num_experts": 3, "bottleneck_size": 4, "task_type": "CAUSAL_LM"}
#: Explicit targets until smear-peft has presets for decoder-only models (then drop them from the rows below).
TARGETS = {"tiny-gpt2": ["attn.c_proj", "mlp.c_proj"], "tiny-llama": ["o_proj", "down_proj"]}


def _config(config_id: str, **kwargs):
    return pytest.param(SmearConfig, {**BASE, **kwargs}, id=config_id)


#: One row per routing setting. Rows are run on every model of MODELS; `target_modules` comes from TARGETS.
#: Causal routing rows go here, e.g. ``_config("smear-causal-prompt", causal_routing="prompt")``.
DECODER_CONFIGS = [
    _config("smear"),
    _config("hash", routing="hash"),
]
MODELS = ["tiny-gpt2", "tiny-llama"]


class TestSmearDecoderModels(tdm.TestDecoderModels):
    transformers_class = TinyModels
    routing_inputs: dict = {}

    def prepare_inputs_for_testing(self):
        return {**super().prepare_inputs_for_testing(), **self.routing_inputs}


def _with_targets(fn):
    def test(self, *args, **kwargs):
        if "config_kwargs" in kwargs and "model_id" in kwargs and "target_modules" not in kwargs["config_kwargs"]:
            kwargs["config_kwargs"] = {**kwargs["config_kwargs"], "target_modules": TARGETS[kwargs["model_id"]]}
        return fn(self, *args, **kwargs)

    return test


adopt(
    TestSmearDecoderModels,
    tdm.TestDecoderModels,
    {"model_id": MODELS, "config_cls,config_kwargs": DECODER_CONFIGS},
    required=["config_cls,config_kwargs"],
    transform=_with_targets,
)
