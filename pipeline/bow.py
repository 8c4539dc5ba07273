"""Bag-of-words experiments (`model.kind: tfidf`): TF-IDF features and a linear model, fold by fold, written the way
a fine-tuned run is written.

On authorship or short, noisy text, n-gram counts carry much of the signal: such a model is the floor a transformer
must beat and, predicting differently, a member an ensemble can use. Each fold fits its vectorizers and its model on
the fold's training rows alone (a validation row's n-grams never reach the vocabulary or the idf weights) and writes
what train.py writes (valid_predictions.csv, log.csv, metrics.json last) with model.joblib in place of model.pt,
so that oof, predict, ensemble, submit, report, grid and the Kaggle kit take the run unchanged. Regression: Ridge,
every target at once; classification: LogisticRegression, class probabilities in the order of `data.classes`.

Prediction (and so the Kaggle kernel) needs only the top-level imports; the folds and scikit-learn's estimators are
imported where a fold is fit.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import data as D
from pipeline.config import Config, TfidfConfig
from pipeline.errors import PipelineError
from pipeline.io import read_json, save_joblib_atomic, write_csv_atomic, write_json_atomic
from pipeline.metrics import score
from pipeline.runs import check_same_config, record_run

MODEL_FILE = "model.joblib"  # a plain dict (fold_model): vectorizers, linear weights, the scikit-learn that saved it
MAX_ITER = 1000  # LogisticRegression's lbfgs iterations; its default of 100 may stop before convergence
TOKEN_PATTERN = r"(?u)\b\w+\b"  # one-letter words too ("I", "a"): scikit-learn's default pattern drops them


def texts(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One text per row; several text columns are joined by a line break."""
    return table[columns].astype(str).agg("\n".join, axis=1).to_numpy()


def build_model(t: TfidfConfig, task: str):
    """An unfitted scikit-learn Pipeline: word and/or character TF-IDF side by side, then the linear model."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import FeatureUnion, Pipeline

    shared = dict(lowercase=t.lowercase, min_df=t.min_df, max_features=t.max_features, sublinear_tf=t.sublinear_tf)
    features = []
    if t.word_ngrams:
        features.append(("word", TfidfVectorizer(analyzer="word", token_pattern=TOKEN_PATTERN,
                                                 ngram_range=tuple(t.word_ngrams), **shared)))
    if t.char_ngrams:
        features.append(("char", TfidfVectorizer(analyzer=t.char_analyzer, ngram_range=tuple(t.char_ngrams), **shared)))
    model = Ridge(alpha=t.alpha) if task == "regression" else LogisticRegression(C=t.C, max_iter=MAX_ITER)
    return Pipeline([("features", FeatureUnion(features)), ("model", model)])


def fold_model(model) -> dict:
    """What a fold saves of its fitted Pipeline: the fitted vectorizers (scikit-learn objects, pickled) and the linear
    model as plain arrays, which predict the same under any scikit-learn (a LogisticRegression pickled by 1.9 fails to
    predict under Kaggle's 1.6: it lacks the `multi_class` attribute 1.6 reads)."""
    linear = model.named_steps["model"]
    return {"features": model.named_steps["features"], "coef": np.atleast_2d(linear.coef_).astype(np.float64),
            "intercept": np.atleast_1d(linear.intercept_).astype(np.float64),
            "classes": getattr(linear, "classes_", None), "scikit_learn": sklearn_version()}


def predict_rows(saved: dict, x: np.ndarray, task: str, outputs: int) -> np.ndarray:
    """(rows, outputs) float64: the targets, or one probability per class in the run's class order.

    Ridge's and LogisticRegression's own formulas: the linear scores, then for classes the logistic function of
    the one score (two classes) or the softmax of one score per class. The model was fit on class indices, so its
    classes are columns of the output: a class absent from a fold's training rows gets probability 0 there rather
    than shifting every column after it.
    """
    from scipy.special import expit, softmax

    if not len(x):  # a table with no rows: scikit-learn's transformers refuse one
        return np.zeros((0, outputs))
    z = np.asarray(saved["features"].transform(x) @ saved["coef"].T) + saved["intercept"]
    if task == "regression":
        return z.reshape(len(x), outputs)
    classes = saved["classes"]
    if z.shape[1] == 1:  # two classes: the score of the second
        probs = np.column_stack([1.0 - expit(z[:, 0]), expit(z[:, 0])])
    else:
        probs = softmax(z, axis=1)
    out = np.zeros((len(x), outputs))
    out[:, classes] = probs
    return out


def sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def load_fold_model(path: Path) -> dict:
    """A fold's saved dict (`fold_model`); an error naming the file and the scikit-learn here if it does not load."""
    import joblib

    try:
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError:  # scikit-learn < 1.3
        InconsistentVersionWarning = UserWarning  # noqa: N806
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InconsistentVersionWarning)  # said once per run, by predict_table
            return joblib.load(path)
    except Exception as err:  # unpickling another scikit-learn's classes can fail in many ways
        raise PipelineError(f"{path} does not load with scikit-learn {sklearn_version()} ({type(err).__name__}: "
                            f"{err}); predict with the scikit-learn it was trained with (its fold's metrics.json, "
                            f"or the kit's MANIFEST.json, names it)") from None


