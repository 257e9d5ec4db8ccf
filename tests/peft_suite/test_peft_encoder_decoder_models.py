"""PEFT's ``TestEncoderDecoderModels`` (tests/test_encoder_decoder_models.py of the installed PEFT's sdist) run on
SMEAR configs with the T5 and BART presets, on tiny models built from configs. Expected failures: `expectations.py`."""

from __future__ import annotations

import pytest

from smear_peft import SmearConfig

from . import upstream
from .adopt import adopt, WithRoutingInputs
from .models import TinyModels

#: PEFT's shared tester runs in CI's slow pass (about 6 minutes on 2 cores).
pytestmark = pytest.mark.slow

ted = upstream.load("test_encoder_decoder_models")

BASE = {"num_experts": 3, "bottleneck_size": 4, "task_type": "SEQ_2_SEQ_LM"}


def _config(config_id: str, **kwargs):
    return pytest.param(SmearConfig, {**BASE, **kwargs}, id=config_id)


#: (config_cls, config_kwargs) rows; the preset picks target_modules and trains the backbone's layer norms.
ENCODER_DECODER_CONFIGS = [
    _config("smear"),
    _config("smear-no-layer-norms", train_layer_norms=False),
    _config("smear-ffn-only-no-post-norm", sublayers=["feed_forward"], post_norm=False, expert_dropout=0.1),
    _config("top_k", routing="top_k"),
    _config("reinforce", routing="reinforce"),
    # tag / hash: without trained layer norms, so the gradient-checkpointing rows isolate the known bug
    _config("tag", routing="tag", train_layer_norms=False),
    _config("hash", routing="hash", train_layer_norms=False),
    _config("ensemble", routing="ensemble"),
]
# st_gumbel and monolithic run on the custom models only (their layer code is shared with top_k / smear); the
# encoder-decoder rows cover what differs: decoder routing from the encoder, tags/keys, generate, presets.
MODELS = ["tiny-t5", "tiny-bart"]
#: BART runs the preset's main rows only (the routing methods are architecture-independent; keeps CI fast).
BART_CONFIGS = {"smear", "tag"}


_CONFIG_IDS = {id(p.values[1]): p.id for p in ENCODER_DECODER_CONFIGS}


def select(params: dict) -> bool:
    """Matrix filter, applied by conftest (reported as deselected)."""
    return params.get("model_id") != "tiny-bart" or _CONFIG_IDS.get(id(params.get("config_kwargs"))) in BART_CONFIGS


class TestSmearEncoderDecoderModels(WithRoutingInputs, ted.TestEncoderDecoderModels):
    transformers_class = TinyModels


adopt(
    TestSmearEncoderDecoderModels,
    ted.TestEncoderDecoderModels,
    {"model_id": MODELS, "config_cls,config_kwargs": ENCODER_DECODER_CONFIGS},
    required=["config_cls,config_kwargs"],
)
