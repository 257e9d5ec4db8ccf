"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import smear_peft  # noqa: E402,F401  (registers the SMEAR PEFT type)


def tiny_t5_config(**overrides):
    from transformers import T5Config

    values = dict(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return T5Config(**values)


def tiny_t5(seed: int = 0, **overrides):
    """A 2+2-layer T5-v1.1-shaped model with deterministic random weights."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(**overrides)).eval()


@pytest.fixture
def t5_batch():
    """Three examples of different lengths, right-padded, with labels."""
    torch.manual_seed(1)
    input_ids = torch.randint(2, 64, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    attention_mask[2, 3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(2, 64, (3, 4))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
