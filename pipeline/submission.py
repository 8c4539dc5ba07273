"""The submission CSV: exactly the ids, order and columns of sample_submission.csv, checked before writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import data as D
from pipeline import decision as decisions
from pipeline.decision import LABEL_METRICS
from pipeline.errors import PipelineError
from pipeline.io import write_csv_atomic
from pipeline.runs import load_run_config, read_predictions


def _labels(classes: list[str]) -> np.ndarray:
    """Class names as the submission writes them: numbers where every name is one (0/1, not "0"/"1")."""
    values = pd.to_numeric(pd.Series(classes), errors="coerce")
    if values.notna().all():
        return np.asarray([int(v) if float(v).is_integer() else float(v) for v in values], dtype=object)
    return np.asarray(classes, dtype=object)


def decide(probs: np.ndarray, classes: list[str], decision: dict | None = None) -> np.ndarray:
    """The predicted label of each row: under the decision tuned on OOF (threshold, class weights), else argmax."""
    if decision is None and len(classes) == 2:
        decision = {"kind": "threshold", "threshold": 0.5}
    index = decisions.apply(decision, probs) if decision else np.asarray(probs).argmax(axis=1)
    return _labels(classes)[index]


def build(preds: pd.DataFrame, sample: pd.DataFrame, id_col: str, task: str, classes: list[str] | None,
          sample_path: Path, metric: str | None = None, decision: dict | None = None) -> pd.DataFrame:
    """Fill sample_submission's columns from test predictions joined by id, in the form the metric scores.

    Classification scored on labels (f1, accuracy, qwk) gets labels, under the `decision` tuned on OOF (the
    binary threshold, class weights); scored on probabilities (logloss, auc) it gets the probability of each
    class sample_submission names, or of the positive class in a binary competition's single column. An ordinal
    regression scored by qwk gets integer labels through the decision's cut points.
    """
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
    labels = task != "regression" and metric in LABEL_METRICS
    if task == "regression" and metric == "qwk":
        if decision is None or decision.get("kind") != "cuts":
            raise PipelineError("qwk scores integer labels and the cut points come from the OOF predictions: run "
                                "`pipeline oof` (or `pipeline ensemble`) first; submission not written")
        rows = rows.copy()
        rows[pred_cols] = decisions.apply(decision, rows[pred_cols].to_numpy())[:, None].astype(int)
    if set(wanted) <= set(pred_cols):
        if labels:  # one column per class, scored on labels: a one-hot row
            chosen = decide(rows[classes].to_numpy(), classes, decision)
            for c, name in zip(classes, _labels(classes)):
                if c in wanted:
                    out[c] = (chosen == name).astype(int)
        else:
            for c in wanted:
                out[c] = rows[c].to_numpy()
    elif task != "regression" and len(wanted) == 1:
        probs = rows[classes].to_numpy()
        if task == "binary" and not labels and pd.api.types.is_numeric_dtype(sample[wanted[0]]):
            out[wanted[0]] = probs[:, 1]  # probability of the positive (second) class
        else:
            out[wanted[0]] = decide(probs, classes, decision)
    else:
        raise PipelineError(f"{sample_path}: sample_submission columns {wanted} do not match the predicted "
                            f"columns {pred_cols}")
    if out[wanted].isna().any().any():
        raise PipelineError(f"submission would contain empty predictions in {wanted}; not written")
    return out


def run(experiment: str, out: Path, output_dir: str = "oof", sample_path: Path | None = None) -> Path:
    """Write the submission for an experiment's test predictions; `sample_path` overrides the config's."""
    run_dir = Path(output_dir) / experiment
    cfg = load_run_config(run_dir)
    preds = read_predictions(run_dir, "test_predictions.csv", f"pipeline predict for {experiment}",
                             cfg.data.id_column)
    sample_path = sample_path or cfg.data.sample_submission_path
    sample = D.read_table(sample_path, "sample_submission", [cfg.data.id_column], cfg.data.id_column)
    classes = None if cfg.data.task == "regression" else [c for c in preds.columns if c != cfg.data.id_column]
    submission = build(preds, sample, cfg.data.id_column, cfg.data.task, classes, sample_path, cfg.metric,
                       decisions.load(run_dir))
    write_csv_atomic(Path(out), submission)
    return Path(out)
