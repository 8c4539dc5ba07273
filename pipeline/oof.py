"""Gather the folds' validation predictions into one out-of-fold file and score it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import data as D
from pipeline import decision
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.folds import load_folds
from pipeline.io import read_csv, read_json, write_csv_atomic, write_json_atomic
from pipeline.metrics import best_constant, score
from pipeline.runs import check_same_inputs, missing_folds


def run(cfg: Config) -> dict:
    """Write oof/<experiment>/oof.csv (id, fold, predictions, in training-file order) and cv.json."""
    missing = missing_folds(cfg)
    if missing:
        raise PipelineError(f"{cfg.run_dir}: fold(s) {', '.join(map(str, missing))} have not finished; "
                            f"train them first (pipeline train --fold K)")
    check_same_inputs(cfg, cfg.run_dir)  # scored against the targets the folds learned
    df = D.load_train(cfg)
    fold = load_folds(cfg, df)
    id_col = cfg.data.id_column
    parts = []
    for k in range(cfg.data.n_folds):
        part = read_csv(cfg.run_dir / f"fold{k}" / "valid_predictions.csv", id_col)
        part.insert(1, "fold", k)
        parts.append(part)
    preds = pd.concat(parts, ignore_index=True)
    if preds[id_col].duplicated().any() or set(preds[id_col]) != set(df[id_col]):
        raise PipelineError(f"{cfg.run_dir}: fold predictions do not cover the training ids exactly once; "
                            f"were the folds changed after training? Retrain the experiment")
    # Join by id, never by position.
    oof = df[[id_col]].merge(preds, on=id_col, how="left", validate="one_to_one")
    if not (oof["fold"].to_numpy() == fold).all():
        raise PipelineError(f"{cfg.run_dir}: predictions were made on other folds than the current folds file")
    columns = [c for c in oof.columns if c not in (id_col, "fold")]
    y = D.target_array(cfg, df)
    values = oof[columns].to_numpy()
    per_fold = {k: score(cfg.metric, y[fold == k], values[fold == k]) for k in range(cfg.data.n_folds)}
    result = {"experiment": cfg.experiment, "metric": cfg.metric, "cv": score(cfg.metric, y, values),
              "folds": {str(k): v for k, v in per_fold.items()},
              **decision.fields(cfg.metric, cfg.data.task, y, values),
              **constant_score(cfg, y, fold, len(columns)),
              "train_seconds": sum(read_json(cfg.run_dir / f"fold{k}" / "metrics.json")["train_seconds"]
                                   for k in range(cfg.data.n_folds))}
    write_csv_atomic(cfg.run_dir / "oof.csv", oof)
    write_json_atomic(cfg.run_dir / "cv.json", result)
    return result


def constant_score(cfg: Config, y: np.ndarray, fold: np.ndarray, n_outputs: int) -> dict:
    """The score of the metric's best constant prediction, fit on each fold's training rows: the floor."""
    out = np.zeros((len(y), n_outputs))
    for k in range(cfg.data.n_folds):
        out[fold == k], name = best_constant(cfg.metric, y[fold != k], int((fold == k).sum()), n_outputs)
    return {"constant": score(cfg.metric, y, out), "constant_is": name}
