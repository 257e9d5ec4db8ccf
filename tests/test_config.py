"""SmearConfig: the paper's defaults, validation errors that name the fix, and JSON round trips."""

from __future__ import annotations

import pytest
from peft import PeftConfig

from smear_peft import ROUTING_METHODS, SmearConfig


def test_defaults_are_the_authors():
    config = SmearConfig()
    assert config.peft_type == "SMEAR"
    assert (config.num_experts, config.routing, config.reduction_factor, config.activation) == (8, "smear", 32, "swish")
    assert (config.expert_init_std, config.router_init_scale) == (0.01, 0.01)
    assert config.sublayers == ["self_attention", "cross_attention", "feed_forward"]
    assert config.train_layer_norms and config.pooling == "masked_mean"
    assert (config.gumbel_temperature, config.gumbel_min_temperature) == (10.0, 0.5)
    assert (config.reinforce_policy_weight, config.reinforce_entropy_weight, config.reinforce_value_weight) == (1e-2, 5e-4, 1e-2)


def test_every_routing_name_of_the_paper_is_accepted():
    assert set(ROUTING_METHODS) == {"smear", "top_k", "st_gumbel", "reinforce", "tag", "hash", "monolithic", "ensemble"}
    for name in ROUTING_METHODS:
        assert SmearConfig(routing=name).routing == name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(routing="soft"), "choose one of smear, "),
        (dict(num_experts=0), r"num_experts: must be an integer >= 1, got 0"),
        (dict(num_experts=True), r"num_experts: must be an integer >= 1, got True"),
        (dict(reduction_factor=None), r"reduction_factor: must be an integer >= 1, got None"),
        (dict(reduction_factor=2.5), r"reduction_factor: must be an integer >= 1, got 2.5"),
        (dict(bottleneck_size="16"), r"bottleneck_size: must be an integer >= 1 or None, got '16'"),
        (dict(top_k=None), r"top_k: must be an integer >= 1, got None"),
        (dict(gumbel_anneal_every=0.5), r"gumbel_anneal_every: must be an integer >= 1"),
        (dict(routing="tag", num_tags="3"), r"num_tags: must be an integer >= 1 or None, got '3'"),
        (dict(r=0), r"SmearConfig.r: must be an integer >= 1, got 0"),
        (dict(expert_dropout=1.0), r"\[0, 1\)"),
        (dict(reduction_factor=0), ">= 1"),
        (dict(activation="tanhh"), "choose one of swish"),
        (dict(pooling="max"), "'masked_mean' or 'mean'"),
        (dict(sublayers=["attention"]), "subset of"),
        (dict(top_k=9), "between 1 and num_experts=8"),
        (dict(gumbel_min_temperature=20.0), "gumbel_min_temperature <= gumbel_temperature"),
        (dict(routing="tag", num_tags=9), "num_experts >= 9 or a tag_to_expert mapping"),
        (dict(routing="tag", tag_to_expert={0: 8}), "out of range for 8 experts"),
        (dict(routing="tag", tag_to_expert={"mnli": 0}), "string tags need SmearConfig\\(tag_names"),
        (dict(tag_names=["a", "a"]), "unique"),
    ],
)
def test_bad_values_raise_errors_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmearConfig(**kwargs)


def test_tag_plus_mapping_per_side():
    tasks = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
    config = SmearConfig(routing="tag", tag_names=tasks, tag_to_expert={"encoder": {"rte": "mnli"}})
    assert config.tag_expert_table("encoder") == [0, 1, 2, 3, 4, 5, 6, 5]
    assert config.tag_expert_table("decoder") == list(range(8))
    assert config.tag_index("qnli") == 6


def test_save_and_load_round_trip(tmp_path):
    config = SmearConfig(
        routing="tag", num_experts=4, num_tags=6, tag_to_expert={"encoder": {4: 0, 5: 1}, "decoder": {4: 2, 5: 3}}, expert_dropout=0.1
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is SmearConfig
    assert loaded.tag_to_expert == {"encoder": {4: 0, 5: 1}, "decoder": {4: 2, 5: 3}}
    assert loaded.tag_expert_table("decoder") == [0, 1, 2, 3, 2, 3]
    assert loaded.expert_dropout == 0.1 and loaded.num_tags == 6
