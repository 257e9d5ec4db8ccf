"""Synthetic GLUE-format data, so the GLUE pipeline runs end to end offline.

Each task gets the columns, label names and official split names of its Hub version (``nyu-mll/glue``): ``train``
and ``validation`` (MNLI: ``train``, ``validation_matched``, ``validation_mismatched``); the unlabelled test splits
are left out. Sentences are built from a small vocabulary with one simple rule per task that a small model can
learn (sentiment words for SST-2, word order for CoLA, shared slots for STS-B, negation for contradiction, ...).
Generation is deterministic in ``seed`` and independent per task and split.

Feed the result to :func:`smear_peft.data.glue.build_glue_split` as ``raw=`` (with a small
``large_task_validation_size``) together with ``templates_dir=BUILTIN_TEMPLATES_DIR`` for a run with no network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import datasets

from .glue import GLUE_TASKS, glue_task_index

__all__ = ["synthetic_glue", "synthetic_glue_task"]

_SUBJECTS = ("the cat", "a dog", "my friend", "the teacher", "a child", "the farmer", "our neighbour", "the pilot")
# (third person, base form, synonym)
_VERBS = (
    ("sees", "see", "notices"),
    ("likes", "like", "enjoys"),
    ("finds", "find", "discovers"),
    ("helps", "help", "assists"),
    ("follows", "follow", "trails"),
    ("paints", "paint", "draws"),
)
_OBJECTS = ("the ball", "a book", "the river", "a house", "the car", "a garden", "the bridge", "a letter")
_PLACES = ("park", "city", "kitchen", "school", "market", "forest")
_POSITIVE = ("great", "wonderful", "delightful", "excellent", "charming", "brilliant")
_NEGATIVE = ("terrible", "awful", "boring", "dreadful", "dull", "painful")

Row = dict[str, Any]
_RowMaker = Callable[[random.Random, int], Row]


def _clause(rng: random.Random) -> tuple[str, tuple[str, str, str], str]:
    return rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)


def _other(rng: random.Random, options: Sequence[Any], avoid: Any) -> Any:
    return rng.choice([option for option in options if option != avoid])


def _cola(rng: random.Random, label: int) -> Row:
    subject, verb, obj = _clause(rng)
    words = f"{subject} {verb[0]} {obj}" if label == 1 else f"{verb[0]} {obj} {subject}"
    return {"sentence": words.capitalize() + "."}


def _sst2(rng: random.Random, label: int) -> Row:
    subject, verb, obj = _clause(rng)
    mood = rng.choice(_POSITIVE if label == 1 else _NEGATIVE)
    return {"sentence": f"{subject} {verb[0]} {obj} and it is {mood} ."}


def _mrpc(rng: random.Random, label: int) -> Row:
    subject, verb, obj = _clause(rng)
    second = f"{subject} {verb[2]} {obj}." if label == 1 else f"{subject} {verb[2]} {_other(rng, _OBJECTS, obj)}."
    return {"sentence1": f"{subject} {verb[0]} {obj}.".capitalize(), "sentence2": second.capitalize()}


def _qqp(rng: random.Random, label: int) -> Row:
    subject, verb, obj = _clause(rng)
    target = obj if label == 1 else _other(rng, _OBJECTS, obj)
    return {
        "question1": f"Why does {subject} {verb[1]} {obj}?",
        "question2": f"What makes {subject} {verb[1]} {target}?",
    }


def _stsb(rng: random.Random, label: float) -> Row:
    subject, verb, obj = _clause(rng)
    shared = round(label * 3 / 5)
    slots = [subject, verb[0], obj]
    replacements = [_other(rng, _SUBJECTS, subject), _other(rng, _VERBS, verb)[0], _other(rng, _OBJECTS, obj)]
    changed = rng.sample(range(3), 3 - shared)
    second = [replacements[i] if i in changed else slots[i] for i in range(3)]
    return {"sentence1": " ".join(slots) + ".", "sentence2": " ".join(second) + "."}


def _entailment_pair(rng: random.Random, outcome: str) -> tuple[str, str]:
    subject, verb, obj = _clause(rng)
    premise = f"{subject} {verb[0]} {obj} in the {rng.choice(_PLACES)}."
    hypotheses = {
        "entailment": f"{subject} {verb[0]} {obj}.",
        "neutral": f"{subject} {verb[0]} {obj} every morning.",
        "contradiction": f"{subject} does not {verb[1]} {obj}.",
    }
    return premise, hypotheses[outcome]


def _mnli(rng: random.Random, label: int) -> Row:
    premise, hypothesis = _entailment_pair(rng, ("entailment", "neutral", "contradiction")[label])
    return {"premise": premise, "hypothesis": hypothesis}


def _rte(rng: random.Random, label: int) -> Row:
    sentence1, sentence2 = _entailment_pair(rng, ("entailment", "contradiction")[label])
    return {"sentence1": sentence1, "sentence2": sentence2}


def _qnli(rng: random.Random, label: int) -> Row:
    subject, verb, obj = _clause(rng)
    answerer = subject if label == 0 else _other(rng, _SUBJECTS, subject)
    return {"question": f"What does {subject} {verb[1]}?", "sentence": f"{answerer} {verb[0]} {obj}."}


def _class_label(*names: str) -> datasets.ClassLabel:
    return datasets.ClassLabel(names=list(names))


_TEXT = datasets.Value("string")
# Per task: text columns, label feature and row maker, mirroring nyu-mll/glue's features.
_TASKS: dict[str, tuple[tuple[str, ...], datasets.ClassLabel | datasets.Value, _RowMaker]] = {
    "cola": (("sentence",), _class_label("unacceptable", "acceptable"), _cola),
    "sst2": (("sentence",), _class_label("negative", "positive"), _sst2),
    "mrpc": (("sentence1", "sentence2"), _class_label("not_equivalent", "equivalent"), _mrpc),
    "qqp": (("question1", "question2"), _class_label("not_duplicate", "duplicate"), _qqp),
    "stsb": (("sentence1", "sentence2"), datasets.Value("float32"), _stsb),
    "mnli": (("premise", "hypothesis"), _class_label("entailment", "neutral", "contradiction"), _mnli),
    "qnli": (("question", "sentence"), _class_label("entailment", "not_entailment"), _qnli),
    "rte": (("sentence1", "sentence2"), _class_label("entailment", "not_entailment"), _rte),
}


def _split(task: str, split: str, size: int, seed: int) -> datasets.Dataset:
    text_columns, label_feature, make_row = _TASKS[task]
    rng = random.Random(f"{seed}:{task}:{split}")
    rows: dict[str, list[Any]] = {name: [] for name in (*text_columns, "label", "idx")}
    for idx in range(size):
        if isinstance(label_feature, datasets.ClassLabel):
            label: float | int = rng.randrange(label_feature.num_classes)
        else:
            label = rng.choice((0.0, 5 / 3, 10 / 3, 5.0))
        for name, value in make_row(rng, label).items():
            rows[name].append(value)
        rows["label"].append(label)
        rows["idx"].append(idx)
    features = datasets.Features(
        {**{name: _TEXT for name in text_columns}, "label": label_feature, "idx": datasets.Value("int32")}
    )
    return datasets.Dataset.from_dict(rows, features=features)


def synthetic_glue_task(
    task: str, *, num_train: int = 256, num_validation: int = 64, seed: int = 0
) -> datasets.DatasetDict:
    """Synthetic official splits of one GLUE task (``train`` and ``validation``; MNLI's two validation splits).

    Args:
        task: one of :data:`~smear_peft.data.glue.GLUE_TASKS`.
        num_train: rows in ``train``.
        num_validation: rows in each validation split.
        seed: generation seed; the same seed gives the same data.
    """
    glue_task_index(task)
    validation_splits = ("validation_matched", "validation_mismatched") if task == "mnli" else ("validation",)
    splits = {"train": _split(task, "train", num_train, seed)}
    splits.update({name: _split(task, name, num_validation, seed) for name in validation_splits})
    return datasets.DatasetDict(splits)


def synthetic_glue(
    tasks: Sequence[str] = GLUE_TASKS, *, num_train: int = 256, num_validation: int = 64, seed: int = 0
) -> dict[str, datasets.DatasetDict]:
    """:func:`synthetic_glue_task` for each task, keyed by task name (the ``raw=`` argument of ``build_glue_split``)."""
    return {
        task: synthetic_glue_task(task, num_train=num_train, num_validation=num_validation, seed=seed) for task in tasks
    }
