"""Test predictions: every fold's best checkpoint predicts the test set; the folds are averaged.

Classification averages probabilities. The models are rebuilt from the run directory alone (saved
backbone config, tokenizer and weights; under LoRA the base weights kept once and each fold's adapters), so no
pretrained download is needed at predict time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import bow
from pipeline import data as D
from pipeline import quantization as Q
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.inference import predict as predict_rows
from pipeline.inference import resolve_device, resolve_precision
from pipeline.io import write_csv_atomic
from pipeline.model import load_checkpoint_state, load_saved_tokenizer, model_from_saved
from pipeline.runs import WHERE_KEYS, differing_keys, load_run_config, missing_folds

# What the checkpoints compute depends on these; predicting with other values would silently change the answers.
SHAPING_KEYS = ("data.text_columns", "data.max_length", "data.task", "data.target_columns", "data.classes")
# Acts only in training: the checkpoint carries its effect (the target scale is in its buffers).
TRAINING_ONLY = {"model.target_scaling"}


def check_trained_like(cfg: Config) -> None:
    """Refuse settings that differ from those the checkpoints were trained with (device and precision may)."""
    if not (cfg.run_dir / "config.yaml").exists():
        return  # nothing trained yet: the missing folds are named next
    saved = load_run_config(cfg.run_dir).to_dict()
    changed = [(k, old, new) for k, old, new in differing_keys(saved, cfg.to_dict(), WHERE_KEYS | TRAINING_ONLY)
               if k.startswith(("model.", "tfidf.")) or k in SHAPING_KEYS]
    if changed:
        listed = "; ".join(f"{k}: trained with {old!r}, asked for {new!r}" for k, old, new in changed)
        raise PipelineError(f"{cfg.run_dir}: predict with the settings the folds were trained with ({listed})")


def run(cfg: Config, test_path: Path | None = None) -> Path:
    """Write oof/<experiment>/test_predictions.csv (id + one column per target or class)."""
    check_trained_like(cfg)
    check_complete(cfg, cfg.run_dir)
    train_df = D.load_train(cfg)
    classes = None if cfg.data.task == "regression" else D.class_names(cfg, train_df[cfg.data.target_columns[0]])
    test = D.load_test(cfg, test_path)
    frame = predict_table(cfg, cfg.run_dir, test, D.prediction_columns(cfg, classes))
    out = cfg.run_dir / "test_predictions.csv"
    write_csv_atomic(out, frame)
    return out


def checkpoint_name(cfg: Config) -> str:
    """The file each fold's model is saved in, by `model.kind`."""
    return bow.MODEL_FILE if cfg.model.kind == "tfidf" else "model.pt"


def checkpoints(cfg: Config, run_dir: Path) -> list[Path]:
    return [Path(run_dir) / f"fold{k}" / checkpoint_name(cfg) for k in range(cfg.data.n_folds)]


def check_complete(cfg: Config, run_dir: Path) -> None:
    """Every fold finished and kept its checkpoint, or an error naming the folds that did not."""
    unfinished = missing_folds(cfg, run_dir)
    if unfinished:
        raise PipelineError(f"{run_dir}: fold(s) {', '.join(map(str, unfinished))} have not finished "
                            f"(no metrics.json); train them first (pipeline train --resume)")
    missing = [k for k, p in enumerate(checkpoints(cfg, run_dir)) if not p.exists()]
    if missing:
        raise PipelineError(f"{run_dir}: no checkpoint for fold(s) {', '.join(map(str, missing))} "
                            f"({checkpoint_name(cfg)}); train them first, with train.save_checkpoint true")


def predict_table(cfg: Config, run_dir: Path, table: pd.DataFrame, columns: list[str],
                  device: str | None = None, precision: str | None = None) -> pd.DataFrame:
    """Every fold's checkpoint in `run_dir` predicts `table`; the folds are averaged (probabilities for classes).

    Needs only the run directory (backbone config, tokenizer, checkpoints): no training data, no pretrained
    weights. `device` and `precision` default to the run's config; a tfidf run ignores them (scikit-learn, CPU).
    """
    if cfg.model.kind == "tfidf":
        return bow.predict_table(cfg, run_dir, table, columns)
    total = np.zeros((len(table), len(columns)))
    for preds in fold_predictions(cfg, run_dir, table, columns, device, precision):
        total += preds
    frame = pd.DataFrame(total / cfg.data.n_folds, columns=columns)
    frame.insert(0, cfg.data.id_column, table[cfg.data.id_column].to_numpy())
    return frame


def fold_predictions(cfg: Config, run_dir: Path, table: pd.DataFrame, columns: list[str],
                     device: str | None = None, precision: str | None = None) -> Iterator[np.ndarray]:
    """Fold k's checkpoint's predictions of `table` (rows, columns), for k = 0, 1, ...: one model in memory at a time.

    `predict_table` averages them; `pipeline pseudo` keeps them apart (fold k's student may only learn from fold k's).
    """
    if cfg.model.kind == "tfidf":
        yield from bow.fold_predictions(cfg, run_dir, table, columns)
        return
    where = resolve_device(device or cfg.train.device)
    Q.check(cfg, where, predicting=True)  # a quantized backbone (model.load_in) loads on CUDA only
    backbone_dir = Path(run_dir) / "backbone"
    tokenizer = load_saved_tokenizer(backbone_dir)
    enc = D.encode(tokenizer, table, cfg.data.text_columns, cfg.data.max_length)
    how = resolve_precision(precision or cfg.train.precision, where)
    positions = np.arange(len(table))
    model = None
    for path in checkpoints(cfg, run_dir):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if model is not None and model.lora:  # one frozen backbone under every fold: only the adapters change
            load_checkpoint_state(model, state)
        else:
            model = model_from_saved(cfg.model, backbone_dir, len(columns), state, how).to(where)
        yield predict_rows(model, enc, positions, cfg.data.task, where, how,
                           cfg.train.eval_batch_size, tokenizer.pad_token_id or 0, cfg.train.pad_to_multiple_of,
                           cfg.train.eval_max_tokens)
