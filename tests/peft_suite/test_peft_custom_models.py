"""PEFT's ``TestPeftCustomModel`` (tests/test_custom_models.py of the installed PEFT's sdist) run on SMEAR configs.

The test bodies and the tiny models (MLP, Conv1d/2d/3d, transformers' Conv1D, MultiheadAttention, ...) are PEFT's;
only the matrix of configs is ours. Expected failures are listed in `expectations.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from smear_peft import SmearConfig

from . import upstream
from .adopt import accept_routing_inputs, adopt, WithRoutingInputs

#: PEFT's shared tester runs in CI's slow pass (about 6 minutes on 2 cores).
pytestmark = pytest.mark.slow

tcm = upstream.load("test_custom_models")

#: Small blocks everywhere: 3 experts with a bottleneck of 4.
BASE = {"num_experts": 3, "bottleneck_size": 4}


def _case(name: str, model_id: str, **kwargs):
    return pytest.param(name, model_id, SmearConfig, {**BASE, **kwargs}, id=name.replace(" ", "_"))


#: (test_name, model_id, config_cls, config_kwargs), as PEFT's TEST_CASES.
CUSTOM_CASES = [
    # every routing method on the MLP
    _case("MLP smear", "MLP", target_modules=["lin0"]),
    _case("MLP top_k", "MLP", target_modules=["lin0"], routing="top_k"),
    _case("MLP top_k k=2", "MLP", target_modules=["lin0"], routing="top_k", top_k=2),
    _case("MLP st_gumbel", "MLP", target_modules=["lin0"], routing="st_gumbel"),
    _case("MLP reinforce", "MLP", target_modules=["lin0"], routing="reinforce"),
    _case("MLP tag", "MLP", target_modules=["lin0"], routing="tag"),
    _case("MLP tag_plus", "MLP", target_modules=["lin0"], routing="tag", num_tags=2, tag_to_expert={1: 0}),
    _case("MLP hash", "MLP", target_modules=["lin0"], routing="hash"),
    _case("MLP monolithic", "MLP", target_modules=["lin0"], routing="monolithic"),
    _case("MLP monolithic params", "MLP", target_modules=["lin0"], routing="monolithic", monolithic_params="params"),
    _case("MLP ensemble", "MLP", target_modules=["lin0"], routing="ensemble"),
    # options
    _case("MLP smear two targets", "MLP", target_modules=["lin0", "lin1"]),
    _case("MLP smear regex", "MLP", target_modules="lin[01]"),
    _case("MLP smear expert_dropout", "MLP", target_modules=["lin0"], expert_dropout=0.1),
    _case("MLP top_k expert_dropout", "MLP", target_modules=["lin0"], routing="top_k", expert_dropout=0.1),
    _case("MLP ensemble expert_dropout", "MLP", target_modules=["lin0"], routing="ensemble", expert_dropout=0.1),
    _case("MLP smear modules_to_save", "MLP", target_modules=["lin0"], modules_to_save=["lin1"]),
    _case("MLP smear no post_norm", "MLP", target_modules=["lin0"], post_norm=False),
    _case("MLP smear batch_norm input", "MLP", target_modules=["lin0"], input_norm="batch_norm"),
    _case("MLP smear relu", "MLP", target_modules=["lin0"], activation="relu", reduction_factor=4, bottleneck_size=None),
    _case("MLP2 smear", "MLP2", target_modules=["lin0", "lin1"]),
    _case("MLP_LayerNorm smear modules_to_save", "MLP_LayerNorm", target_modules=["lin0"], modules_to_save=["layernorm0"]),
    # other layer types (PEFT's MockTransformerWrapper models)
    _case("EmbConv1D smear", "EmbConv1D", target_modules=["conv1d"]),
    _case("Conv1d smear", "Conv1d", target_modules=["conv1d"]),
    _case("Conv1dBigger smear", "Conv1dBigger", target_modules=["conv1d"]),
    _case("Conv2d smear", "Conv2d", target_modules=["conv2d"]),
    _case("Conv2d1x1 top_k", "Conv2d1x1", target_modules=["conv2d"], routing="top_k"),
    _case("Conv2d2 smear", "Conv2d2", target_modules=["conv2d", "lin0"]),
    _case("Conv2d smear batch_norm input", "Conv2d", target_modules=["conv2d"], input_norm="batch_norm"),
    _case("Conv3d smear", "Conv3d", target_modules=["conv3d"]),
    _case("MHA smear", "MHA", target_modules=["mha"]),
    _case("MHA ensemble", "MHA", target_modules=["mha"], routing="ensemble"),
]


@dataclass
class SmearIA3Config(SmearConfig):
    """SmearConfig with (IA)3 experts unless told otherwise: PEFT's tests parametrised by the config class alone build
    the configs themselves, so the expert type rides on the class."""

    expert_type: str = "ia3"


class SmearMockTransformerWrapper:
    """PEFT's MockTransformerWrapper, with models that accept the routing inputs."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        return accept_routing_inputs(tcm.MockTransformerWrapper.from_pretrained(model_id, dtype=dtype))


class TestSmearCustomModels(WithRoutingInputs, tcm.TestPeftCustomModel):
    transformers_class = SmearMockTransformerWrapper


# Tests parametrised only by the config class (multiple adapters, set_adapter, requires_grad) take SmearConfig().
adopt(
    TestSmearCustomModels,
    tcm.TestPeftCustomModel,
    {
        "test_name,model_id,config_cls,config_kwargs": CUSTOM_CASES,
        "config_cls": [pytest.param(SmearConfig, id="SmearConfig"), pytest.param(SmearIA3Config, id="SmearIA3Config")],
    },
    required=["test_name,model_id,config_cls,config_kwargs", "config_cls"],
)
