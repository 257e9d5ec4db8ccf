"""The causal-LM form of the text benchmark (benchmarks/text_tasks.py, benchmarks/quality.py): data layout only."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality  # noqa: E402
import text_tasks  # noqa: E402


def test_causal_examples_put_labels_on_the_answer_only():
    splits = text_tasks.make_text_splits(seed=0, test_size=3, train_scale=0.01)
    batch = text_tasks.causal_collate(splits["test"], range(len(splits["test"])))
    for row, (source, target) in enumerate(zip(splits["test"].input_ids, splits["test"].labels)):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        prompt = source[:-1] + [text_tasks.SEP]
        assert ids[: len(prompt) + len(target)] == prompt + target
        assert labels[: len(prompt)] == [-100] * len(prompt)  # SMEAR routes on these positions
        assert labels[len(prompt): len(prompt) + len(target)] == target
        assert all(v == -100 for v in labels[len(prompt) + len(target):])
    assert batch["attention_mask"].equal(batch["input_ids"].ne(text_tasks.PAD).long())


def test_causal_prompts_are_left_padded_and_recover_the_answers():
    splits = text_tasks.make_text_splits(seed=0, test_size=4, train_scale=0.01)
    batch = quality._trim(text_tasks.causal_collate(splits["test"], range(len(splits["test"]))), causal=True)
    prompt_ids, mask, answers = quality._causal_prompts(batch)
    assert answers == [list(t) for t in splits["test"].labels]
    for row, source in enumerate(splits["test"].input_ids):
        real = prompt_ids[row][mask[row].bool()].tolist()
        assert real == source[:-1] + [text_tasks.SEP]
        assert mask[row, -1] == 1  # left padding: the prompt ends at the last column


def test_causal_pretraining_documents_are_denoising_pairs():
    batch = text_tasks.causal_lm_batch(random.Random(0), 8)
    reference = text_tasks.denoising_batch(random.Random(0), 8)
    for row in range(8):
        doc = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        source = reference["input_ids"][row][reference["attention_mask"][row].bool()].tolist()[:-1]
        target = [t for t in reference["labels"][row].tolist() if t != -100]
        assert doc == source + [text_tasks.SEP] + target
    assert torch.equal(batch["labels"].ne(-100), batch["attention_mask"].bool())
