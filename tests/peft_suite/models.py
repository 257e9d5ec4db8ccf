"""Tiny transformers models built from configs (nothing is downloaded), standing in for PEFT's Hub test checkpoints."""

from __future__ import annotations

import torch

from .adopt import accept_routing_inputs


def _configs():
    from transformers import BartConfig, GPT2Config, LlamaConfig, T5Config

    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0)
    return {
        "tiny-t5": (
            "AutoModelForSeq2SeqLM",
            T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False, **special),
        ),
        "tiny-bart": (
            "AutoModelForSeq2SeqLM",
            BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None, **special),
        ),
        "tiny-gpt2": (
            "AutoModelForCausalLM",
            GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1),
        ),
        "tiny-llama": (
            "AutoModelForCausalLM",
            LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                        bos_token_id=1),
        ),
    }


class TinyModels:
    """``from_pretrained(model_id)`` of PEFT's tests, for the model ids above: same seed, same weights every call."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, torch_dtype=None, **kwargs):
        import transformers

        auto_name, config = _configs()[model_id]
        torch.manual_seed(0)
        model = getattr(transformers, auto_name).from_config(config)
        dtype = dtype or torch_dtype
        if dtype is not None and dtype != "auto":
            model = model.to(dtype)
        model.config._name_or_path = model_id
        model.name_or_path = model_id
        return accept_routing_inputs(model.eval())
