"""The eight GLUE tasks of the paper's T5 experiments: splits, prompts, task mixing and seq2seq collation.

Everything follows the SMEAR authors' code (``hyperformer/hyperformer/data/p3_tasks.py`` with
``split_validation_test=true``; see ``research/smear_official.md`` §6):

* **Splits** (:func:`split_glue`). Small tasks (CoLA, RTE, MRPC, STS-B): train is the official train split; the
  official validation split is permuted with ``torch.randperm`` under ``torch.Generator().manual_seed(42)``, its
  first ``n // 2`` rows become validation and the remaining ``n - n // 2`` rows test (so for an odd ``n`` the test
  half has the extra row, as ``indices[:n // 2]`` / ``indices[n // 2:]`` in the authors' code). Large tasks (QQP,
  QNLI, SST-2): the official train split is permuted the same way, its first 1000 rows become validation and the
  rest train; test is the official validation split. MNLI: train is the official train split, validation is
  ``validation_mismatched`` and test is ``validation_matched``. The authors' code also drops the last row of every
  split (``n_obs=-1`` reaches a ``[:-1]`` slice); that is reproduced only with ``drop_last_example_quirk=True``.
* **Prompts** (:func:`prompt_glue`). Only PromptSource templates with ``metadata.original_task`` are used. Training
  and validation rows get one template each, drawn pseudo-randomly from ``(template_seed, routing_key)`` so the draw
  is reproducible and independent of row order (the authors redraw with an unseeded ``np.random.choice`` on every
  fetch; pass ``template_seed=epoch`` to redraw per epoch). Test rows are expanded to every (example, template)
  pair, example-major, as the authors' ``eval_all_templates=True``.
* **Mixing** (:class:`ExamplesProportionalSampler`). The tasks are concatenated and indices are drawn uniformly
  with replacement over the concatenation, which is examples-proportional mixing; this is the authors'
  ``MultiTaskBatchSampler`` with temperature 1 on one process (generator seeded with ``seed + epoch``).
* **Routing metadata.** Every row carries ``routing_tag``, the task's index in :data:`GLUE_TASKS`, and
  ``routing_key``, an integer that identifies the source example (the same for all its prompts):
  ``routing_tag * 10**8 + source_split_code * 10**7 + row`` where ``row`` is the example's row in its official
  split and the codes are train 0, validation 1, validation_matched 2, validation_mismatched 3. Keys are
  identifiers, not uniform random numbers: hash them for hash routing.

Data only: nothing here builds or calls a model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch.utils.data import Sampler

from .prompts import Template, load_templates, original_task_templates

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "GLUE_HUB_ID",
    "GLUE_SPLITS",
    "GLUE_TASKS",
    "LARGE_GLUE_TASKS",
    "PROMPTED_FEATURES",
    "ROUTING_COLUMNS",
    "SMALL_GLUE_TASKS",
    "ExamplesProportionalSampler",
    "GlueSeq2SeqCollator",
    "build_glue_split",
    "glue_task_index",
    "glue_templates",
    "load_raw_glue",
    "prompt_glue",
    "split_glue",
]

GLUE_TASKS: tuple[str, ...] = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")
"""The eight tasks in the authors' ``tasks`` order; a task's position is its ``routing_tag`` (WNLI is not used)."""
SMALL_GLUE_TASKS: tuple[str, ...] = ("cola", "rte", "mrpc", "stsb")
"""Tasks whose official validation split is halved into validation and test."""
LARGE_GLUE_TASKS: tuple[str, ...] = ("qqp", "qnli", "sst2")
"""Tasks whose train split gives up validation rows and whose official validation split becomes test."""
GLUE_SPLITS: tuple[str, ...] = ("train", "validation", "test")
GLUE_HUB_ID = "nyu-mll/glue"
DEFAULT_SPLIT_SEED = 42
DEFAULT_LARGE_TASK_VALIDATION_SIZE = 1000

ROUTING_COLUMNS: tuple[str, ...] = ("task", "routing_tag", "routing_key")
"""Columns :func:`split_glue` adds to every row."""
_ROUTING_KEY_TASK_STRIDE = 10**8
_ROUTING_KEY_SPLIT_STRIDE = 10**7
_SOURCE_SPLIT_CODES = {"train": 0, "validation": 1, "validation_matched": 2, "validation_mismatched": 3}

PROMPTED_FEATURES = datasets.Features(
    {
        "input_text": datasets.Value("string"),
        "target_text": datasets.Value("string"),
        "answer_choices": datasets.List(datasets.Value("string")),
        "template_name": datasets.Value("string"),
        "task": datasets.Value("string"),
        "routing_tag": datasets.Value("int64"),
        "routing_key": datasets.Value("int64"),
    }
)
"""Columns of prompted GLUE rows (``answer_choices`` is empty for STS-B, whose target is a number)."""


def glue_task_index(task: str) -> int:
    """The task's index in :data:`GLUE_TASKS`, which is its ``routing_tag``."""
    try:
        return GLUE_TASKS.index(task)
    except ValueError:
        raise ValueError(f"Unknown GLUE task {task!r}; expected one of {GLUE_TASKS}.") from None