def predict_table(cfg: Config, run_dir: Path, table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Every fold's model in `run_dir` predicts `table`; the folds are averaged (probabilities for classes)."""
    total = np.zeros((len(table), len(columns)))
    for preds in fold_predictions(cfg, run_dir, table, columns):
        total += preds
    frame = pd.DataFrame(total / cfg.data.n_folds, columns=columns)
    frame.insert(0, cfg.data.id_column, table[cfg.data.id_column].to_numpy())
    return frame


def fold_predictions(cfg: Config, run_dir: Path, table: pd.DataFrame, columns: list[str]) -> Iterator[np.ndarray]:
    """Fold k's model's predictions of `table`, for k = 0, 1, ...; one model at a time: vocabularies are large."""
    x = texts(table, cfg.data.text_columns)
    versions = set()
    for k in range(cfg.data.n_folds):
        saved = load_fold_model(Path(run_dir) / f"fold{k}" / MODEL_FILE)
        versions.add(saved["scikit_learn"])
        yield predict_rows(saved, x, cfg.data.task, len(columns))
    here = sklearn_version()
    if versions != {here}:
        warnings.warn(f"{run_dir}: the fold models were saved by scikit-learn {', '.join(sorted(versions))} and are "
                      f"predicting with {here}; vectorizers pickled by another version may transform differently. "
                      f"Train with the scikit-learn you predict with (on Kaggle: the image's, see "
                      f"pipeline/kaggle/image.yaml)",
                      stacklevel=3)


def fit(cfg: Config, x: np.ndarray, y: np.ndarray, fold: int):
    model = build_model(cfg.tfidf, cfg.data.task)
    try:
        return model.fit(x, y)
    except ValueError as err:  # no n-gram left after min_df / max_df, or one class only
        raise PipelineError(f"{cfg.experiment} fold {fold}: TF-IDF + linear model cannot be fit on the fold's "
                            f"{len(x)} training rows ({err}); check tfidf.min_df and the labels") from None


def train_fold(cfg: Config, df: pd.DataFrame, x: np.ndarray, y: np.ndarray, fold_of: np.ndarray,
               classes: list[str] | None, fold: int, resume: bool = False) -> dict:
    """Fit one fold on its training rows, score its validation rows, write the fold's files (metrics.json last)."""
    import torch

    from pipeline.train import peak_memory_mb, reset_peak_memory  # the transformer run's measure, same column

    cpu = torch.device("cpu")

    if fold not in set(fold_of.tolist()):
        raise PipelineError(f"fold {fold} does not exist: data.n_folds is {cfg.data.n_folds}")
    out = cfg.run_dir / f"fold{fold}"
    check_same_config(cfg, cfg.run_dir)
    if resume and (out / "metrics.json").exists():
        return read_json(out / "metrics.json")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "valid_predictions.csv", MODEL_FILE):  # unfinished until metrics.json is back
        (out / stale).unlink(missing_ok=True)
    record_run(cfg)
    reset_peak_memory(cpu)
    started = time.time()

    train_pos, valid_pos = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
    columns = D.prediction_columns(cfg, classes)
    saved = fold_model(fit(cfg, x[train_pos], y[train_pos], fold))
    preds = predict_rows(saved, x[valid_pos], cfg.data.task, len(columns))  # the saved model is the one scored
    value = score(cfg.metric, y[valid_pos], preds)
    seconds = round(time.time() - started, 1)

    if cfg.train.save_checkpoint:
        save_joblib_atomic(out / MODEL_FILE, saved)
    frame = pd.DataFrame(preds, columns=columns)
    frame.insert(0, cfg.data.id_column, df[cfg.data.id_column].to_numpy()[valid_pos])
    write_csv_atomic(out / "valid_predictions.csv", frame)
    write_csv_atomic(out / "log.csv", pd.DataFrame([{"step": 1, "epoch": 1.0, cfg.metric: value,
                                                     "elapsed_s": seconds}]))
    features = {name: len(v.vocabulary_) for name, v in saved["features"].transformer_list}
    metrics = {"fold": fold, "metric": cfg.metric, "score": value, "best_step": 1, "steps": 1,
               "train_rows": len(train_pos), "valid_rows": len(valid_pos), "precision": "fp64", "device": "cpu",
               "processes": 1, "train_seconds": seconds, "peak_memory_mb": peak_memory_mb(cpu), "skipped_steps": 0,
               "features": features, "scikit_learn": sklearn_version()}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def run(cfg: Config, folds: list[int] | None = None, resume: bool = False) -> list[dict]:
    """Fit the given folds (default: all) of a tfidf experiment; deterministic, on one CPU process."""
    from pipeline.folds import load_folds

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PipelineError(f"{cfg.experiment}: model.kind tfidf fits on one process; run `pipeline train` without "
                            f"accelerate launch or torchrun")
    df = D.load_train(cfg)
    fold_of = load_folds(cfg, df)
    classes = None if cfg.data.task == "regression" else D.class_names(cfg, df[cfg.data.target_columns[0]])
    x, y = texts(df, cfg.data.text_columns), D.target_array(cfg, df)
    return [train_fold(cfg, df, x, y, fold_of, classes, k, resume)
            for k in (folds if folds is not None else range(cfg.data.n_folds))]
