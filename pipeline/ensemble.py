"""Blend several experiments: weights fit on their OOF predictions (non-negative, summing to one).

The blend is never worse on OOF than its best member: when the optimizer's answer is not better, the best
single member (weight one) is kept. The same weights are applied to the members' test predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pipeline import data as D
from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.io import write_csv_atomic, write_json_atomic
from pipeline.metrics import LOWER_IS_BETTER, score, threshold_fields
from pipeline.runs import load_run_config, read_predictions


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


def run(experiments: list[str], name: str, output_dir: str = "oof") -> dict:
    if len(experiments) < 1:
        raise PipelineError("ensemble: name at least one experiment")
    if name in experiments:
        raise PipelineError(f"ensemble: the name '{name}' would overwrite a member; choose another --name")
    out = Path(output_dir) / name
    if (out / "config.yaml").exists() and not (out / "ensemble.json").exists():
        raise PipelineError(f"ensemble: {out} holds a trained experiment, not a blend; choose another --name")
    dirs = [Path(output_dir) / e for e in experiments]
    cfgs = [load_run_config(d) for d in dirs]
    first = cfgs[0]
    for e, c in zip(experiments, cfgs):
        if (c.data.train_path, c.data.target_columns, c.data.task) != \
                (first.data.train_path, first.data.target_columns, first.data.task):
            raise PipelineError(f"ensemble: '{e}' was trained on other data or targets than '{experiments[0]}' "
                                f"({c.data.train_path} {c.data.target_columns} vs {first.data.train_path} "
                                f"{first.data.target_columns})")
    id_col = first.data.id_column
    oofs = [read_predictions(d, "oof.csv", f"pipeline oof {d.name}", id_col) for d in dirs]
    columns = [c for c in oofs[0].columns if c not in (id_col, "fold")]
    for e, oof in zip(experiments, oofs):
        if [c for c in oof.columns if c not in (id_col, "fold")] != columns:
            raise PipelineError(f"ensemble: '{e}' predicts columns {list(oof.columns)}, not {columns}")
        if not oof[id_col].equals(oofs[0][id_col]) or not oof["fold"].equals(oofs[0]["fold"]):
            raise PipelineError(f"ensemble: '{e}' was trained on other folds than '{experiments[0]}'; "
                                f"a blend fit on OOFs from different folds leaks validation data")
    train = D.load_train(first)
    train = train.set_index(id_col).loc[oofs[0][id_col]].reset_index()  # truth joined by id
    y = D.target_array(first, train)
    preds = [o[columns].to_numpy(float) for o in oofs]
    weights = fit_weights(y, preds, first.metric)
    blend = np.tensordot(weights, np.stack(preds), axes=1)
    members = {e: score(first.metric, y, p) for e, p in zip(experiments, preds)}
    result = {"metric": first.metric, "members": members, "weights": dict(zip(experiments, weights.tolist())),
              "cv": score(first.metric, y, blend)}
    oof = oofs[0][[id_col, "fold"]].copy()
    oof[columns] = blend
    test = blend_test(dirs, experiments, weights, id_col, columns)  # checked before anything is written

    write_csv_atomic(out / "oof.csv", oof)
    if test is not None:
        write_csv_atomic(out / "test_predictions.csv", test)
        result["test_predictions"] = str(out / "test_predictions.csv")
    else:  # a test file of an earlier blend under this name would be submitted with the wrong members
        (out / "test_predictions.csv").unlink(missing_ok=True)
        result["without_test_predictions"] = [e for e, d in zip(experiments, dirs)
                                              if not (d / "test_predictions.csv").exists()]
    blended = first
    blended.experiment, blended.output_dir = name, output_dir
    save_config(blended, out / "config.yaml")
    write_json_atomic(out / "ensemble.json", result)
    write_json_atomic(out / "cv.json", {"experiment": name, "metric": first.metric, "cv": result["cv"],
                                        **threshold_fields(first.metric, first.data.task, y, blend)})
    return result


def blend_test(dirs: list[Path], experiments: list[str], weights: np.ndarray, id_col: str,
               columns: list[str]) -> pd.DataFrame | None:
    """The members' test predictions with the blend's weights; None unless every member has them."""
    if not all((d / "test_predictions.csv").exists() for d in dirs):
        return None
    frames = [read_predictions(d, "test_predictions.csv", "", id_col) for d in dirs]
    for e, f in zip(experiments, frames):
        if not f[id_col].equals(frames[0][id_col]):
            raise PipelineError(f"ensemble: test predictions of '{e}' have other ids than '{experiments[0]}'")
    return blend(frames, weights, id_col, columns)


def blend(frames: list[pd.DataFrame], weights: np.ndarray, id_col: str, columns: list[str]) -> pd.DataFrame:
    """The weighted sum of prediction frames that share their ids, row for row (the Kaggle kernel's blend too)."""
    out = frames[0][[id_col]].copy()
    out[columns] = np.tensordot(np.asarray(weights, float), np.stack([f[columns].to_numpy(float) for f in frames]),
                                axes=1)
    return out
