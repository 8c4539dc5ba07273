"""Competition metrics: one function each, used everywhere (training, OOF, ensemble, report).

Regression predictions are arrays of shape (n, targets); classification predictions are class
probabilities of shape (n, classes) and labels are class indices.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

LOWER_IS_BETTER = {"rmse": True, "mcrmse": True, "mae": True, "logloss": True,
                   "auc": False, "accuracy": False, "f1": False}


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of one shape: (n,) against (n, 1) would silently broadcast to an n x n grid."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"targets of shape {y_true.shape} and predictions of shape {y_pred.shape} differ")
    return y_true, y_pred


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error over every entry (one target: the CommonLit metric)."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def mcrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean column-wise RMSE, the metric of several-target competitions (e.g. six essay scores)."""
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.ndim == 1:
        return rmse(y_true, y_pred)
    return float(np.mean(np.sqrt(np.mean((y_true - y_pred) ** 2, axis=0))))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class log loss of the probabilities rescaled to sum to one per row, as Kaggle's scorer does.

    Probabilities read back from a file or softmaxed in float32 are off by ~1e-7, which scikit-learn reports
    in a warning on every call.
    """
    probs = np.asarray(probs, float)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(skm.log_loss(labels, probs, labels=list(range(probs.shape[1]))))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(skm.accuracy_score(labels, np.asarray(probs).argmax(axis=1)))


def f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary F1 of the positive class; macro F1 over classes when there are more than two."""
    probs = np.asarray(probs)
    average = "binary" if probs.shape[1] == 2 else "macro"
    return float(skm.f1_score(labels, probs.argmax(axis=1), average=average))


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of the positive class; one-vs-rest macro AUC when there are more than two classes."""
    probs = np.asarray(probs, float)
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    return float(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


METRIC_FUNCTIONS = {"rmse": rmse, "mcrmse": mcrmse, "mae": mae, "logloss": logloss,
                    "accuracy": accuracy, "f1": f1, "auc": auc}


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return METRIC_FUNCTIONS[metric](y_true, y_pred)


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if LOWER_IS_BETTER[metric] else new > best
