"""THE list of PEFT tests that are expected to fail on SMEAR, each with its reason. Nothing else is skipped.

* `NOT_APPLICABLE`: PEFT tests whose premise routed adapters don't meet (by design). They are reported as
  ``xfail(strict=True)`` with the exception they must raise, or as ``skip`` where the outcome is not deterministic.
* `KNOWN_BUGS`: real smear-peft bugs, reported as ``xfail(strict=True)``: once a bug is fixed its tests XPASS, which
  fails the run, and its entry must be deleted here.

Each entry names PEFT test functions (the same names in ``test_custom_models.py``, ``test_encoder_decoder_models.py``
and ``test_decoder_models.py``) and optionally a condition on the test's parameters (``config_kwargs``, ``model_id``,
``dtype``, ...). The first matching entry applies, known bugs before not-applicable entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch


@dataclass(frozen=True)
class Expectation:
    title: str
    reason: str
    tests: frozenset[str]
    when: Callable[[dict], bool] = lambda params: True
    raises: Optional[type | tuple[type, ...]] = None
    skip: bool = False
    category: str = field(default="peft_not_applicable")

    def marker(self):
        label = "not applicable" if self.category == "peft_not_applicable" else "known bug"
        text = f"{label}: {self.title}: {self.reason}"
        if self.skip:
            return pytest.mark.skip(reason=text)
        return pytest.mark.xfail(strict=True, raises=self.raises, reason=text)


def _kwargs(params: dict) -> dict:
    return params.get("config_kwargs") or {}


def _routing(params: dict) -> str:
    return _kwargs(params).get("routing", "smear")


LEARNED_ROUTERS = {"smear", "top_k", "st_gumbel", "reinforce", "ensemble"}
HALF = (torch.float16, torch.bfloat16)
#: Models whose targets have one output channel: a LayerNorm over one channel outputs its bias (0 at init).
ONE_CHANNEL_MODELS = {"EmbConv1D", "Conv1d"}

MERGE_TESTS = frozenset(
    {
        "test_merge_layers",
        "test_merge_layers_fp16",
        "test_merge_layers_nan",
        "test_merge_layers_multi",
        "test_merge_layers_is_idempotent",
        "test_merge_layers_is_deterministic_in_train_mode",
        "test_safe_merge",
        "test_disable_adapters_with_merging",
        "test_delete_merged_adapter_raises_without_mutation",
        "test_delete_merged_adapter_only_rejects_the_merged_one",
        # these run the model in half precision first (which must work), then merge
        "test_forward_float16",
        "test_forward_bfloat16",
        "test_forward_float16_no_autocast",
        "test_forward_bfloat16_no_autocast",
    }
)

NOT_APPLICABLE = [
    Expectation(
        "merging",
        "routing is input-dependent (every example gets its own mixture of experts), so there is no single weight "
        "update to merge; SmearModel raises NotImplementedError with that explanation",
        MERGE_TESTS,
        raises=NotImplementedError,
    ),
    Expectation(
        "identity at init",
        "the authors' initialisation (N(0, 0.01) experts followed by a LayerNorm on the expert output) is not an "
        "identity at init, so the test's precondition 'adapter output == base output before training' fails",
        frozenset({"test_disable_adapters"}),
        when=lambda p: p.get("model_id") not in ONE_CHANNEL_MODELS,
        raises=AssertionError,
    ),
    Expectation(
        "router gradients",
        "the router's weight-LayerNorm bias adds the same vector to every expert's weights, i.e. the same logit to "
        "every expert, which the softmax ignores: its gradient is zero up to rounding, so whether it moves past the "
        "test's tolerance is not deterministic (and with MHA's lr=1e-3 the router's input LayerNorm, whose gradient "
        "scales with the 0.01-std router weights, moves less than the tolerance); REINFORCE routers learn only from "
        "the auxiliary loss (SmearModel.reinforce_loss), which PEFT's loop doesn't add",
        frozenset({"test_only_params_are_updated"}),
        when=lambda p: _routing(p) in LEARNED_ROUTERS,
        skip=True,
    ),
    Expectation(
        "tag routing without tags",
        "tag routing needs routing_tags on every call (SmearModel raises a ValueError saying so); this test builds its "
        "own inputs, so it cannot pass them",
        frozenset({"test_generate_half_prec"}),
        when=lambda p: _routing(p) == "tag",
        raises=ValueError,
    ),
    Expectation(
        "hash routing without keys under segment routing",
        "a causal LM with causal_routing='segment' has no prompt whose ids could be hashed without reading later "
        "tokens, so hash routing needs routing_keys on every call (SmearModel raises a ValueError saying so); these "
        "generate tests build their own inputs, so they cannot pass them",
        frozenset({"test_generate_half_prec", "test_generate_pos_args"}),
        when=lambda p: _routing(p) == "hash" and _kwargs(p).get("causal_routing") == "segment",
        raises=ValueError,
    ),
    Expectation(
        "feedforward_modules read as 'this is IA3'",
        "the test passes feedforward_modules=['lin0'] to every config class that has the field (it means IA3 there); "
        "SmearConfig has it for expert_type='ia3' only and refuses it otherwise with a ValueError (the IA3-expert row "
        "of the config matrix runs these tests, and tests/test_peft_api.py checks mixed modules_to_save for adapters)",
        frozenset({"test_multiple_adapters_mixed_modules_to_save", "test_multiple_adapters_mixed_modules_to_save_order_switched"}),
        when=lambda p: p.get("config_cls") is not None and getattr(p["config_cls"], "expert_type", "adapter") != "ia3",
        raises=ValueError,
    ),
    Expectation(
        "Hub checkpoint",
        "the test hard-codes a Hub checkpoint (PEFT_ENCODER_DECODER_MODELS_TO_TEST[0]) and checks prompt learning's "
        "inputs_embeds path; CI downloads nothing",
        frozenset({"test_prompt_learning_forward_with_inputs_embeds"}),
        skip=True,
    ),
    Expectation(
        "REINFORCE with reentrant checkpointing",
        "REINFORCE trains its router from terms recorded in the forward pass, which reentrant checkpointing runs "
        "without gradients: SmearModel raises a RuntimeError naming use_reentrant=False (the non-reentrant case "
        "runs, and tests/test_frames.py checks its gradients equal those without checkpointing)",
        frozenset({"test_training_encoder_decoders_gradient_checkpointing", "test_training_decoders_gradient_checkpointing"}),
        when=lambda p: _routing(p) == "reinforce" and p.get("use_reentrant") is True,
        raises=RuntimeError,
    ),
    Expectation(
        "trained layer norms",
        "with train_layer_norms=True (the authors' T5 recipe, the presets' default) the backbone's layer norms are "
        "trained through modules_to_save; these tests allow gradients only on parameters with the adapter prefix "
        "(the matrix's train_layer_norms=False rows run them and pass)",
        frozenset(
            {
                "test_training_encoder_decoders_layer_indexing",
                "test_training_encoder_decoders_gradient_checkpointing",
                "test_training_decoders_layer_indexing",
                "test_training_decoders_gradient_checkpointing",
            }
        ),
        when=lambda p: _kwargs(p).get("train_layer_norms", True) is not False,
        raises=AssertionError,
    ),
    Expectation(
        "hash routing without input ids",
        "hash routing hashes each example's input_ids unless routing_keys are given; a call with only inputs_embeds "
        "has nothing to hash, and SmearModel raises a ValueError saying to pass routing_keys",
        frozenset({"test_passing_input_embeds_works"}),
        when=lambda p: _routing(p) == "hash",
        raises=ValueError,
    ),
    Expectation(
        "Hub tokenizer",
        "the test loads AutoTokenizer.from_pretrained(model_id) from the Hub (a prompt-learning training test); CI "
        "downloads nothing",
        frozenset({"test_prompt_learning_with_gradient_checkpointing"}),
        skip=True,
    ),
    Expectation(
        "REINFORCE router",
        "REINFORCE routers (and their baselines) get gradients only from the auxiliary policy loss "
        "(SmearModel.reinforce_loss), which PEFT's generic training step doesn't add, so their .grad stays None",
        frozenset(
            {
                "test_training_custom_models",
                "test_training_encoder_decoders",
                "test_training_decoders",
                "test_training_encoder_decoders_layer_indexing",
                "test_training_decoders_layer_indexing",
                "test_training_encoder_decoders_gradient_checkpointing",
                "test_training_decoders_gradient_checkpointing",
            }
        ),
        when=lambda p: _routing(p) == "reinforce",
        raises=AssertionError,
    ),
]

#: Open smear-peft bugs found by PEFT's suite: none. (The round-2 list — REINFORCE on a bare-tensor output, REINFORCE
#: under non-reentrant checkpointing — was fixed; its other entries were cases of the not-applicable reasons above.)
KNOWN_BUGS: list[Expectation] = []


def classify(test_name: str, params: dict) -> Optional[Expectation]:
    """The expectation of PEFT test ``test_name`` with these parameters (``None``: it must pass)."""
    for expectation in (*KNOWN_BUGS, *NOT_APPLICABLE):  # an open bug overrides a case's usual expectation
        if test_name in expectation.tests and expectation.when(params):
            return expectation
    return None
