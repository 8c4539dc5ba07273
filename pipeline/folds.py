"""Fold assignment, once per dataset and shared by every experiment on it.

Regression stratifies on quantile bins of the target; several targets use iterative stratification on
their bins (MultilabelStratifiedKFold); classification stratifies on the label. With a group column,
whole groups go to one fold (StratifiedGroupKFold). The same settings always give the same folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.config import Config
from pipeline.data import load_train, target_array
from pipeline.errors import PipelineError
from pipeline.io import read_csv, write_csv_atomic


def folds_path(cfg: Config) -> Path:
    d = cfg.data
    return Path(cfg.output_dir) / "folds" / f"{d.name}-k{d.n_folds}-seed{d.fold_seed}.csv"


def _bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bins; ties collapse bins, so a constant target still gets one valid bin."""
    ranks = pd.Series(values).rank(method="first").to_numpy()
    return np.minimum((ranks - 1) * n_bins // len(values), n_bins - 1).astype(int)


def assign_folds(df: pd.DataFrame, cfg: Config) -> np.ndarray:
    d = cfg.data
    n = len(df)
    if n < d.n_folds:
        raise PipelineError(f"{d.train_path}: {n} rows cannot be split into {d.n_folds} folds")
    if d.task == "regression":
        bins = np.stack([_bins(df[c].to_numpy(), min(d.fold_bins, n // d.n_folds or 1))
                         for c in d.target_columns], axis=1)
    else:
        bins = target_array(cfg, df)[:, None]
    fold = np.full(n, -1, dtype=int)
    x = np.zeros((n, 1))
    if d.group_column:
        if d.group_column not in df.columns:
            raise PipelineError(f"{d.train_path}: group column '{d.group_column}' not found; columns found: "
                                f"{', '.join(map(str, df.columns))}")
        groups = df[d.group_column].astype(str).to_numpy()
        if len(set(groups)) < d.n_folds:
            raise PipelineError(f"{d.train_path}: group column '{d.group_column}' has {len(set(groups))} "
                                f"groups, fewer than data.n_folds={d.n_folds}")
        # A single stratification key: the first target's bin (or the label).
        # sklearn refuses when no label has a row per fold: split the groups unstratified then.
        key = bins[:, 0] if np.bincount(bins[:, 0]).max() >= d.n_folds else np.zeros(n, dtype=int)
        splitter = StratifiedGroupKFold(n_splits=d.n_folds, shuffle=True, random_state=d.fold_seed)
        splits = splitter.split(x, key, groups)
    elif bins.shape[1] > 1:
        onehot = np.concatenate([np.eye(bins[:, j].max() + 1, dtype=int)[bins[:, j]]
                                 for j in range(bins.shape[1])], axis=1)
        splits = MultilabelStratifiedKFold(n_splits=d.n_folds, shuffle=True,
                                           random_state=d.fold_seed).split(x, onehot)
    else:
        counts = np.bincount(bins[:, 0])
        # A class with fewer rows than folds only misses some folds; the other classes stay stratified.
        strat = bins[:, 0] if counts.max() >= d.n_folds else np.zeros(n, dtype=int)
        splits = StratifiedKFold(n_splits=d.n_folds, shuffle=True, random_state=d.fold_seed).split(x, strat)
    for k, (_, valid) in enumerate(splits):
        fold[valid] = k
    return fold


def make_folds(cfg: Config, force: bool = False) -> Path:
    """Write `oof/folds/<dataset>-k<n>-seed<s>.csv` (id, fold) unless it is already there."""
    path = folds_path(cfg)
    if path.exists() and not force:
        return path
    df = load_train(cfg)
    folds = pd.DataFrame({cfg.data.id_column: df[cfg.data.id_column], "fold": assign_folds(df, cfg)})
    write_csv_atomic(path, folds)
    return path


def load_folds(cfg: Config, df: pd.DataFrame) -> np.ndarray:
    """Fold of every training row, joined by id; checks the file belongs to this dataset."""
    path = make_folds(cfg)
    id_col = cfg.data.id_column
    folds = read_csv(path, id_col)
    if id_col not in folds.columns or "fold" not in folds.columns:
        raise PipelineError(f"{path}: expected columns '{id_col}' and 'fold'")
    by_id = folds.set_index(id_col)["fold"]
    missing = ~df[id_col].isin(by_id.index)
    if missing.any() or len(folds) != len(df):
        raise PipelineError(f"{path}: made for another dataset (ids differ from {cfg.data.train_path}); "
                            f"delete it or run `pipeline folds --force`")
    fold = by_id.loc[df[id_col]].to_numpy()
    bad = (fold < 0) | (fold >= cfg.data.n_folds)
    if bad.any():
        raise PipelineError(f"{path}: fold index {int(fold[bad][0])} is out of range 0..{cfg.data.n_folds - 1}")
    group = cfg.data.group_column
    if group and group in df.columns:
        spans = pd.Series(fold).groupby(df[group].astype(str).to_numpy()).nunique()
        if (spans > 1).any():
            raise PipelineError(f"{path}: group {spans.idxmax()!r} of data.group_column '{group}' is in several "
                                f"folds (the file was made without it); run `pipeline folds --force`")
    return fold
