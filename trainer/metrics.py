"""GLUE metrics via scikit-learn / scipy, returned in points (x100) like the GLUE leaderboard."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def classification(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """accuracy, F1 of class 1 (MRPC's positive class; binary tasks only), Matthews correlation."""
    y_pred, y_true = np.asarray(predictions), np.asarray(labels)
    out = {"accuracy": 100.0 * accuracy_score(y_true, y_pred),
           "mcc": 100.0 * matthews_corrcoef(y_true, y_pred)}
    if max(int(y_true.max()), int(y_pred.max())) <= 1:
        out["f1"] = 100.0 * f1_score(y_true, y_pred, pos_label=1, zero_division=0.0)
    else:
        out["macro_f1"] = 100.0 * f1_score(y_true, y_pred, average="macro", zero_division=0.0)
    return out


def regression(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (constant predictions give 0, not NaN)."""
    y_pred, y_true = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if np.ptp(y_pred) == 0 or np.ptp(y_true) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": 100.0 * float(pearsonr(y_pred, y_true)[0]),
            "spearman": 100.0 * float(spearmanr(y_pred, y_true)[0])}


def from_outputs(outputs: np.ndarray, labels: Sequence[float], problem_type: str) -> dict[str, float]:
    """outputs [N, C] logits (or [N, 1] regression values) -> every metric of the problem type."""
    if problem_type == "regression":
        return regression(outputs[:, 0], labels)
    return classification(outputs.argmax(axis=1), [int(x) for x in labels])