def load_raw_glue(
    task: str, path: str | os.PathLike[str] = GLUE_HUB_ID, **load_dataset_kwargs: Any
) -> datasets.DatasetDict:
    """Loads the official splits of one GLUE task.

    Args:
        task: one of :data:`GLUE_TASKS`.
        path: the Hub dataset id (default ``"nyu-mll/glue"``), a local copy of that repository, or a folder holding
            one ``DatasetDict.save_to_disk`` folder per task (``<path>/<task>/dataset_dict.json``).
        load_dataset_kwargs: passed to :func:`datasets.load_dataset` (for example ``cache_dir``); for a
            ``save_to_disk`` folder only ``keep_in_memory`` applies.
    """
    glue_task_index(task)
    saved = Path(path) / task
    if (saved / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(saved), keep_in_memory=load_dataset_kwargs.get("keep_in_memory"))
    return datasets.load_dataset(str(path), task, **load_dataset_kwargs)


def _permutation(size: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def _official_split(raw: datasets.DatasetDict, task: str, name: str) -> datasets.Dataset:
    """The official split ``name`` of ``task`` with the columns ``task``, ``routing_tag`` and ``routing_key`` added."""
    if name not in raw:
        raise KeyError(f"GLUE task {task!r} needs the official split {name!r}; the given data has {sorted(raw)}.")
    official = raw[name]
    clashing = [column for column in ROUTING_COLUMNS if column in official.column_names]
    if clashing:
        raise ValueError(f"The {task!r} split {name!r} already has the reserved column(s) {clashing}.")
    tag = glue_task_index(task)
    key_base = tag * _ROUTING_KEY_TASK_STRIDE + _SOURCE_SPLIT_CODES[name] * _ROUTING_KEY_SPLIT_STRIDE
    official = official.add_column("task", [task] * len(official))
    official = official.add_column("routing_tag", [tag] * len(official))
    return official.add_column("routing_key", [key_base + row for row in range(len(official))])


def _take(official: datasets.Dataset, rows: Sequence[int] | None = None, *, drop_last: bool) -> datasets.Dataset:
    """Rows ``rows`` (default: all, in order) of an official split, without the last one when ``drop_last``."""
    if rows is None:
        rows = range(len(official))
    if drop_last:
        rows = list(rows)[:-1]
    return official.select(rows)


def split_glue(
    task: str,
    raw: datasets.DatasetDict,
    *,
    seed: int = DEFAULT_SPLIT_SEED,
    large_task_validation_size: int = DEFAULT_LARGE_TASK_VALIDATION_SIZE,
    drop_last_example_quirk: bool = False,
) -> datasets.DatasetDict:
    """Makes the authors' train/validation/test splits of one task from its official splits.

    Args:
        task: one of :data:`GLUE_TASKS`.
        raw: the official splits (``train`` and ``validation``; MNLI needs ``train``, ``validation_matched`` and
            ``validation_mismatched``) with the GLUE columns, e.g. from :func:`load_raw_glue`.
        seed: seed of the ``torch.Generator`` that permutes the split that is divided (42 in the paper).
        large_task_validation_size: rows of a large task's permuted train split that become validation (1000 in
            the paper; lower it only for tiny offline data).
        drop_last_example_quirk: drop the last row of every split, as the authors' code does by accident.

    Returns:
        A ``DatasetDict`` with ``train``, ``validation`` and ``test``: the task's GLUE columns plus ``task``,
        ``routing_tag`` and ``routing_key`` (see the module docstring).
    """
    glue_task_index(task)
    drop_last = drop_last_example_quirk
    if task == "mnli":
        return datasets.DatasetDict(
            train=_take(_official_split(raw, task, "train"), drop_last=drop_last),
            validation=_take(_official_split(raw, task, "validation_mismatched"), drop_last=drop_last),
            test=_take(_official_split(raw, task, "validation_matched"), drop_last=drop_last),
        )
    train = _official_split(raw, task, "train")
    validation = _official_split(raw, task, "validation")
    if task in SMALL_GLUE_TASKS:
        order = _permutation(len(validation), seed)
        half = len(validation) // 2
        return datasets.DatasetDict(
            train=_take(train, drop_last=drop_last),
            validation=_take(validation, order[:half], drop_last=drop_last),
            test=_take(validation, order[half:], drop_last=drop_last),
        )
    if not 0 < large_task_validation_size < len(train):
        raise ValueError(
            f"large_task_validation_size={large_task_validation_size} must be between 1 and the {task!r} train size "
            f"minus one ({len(train) - 1}); lower it for small data."
        )
    order = _permutation(len(train), seed)
    return datasets.DatasetDict(
        train=_take(train, order[large_task_validation_size:], drop_last=drop_last),
        validation=_take(train, order[:large_task_validation_size], drop_last=drop_last),
        test=_take(validation, drop_last=drop_last),
    )


def glue_templates(task: str, templates_dir: str | os.PathLike[str] | None = None) -> list[Template]:
    """The original-task templates of a GLUE task, sorted by name.

    Args:
        task: one of :data:`GLUE_TASKS`.
        templates_dir: PromptSource-style templates folder; defaults to the installed promptsource package
            (:data:`smear_peft.data.prompts.BUILTIN_TEMPLATES_DIR` holds a small offline set).
    """
    glue_task_index(task)
    templates = original_task_templates(load_templates("glue", task, templates_dir))
    if not templates:
        raise ValueError(f"No original-task templates for glue/{task} in {templates_dir or 'promptsource'}.")
    return templates


def _template_draw(template_seed: int, routing_key: int, num_templates: int) -> int:
    digest = hashlib.blake2b(f"{template_seed}:{routing_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_templates


def prompt_glue(
    dataset: datasets.Dataset,
    templates: Sequence[Template],
    *,
    all_templates: bool,
    template_seed: int = 0,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Renders the rows of one task's split (from :func:`split_glue`) into text-to-text examples.

    Args:
        dataset: rows with the task's GLUE columns and ``task``, ``routing_tag``, ``routing_key``.
        templates: the templates to use (normally :func:`glue_templates`).
        all_templates: emit every (example, template) pair, example-major (test); otherwise one template per
            example, drawn from ``(template_seed, routing_key)`` (train, validation).
        template_seed: seed of the per-example template draw.
        num_proc: processes for :meth:`datasets.Dataset.map`.

    Returns:
        A dataset with the columns of :data:`PROMPTED_FEATURES`.
    """
    if not templates:
        raise ValueError("prompt_glue needs at least one template.")
    missing = [column for column in ROUTING_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(f"prompt_glue needs the columns {missing}; build the split with split_glue().")

    def render(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rendered: dict[str, list[Any]] = {name: [] for name in PROMPTED_FEATURES}
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            example = {name: value for name, value in row.items() if name not in ROUTING_COLUMNS}
            if all_templates:
                chosen: Sequence[Template] = templates
            else:
                chosen = [templates[_template_draw(template_seed, row["routing_key"], len(templates))]]
            for template in chosen:
                input_text, target_text = template.apply(example)
                rendered["input_text"].append(input_text)
                rendered["target_text"].append(target_text)
                rendered["answer_choices"].append(template.get_answer_choices_list(example) or [])
                rendered["template_name"].append(template.name)
                for name in ROUTING_COLUMNS:
                    rendered[name].append(row[name])
        return rendered

    return dataset.map(
        render,
        batched=True,
        remove_columns=dataset.column_names,
        features=PROMPTED_FEATURES,
        num_proc=num_proc,
        desc="Rendering prompts",
    )


def build_glue_split(
    split: str,
    *,
    tasks: Sequence[str] = GLUE_TASKS,
    raw: Mapping[str, datasets.DatasetDict] | None = None,
    path: str | os.PathLike[str] = GLUE_HUB_ID,
    templates_dir: str | os.PathLike[str] | None = None,
    all_templates: bool | None = None,
    template_seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    large_task_validation_size: int = DEFAULT_LARGE_TASK_VALIDATION_SIZE,
    drop_last_example_quirk: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """One prompted split of several GLUE tasks, concatenated in the order of ``tasks``.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        tasks: tasks to include (default: all of :data:`GLUE_TASKS`).
        raw: official splits per task (for local or synthetic data); tasks missing from it are loaded with
            :func:`load_raw_glue` from ``path``.
        path: where :func:`load_raw_glue` reads from.
        templates_dir: PromptSource-style templates folder (default: the installed promptsource).
        all_templates: expand every (example, template) pair; defaults to ``True`` for test only.
        template_seed: seed of the per-example template draw (pass the epoch to redraw per epoch).
        split_seed, large_task_validation_size, drop_last_example_quirk: see :func:`split_glue`.
        num_proc: processes for rendering.

    Returns:
        A dataset with the columns of :data:`PROMPTED_FEATURES`. Shuffle or sample it for training
        (:class:`ExamplesProportionalSampler` gives the authors' examples-proportional mixing).
    """
    if split not in GLUE_SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {GLUE_SPLITS}.")
    expand = split == "test" if all_templates is None else all_templates
    prompted = []
    for task in tasks:
        official = raw[task] if raw is not None and task in raw else load_raw_glue(task, path)
        rows = split_glue(
            task,
            official,
            seed=split_seed,
            large_task_validation_size=large_task_validation_size,
            drop_last_example_quirk=drop_last_example_quirk,
        )[split]
        templates = glue_templates(task, templates_dir)
        prompted.append(
            prompt_glue(rows, templates, all_templates=expand, template_seed=template_seed, num_proc=num_proc)
        )
    return datasets.concatenate_datasets(prompted)


class ExamplesProportionalSampler(Sampler[int]):
    """Uniform draws with replacement over a concatenation of tasks: examples-proportional mixing.

    Each epoch yields ``num_examples`` indices from ``torch.randint`` under a generator seeded with
    ``seed + epoch``, as the authors' ``MultiTaskBatchSampler`` (temperature 1, one process). Batches mix tasks.
    Use it with ``DataLoader(..., sampler=sampler, batch_size=b, drop_last=True)`` to get the authors'
    ``num_examples // b`` batches per epoch, and call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, num_examples: int, seed: int = 0) -> None:
        if num_examples <= 0:
            raise ValueError(f"ExamplesProportionalSampler needs a non-empty dataset, got {num_examples} examples.")
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose draws :meth:`__iter__` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randint(0, self.num_examples, (self.num_examples,), generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_examples


@dataclass
class GlueSeq2SeqCollator:
    """Tokenizes prompted GLUE rows into a padded seq2seq batch.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (target token ids, padding replaced by -100), and the
    routing metadata ``routing_tags`` and ``routing_keys`` (int64 tensors of shape ``[batch]``). With
    ``include_text_fields`` it also returns, as plain lists for scoring generations, ``target_text``, ``task`` and
    ``answer_choices``; leave it off for training batches so that every value is a tensor.

    Attributes:
        tokenizer: the model's tokenizer (T5's appends ``</s>`` itself).
        max_source_length: inputs are truncated to this many tokens (128 in the paper).
        max_target_length: targets are truncated to this many tokens (128 in the paper).
        pad_to_multiple_of: pad lengths up to a multiple of this (padding is to the longest row otherwise).
        include_text_fields: add ``target_text``, ``task`` and ``answer_choices``.
    """

    tokenizer: PreTrainedTokenizerBase
    max_source_length: int = 128
    max_target_length: int = 128
    pad_to_multiple_of: int | None = None
    include_text_fields: bool = False

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collates rows with the columns of :data:`PROMPTED_FEATURES`."""
        padding = {"padding": "longest", "truncation": True, "pad_to_multiple_of": self.pad_to_multiple_of}
        inputs = self.tokenizer(
            [row["input_text"] for row in rows], max_length=self.max_source_length, return_tensors="pt", **padding
        )
        targets = self.tokenizer(
            text_target=[row["target_text"] for row in rows],
            max_length=self.max_target_length,
            return_tensors="pt",
            **padding,
        )
        batch: dict[str, Any] = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "labels": targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100),
            "routing_tags": torch.tensor([row["routing_tag"] for row in rows], dtype=torch.long),
            "routing_keys": torch.tensor([row["routing_key"] for row in rows], dtype=torch.long),
        }
        if self.include_text_fields:
            batch["target_text"] = [row["target_text"] for row in rows]
            batch["task"] = [row["task"] for row in rows]
            batch["answer_choices"] = [list(row["answer_choices"]) for row in rows]
        return batch
