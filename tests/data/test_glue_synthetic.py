"""Tests of the offline GLUE-format generator (smear_peft.data.glue_synthetic)."""

from __future__ import annotations

import datasets
import pytest

from smear_peft.data.glue import GLUE_TASKS
from smear_peft.data.glue_synthetic import synthetic_glue, synthetic_glue_task

# Columns and label spaces of nyu-mll/glue.
GLUE_COLUMNS = {
    "cola": (["sentence", "label", "idx"], ["unacceptable", "acceptable"]),
    "sst2": (["sentence", "label", "idx"], ["negative", "positive"]),
    "mrpc": (["sentence1", "sentence2", "label", "idx"], ["not_equivalent", "equivalent"]),
    "qqp": (["question1", "question2", "label", "idx"], ["not_duplicate", "duplicate"]),
    "stsb": (["sentence1", "sentence2", "label", "idx"], None),
    "mnli": (["premise", "hypothesis", "label", "idx"], ["entailment", "neutral", "contradiction"]),
    "qnli": (["question", "sentence", "label", "idx"], ["entailment", "not_entailment"]),
    "rte": (["sentence1", "sentence2", "label", "idx"], ["entailment", "not_entailment"]),
}


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_columns_splits_and_label_spaces_match_glue(task: str) -> None:
    data = synthetic_glue_task(task, num_train=40, num_validation=12, seed=5)
    columns, label_names = GLUE_COLUMNS[task]
    validation_splits = ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]
    expected_splits = ["train", *validation_splits]
    assert list(data) == expected_splits
    assert data["train"].column_names == columns and len(data["train"]) == 40
    assert all(len(data[split]) == 12 for split in expected_splits[1:])
    labels = data["train"]["label"]
    if label_names is None:
        assert data["train"].features["label"] == datasets.Value("float32")
        assert all(0.0 <= label <= 5.0 for label in labels) and len(set(labels)) > 1
    else:
        assert data["train"].features["label"].names == label_names
        assert set(labels) == set(range(len(label_names)))
    assert data["train"]["idx"] == list(range(40))


def test_generation_is_deterministic_in_the_seed() -> None:
    first, again, other = synthetic_glue(seed=3), synthetic_glue(seed=3), synthetic_glue(seed=4)
    for task in GLUE_TASKS:
        assert first[task]["train"].to_dict() == again[task]["train"].to_dict()
        assert first[task]["train"].to_dict() != other[task]["train"].to_dict()


def test_sst2_rule_is_learnable_from_sentiment_words() -> None:
    train = synthetic_glue_task("sst2", num_train=50)["train"]
    positive_words = ("great", "wonderful", "delightful", "excellent", "charming", "brilliant")
    for sentence, label in zip(train["sentence"], train["label"], strict=True):
        positive = any(word in sentence for word in positive_words)
        assert positive == (label == 1)
