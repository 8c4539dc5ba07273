"""The decision a label-scored metric reads, tuned on OOF predictions and applied at submission.

- binary, F1 or accuracy: a threshold on the positive class's probability (`metrics.tune_threshold`);
- several classes, F1, accuracy or QWK: a weight per class on the probabilities, label = argmax(p * w), found by
  coordinate ascent (per-class thresholds, one-vs-rest, in the form that always yields one label);
- one ordinal regression target scored by QWK: cut points between the integer labels, the "OptimizedRounder" of
  PetFinder and of AES 2.0 (1st and 4th), found by coordinate search from the midpoints (plain rounding).

Every search starts from the untuned decision and takes only strict improvements, so the tuned OOF score is never
below the untuned one. Tuned and scored on the same predictions, it is optimistic by what a few parameters can
overfit: cv.json keeps both numbers (`cv` and `cv_decided`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import read_json
from pipeline.metrics import ordinal_labels, score, tune_threshold

LABEL_METRICS = ("f1", "accuracy", "qwk")  # scored on labels; every other metric on probabilities or values
PASSES = 3  # coordinate sweeps; each stops early when a sweep changes nothing
WEIGHT_GRID = np.exp(np.linspace(-3.0, 3.0, 31))  # class weights tried, from 1/20 to 20
CUT_CANDIDATES = 41  # cut positions tried between each cut's neighbours


def fit(metric: str, task: str, y: np.ndarray, preds: np.ndarray) -> dict | None:
    """The tuned decision for this metric and task, or None where the metric reads the predictions as they are."""
    preds = np.asarray(preds, float)
    if task == "binary" and metric in ("f1", "accuracy"):
        return {"kind": "threshold", "threshold": tune_threshold(metric, y, preds)[0]}
    if task == "multiclass" and metric in LABEL_METRICS:
        return {"kind": "class_weights", "weights": tune_class_weights(metric, y, preds).tolist()}
    if task == "regression" and metric == "qwk":
        labels = ordinal_labels(y)
        return {"kind": "cuts", "labels": labels.tolist(), "cuts": tune_cuts(y, preds, labels).tolist()}
    return None


def fields(metric: str, task: str, y: np.ndarray, preds: np.ndarray) -> dict:
    """cv.json's entries: the decision `submit` applies and the OOF score with it; nothing where none applies."""
    decision = fit(metric, task, y, preds)
    if decision is None:
        return {}
    return {"decision": decision, "cv_decided": decided_score(metric, y, preds, decision)}


def apply(decision: dict, preds: np.ndarray) -> np.ndarray:
    """Class indices (classification) or ordinal label values (regression, shape (n,)) under `decision`."""
    preds = np.asarray(preds, float)
    kind = decision["kind"]
    if kind == "threshold":
        return (preds[:, 1] >= decision["threshold"]).astype(int)
    if kind == "class_weights":
        return (preds * np.asarray(decision["weights"], float)).argmax(axis=1)
    if kind == "cuts":
        labels = np.asarray(decision["labels"], float)
        return labels[np.searchsorted(np.asarray(decision["cuts"], float), preds[:, 0], side="right")]
    raise ValueError(f"unknown decision kind {kind!r}")


def decided_score(metric: str, y: np.ndarray, preds: np.ndarray, decision: dict) -> float:
    """The metric of the decided labels (given to it as one-hot probabilities, or as integer values)."""
    return score(metric, y, _as_predictions(apply(decision, preds), np.asarray(preds).shape))


def _as_predictions(decided: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if decided.dtype.kind == "f":  # ordinal values: the metric rounds integers to themselves
        return decided[:, None]
    return np.eye(shape[1])[decided]


def tune_class_weights(metric: str, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class weights on the probabilities that maximize `metric` of argmax(p * w); all ones unless better."""
    weights = np.ones(probs.shape[1])
    best = score(metric, y, probs)
    for _ in range(PASSES):
        improved = False
        for c in range(len(weights)):
            for value in WEIGHT_GRID:
                trial = weights.copy()
                trial[c] = value
                v = score(metric, y, probs * trial)
                if v > best + 1e-12:
                    best, weights, improved = v, trial, True
        if not improved:
            break
    return weights


def tune_cuts(y: np.ndarray, preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Increasing cut points between `labels` that maximize QWK of the cut predictions; the midpoints unless better."""
    cuts = (labels[:-1] + labels[1:]) / 2

    def value(c: np.ndarray) -> float:
        return decided_score("qwk", y, preds, {"kind": "cuts", "labels": labels, "cuts": c})

    best = value(cuts)
    for _ in range(PASSES):
        improved = False
        for i in range(len(cuts)):
            lo = cuts[i - 1] if i > 0 else labels[0] - 1.0
            hi = cuts[i + 1] if i + 1 < len(cuts) else labels[-1] + 1.0
            for candidate in np.linspace(lo, hi, CUT_CANDIDATES + 2)[1:-1]:
                trial = cuts.copy()
                trial[i] = candidate
                v = value(trial)
                if v > best + 1e-12:
                    best, cuts, improved = v, trial, True
        if not improved:
            break
    return cuts


def load(run_dir: Path) -> dict | None:
    """The decision tuned on the run's OOF predictions (its cv.json), or None."""
    path = Path(run_dir) / "cv.json"
    if not path.exists():
        return None
    saved = read_json(path)
    if "threshold" in saved and "decision" not in saved:  # written before decisions had kinds
        return {"kind": "threshold", "threshold": float(saved["threshold"])}
    return saved.get("decision")
