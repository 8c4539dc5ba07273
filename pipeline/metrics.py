"""Competition metrics: one function each, used everywhere (training, OOF, ensemble, report).

Regression predictions are arrays of shape (n, targets); classification predictions are class
probabilities of shape (n, classes) and labels are class indices.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

LOWER_IS_BETTER = {"rmse": True, "mcrmse": True, "mae": True, "logloss": True,
                   "auc": False, "accuracy": False, "f1": False, "qwk": False}


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
    return float(skm.f1_score(labels, probs.argmax(axis=1), average=average, zero_division=0.0))


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of the positive class; one-vs-rest macro AUC when there are more than two classes."""
    probs = np.asarray(probs, float)
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    return float(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


def ordinal_labels(y_true: np.ndarray) -> np.ndarray:
    """The integer labels from the smallest to the largest target: what an ordinal regression is rounded to."""
    y_true = np.asarray(y_true, float)
    return np.arange(np.floor(y_true.min()), np.ceil(y_true.max()) + 1)


def qwk(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Quadratic weighted kappa, the metric of ordinal scores (essay scoring: AES 2.0, ASAP).

    Regression (targets of shape (n, 1)): predictions rounded to the nearest integer label within the targets'
    range (cut points tuned on OOF replace the rounding at submission; pipeline/decision.py). Classification:
    the most probable class, classes in their index order. Computed from the confusion matrix as
    scikit-learn's cohen_kappa_score(weights="quadratic") does (a test holds them equal), fast enough to be
    called thousands of times by the cut search.
    """
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        y_true, y_pred = _pair(y_true, y_pred)
        if y_true.shape[1] != 1:
            raise ValueError(f"qwk scores one target, got {y_true.shape[1]}")
        labels = ordinal_labels(y_true)
        truth = (y_true[:, 0] - labels[0]).astype(int)
        pred = (np.clip(np.floor(y_pred[:, 0] + 0.5), labels[0], labels[-1]) - labels[0]).astype(int)
        k = len(labels)
    else:
        probs = np.asarray(y_pred)
        truth, pred, k = y_true.astype(int), probs.argmax(axis=1), probs.shape[1]
    observed = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k).astype(float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / max(len(truth), 1)
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    chance = float((weights * expected).sum())
    return 1.0 - float((weights * observed).sum()) / chance if chance > 0 else 0.0


METRIC_FUNCTIONS = {"rmse": rmse, "mcrmse": mcrmse, "mae": mae, "logloss": logloss,
                    "accuracy": accuracy, "f1": f1, "auc": auc, "qwk": qwk}


def best_constant(metric: str, y_train: np.ndarray, n_rows: int, n_outputs: int) -> tuple[np.ndarray, str]:
    """The best prediction that ignores the text, fit on training labels: the floor a model must beat.

    Returns `n_rows` copies of it (shaped like the model's predictions) and what it is, in words. Regression
    targets are float arrays (n, targets); class labels are indices, predicted as probabilities.
    """
    if y_train.dtype.kind == "f":
        if metric == "mae":
            return np.tile(np.median(y_train, axis=0), (n_rows, 1)), "the training median"
        return np.tile(y_train.mean(axis=0), (n_rows, 1)), "the training mean"
    freq = np.bincount(y_train, minlength=n_outputs) / len(y_train)
    if metric in ("logloss", "auc"):
        return np.tile(freq, (n_rows, 1)), "the training class frequencies"
    # Accuracy and macro F1: the majority class; binary F1 scores the positive class, so predicting it always.
    positive = metric == "f1" and n_outputs == 2
    chosen = 1 if positive else int(freq.argmax())
    return np.tile(np.eye(n_outputs)[chosen], (n_rows, 1)), "always the positive class" if positive else \
        "always the majority class"


def tune_threshold(metric: str, labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The binary decision threshold on the positive class's probability that maximizes F1 or accuracy.

    Every distinct cut of the sorted probabilities is tried (so the result is never worse than 0.5's); among equal
    scores the threshold nearest 0.5 wins. Returns (threshold, score at it). Tuned and scored on the same
    predictions, the score is optimistic by the amount a threshold can overfit them.
    """
    p = np.asarray(probs, float)[:, 1]
    y = np.asarray(labels)
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    tp = np.concatenate([[0], np.cumsum(y == 1)])  # predicting the top i rows positive, i = 0..n
    fp = np.arange(len(y) + 1) - tp
    positives = int((y == 1).sum())
    if metric == "f1":
        values = np.divide(2 * tp, 2 * tp + fp + (positives - tp), out=np.zeros(len(tp)), where=tp > 0)
    else:
        values = (tp + (len(y) - positives - fp)) / len(y)
    cuts = np.concatenate([[p[0] + 1e-6], p])  # cut i: probabilities >= cuts[i], the top i rows, are positive
    whole = np.concatenate([[True], p[:-1] != p[1:], [True]])  # a cut inside tied probabilities is not one
    values = np.where(whole, values, -np.inf)
    best = values.max()
    candidates = np.flatnonzero(values >= best - 1e-12)
    chosen = candidates[np.argmin(np.abs(cuts[candidates] - 0.5))]
    return float(cuts[chosen]), float(values[chosen])


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return METRIC_FUNCTIONS[metric](y_true, y_pred)


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if LOWER_IS_BETTER[metric] else new > best
