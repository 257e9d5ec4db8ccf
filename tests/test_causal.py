"""Causal LMs: prompt routing and causal segment routing keep the model causal and generation exact."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

from smear_peft import SmearConfig

VOCAB = 64


def tiny_causal(model_type: str, seed: int = 0):
    configs = {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "llama": lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        ),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64,
        ),
    }
    torch.manual_seed(seed)
    config = configs[model_type]()
    config.pad_token_id = 0
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def smear_causal(model_type: str, routing: str = "smear", **config):
    model = get_peft_model(tiny_causal(model_type), SmearConfig(num_experts=4, reduction_factor=4, routing=routing, **config))
    torch.manual_seed(1)
    with torch.no_grad():  # random adapters and routers, so that routing matters
        for name, param in model.named_parameters():
            if "smear_" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


MODES = [dict(), dict(causal_routing="segment", segment_length=3)]
MODE_IDS = ["prompt", "segment"]
CAUSAL_MODELS = ["gpt2", "llama", "opt"]


def prompt_batch(prompt_len: int = 4, total: int = 10, batch: int = 2):
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (batch, total))
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
def test_a_changed_later_token_never_changes_earlier_logits(model_type, mode):
    model = smear_causal(model_type, **mode)
    ids, labels = prompt_batch()
    first_response = 4
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).logits
        for position in range(first_response, ids.shape[1]):  # every response token (segment mode: any token)
            changed = ids.clone()
            changed[:, position] = (changed[:, position] + 7) % (VOCAB - 3) + 3
            logits = model(input_ids=changed, labels=labels).logits
            torch.testing.assert_close(logits[:, :position], reference[:, :position], rtol=0, atol=1e-6)
            assert (logits[:, position:] - reference[:, position:]).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
def test_segment_routing_is_strictly_causal_from_the_first_token(model_type):
    model = smear_causal(model_type, causal_routing="segment", segment_length=2)
    ids, _ = prompt_batch(total=9)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        for position in range(1, ids.shape[1]):
            changed = ids.clone()
            changed[:, position] = (changed[:, position] + 5) % (VOCAB - 3) + 3
            torch.testing.assert_close(model(input_ids=changed).logits[:, :position], reference[:, :position], rtol=0, atol=1e-6)


def test_segments_route_on_the_previous_segment():
    """Segment routing differs from routing every position on the prompt, and segment 0 uses the learned prior."""
    model = smear_causal("llama", causal_routing="segment", segment_length=3)
    ids, labels = prompt_batch(prompt_len=3, total=9)
    prompt = smear_causal("llama")
    with torch.no_grad():
        segment_logits = model(input_ids=ids).logits
        prompt_logits = prompt(input_ids=ids, labels=labels).logits
        # the same weights: only the routing differs, from the first token on
        assert (segment_logits[:, :3] - prompt_logits[:, :3]).abs().max() > 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
def test_prompt_routing_generate_with_and_without_cache_equals_step_by_step_forwards(model_type, num_beams):
    model = smear_causal(model_type)
    ids, _ = prompt_batch(prompt_len=5, total=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        uncached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        remerged = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), routing_cache=False, **kwargs)
        assert torch.equal(cached, remerged)
        if num_beams == 1:  # greedy: each token is the argmax of a full forward routed on the prompt
            routing_mask = torch.zeros_like(cached, dtype=torch.bool)
            routing_mask[:, :5] = True
            logits = model(input_ids=cached, routing_mask=routing_mask).logits
            assert torch.equal(logits[:, 4:-1].argmax(-1), cached[:, 5:])


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
def test_segment_routing_generate_with_and_without_cache_equals_step_by_step_forwards(model_type):
    model = smear_causal(model_type, causal_routing="segment", segment_length=3)
    ids, _ = prompt_batch(prompt_len=4, total=4)
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        uncached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        logits = model(input_ids=cached).logits
        assert torch.equal(logits[:, 3:-1].argmax(-1), cached[:, 4:])
        beams = model.generate(input_ids=ids, num_beams=2, use_cache=False, **kwargs)
        assert beams.shape == cached.shape
        with pytest.raises(ValueError, match="use_cache=False"):
            model.generate(input_ids=ids, num_beams=2, **kwargs)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_left_padded_generation_equals_each_example_alone(model_type, mode):
    model = smear_causal(model_type, **mode)
    torch.manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (3, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
        for row, prompt in enumerate(prompts):
            alone = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
            assert torch.equal(together[row], alone[0, len(prompt):])


def test_right_padded_training_batch_equals_each_example_alone():
    model = smear_causal("llama")
    ids, labels = prompt_batch(prompt_len=3, total=8)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels[1, 6:] = -100
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        alone = model(input_ids=ids[1:, :6], labels=labels[1:, :6]).logits
    torch.testing.assert_close(together[1, :6], alone[0], rtol=0, atol=1e-5)


def test_prompt_is_the_leading_unsupervised_tokens_or_an_explicit_routing_mask():
    model = smear_causal("gpt2")
    ids, labels = prompt_batch(prompt_len=4)
    routing_mask = torch.zeros_like(ids, dtype=torch.bool)
    routing_mask[:, :4] = True
    later_masked = labels.clone()
    later_masked[:, 8] = -100  # a later unsupervised token (a next user turn) is not part of the routing prompt
    with torch.no_grad():
        by_labels = model(input_ids=ids, labels=labels).logits
        by_mask = model(input_ids=ids, routing_mask=routing_mask).logits
        by_later = model(input_ids=ids, labels=later_masked).logits
    assert torch.equal(by_labels, by_mask)
    assert torch.equal(by_labels, by_later)


def test_calls_without_a_prompt_get_a_clear_error():
    model = smear_causal("llama")
    ids, labels = prompt_batch()
    with pytest.raises(ValueError, match="routing_mask.*segment"):
        model(input_ids=ids)
    supervised = ids.clone()  # the first real token is supervised: no prompt
    with pytest.raises(ValueError, match="no prompt to route on"):
        model(input_ids=ids, labels=supervised)
    not_prefix = torch.zeros_like(ids, dtype=torch.bool)
    not_prefix[:, 5] = True
    with pytest.raises(ValueError, match="prefix"):
        model(input_ids=ids, routing_mask=not_prefix)
    with torch.no_grad():
        past = model(input_ids=ids[:, :4], labels=labels[:, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="generate"):
        model(input_ids=ids[:, 4:5], past_key_values=past)
    assert model.base_model.frames.current() is None


def test_segment_routing_continued_from_a_cache_outside_generate_is_an_error():
    model = smear_causal("llama", causal_routing="segment", segment_length=2)
    ids, _ = prompt_batch()
    with torch.no_grad():
        past = model(input_ids=ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="generate"):
            model(input_ids=ids[:, 4:5], past_key_values=past)


@pytest.mark.parametrize("routing", ["smear", "top_k", "st_gumbel", "reinforce", "tag", "hash", "monolithic", "ensemble"])
def test_every_routing_method_trains_and_generates_on_a_causal_lm(routing):
    model = smear_causal("llama", routing=routing, causal_routing="segment", segment_length=3)
    ids, labels = prompt_batch()
    tags, keys = torch.tensor([1, 3]), torch.tensor([11, 12])  # segment routing hashes explicit keys only
    model.train()
    out = model(input_ids=ids, labels=labels, routing_tags=tags, routing_keys=keys)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "smear_experts" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        cached = model.generate(
            input_ids=ids[:, :4], routing_tags=tags, routing_keys=keys, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        uncached = model.generate(
            input_ids=ids[:, :4], routing_tags=tags, routing_keys=keys, max_new_tokens=4, do_sample=False, pad_token_id=0,
            use_cache=False,
        )
    assert torch.equal(cached, uncached)


def test_hash_routing_of_a_causal_lm_hashes_the_prompt_only():
    model = smear_causal("gpt2", routing="hash")
    ids, labels = prompt_batch(prompt_len=4, total=9)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).logits
        changed = ids.clone()
        changed[:, 6] = (changed[:, 6] + 5) % (VOCAB - 3) + 3
        torch.testing.assert_close(model(input_ids=changed, labels=labels).logits[:, :6], reference[:, :6], rtol=0, atol=1e-6)
        kwargs = dict(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    segments = smear_causal("gpt2", routing="hash", causal_routing="segment", segment_length=2)
    with pytest.raises(ValueError, match="routing_keys"):
        segments(input_ids=ids)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_hash_routing_of_a_left_padded_causal_batch_equals_each_example_alone(model_type):
    model = smear_causal(model_type, routing="hash")
    embed = model.get_input_embeddings()
    torch.manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (7, 4)]
    width = 7
    ids = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
    mask = (ids != 0).long()
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # GPT-2 has absolute positions: count them from the first real token
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    layer = next(m for m in model.modules() if type(m).__name__ == "SmearLayer")
    chosen = []
    decide = layer.smear_routing["default"].decide
    layer.smear_routing["default"].decide = lambda inputs: chosen.append(decide(inputs).index.tolist()) or decide(inputs)
    with torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
        for row, prompt in enumerate(prompts):
            alone = model.generate(input_ids=prompt[None], **kwargs)[0, len(prompt):]
            assert torch.equal(together[row], alone)
        blocks = len(chosen) // 3  # the routing method is shared by the adapter's blocks: one entry per block and call
        # the padded batch's experts are the examples' own, in every block
        assert chosen[:blocks] == [a + b for a, b in zip(chosen[blocks:2 * blocks], chosen[2 * blocks:])]
        assert len({tuple(c) for c in chosen[:blocks]}) > 1
        # Training-style forwards from ids and from embeddings (hashed over the prompt's real positions only).
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]
        for inputs in (dict(input_ids=ids), dict(inputs_embeds=embed(ids))):
            name, value = next(iter(inputs.items()))
            batched = model(**inputs, attention_mask=mask, position_ids=position_ids, labels=labels).logits
            alone = model(**{name: value[1:, 3:]}, labels=labels[1:, 3:]).logits
            torch.testing.assert_close(batched[1, 3:], alone[0], rtol=0, atol=1e-5)


def four_d_mask(mask: torch.Tensor) -> torch.Tensor:
    """The additive [B, 1, S, S] causal mask of a 2-D padding mask (padding rows attend to themselves)."""
    width = mask.shape[1]
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(width, dtype=torch.bool)[None, None]
    return torch.zeros(mask.shape[0], 1, width, width).masked_fill(~allowed, torch.finfo(torch.float32).min)


def test_a_4d_attention_mask_is_an_error_naming_the_fix_unless_routing_does_not_need_it():
    model = smear_causal("llama")
    ids, labels = prompt_batch(prompt_len=5, total=8)
    ids[1, :3] = 0  # left padding
    mask = (ids != 0).long()
    labels[1, :3] = -100
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    prompt = mask.bool() & (labels == -100)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels, position_ids=position_ids).logits
        with pytest.raises(ValueError, match=r"attention_mask is a 4-D tensor of shape \(2, 1, 8, 8\).*2-D padding mask.*routing_mask"):
            model(input_ids=ids, attention_mask=four_d_mask(mask), labels=labels, position_ids=position_ids)
        # routing_mask marks the prompt's real tokens: the 4-D mask is then only the model's business
        marked = model(input_ids=ids, attention_mask=four_d_mask(mask), routing_mask=prompt, position_ids=position_ids).logits
        torch.testing.assert_close(marked[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-6)
        assert (reference[1, 3:] - model(input_ids=ids[1:, 3:], labels=labels[1:, 3:]).logits[0]).abs().max() < 1e-5
        with pytest.raises(ValueError, match=r"Examples \[1\] have no prompt"):  # it must mark every example's prompt
            model(input_ids=ids, attention_mask=four_d_mask(mask), routing_mask=prompt & (torch.arange(2) == 0)[:, None])
        # segments count real tokens: an error (routing_mask cannot help there), unless the routing reads no input
        segments = smear_causal("llama", causal_routing="segment", segment_length=3)
        with pytest.raises(ValueError, match="2-D padding mask") as error:
            segments(input_ids=ids, attention_mask=four_d_mask(mask), position_ids=position_ids)
        assert "routing_mask" not in str(error.value)
        tags = smear_causal("llama", routing="tag", causal_routing="segment", segment_length=3)
        kwargs = dict(input_ids=ids, position_ids=position_ids, routing_tags=[1, 2])
        by_tags = tags(**kwargs, attention_mask=four_d_mask(mask)).logits
        torch.testing.assert_close(by_tags[mask.bool()], tags(**kwargs, attention_mask=mask).logits[mask.bool()], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_generate_with_a_static_cache_routes_as_with_a_dynamic_one_or_names_the_fix(mode):
    model = smear_causal("llama", **mode)
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        # Unpadded prompts: transformers passes 4-D masks to the decoding steps only, which add real tokens.
        dynamic = model.generate(input_ids=ids, **kwargs)
        assert torch.equal(model.generate(input_ids=ids, cache_implementation="static", **kwargs), dynamic)
        # Left-padded prompts: the prefill gets a 4-D mask too, which hides the padding.
        ids[1, :2] = 0
        mask = (ids != 0).long()
        dynamic = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        fix = "routing_mask=attention_mask" if not mode else "dynamic cache"
        with pytest.raises(ValueError, match=fix):
            model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
        if not mode:
            static = model.generate(input_ids=ids, attention_mask=mask, routing_mask=mask, cache_implementation="static", **kwargs)
            assert torch.equal(static, dynamic)
    assert model.base_model.frames.current() is None


def test_causal_routing_on_an_encoder_decoder_is_refused():
    from tests.conftest import tiny_t5

    with pytest.raises(ValueError, match="decoder-only"):
        get_peft_model(tiny_t5(), SmearConfig(causal_routing="prompt"))


def test_causal_lm_presets_need_no_target_modules():
    from smear_peft.architectures import find_preset

    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "whisper"):
        assert find_preset(model_type) is not None, model_type
    model = smear_causal("opt")
    names = [layer.block_name for layer in model.base_model.smear_layers()]
    assert names == [f"model.decoder.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "fc2")]
    assert model.peft_config["default"].causal_routing == "prompt"


def test_generate_with_a_routing_mask_repeats_it_for_beams_and_return_sequences():
    model = smear_causal("llama")
    ids, _ = prompt_batch(prompt_len=6, total=6)
    routing_mask = torch.zeros_like(ids, dtype=torch.bool)
    routing_mask[0, :3] = True  # example 0 routes on its first 3 tokens, example 1 on its first 5
    routing_mask[1, :5] = True
    ones = torch.ones_like(ids)
    for kwargs in (dict(num_beams=2), dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, top_k=1, num_return_sequences=2)):
        kwargs.update(max_new_tokens=4, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            together = model.generate(input_ids=ids, attention_mask=ones, routing_mask=routing_mask, **kwargs)
            per, beams = len(together.sequences) // 2, len(together.scores[0]) // 2
            for row in range(2):
                alone = model.generate(input_ids=ids[row:row + 1], attention_mask=ones[:1],
                                       routing_mask=routing_mask[row:row + 1], **kwargs)
                assert torch.equal(together.sequences[row * per:(row + 1) * per], alone.sequences)
                torch.testing.assert_close(together.scores[0][row * beams:(row + 1) * beams], alone.scores[0], rtol=0, atol=1e-5)
        # and the mask matters: routing example 0 on 5 tokens changes its first scores
        changed = routing_mask.clone()
        changed[0, :5] = True
        with torch.no_grad():
            other = model.generate(input_ids=ids, attention_mask=ones, routing_mask=changed, **kwargs)
        assert not torch.allclose(other.scores[0][:beams], together.scores[0][:beams])


@pytest.mark.parametrize("what", ["routing_tags", "adapter_names"])
def test_generate_takes_exactly_one_tag_or_adapter_name_per_example(what):
    model = smear_causal("llama", routing="tag") if what == "routing_tags" else smear_causal("llama")
    if what == "adapter_names":
        model.add_adapter("other", SmearConfig(num_experts=4, reduction_factor=4))
    ids, _ = prompt_batch(prompt_len=5, total=5)
    values = {"routing_tags": ([3], [0, 1, 2, 3], [0, 1, 2]), "adapter_names": (["other"], ["default", "other"] * 2)}[what]
    for value in values:  # counts that divide the expanded batch (2 examples x beams) used to be spread over it
        for beams in (1, 2, 3):
            with pytest.raises(ValueError, match=f"got {len(value)} {what} for 2 examples"):
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, num_beams=beams,
                               pad_token_id=0, **{what: value})
    assert model.base_model.frames.current() is None


def test_generate_from_inputs_embeds_without_padding_routes_on_the_whole_prompt():
    model = smear_causal("llama")
    ids, _ = prompt_batch(prompt_len=5, total=5)
    embeds = model.get_input_embeddings()(ids)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        by_ids = model.generate(input_ids=ids, **kwargs)
        by_embeds = model.generate(inputs_embeds=embeds, **kwargs)  # transformers drops the mask and the input ids
    assert torch.equal(by_embeds.sequences, by_ids.sequences[:, 5:])
    torch.testing.assert_close(by_embeds.scores[0], by_ids.scores[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_generation_strategies_that_cannot_keep_causal_routing_are_refused(mode):
    model = smear_causal("llama", **mode)
    ids, _ = prompt_batch(prompt_len=6, total=6)
    ones = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=ones, max_new_tokens=3, do_sample=False, pad_token_id=0)
    refused = [(dict(assistant_model=tiny_causal("llama")), "assistant_model")]
    with torch.no_grad(), model.disable_adapter():
        prefix = model(input_ids=ids[:, :4], use_cache=True).past_key_values
    refused.append((dict(past_key_values=prefix), "prefix cache"))
    if mode:  # segment routing
        refused.append((dict(prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"))
        with torch.no_grad():  # chunked prefill is exact for segment routing (each segment routes on the previous)
            chunked = model.generate(**kwargs, prefill_chunk_size=4)
            assert torch.equal(chunked, model.generate(**kwargs))
    else:
        refused.append((dict(prefill_chunk_size=4), "prefill_chunk_size"))
        one = dict(kwargs, input_ids=ids[:1], attention_mask=ones[:1])  # transformers: batch size 1 only
        with torch.no_grad():  # prompt lookup decoding is exact for prompt routing (routing fixed at prefill)
            assert torch.equal(model.generate(**one, prompt_lookup_num_tokens=2), model.generate(**one))
    for extra, message in refused:
        with pytest.raises(ValueError, match=message):
            model.generate(**kwargs, **extra)
    assert model.base_model.frames.current() is None


@pytest.mark.parametrize("mode", [dict(), dict(causal_routing="segment", segment_length=2100)], ids=MODE_IDS)
def test_float16_routing_on_a_long_prompt_stays_finite_and_close_to_float32(mode):
    import copy

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=4400, pad_token_id=0)).eval()
    with torch.no_grad():
        base.transformer.h[0].mlp.c_proj.bias[0] = 40.0  # one large channel: its float16 sum over 2100 positions is inf
    model = get_peft_model(base, SmearConfig(num_experts=4, reduction_factor=4, **mode)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "smear_" in name:
                param.normal_(0.0, 0.3)
    half = copy.deepcopy(model).half()
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 4300))
    labels = ids.clone()
    labels[:, :2100] = -100
    with torch.no_grad():
        wide = model(input_ids=ids, labels=labels).logits
        narrow = half(input_ids=ids, labels=labels).logits
        with half.disable_adapter(), model.disable_adapter():
            base_gap = (half(input_ids=ids).logits.float() - model(input_ids=ids).logits).abs().max()
    assert torch.isfinite(narrow).all()
    # as close to float32 as the base model in float16 is (its own float16 rounding), with routing on top
    assert (narrow.float() - wide).abs().max() < 10 * base_gap + 1e-3


@pytest.mark.parametrize("routing", ["monolithic", "tag"])
def test_routing_that_reads_no_input_needs_no_prompt(routing):
    model = smear_causal("llama", routing=routing)
    ids, _ = prompt_batch()
    tags = dict(routing_tags=[1, 3]) if routing == "tag" else {}
    routing_mask = torch.zeros_like(ids, dtype=torch.bool)
    routing_mask[:, :4] = True
    with torch.no_grad():
        plain = model(input_ids=ids, **tags).logits  # a plain LM call: nothing to route on, nothing needed
        marked = model(input_ids=ids, routing_mask=routing_mask, **tags).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(plain, marked) and not torch.allclose(plain, base)
    with pytest.raises(ValueError, match="routing_mask"):
        smear_causal("llama")(input_ids=ids)  # a routed method still needs its prompt
