"""How the members' predictions become one: the methods `pipeline ensemble` fits on OOF, and `apply`, the one
function that computes a fitted blend (for the test predictions and in the Kaggle kernel).

- `nnls`: weights on the simplex (non-negative, summing to one) that optimize the metric; the best single member
  is kept when the optimizer finds nothing better.
- `hill`: greedy forward selection with replacement (Caruana et al., 2004, "Ensemble selection from libraries of
  models"), as Kaggle blends do it (ELL 3rd kept 24 of 50 models): start from the best member, then mix in, step
  by step, the member and weight that most improve the OOF score, until nothing does. `negative=True` also tries
  subtracting a member (regression only: probabilities must stay probabilities).
- `stack`: a second-stage model on the members' predictions: `linear` (ridge on the values, its alpha chosen by
  efficient leave-one-out inside each fit; multinomial logistic regression on the log-probabilities for
  classes), or `lgbm` (LightGBM gradient-boosted trees, an optional extra: `pip install .[lgbm]`; small trees
  with row and column subsampling, for members whose errors depend on where they predict). Its OOF predictions
  come from nested folds: fold k's are made by a stacker fit on the other folds' rows alone, so no prediction
  used its own fold's labels. The test predictions use a stacker fit on every row.
- `mean`: equal weights (the seeds of one config, for instance).

A fitted blend is a plain dict ("kind": "linear" with weights, or "kind": "stack" with its coefficients or, for
LightGBM, its trees as text) that `apply` computes with numpy alone (LightGBM's trees need lightgbm, which
Kaggle's image has), so the kernel needs no scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pipeline.metrics import LOWER_IS_BETTER, is_better, score

METHODS = ("nnls", "hill", "stack", "mean")
STACKERS = ("linear", "lgbm")
LGBM_PARAMS = {"n_estimators": 300, "learning_rate": 0.03, "num_leaves": 7, "min_child_samples": 20,
               "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8, "random_state": 0, "n_jobs": 1,
               "verbose": -1}
HILL_WEIGHTS = np.linspace(0.05, 0.5, 10)  # the share of the blend a hill-climbing step gives a member
HILL_NEGATIVE = np.concatenate([-HILL_WEIGHTS[::-1], HILL_WEIGHTS])
HILL_MAX_STEPS = 200
RIDGE_ALPHAS = np.logspace(-3, 3, 13)
LOGISTIC_C = 1.0
EPS = 1e-7  # probabilities are clipped to [EPS, 1] before their logarithm


def fit_weights(y: np.ndarray, preds: list[np.ndarray], metric: str) -> np.ndarray:
    """Weights on the simplex that optimize `metric` of the weighted mean of `preds`."""
    sign = 1.0 if LOWER_IS_BETTER[metric] else -1.0
    stack = np.stack(preds)

    def loss(w: np.ndarray) -> float:
        return sign * score(metric, y, np.tensordot(w, stack, axes=1))

    n = len(preds)
    candidates = [np.full(n, 1.0 / n)] + list(np.eye(n))
    result = minimize(loss, candidates[0], method="SLSQP", bounds=[(0.0, 1.0)] * n,
                      constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},))
    if result.success:
        w = np.clip(result.x, 0.0, None)
        candidates.append(w / w.sum())
    return min(candidates, key=loss)


def hill_climb(y: np.ndarray, preds: list[np.ndarray], metric: str, negative: bool = False) -> np.ndarray:
    """Weights summing to one, grown greedily from the best member; every step strictly improves the OOF score."""
    scores = [score(metric, y, p) for p in preds]
    first = int(np.argmin(scores) if LOWER_IS_BETTER[metric] else np.argmax(scores))
    weights = np.eye(len(preds))[first]
    current, best = np.asarray(preds[first], float), scores[first]
    steps = HILL_NEGATIVE if negative else HILL_WEIGHTS
    for _ in range(HILL_MAX_STEPS):
        chosen = None
        for j, member in enumerate(preds):
            for w in steps:
                value = score(metric, y, (1 - w) * current + w * member)
                if is_better(metric, value, best) and abs(value - best) > 1e-12:
                    best, chosen = value, (j, w)
        if chosen is None:
            break
        j, w = chosen
        weights = (1 - w) * weights
        weights[j] += w
        current = (1 - w) * current + w * preds[j]
    return weights


def linear(weights: np.ndarray) -> dict:
    return {"kind": "linear", "weights": np.asarray(weights, float).tolist()}


def features(preds: list[np.ndarray], classification: bool) -> np.ndarray:
    """The stacker's inputs: every member's values, or the logarithm of every member's class probabilities."""
    x = np.concatenate([np.asarray(p, float) for p in preds], axis=1)
    return np.log(np.clip(x, EPS, 1.0)) if classification else x


def lightgbm():
    try:
        import lightgbm
    except ImportError:
        from pipeline.errors import PipelineError

        raise PipelineError("the lgbm stacker needs LightGBM: pip install 'lightgbm>=4' (or the project's [lgbm] "
                            "extra); Kaggle's image has it") from None
    return lightgbm


def fit_lgbm(x: np.ndarray, y: np.ndarray, classification: bool, classes: int) -> dict:
    """LightGBM trees on `x`: one regressor per target, or one classifier (its classes kept to place its columns)."""
    lgb = lightgbm()
    if classification:
        model = lgb.LGBMClassifier(**LGBM_PARAMS).fit(x, y)
        return {"kind": "stack", "model": "lgbm", "classes": int(classes), "seen": model.classes_.tolist(),
                "trees": [model.booster_.model_to_string()]}
    y = y.reshape(len(y), -1)
    trees = [lgb.LGBMRegressor(**LGBM_PARAMS).fit(x, y[:, t]).booster_.model_to_string() for t in range(y.shape[1])]
    return {"kind": "stack", "model": "lgbm", "classes": None, "trees": trees}


