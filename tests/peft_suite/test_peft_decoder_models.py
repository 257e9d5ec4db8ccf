"""PEFT's ``TestDecoderModels`` (tests/test_decoder_models.py of the installed PEFT's sdist) run on SMEAR configs, on
tiny GPT-2 / Llama models built from configs. Expected failures: `expectations.py`."""

from __future__ import annotations

import pytest

from smear_peft import SmearConfig

from . import upstream
from .adopt import adopt, WithRoutingInputs
from .models import TinyModels

#: PEFT's shared tester runs in CI's slow pass (about 6 minutes on 2 cores).
pytestmark = pytest.mark.slow

tdm = upstream.load("test_decoder_models")

#: Causal LMs route causally. PEFT's tests call the model on bare inputs (no labels marking a prompt), so the rows use
#: segment routing, which needs no prompt; prompt routing has its own tests (tests/test_causal.py).
BASE = {"num_experts": 3, "bottleneck_size": 4, "task_type": "CAUSAL_LM", "causal_routing": "segment", "segment_length": 2}


def _config(config_id: str, **kwargs):
    return pytest.param(SmearConfig, {**BASE, **kwargs}, id=config_id)


#: One row per routing setting, run on every model of MODELS with smear-peft's presets (gpt2, llama).
#: The causal presets train the backbone's layer norms; the rows without them run PEFT's training tests that allow
#: gradients only on adapter parameters.
DECODER_CONFIGS = [
    _config("smear"),
    _config("smear-no-layer-norms", train_layer_norms=False),
    _config("hash", routing="hash", train_layer_norms=False),
]
MODELS = ["tiny-gpt2", "tiny-llama"]


class TestSmearDecoderModels(WithRoutingInputs, tdm.TestDecoderModels):
    transformers_class = TinyModels


adopt(
    TestSmearDecoderModels,
    tdm.TestDecoderModels,
    {"model_id": MODELS, "config_cls,config_kwargs": DECODER_CONFIGS},
    required=["config_cls,config_kwargs"],
)
