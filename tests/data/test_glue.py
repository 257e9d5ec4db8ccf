"""Tests of the GLUE splits, prompting, mixing and collation (smear_peft.data.glue), on tiny in-memory data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from smear_peft.data.glue import (
    GLUE_TASKS,
    PROMPTED_FEATURES,
    ExamplesProportionalSampler,
    GlueSeq2SeqCollator,
    build_glue_split,
    glue_task_index,
    glue_templates,
    load_raw_glue,
    prompt_glue,
    split_glue,
)
from smear_peft.data.glue_synthetic import synthetic_glue
from smear_peft.data.prompts import BUILTIN_TEMPLATES_DIR

datasets.disable_progress_bars()


def pairs(size: int, offset: int = 0) -> datasets.Dataset:
    """RTE-shaped rows whose ``idx`` is the row number plus ``offset``."""
    return datasets.Dataset.from_dict(
        {
            "sentence1": [f"premise {offset + row}" for row in range(size)],
            "sentence2": [f"hypothesis {offset + row}" for row in range(size)],
            "label": [row % 2 for row in range(size)],
            "idx": [offset + row for row in range(size)],
        }
    )


def permutation(size: int, seed: int = 42) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def test_small_task_halves_the_shuffled_validation_split_with_the_extra_row_in_test() -> None:
    raw = datasets.DatasetDict(train=pairs(6), validation=pairs(7, offset=100))
    splits = split_glue("rte", raw)
    order = permutation(7)
    assert splits["train"]["idx"] == list(range(6))
    assert splits["validation"]["idx"] == [100 + row for row in order[:3]]
    assert splits["test"]["idx"] == [100 + row for row in order[3:]]


def test_large_task_takes_validation_from_the_shuffled_train_split() -> None:
    raw = datasets.DatasetDict(train=pairs(12), validation=pairs(5, offset=100))
    splits = split_glue(
        "qqp", raw.rename_columns({"sentence1": "question1", "sentence2": "question2"}), large_task_validation_size=4
    )
    order = permutation(12)
    assert splits["validation"]["idx"] == order[:4]
    assert splits["train"]["idx"] == order[4:]
    assert splits["test"]["idx"] == [100, 101, 102, 103, 104]
    with pytest.raises(ValueError, match="lower it for small data"):
        split_glue("qqp", raw, large_task_validation_size=12)


def test_mnli_uses_mismatched_for_validation_and_matched_for_test() -> None:
    raw = datasets.DatasetDict(train=pairs(4), validation_matched=pairs(3, 100), validation_mismatched=pairs(5, 200))
    splits = split_glue("mnli", raw)
    assert splits["train"]["idx"] == [0, 1, 2, 3]
    assert splits["validation"]["idx"] == [200, 201, 202, 203, 204]
    assert splits["test"]["idx"] == [100, 101, 102]
    with pytest.raises(KeyError, match=r"needs the official split .validation_mismatched."):
        split_glue("mnli", datasets.DatasetDict(train=pairs(4), validation=pairs(3)))


def test_drop_last_example_quirk_drops_the_last_row_of_every_split() -> None:
    raw = datasets.DatasetDict(train=pairs(6), validation=pairs(7, offset=100))
    faithful, quirky = split_glue("rte", raw), split_glue("rte", raw, drop_last_example_quirk=True)
    for split in ("train", "validation", "test"):
        assert quirky[split]["idx"] == faithful[split]["idx"][:-1]


def test_split_seed_reproduces_and_changes_the_split() -> None:
    raw = datasets.DatasetDict(train=pairs(4), validation=pairs(40))
    assert split_glue("cola", raw)["test"]["idx"] == split_glue("cola", raw)["test"]["idx"]
    assert split_glue("cola", raw, seed=1)["test"]["idx"] == permutation(40, 1)[20:]
    assert split_glue("cola", raw, seed=1)["test"]["idx"] != split_glue("cola", raw)["test"]["idx"]


def test_rows_carry_task_routing_tag_and_stable_unique_routing_keys() -> None:
    raw = datasets.DatasetDict(train=pairs(6), validation=pairs(7, offset=100))
    splits = split_glue("mrpc", raw)
    tag = GLUE_TASKS.index("mrpc")
    assert tag == glue_task_index("mrpc") == 2
    for split in splits.values():
        assert set(split["task"]) == {"mrpc"} and set(split["routing_tag"]) == {tag}
    assert splits["train"]["routing_key"] == [tag * 10**8 + row for row in range(6)]
    assert splits["test"]["routing_key"] == [tag * 10**8 + 10**7 + idx - 100 for idx in splits["test"]["idx"]]
    all_keys = [key for split in splits.values() for key in split["routing_key"]]
    assert len(set(all_keys)) == len(all_keys) == 13


def test_unknown_task_is_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown GLUE task 'wnli'"):
        glue_task_index("wnli")


@pytest.fixture(scope="module")
def rte_test_rows() -> datasets.Dataset:
    return split_glue("rte", datasets.DatasetDict(train=pairs(2), validation=pairs(9)))["test"]


def test_all_templates_expands_every_example_template_pair_example_major(rte_test_rows: datasets.Dataset) -> None:
    templates = glue_templates("rte", BUILTIN_TEMPLATES_DIR)
    prompted = prompt_glue(rte_test_rows, templates, all_templates=True)
    assert prompted.features == PROMPTED_FEATURES
    assert len(prompted) == 2 * len(rte_test_rows) == 10
    assert prompted["template_name"] == [template.name for template in templates] * 5
    assert prompted["routing_key"] == [key for key in rte_test_rows["routing_key"] for _ in templates]
    first = rte_test_rows[0]
    expected = templates[1].apply({name: first[name] for name in ("sentence1", "sentence2", "label", "idx")})
    assert (prompted[1]["input_text"], prompted[1]["target_text"]) == expected
    assert prompted[1]["answer_choices"] == ["entailment", "not entailment"]


def test_random_template_draw_is_seeded_and_independent_of_row_order() -> None:
    rows = split_glue("rte", datasets.DatasetDict(train=pairs(200), validation=pairs(2)))["train"]
    templates = glue_templates("rte", BUILTIN_TEMPLATES_DIR)
    drawn = prompt_glue(rows, templates, all_templates=False, template_seed=3)
    assert len(drawn) == len(rows) and drawn["routing_key"] == rows["routing_key"]
    counts = Counter(drawn["template_name"])
    assert set(counts) == {template.name for template in templates} and min(counts.values()) > 70
    reversed_rows = rows.select(range(len(rows) - 1, -1, -1))
    redrawn = prompt_glue(reversed_rows, templates, all_templates=False, template_seed=3)
    assert redrawn["template_name"] == drawn["template_name"][::-1]
    other_seed = prompt_glue(rows, templates, all_templates=False, template_seed=4)
    assert other_seed["template_name"] != drawn["template_name"]


@pytest.fixture(scope="module")
def synthetic_raw() -> dict[str, datasets.DatasetDict]:
    return synthetic_glue(num_train=24, num_validation=10, seed=1)


def test_build_glue_split_concatenates_all_tasks(synthetic_raw: dict[str, datasets.DatasetDict]) -> None:
    kwargs = {"raw": synthetic_raw, "templates_dir": BUILTIN_TEMPLATES_DIR, "large_task_validation_size": 4}
    test = build_glue_split("test", **kwargs)
    train = build_glue_split("train", **kwargs)
    test_rows = {"rte": 5, "sst2": 10, "mrpc": 5, "stsb": 5, "qqp": 10, "mnli": 10, "qnli": 10, "cola": 5}
    train_rows = {"rte": 24, "sst2": 20, "mrpc": 24, "stsb": 24, "qqp": 20, "mnli": 24, "qnli": 20, "cola": 24}
    assert Counter(test["task"]) == {task: 2 * rows for task, rows in test_rows.items()}  # two templates each
    assert Counter(train["task"]) == train_rows
    assert list(dict.fromkeys(test["task"])) == list(GLUE_TASKS)
    assert all(GLUE_TASKS[tag] == task for tag, task in zip(train["routing_tag"], train["task"], strict=True))
    stsb = test.filter(lambda row: row["task"] == "stsb")
    assert set(map(len, stsb["answer_choices"])) == {0} and all(float(text) >= 0 for text in stsb["target_text"])


def test_load_raw_glue_reads_saved_dataset_dicts(tmp_path: Path, synthetic_raw: dict) -> None:
    synthetic_raw["cola"].save_to_disk(tmp_path / "cola")
    loaded = load_raw_glue("cola", tmp_path)
    assert loaded["validation"]["sentence"] == synthetic_raw["cola"]["validation"]["sentence"]


def test_sampler_draws_uniformly_with_replacement_like_the_authors() -> None:
    sampler = ExamplesProportionalSampler(50, seed=7)
    epoch0 = list(sampler)
    authors = torch.randint(0, 50, size=(50, 1), generator=torch.Generator().manual_seed(7)).flatten().tolist()
    assert len(sampler) == 50 and epoch0 == authors and epoch0 == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(sampler) == torch.randint(0, 50, (50,), generator=torch.Generator().manual_seed(8)).tolist()
    share_of_first_task = sum(index < 10 for index in ExamplesProportionalSampler(10_000, seed=0)) / 10_000
    assert share_of_first_task < 0.01  # the first 10 of 10k rows: sampled in proportion to their size


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["<pad>", "</s>", "<unk>", "is", "it", "good", "yes", "no"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def test_collator_pads_labels_with_ignore_index_and_returns_routing_tensors(tokenizer) -> None:
    rows = [
        {
            "input_text": "is it good",
            "target_text": "yes",
            "answer_choices": ["no", "yes"],
            "task": "sst2",
            "routing_tag": 1,
            "routing_key": 100000003,
            "template_name": "t",
        },
        {
            "input_text": "good",
            "target_text": "no no",
            "answer_choices": [],
            "task": "stsb",
            "routing_tag": 3,
            "routing_key": 310000001,
            "template_name": "t",
        },
    ]
    batch = GlueSeq2SeqCollator(tokenizer, include_text_fields=True)(rows)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[6, -100], [7, 7]]
    assert batch["routing_tags"].tolist() == [1, 3] and batch["routing_keys"].dtype == torch.long
    assert batch["routing_keys"].tolist() == [100000003, 310000001]
    assert (batch["target_text"], batch["task"], batch["answer_choices"]) == (
        ["yes", "no no"],
        ["sst2", "stsb"],
        [["no", "yes"], []],
    )
    training = GlueSeq2SeqCollator(tokenizer, max_source_length=2)(rows)
    assert all(isinstance(value, torch.Tensor) for value in training.values())
    assert training["input_ids"].shape == (2, 2)