def apply_lgbm(spec: dict, x: np.ndarray) -> np.ndarray:
    lgb = lightgbm()
    out = [lgb.Booster(model_str=t).predict(x) for t in spec["trees"]]
    if spec["classes"] is None:
        return np.stack(out, axis=1)
    probs, seen = np.asarray(out[0]), spec["seen"]
    if probs.ndim == 1:  # two classes seen: the second's probability
        probs = np.stack([1 - probs, probs], axis=1)
    full = np.zeros((len(x), spec["classes"]))
    full[:, seen] = probs  # a class absent from the rows it was fit on gets probability 0
    return full


def fit_stacker(x: np.ndarray, y: np.ndarray, classification: bool, classes: int, stacker: str = "linear") -> dict:
    """A ridge (values) or logistic (classes) model on `x` as plain coefficients, or LightGBM's trees."""
    if stacker == "lgbm":
        return fit_lgbm(x, y, classification, classes)
    if classification:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=LOGISTIC_C, max_iter=2000).fit(x, y)
        if len(model.classes_) != classes:  # a class missing from these rows: its column stays impossible
            coef, intercept = np.zeros((classes, x.shape[1])), np.full(classes, -30.0)
            if len(model.classes_) == 2:
                coef[model.classes_[1]], intercept[model.classes_[1]] = model.coef_[0], model.intercept_[0]
                intercept[model.classes_[0]] = 0.0
            else:
                coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
            return {"kind": "stack", "model": "logistic", "coef": coef.tolist(), "intercept": intercept.tolist()}
        return {"kind": "stack", "model": "logistic", "coef": model.coef_.tolist(),
                "intercept": model.intercept_.tolist()}
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(x, y)
    return {"kind": "stack", "model": "ridge", "coef": np.atleast_2d(model.coef_).tolist(),
            "intercept": np.atleast_1d(model.intercept_).tolist()}


def fit_stack(y: np.ndarray, preds: list[np.ndarray], fold: np.ndarray, classification: bool,
              stacker: str = "linear") -> tuple[dict, np.ndarray]:
    """(the stacker fit on every row, nested-fold OOF predictions: fold k's from a stacker fit without fold k)."""
    x = features(preds, classification)
    classes = np.asarray(preds[0]).shape[1]
    oof = np.zeros((len(y), classes))
    for k in np.unique(fold):
        inside = fold != k
        fitted = fit_stacker(x[inside], y[inside], classification, classes, stacker)
        oof[~inside] = apply(fitted, preds_rows(preds, ~inside))
    return fit_stacker(x, y, classification, classes, stacker), oof


def nested_linear(y: np.ndarray, preds: list[np.ndarray], fold: np.ndarray,
                  fit) -> tuple[np.ndarray, dict[int, list[float]]]:
    """What a fitted weighting would have scored on unseen rows: fold k's predictions blended by `fit`'s weights
    fit on the other folds' OOF alone (`fit(y, preds) -> weights`), and those weights per fold. Weights fit on every
    OOF row are scored on the rows they were fit on, which flatters a blend of many members (hill climbing picks 24
    of 50); fold k's weights never saw fold k's labels, which is what a fold-safe teacher needs (pipeline/pseudo.py).
    """
    out = np.zeros(np.asarray(preds[0]).shape)
    fold_weights = {}
    for k in np.unique(fold):
        inside = fold != k
        weights = np.asarray(fit(y[inside], preds_rows(preds, inside)), float)
        out[~inside] = apply(linear(weights), preds_rows(preds, ~inside))
        fold_weights[int(k)] = weights.tolist()
    return out, fold_weights


def preds_rows(preds: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(p)[rows] for p in preds]


def apply(spec: dict, preds: list[np.ndarray]) -> np.ndarray:
    """The blend's predictions from its members' (each (n, columns)), as `spec` says."""
    if spec["kind"] == "linear":
        return np.tensordot(np.asarray(spec["weights"], float), np.stack([np.asarray(p, float) for p in preds]),
                            axes=1)
    if spec["model"] == "lgbm":
        return apply_lgbm(spec, features(preds, spec["classes"] is not None))
    coef, intercept = np.asarray(spec["coef"], float), np.asarray(spec["intercept"], float)
    out = features(preds, spec["model"] == "logistic") @ coef.T + intercept
    if spec["model"] == "ridge":
        return out
    if out.shape[1] == 1:  # binary logistic regression: the positive class's log-odds
        p = 1.0 / (1.0 + np.exp(-out[:, 0]))
        return np.stack([1 - p, p], axis=1)
    out = np.exp(out - out.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def blend_frames(frames: list[pd.DataFrame], id_col: str, columns: list[str], weights: list[float] | None = None,
                 stack: dict | None = None) -> pd.DataFrame:
    """Prediction frames that share their ids, blended row for row: with `weights`, or through a stacker whose
    members are weighted sums of these frames (`stack`: {"members": [[weight per frame] per member], "spec"})."""
    values = [f[columns].to_numpy(float) for f in frames]
    if stack is None:
        blended = apply(linear(weights), values)
    else:
        members = [np.tensordot(np.asarray(row, float), np.stack(values), axes=1) for row in stack["members"]]
        blended = apply(stack["spec"], members)
    out = frames[0][[id_col]].copy()
    out[columns] = blended
    return out
