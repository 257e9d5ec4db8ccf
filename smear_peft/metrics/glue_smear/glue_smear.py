"""GLUE metrics of the SMEAR paper's T5 experiments, computed from generated text (an ``evaluate`` metric).

Load it offline by path: ``evaluate.load("<path>/glue_smear")`` or ``smear_peft.metrics.load_glue_metric()``.

This mirrors the authors' evaluation (``hyperformer/hyperformer/data/postprocessors.py`` and
``metrics/metrics.py``; ``research/smear_official.md`` §6):

* **Text to label.** Prediction and reference strings are stripped and lower-cased, then a fixed word list maps
  them to 1 (``yes``, ``entailment``, ``equivalent``, ``acceptable``, ``positive``, ...), 0 (``no``,
  ``not entailment``, ``unacceptable``, ``negative``, ...) or 2 (``maybe``, ``neither``, ``inconclusive``,
  ``sometimes``, ``possible``); anything else is invalid (-1). The ids live in this word space, not in GLUE's label
  space, but since references are mapped the same way every metric is unchanged, and for MRPC and QQP the
  positive class 1 is "equivalent"/"duplicate" as in GLUE. A reference outside the word list is an error (its
  example could not be scored) rather than silently invalid.
* **STS-B** strings are parsed as floats (references are the template's rounded score); an unparsable prediction
  becomes -1.0, the authors' default.
* **Invalid predictions count as wrong**: they never equal the reference (accuracy); for F1 they are replaced by
  the opposite of the reference, as the authors' (and T5's) ``f1_score_with_invalid``; Matthews correlation gets
  them as an extra class, as the authors' code passes them to scikit-learn unchanged.
* Every metric is multiplied by 100; a correlation that is undefined (constant predictions) is reported as 0.
* Rows are pooled per task over all (example, template) pairs.

Averages (:func:`glue_averages`): ``average_over_metric_entries`` is the authors' ``eval_average_metrics``, the
mean of all metric entries, so with all eight tasks it averages 11 numbers and MRPC, QQP and STS-B weigh twice;
``average_over_tasks`` first averages each task's metrics, then the tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import datasets
import evaluate
import numpy as np
import scipy.stats
import sklearn.metrics

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "rte": ("accuracy",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "cola": ("matthews_correlation",),
}
"""The metrics reported per task, in the authors' task order."""

LABEL_WORDS: dict[str, int] = {
    **dict.fromkeys(
        (
            "yes",
            "entailment",
            "equivalent",
            "acceptable",
            "positive",
            "good",
            "happy",
            "duplicates",
            "true",
            "correct",
            "always",
            "guaranteed",
        ),
        1,
    ),
    **dict.fromkeys(
        (
            "no",
            "not entailment",
            "not equivalent",
            "unacceptable",
            "negative",
            "bad",
            "sad",
            "not duplicates",
            "false",
            "incorrect",
            "never",
            "impossible",
        ),
        0,
    ),
    **dict.fromkeys(("neither", "inconclusive", "sometimes", "maybe", "possible"), 2),
}
"""The authors' word list: lower-cased answer text to label id."""

INVALID_LABEL = -1
INVALID_STSB_SCORE = -1.0
_NUM_CLASSES = {"mnli": 3}
_BINARY = 2

_DESCRIPTION = """\
Per-task GLUE metrics (accuracy, F1, Pearson, Spearman, Matthews correlation, all x100) computed from generated
answer text as in the SMEAR paper (Muqeeth, Liu, Raffel 2023), plus their two averages. Invalid generations count
as wrong.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated text, one per (example, template) row.
    references (list of str): the rendered target text of the same rows.
    tasks (list of str): each row's GLUE task, one of rte, sst2, mrpc, stsb, qqp, mnli, qnli, cola.
Returns:
    "<task>/<metric>" for each task present (rte/sst2/mnli/qnli: accuracy; mrpc/qqp: f1, accuracy; stsb: pearson,
    spearman; cola: matthews_correlation), "<task>/invalid_fraction" (share of predictions that map to no valid
    label), "average_over_metric_entries" (the authors' average) and "average_over_tasks".
Examples:
    >>> metric = load_glue_metric()
    >>> metric.compute(predictions=["yes", "no"], references=["yes", "yes"], tasks=["rte", "rte"])["rte/accuracy"]
    50.0
"""

_CITATION = """\
@article{muqeeth2023smear,
  title={Soft Merging of Experts with Adaptive Routing},
  author={Muqeeth, Mohammed and Liu, Haokun and Raffel, Colin},
  journal={Transactions on Machine Learning Research},
  year={2023}
}
"""


def text_to_label(text: str) -> int:
    """The authors' postprocessor: strip, lower-case and look up :data:`LABEL_WORDS` (-1 when absent)."""
    return LABEL_WORDS.get(text.strip().lower(), INVALID_LABEL)


