"""Evaluation metrics of the paper's experiments, packaged as ``evaluate`` modules that load offline by path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

from .glue_smear.glue_smear import LABEL_WORDS, TASK_METRICS, glue_averages, score_task, text_to_label, text_to_score

__all__ = [
    "GLUE_SMEAR_METRIC_DIR",
    "LABEL_WORDS",
    "TASK_METRICS",
    "glue_averages",
    "load_glue_metric",
    "score_task",
    "text_to_label",
    "text_to_score",
]

GLUE_SMEAR_METRIC_DIR: Path = Path(__file__).resolve().parent / "glue_smear"
"""Folder of the ``glue_smear`` metric script; ``evaluate.load(str(GLUE_SMEAR_METRIC_DIR))`` needs no network."""


def load_glue_metric(**load_kwargs: Any) -> evaluate.EvaluationModule:
    """Loads the ``glue_smear`` metric from this package (no network); ``load_kwargs`` go to :func:`evaluate.load`.

    Call ``compute(predictions=generated_texts, references=target_texts, tasks=task_names)``.
    """
    return evaluate.load(str(GLUE_SMEAR_METRIC_DIR), **load_kwargs)
