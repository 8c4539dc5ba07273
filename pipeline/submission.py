"""The submission CSV: exactly the ids, order and columns of sample_submission.csv, checked before writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import data as D
from pipeline.errors import PipelineError
from pipeline.io import write_csv_atomic
from pipeline.runs import load_run_config, read_predictions


def build(preds: pd.DataFrame, sample: pd.DataFrame, id_col: str, task: str, classes: list[str] | None,
          sample_path: Path) -> pd.DataFrame:
    """Fill sample_submission's columns from test predictions joined by id."""
    if id_col not in sample.columns:
        raise PipelineError(f"{sample_path}: no id column '{id_col}'; columns found: {', '.join(sample.columns)}")
    wanted = [c for c in sample.columns if c != id_col]
    pred_cols = [c for c in preds.columns if c != id_col]
    preds = preds.set_index(id_col)
    try:
        sample_ids = sample[id_col].astype(preds.index.dtype) if len(preds) else sample[id_col]
    except (ValueError, TypeError):  # ids of another type (text vs numbers): none match, reported below
        sample_ids = sample[id_col]
    missing = ~sample_ids.isin(preds.index)
    if missing.any() or len(preds) != len(sample):
        extra = len(set(preds.index) - set(sample_ids))
        raise PipelineError(f"{sample_path}: test ids differ from sample_submission's ({int(missing.sum())} "
                            f"missing from the predictions, e.g. {sample_ids[missing].head(3).tolist()}; "
                            f"{extra} predicted ids not in sample_submission)")
    rows = preds.loc[sample_ids]
    out = sample[[id_col]].copy()
    if set(wanted) <= set(pred_cols):
        for c in wanted:
            out[c] = rows[c].to_numpy()
    elif task != "regression" and len(wanted) == 1:
        probs = rows[classes].to_numpy()
        if task == "binary" and pd.api.types.is_numeric_dtype(sample[wanted[0]]):
            out[wanted[0]] = probs[:, 1]  # probability of the positive (second) class
        else:
            out[wanted[0]] = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
    else:
        raise PipelineError(f"{sample_path}: sample_submission columns {wanted} do not match the predicted "
                            f"columns {pred_cols}")
    if out[wanted].isna().any().any():
        raise PipelineError(f"submission would contain empty predictions in {wanted}; not written")
    return out


def run(experiment: str, out: Path, output_dir: str = "oof") -> Path:
    run_dir = Path(output_dir) / experiment
    cfg = load_run_config(run_dir)
    preds = read_predictions(run_dir, "test_predictions.csv", f"pipeline predict for {experiment}",
                             cfg.data.id_column)
    sample_path = cfg.data.sample_submission_path
    sample = D.read_table(sample_path, "sample_submission", [cfg.data.id_column], cfg.data.id_column)
    classes = None if cfg.data.task == "regression" else [c for c in preds.columns if c != cfg.data.id_column]
    submission = build(preds, sample, cfg.data.id_column, cfg.data.task, classes, sample_path)
    write_csv_atomic(Path(out), submission)
    return Path(out)
