"""Test predictions: every fold's best checkpoint predicts the test set; the folds are averaged.

Classification averages probabilities. The models are rebuilt from the run directory alone (saved
backbone config, tokenizer and weights), so no pretrained download is needed at predict time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import data as D
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io import write_csv_atomic
from pipeline.model import load_tokenizer, model_from_saved
from pipeline.oof import missing_folds
from pipeline.runs import WHERE_KEYS, differing_keys, load_run_config
from pipeline.train import predict as predict_rows
from pipeline.train import resolve_device, resolve_precision

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
               if k.startswith("model.") or k in SHAPING_KEYS]
    if changed:
        listed = "; ".join(f"{k}: trained with {old!r}, asked for {new!r}" for k, old, new in changed)
        raise PipelineError(f"{cfg.run_dir}: predict with the settings the folds were trained with ({listed})")


def run(cfg: Config, test_path: Path | None = None) -> Path:
    """Write oof/<experiment>/test_predictions.csv (id + one column per target or class)."""
    check_trained_like(cfg)
    unfinished = missing_folds(cfg)
    if unfinished:
        raise PipelineError(f"{cfg.run_dir}: fold(s) {', '.join(map(str, unfinished))} have not finished "
                            f"(no metrics.json); train them first (pipeline train --resume)")
    checkpoints = [cfg.run_dir / f"fold{k}" / "model.pt" for k in range(cfg.data.n_folds)]
    missing = [k for k, p in enumerate(checkpoints) if not p.exists()]
    if missing:
        raise PipelineError(f"{cfg.run_dir}: no checkpoint for fold(s) {', '.join(map(str, missing))} "
                            f"(model.pt); train them first, with train.save_checkpoint true")
    train_df = D.load_train(cfg)
    classes = None if cfg.data.task == "regression" else D.class_names(cfg, train_df[cfg.data.target_columns[0]])
    columns = D.prediction_columns(cfg, classes)
    test = D.load_test(cfg, test_path)
    backbone_dir = cfg.run_dir / "backbone"
    tokenizer = load_tokenizer(backbone_dir)
    enc = D.encode(tokenizer, test, cfg.data.text_columns, cfg.data.max_length)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    positions = np.arange(len(test))
    total = np.zeros((len(test), len(columns)))
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = model_from_saved(cfg.model, backbone_dir, len(columns), state).to(device)
        total += predict_rows(model, enc, positions, cfg.data.task, device, precision,
                              cfg.train.eval_batch_size, tokenizer.pad_token_id or 0, cfg.train.pad_to_multiple_of)
    frame = pd.DataFrame(total / len(checkpoints), columns=columns)
    frame.insert(0, cfg.data.id_column, test[cfg.data.id_column].to_numpy())
    out = cfg.run_dir / "test_predictions.csv"
    write_csv_atomic(out, frame)
    return out
