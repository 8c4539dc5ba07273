"""Predictions: deterministic with dropout in the model, blind to padding, and the folds' mean on the test set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import data as D
from pipeline import predict as P
from pipeline import train as T
from pipeline.errors import PipelineError
from pipeline.model import build_model, model_from_saved
from tests.conftest import tiny_config
from tests.test_train import encoded, texts_of_many_lengths

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
FP32 = ["train.precision=fp32", "train.device=cpu"]


def test_predictions_are_deterministic_with_dropout_in_the_model(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["model.dropout=0.5", "model.head_dropout=0.5"])
    enc, pad_id = encoded(tiny_backbone, texts_of_many_lengths(20))
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 1)
    rows = np.arange(20)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(**D.collate(enc, [0], pad_id).inputs),
                               model(**D.collate(enc, [0], pad_id).inputs))  # the dropout is live in training
    first = T.predict(model.train(), enc, rows, "regression", CPU, "fp32", 8, pad_id)  # as train_fold leaves it
    second = T.predict(model.train(), enc, rows, "regression", CPU, "fp32", 8, pad_id)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("pooling", ["attention", "cls", "mean", "last"])
def test_a_row_predicts_the_same_alone_and_beside_a_much_longer_row(tmp_path, tiny_backbone, pooling):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["model.dropout=0", f"model.pooling={pooling}"])
    texts = ["red cat", " ".join(["alpha beta gamma delta"] * 12)]
    enc, pad_id = encoded(tiny_backbone, texts)
    assert enc.lengths[1] > 10 * enc.lengths[0]
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 3)
    with torch.no_grad():
        model.head.out.weight.mul_(20)  # outputs far apart, so attention to a padded token would show
    alone = T.predict(model, enc, np.array([0]), "regression", CPU, "fp32", 1, pad_id)
    beside = T.predict(model, enc, np.array([0, 1]), "regression", CPU, "fp32", 2, pad_id, multiple=8)
    np.testing.assert_allclose(beside[0], alone[0], rtol=0, atol=1e-5)
    # The test can tell: the same batch with its padding attended to moves the short row's output.
    inputs = D.collate(enc, [0, 1], pad_id, 8).inputs
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with torch.no_grad():
        unmasked = model.eval()(**inputs)[0].numpy()
    assert np.abs(unmasked - alone[0]).max() > 1e-2


def test_test_predictions_are_the_mean_of_the_folds(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32 + ["train.eval_every=2"])
    T.run(cfg, progress=False)
    path = P.run(cfg)
    saved = pd.read_csv(path)
    test = pd.read_csv(cfg.data.test_path)
    assert saved["id"].tolist() == test["id"].tolist()
    enc = D.encode(T.prepare(cfg).tokenizer, test, ["text"], cfg.data.max_length)
    folds = []
    for k in range(cfg.data.n_folds):
        state = torch.load(cfg.run_dir / f"fold{k}" / "model.pt")
        model = model_from_saved(cfg.model, cfg.run_dir / "backbone", 1, state)
        folds.append(T.predict(model, enc, np.arange(len(test)), "regression", CPU, "fp32", 16, 0)[:, 0])
    folds = np.array(folds)
    np.testing.assert_allclose(saved["target"], folds.mean(0), rtol=0, atol=1e-6)
    assert np.abs(folds - folds.mean(0)).max() > 1e-3  # the folds disagree: any one fold alone would show


def test_a_run_without_checkpoints_trains_and_predict_says_why_it_cannot(tmp_path, tiny_backbone, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32 + ["train.save_checkpoint=false", "train.eval_every=1"])
    saved = []
    monkeypatch.setattr(T, "save_torch_atomic", lambda path, obj: saved.append(path))
    T.run(cfg, progress=False)
    assert saved == []  # neither model.pt nor a resume state.pt, at any step
    for k in range(3):
        fold = cfg.run_dir / f"fold{k}"
        assert (fold / "metrics.json").exists() and (fold / "valid_predictions.csv").exists()
        assert not (fold / "model.pt").exists() and not (fold / "state.pt").exists()
    with pytest.raises(PipelineError, match=r"no checkpoint for fold\(s\) 0, 1, 2 \(model.pt\); train them first, "
                                            r"with train.save_checkpoint true"):
        P.run(cfg)
