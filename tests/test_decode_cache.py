"""The decode-time cache: within one `generate` call, decoder routing blocks route and merge (or gather) once.

Decoder routing depends only on the encoder's output, so `SmearModel.generate` keeps each decoder block's routing
decision and merged / gathered expert for the whole call (``GenerationSession.blocks``, one session per ``generate``
call). These tests check that it changes no output (greedy and beam search; SMEAR, top-k and tag routing), that it is
invalidated for new inputs, and that the merge runs once per decoder block per call. Generation without the cache runs
the same ``generate`` with a session whose ``blocks`` never keep anything, so every decoding step routes and merges
again.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from peft import get_peft_model

from smear_peft import SmearConfig
from smear_peft.experts import Experts
from smear_peft.frames import GenerationSession

from .conftest import tiny_t5

TAGS = [2, 0, 3]


def routed_t5(routing: str):
    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=4, reduction_factor=4, routing=routing)).eval()
    torch.manual_seed(7)
    with torch.no_grad():  # move adapters and routers away from their near-uniform init
        for name, param in model.named_parameters():
            if "smear_" in name:
                param.normal_(0, 0.5)
    return model


def routing_kwargs(routing: str, batch: int = 3) -> dict:
    return {"routing_tags": TAGS[:batch]} if routing == "tag" else {}


def generate_with_cache(model, **kwargs):
    return model.generate(**kwargs)


class ForgetfulBlocks(dict):
    """A session's ``blocks`` that never keep an entry: every decoding step routes (and merges) again."""

    def __setitem__(self, key, value):
        pass

    def __contains__(self, key):
        return False


class UncachedSession(GenerationSession):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks = ForgetfulBlocks()


def generate_without_cache(model, **kwargs):
    with mock.patch("smear_peft.model.GenerationSession", UncachedSession):
        return model.generate(**kwargs)


def inputs_of(batch, rows=slice(None)):
    return {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}


DECODING = {
    "greedy": dict(max_new_tokens=5, do_sample=False),
    "beam": dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, early_stopping=True),
}


@pytest.mark.parametrize("decoding", sorted(DECODING))
@pytest.mark.parametrize("routing", ["smear", "top_k", "tag"])
def test_outputs_are_the_same_with_and_without_the_cache(t5_batch, routing, decoding):
    model = routed_t5(routing)
    kwargs = {**inputs_of(t5_batch), **DECODING[decoding], "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        cached = generate_with_cache(model, **kwargs, **routing_kwargs(routing))
        uncached = generate_without_cache(model, **kwargs, **routing_kwargs(routing))
    assert model.base_model.frames.current() is None  # the cache lives for one generate call only
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without_cache in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(with_cache, without_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["smear", "top_k", "tag"])
def test_cache_is_invalidated_for_new_inputs(t5_batch, routing):
    model = routed_t5(routing)
    first, second = inputs_of(t5_batch, slice(0, 2)), inputs_of(t5_batch, slice(1, 3))
    first_tags = {"routing_tags": TAGS[0:2]} if routing == "tag" else {}
    second_tags = {"routing_tags": TAGS[1:3]} if routing == "tag" else {}
    options = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        fresh_second = routed_t5(routing).generate(**second, **options, **second_tags)
        model.generate(**first, **options, **first_tags)
        after_first = model.generate(**second, **options, **second_tags)
        # inside one session too: the cache never outlives the encoder states it was computed from
        session = GenerationSession()
        with model.base_model.frames.scope(session=session):
            with model.base_model.routing_inputs(first_tags.get("routing_tags")):
                model.base_model.model.generate(**first, max_new_tokens=3)
            first_entries = dict(session.blocks)
            with model.base_model.routing_inputs(second_tags.get("routing_tags")):
                in_same_cache = model.base_model.model.generate(**second, **options)
        assert len(first_entries) == 6  # every decoder block kept its routing for the first inputs
        assert len(session.blocks) == 6 and all(session.blocks[k] is not first_entries[k] for k in first_entries)
    assert model.base_model.frames.current() is None
    for result in (after_first, in_same_cache):
        assert torch.equal(result.sequences, fresh_second.sequences)
        for got, expected in zip(result.scores, fresh_second.scores):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def count_merges(model, generate, **kwargs):
    with mock.patch.object(Experts, "merged", autospec=True, side_effect=Experts.merged) as merged, torch.no_grad():
        generate(model, **kwargs)
    decoder_experts = {id(layer.smear_experts["default"]) for layer in model.base_model.smear_layers() if layer.side == "decoder"}
    calls = [call.args[0] for call in merged.call_args_list]
    return sum(id(e) in decoder_experts for e in calls), len(calls) - sum(id(e) in decoder_experts for e in calls)


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_merge_runs_once_per_decoder_block_per_generate_call(t5_batch, decoding):
    model = routed_t5("smear")
    layers = list(model.base_model.smear_layers())
    decoder_blocks = sum(layer.side == "decoder" for layer in layers)
    encoder_blocks = sum(layer.side == "encoder" for layer in layers)
    assert decoder_blocks == 6 and encoder_blocks == 4  # tiny T5: 2 decoder layers x 3, 2 encoder layers x 2
    steps = DECODING[decoding]["max_new_tokens"]
    kwargs = {**inputs_of(t5_batch), **DECODING[decoding], "min_new_tokens": steps}
    decoder_merges, encoder_merges = count_merges(model, generate_with_cache, **kwargs)
    assert decoder_merges == decoder_blocks
    assert encoder_merges == encoder_blocks
    decoder_merges, encoder_merges = count_merges(model, generate_with_cache, **kwargs)
    assert decoder_merges == decoder_blocks  # a second call merges again, once
    # without the cache every decoding step merges again
    decoder_merges, encoder_merges = count_merges(model, generate_without_cache, **kwargs)
    assert decoder_merges == decoder_blocks * steps
    assert encoder_merges == encoder_blocks
