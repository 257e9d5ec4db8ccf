"""smear_peft.authors_t5: the authors' T5 fork (decoder-output scaling, block-0 cross-attention bias) on a
transformers-5 T5, checked against computations written out here from the fork's code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from smear_peft import SmearConfig
from smear_peft.authors_t5 import (
    CROSS_ATTENTION_BIAS_KEY,
    apply_authors_backbone,
    checkpoint_tensor,
    save_authors_backbone,
)

from .conftest import tiny_t5


def authors_bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """transformers 3.5's ``T5Attention._relative_position_bucket`` with ``bidirectional=True`` (the fork's
    cross-attention), written out: ``n = -relative``, half the buckets for n < 0, exact below num_buckets // 4."""
    n = -relative_position
    num_buckets //= 2
    ret = (n < 0).long() * num_buckets
    n = n.abs()
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return ret + torch.where(n < max_exact, n, large)


def authors_cross_bias(weight: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """The fork's ``compute_bias(qlen, klen)``: (1, heads, qlen, klen)."""
    relative = torch.arange(key_length)[None, :] - torch.arange(query_length)[:, None]
    return weight[authors_bucket(relative)].permute(2, 0, 1).unsqueeze(0)


def test_bucket_formula_matches_transformers_bidirectional_buckets():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :]
    assert torch.equal(authors_bucket(relative), T5Attention._relative_position_bucket(relative, bidirectional=True))


def test_logits_are_the_decoder_output_scaled_by_d_model_before_the_untied_head(t5_batch):
    plain, authors = tiny_t5(), tiny_t5()
    assert not plain.config.scale_decoder_outputs  # transformers 5 with tie_word_embeddings=False: no scaling
    assert apply_authors_backbone(authors) == "initialised"
    with torch.no_grad():
        authors.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight.zero_()  # isolate (a)
        expected = plain(**t5_batch).logits * 32**-0.5  # the head is linear without bias
        torch.testing.assert_close(authors(**t5_batch).logits, expected, rtol=1e-5, atol=1e-6)
        hidden = plain(**t5_batch, output_hidden_states=True).decoder_hidden_states[-1]
        torch.testing.assert_close(expected, hidden * 32**-0.5 @ plain.lm_head.weight.T, rtol=1e-5, atol=1e-6)


def test_every_decoder_cross_attention_adds_block_zeros_bidirectional_bias(t5_batch):
    model = tiny_t5()
    apply_authors_backbone(model, generator=torch.Generator().manual_seed(3))
    weight = model.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight
    assert weight.shape == (32, 4) and not weight.requires_grad
    seen = []

    def capture(module, args, kwargs, output):
        seen.append((args[0] if args else kwargs["hidden_states"], kwargs, output[0]))

    hooks = [block.layer[1].EncDecAttention.register_forward_hook(capture, with_kwargs=True)
             for block in model.decoder.block]
    with torch.no_grad():
        model(**t5_batch)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 2  # both decoder layers
    query_length, key_length = t5_batch["labels"].shape[1], t5_batch["input_ids"].shape[1]
    bias = authors_cross_bias(weight.detach(), query_length, key_length)
    padding = (1.0 - t5_batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for block, (hidden, kwargs, output) in zip(model.decoder.block, seen):
        attention = block.layer[1].EncDecAttention
        encoder = kwargs["key_value_states"]

        def heads(x):
            return x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)

        q, k, v = heads(attention.q(hidden)), heads(attention.k(encoder)), heads(attention.v(encoder))
        scores = q @ k.transpose(-1, -2) + bias + padding  # T5: no 1/sqrt(d) scaling
        expected = attention.o((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(hidden.shape[0], -1, 32))
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    plain = tiny_t5()
    with torch.no_grad():
        assert not torch.allclose(plain(**t5_batch).logits * 32**-0.5, model(**t5_batch).logits, atol=1e-3)


def test_cached_generation_gives_the_queries_their_decoder_positions(t5_batch):
    """Incremental decoding computes the bias for one query at a time: with the right position it matches
    decoding without a cache, which recomputes every position."""
    model = tiny_t5()
    apply_authors_backbone(model, generator=torch.Generator().manual_seed(4))
    inputs = {k: t5_batch[k] for k in ("input_ids", "attention_mask")}
    options = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, use_cache=True, **options)
    uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("file_name", ["model.safetensors", "pytorch_model.bin"])
def test_bias_comes_from_the_checkpoint_when_it_holds_the_key(tmp_path, file_name):
    source = tiny_t5()
    source.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state[CROSS_ATTENTION_BIAS_KEY] = torch.arange(128.0).view(32, 4)
    if file_name.endswith(".safetensors"):
        state.pop("decoder.embed_tokens.weight"), state.pop("encoder.embed_tokens.weight")  # shared tensors
        save_file(state, tmp_path / file_name, metadata={"format": "pt"})
    else:
        torch.save(state, tmp_path / file_name)
    assert torch.equal(checkpoint_tensor(str(tmp_path)), state[CROSS_ATTENTION_BIAS_KEY])
    model = type(source).from_pretrained(tmp_path)  # transformers 5 ignores the key ...
    assert apply_authors_backbone(model, str(tmp_path)) == "checkpoint"  # ... we load it
    weight = model.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight
    assert torch.equal(weight, state[CROSS_ATTENTION_BIAS_KEY]) and not weight.requires_grad


def test_bias_is_frozen_and_reloads_with_the_adapter(tmp_path, t5_batch):
    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, reduction_factor=4))
    # applied after get_peft_model: the cross-attention is wrapped by a SMEAR block by then
    apply_authors_backbone(model, generator=torch.Generator().manual_seed(5))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("relative_attention_bias" in n for n in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.eval()
    with torch.no_grad():
        expected = model(**t5_batch).logits
    model.save_pretrained(tmp_path)
    save_authors_backbone(model, str(tmp_path))

    def reload(**options):
        base = tiny_t5()
        source = apply_authors_backbone(base, generator=torch.Generator().manual_seed(99), **options)
        loaded = PeftModel.from_pretrained(base, tmp_path).eval()
        with torch.no_grad():
            return source, loaded(**t5_batch).logits

    source, logits = reload(weights_dir=str(tmp_path))
    assert source == "weights_dir"
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert not torch.allclose(reload()[1], expected, atol=1e-4)  # a fresh draw of the bias is another model
