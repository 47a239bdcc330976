"""GLUE metric functions against hand-computed values."""

import math

import numpy as np
import pytest

from trainer import metrics


def test_classification_known_values():
    # tp=2, fp=1, fn=1, tn=1 -> acc 3/5, F1 = 2*2/(2*2+1+1) = 2/3,
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2-1)/sqrt(3*3*2*2) = 1/6
    m = metrics.classification([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["mcc"] == pytest.approx(100 / 6)


def test_mcc_degenerate_and_multiclass():
    assert metrics.classification([1, 1, 1], [1, 0, 1])["mcc"] == 0.0  # constant prediction
    m = metrics.classification([0, 1, 2, 2], [0, 1, 2, 1])
    assert m["accuracy"] == 75.0 and "macro_f1" in m and "f1" not in m


def test_regression_known_values():
    m = metrics.regression([1, 2, 3, 4], [1, 3, 2, 4])
    assert m["spearman"] == pytest.approx(80.0)  # 1 - 6*2/(4*15)
    assert m["pearson"] == pytest.approx(80.0)
    m = metrics.regression([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert m == {"pearson": 0.0, "spearman": 0.0}
    m = metrics.regression([1, 2, 3], [2, 4, 7])
    assert m["spearman"] == pytest.approx(100.0)
    assert m["pearson"] == pytest.approx(100 * np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])


def test_from_outputs():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
    assert metrics.from_outputs(logits, [1, 0, 0], "single_label_classification")["accuracy"] == \
        pytest.approx(200 / 3)
    values = np.array([[0.5], [1.5], [2.5]])
    assert math.isclose(metrics.from_outputs(values, [0.0, 1.0, 3.0], "regression")["spearman"], 100.0)