def text_to_score(text: str, default: float = INVALID_STSB_SCORE) -> float:
    """Parses an STS-B score; ``default`` when the text is not a number."""
    try:
        return float(text)
    except ValueError:
        return default


def _correlation_x100(value: float) -> float:
    return 0.0 if math.isnan(value) else 100.0 * float(value)


def score_task(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The metrics of one task (see :data:`TASK_METRICS`) and the fraction of invalid predictions.

    Raises:
        ValueError: unknown task, no rows, or a reference that does not map to a label.
    """
    if task not in TASK_METRICS:
        raise ValueError(f"Unknown GLUE task {task!r}; expected one of {tuple(TASK_METRICS)}.")
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{task}: expected as many predictions as references, and at least one.")
    if task == "stsb":
        targets = np.array([text_to_score(text, default=math.nan) for text in references])
        if np.isnan(targets).any():
            bad = references[int(np.flatnonzero(np.isnan(targets))[0])]
            raise ValueError(f"stsb: the reference {bad!r} is not a number.")
        parsed = np.array([text_to_score(text, default=math.nan) for text in predictions])
        invalid = np.isnan(parsed)
        scores = np.where(invalid, INVALID_STSB_SCORE, parsed)
        return {
            "pearson": _correlation_x100(scipy.stats.pearsonr(targets, scores)[0]) if len(targets) > 1 else 0.0,
            "spearman": _correlation_x100(scipy.stats.spearmanr(targets, scores)[0]),
            "invalid_fraction": float(invalid.mean()),
        }
    labels = np.array([text_to_label(text) for text in references])
    if (labels == INVALID_LABEL).any():
        bad = references[int(np.flatnonzero(labels == INVALID_LABEL)[0])]
        raise ValueError(
            f"{task}: the reference {bad!r} is not in the authors' label word list (LABEL_WORDS); use templates whose "
            "answer choices are in that list."
        )
    guesses = np.array([text_to_label(text) for text in predictions])
    invalid = ~np.isin(guesses, np.arange(_NUM_CLASSES.get(task, _BINARY)))
    result: dict[str, float] = {}
    for metric in TASK_METRICS[task]:
        if metric == "accuracy":
            result[metric] = 100.0 * sklearn.metrics.accuracy_score(labels, guesses)
        elif metric == "f1":
            wrong_class_for_invalid = np.where(invalid, 1 - labels, guesses)
            result[metric] = 100.0 * sklearn.metrics.f1_score(labels, wrong_class_for_invalid, zero_division=0.0)
        elif metric == "matthews_correlation":
            result[metric] = 100.0 * sklearn.metrics.matthews_corrcoef(labels, guesses)
    result["invalid_fraction"] = float(invalid.mean())
    return result


def glue_averages(scores: Mapping[str, float]) -> dict[str, float]:
    """Both overall averages of flat ``"<task>/<metric>"`` scores (other keys are ignored).

    Returns:
        ``average_over_metric_entries``: the authors' average, the mean of every metric entry present
        (11 entries for all eight tasks, so MRPC, QQP and STS-B count twice); ``average_over_tasks``: the mean over
        tasks of each task's mean metric. Both cover only the tasks present in ``scores``.
    """
    per_task = {
        task: [scores[f"{task}/{metric}"] for metric in metrics]
        for task, metrics in TASK_METRICS.items()
        if all(f"{task}/{metric}" in scores for metric in metrics)
    }
    if not per_task:
        raise ValueError(f"No complete task metrics in {sorted(scores)}; expected keys like 'rte/accuracy'.")
    entries = [value for values in per_task.values() for value in values]
    return {
        "average_over_metric_entries": float(np.mean(entries)),
        "average_over_tasks": float(np.mean([np.mean(values) for values in per_task.values()])),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueSmear(evaluate.Metric):
    """GLUE metrics from generated text, pooled per task, with the authors' and the per-task averages."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "tasks": datasets.Value("string"),
                }
            ),
            reference_urls=["https://github.com/r-three/smear"],
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str], tasks: Sequence[str]) -> dict[str, float]:
        rows_by_task: dict[str, tuple[list[str], list[str]]] = {}
        for prediction, reference, task in zip(predictions, references, tasks, strict=True):
            task_predictions, task_references = rows_by_task.setdefault(task, ([], []))
            task_predictions.append(prediction)
            task_references.append(reference)
        unknown = sorted(set(rows_by_task) - set(TASK_METRICS))
        if unknown:
            raise ValueError(f"Unknown GLUE task(s) {unknown}; expected some of {tuple(TASK_METRICS)}.")
        scores = {
            f"{task}/{name}": value
            for task in TASK_METRICS
            if task in rows_by_task
            for name, value in score_task(task, *rows_by_task[task]).items()
        }
        return {**scores, **glue_averages(scores)}
