"""Tests of the glue_smear evaluate metric (smear_peft.metrics), against scikit-learn and SciPy."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from smear_peft.metrics import (
    GLUE_SMEAR_METRIC_DIR,
    TASK_METRICS,
    glue_averages,
    load_glue_metric,
    score_task,
    text_to_label,
)


@pytest.fixture(scope="module")
def metric() -> evaluate.EvaluationModule:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        return load_glue_metric()


def test_loads_offline_by_path(metric: evaluate.EvaluationModule) -> None:
    assert metric.name == "glue_smear"
    assert set(metric.features) == {"predictions", "references", "tasks"}
    assert evaluate.load(str(GLUE_SMEAR_METRIC_DIR / "glue_smear.py")).name == "glue_smear"


def test_postprocessing_uses_the_authors_word_list() -> None:
    assert [text_to_label(text) for text in (" Yes ", "not entailment", "Maybe", "Guaranteed", "yes!", "")] == [
        1,
        0,
        2,
        1,
        -1,
        -1,
    ]


def test_accuracy_and_f1_match_sklearn_with_invalid_predictions_counted_wrong(metric) -> None:
    references = ["yes", "yes", "no", "no", "yes", "no", "equivalent", "not equivalent"]
    predictions = ["yes", "banana", "no", "maybe", "no", "", "Equivalent", "yes"]
    result = metric.compute(predictions=predictions, references=references, tasks=["mrpc"] * 8)
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    # invalid ("banana", "maybe", "") -> the opposite of the reference
    wrong_for_invalid = np.array([1, 0, 0, 1, 0, 1, 1, 1])
    assert result["mrpc/f1"] == pytest.approx(100 * sklearn.metrics.f1_score(labels, wrong_for_invalid))
    assert result["mrpc/f1"] == pytest.approx(100 * 2 * 2 / (2 * 2 + 3 + 2))  # tp=2, fp=3, fn=2
    assert result["mrpc/accuracy"] == pytest.approx(100 * 3 / 8)
    assert result["mrpc/invalid_fraction"] == pytest.approx(3 / 8)


def test_three_way_accuracy_and_matthews_correlation(metric) -> None:
    mnli = metric.compute(
        predictions=["yes", "maybe", "no", "sometimes"],
        references=["always", "maybe", "never", "never"],
        tasks=["mnli"] * 4,
    )
    assert mnli["mnli/accuracy"] == 75.0 and mnli["mnli/invalid_fraction"] == 0.0
    predictions = ["acceptable", "unacceptable", "acceptable", "no idea", "acceptable", "unacceptable"]
    references = ["acceptable", "unacceptable", "unacceptable", "acceptable", "acceptable", "acceptable"]
    cola = metric.compute(predictions=predictions, references=references, tasks=["cola"] * 6)
    expected = sklearn.metrics.matthews_corrcoef([1, 0, 0, 1, 1, 1], [1, 0, 1, -1, 1, 0])
    assert cola["cola/matthews_correlation"] == pytest.approx(100 * expected)
    assert cola["cola/invalid_fraction"] == pytest.approx(1 / 6)


def test_stsb_correlations_match_scipy_with_unparsable_predictions_as_minus_one(metric) -> None:
    references = ["3.8", "1.0", "4.6", "0.2", "2.4"]
    predictions = ["3.6", "1.4", "five", "0.0", "2.0"]
    result = metric.compute(predictions=predictions, references=references, tasks=["stsb"] * 5)
    targets, scores = [3.8, 1.0, 4.6, 0.2, 2.4], [3.6, 1.4, -1.0, 0.0, 2.0]
    assert result["stsb/pearson"] == pytest.approx(100 * scipy.stats.pearsonr(targets, scores)[0])
    assert result["stsb/spearman"] == pytest.approx(100 * scipy.stats.spearmanr(targets, scores)[0])
    assert result["stsb/invalid_fraction"] == pytest.approx(0.2)
    with pytest.warns(scipy.stats.ConstantInputWarning):
        constant = score_task("stsb", ["2.0"] * 3, ["1.0", "2.0", "3.0"])
    assert (constant["pearson"], constant["spearman"]) == (0.0, 0.0)


def test_results_pool_rows_per_task_and_report_both_averages(metric) -> None:
    result = metric.compute(
        predictions=["yes", "no", "positive", "yes", "2.0", "1.0"],
        references=["yes", "yes", "positive", "yes", "2.0", "1.0"],
        tasks=["rte", "rte", "sst2", "qqp", "stsb", "stsb"],
    )
    assert (result["rte/accuracy"], result["sst2/accuracy"]) == (50.0, 100.0)
    assert (result["qqp/f1"], result["qqp/accuracy"]) == (100.0, 100.0)
    entries = [50.0, 100.0, 100.0, 100.0, 100.0, 100.0]  # rte, sst2, stsb x2, qqp x2
    assert result["average_over_metric_entries"] == pytest.approx(np.mean(entries))
    assert result["average_over_tasks"] == pytest.approx(np.mean([50.0, 100.0, 100.0, 100.0]))


def test_glue_averages_over_all_eleven_entries_and_over_tasks() -> None:
    scores = {f"{task}/{name}": 10.0 * index for index, task in enumerate(TASK_METRICS) for name in TASK_METRICS[task]}
    scores["mrpc/f1"], scores["stsb/spearman"] = 0.0, 0.0
    scores["rte/invalid_fraction"] = 123.0  # not a metric entry: ignored
    averages = glue_averages(scores)
    entries = [value for key, value in scores.items() if not key.endswith("invalid_fraction")]
    assert len(entries) == 11
    assert averages["average_over_metric_entries"] == pytest.approx(sum(entries) / 11)
    per_task = [0.0, 10.0, (0.0 + 20.0) / 2, (30.0 + 0.0) / 2, 40.0, 50.0, 60.0, 70.0]
    assert averages["average_over_tasks"] == pytest.approx(sum(per_task) / 8)
    assert not math.isclose(averages["average_over_metric_entries"], averages["average_over_tasks"])


def test_unscorable_inputs_raise_clear_errors(metric) -> None:
    with pytest.raises(ValueError, match="not in the authors' label word list"):
        metric.compute(predictions=["yes"], references=["sure"], tasks=["rte"])
    with pytest.raises(ValueError, match="Unknown GLUE task"):
        metric.compute(predictions=["yes"], references=["yes"], tasks=["wnli"])
    with pytest.raises(ValueError, match="is not a number"):
        score_task("stsb", ["1.0"], ["high"])
