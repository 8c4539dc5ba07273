"""Regression targets far from zero: trained as z-scores, predicted in their own units (model.target_scaling)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import data as D
from pipeline import oof as O
from pipeline import predict as P
from pipeline import train as T
from pipeline.errors import PipelineError
from pipeline.model import build_model, model_from_saved
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = ["train.precision=fp32", "train.device=cpu"]


def shift_targets(cfg, mean: float, std: float) -> np.ndarray:
    """Rescale the fabricated dataset's target to the given mean and std (the words still explain it)."""
    path = cfg.data.train_path
    df = pd.read_csv(path)
    z = (df["target"] - df["target"].mean()) / df["target"].std()
    df["target"] = mean + std * z
    df.to_csv(path, index=False)
    return df["target"].to_numpy()


def test_standardized_training_predicts_in_the_targets_units(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32)
    y = shift_targets(cfg, 50.0, 5.0)
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    state = torch.load(cfg.run_dir / "fold0" / "model.pt", weights_only=True)
    prep = T.prepare(cfg)
    train_rows = y[prep.fold != 0]
    np.testing.assert_allclose(state["target_scale.mean"].numpy(), [train_rows.mean()], rtol=1e-6)
    np.testing.assert_allclose(state["target_scale.std"].numpy(), [train_rows.std()], rtol=1e-5)
    valid = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    assert abs(valid["target"].mean() - 50) < 5  # in the targets' units, not z-scores near 0
    assert metrics["score"] < 5.5  # no worse than about predicting the mean (std 5): the offset was never learned

    # The checkpoint alone rebuilds the scale: predict gives the same numbers as the fold's own evaluation.
    model = model_from_saved(cfg.model, cfg.run_dir / "backbone", 1, state)
    valid_pos = np.flatnonzero(prep.fold == 0)
    again = T.predict(model, prep.enc, valid_pos, "regression", torch.device("cpu"), "fp32", 16, 0, 8)
    np.testing.assert_allclose(again[:, 0], valid["target"].to_numpy(), rtol=1e-5)


def test_the_loss_compares_z_scores(tmp_path, tiny_backbone):
    """At the start the head predicts about zero: in z-scores the loss is about 1, not (50 / 5)^2 = 100."""
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32)
    shift_targets(cfg, 50.0, 5.0)
    prep = T.prepare(cfg)
    losses = {}
    for scaling in ("standardize", "none"):
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, 1)
        if scaling == "standardize":
            model.target_scale.fit(prep.enc.targets)
        model.eval()
        batch = D.collate(prep.enc, list(range(16)), 0)
        losses[scaling] = T.training_loss(model, batch, "regression", 0.0).item()
    assert losses["standardize"] < 3
    assert losses["none"] > 1000  # (50^2): the unscaled head must first learn the offset


@pytest.mark.parametrize("scaling", ["mean", "none"])
def test_other_scalings_leave_the_scale_at_identity(tmp_path, tiny_backbone, scaling):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32 + [f"model.target_scaling={scaling}"])
    y = shift_targets(cfg, 50.0, 5.0)
    T.run(cfg, folds=[0], progress=False)
    state = torch.load(cfg.run_dir / "fold0" / "model.pt", weights_only=True)
    assert state["target_scale.mean"].tolist() == [0.0] and state["target_scale.std"].tolist() == [1.0]
    if scaling == "mean":  # the bias started at the training mean and moved a little from there
        prep = T.prepare(cfg)
        assert abs(state["head.out.bias"].item() - y[prep.fold != 0].mean()) < 2.0


def test_several_targets_are_scaled_each_by_its_own_statistics(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, targets=2, extra=FP32)
    df = pd.read_csv(cfg.data.train_path)
    df["target0"], df["target1"] = df["target0"] * 10 + 100, df["target1"] - 7
    df.to_csv(cfg.data.train_path, index=False)
    T.run(cfg, folds=[0], progress=False)
    state = torch.load(cfg.run_dir / "fold0" / "model.pt", weights_only=True)
    prep = T.prepare(cfg)
    rows = df[["target0", "target1"]].to_numpy()[prep.fold != 0]
    np.testing.assert_allclose(state["target_scale.mean"].numpy(), rows.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(state["target_scale.std"].numpy(), rows.std(axis=0), rtol=1e-5)


def test_a_constant_target_trains_with_std_one(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32 + ["train.eval_every=1"])
    df = pd.read_csv(cfg.data.train_path)
    df["target"] = 3.0
    df.to_csv(cfg.data.train_path, index=False)
    T.run(cfg, folds=[0], progress=False)
    state = torch.load(cfg.run_dir / "fold0" / "model.pt", weights_only=True)
    assert state["target_scale.std"].tolist() == [1.0] and state["target_scale.mean"].tolist() == [3.0]


def test_a_checkpoint_from_before_target_scaling_predicts_unscaled(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32 + ["model.target_scaling=none"])
    T.run(cfg, progress=False)
    O.run(cfg)
    before = pd.read_csv(cfg.run_dir / "oof.csv")
    for k in range(cfg.data.n_folds):  # what an older run directory holds: no scale buffers, no key in its config
        path = cfg.run_dir / f"fold{k}" / "model.pt"
        state = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in state.items() if not k.startswith("target_scale.")}, path)
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    del saved["model"]["target_scaling"]
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    today = tiny_config(tmp_path, tiny_backbone, extra=FP32)  # today's default: standardize
    P.run(today)  # predict takes the old checkpoints: they carry no scale and need none
    assert pd.read_csv(cfg.run_dir / "test_predictions.csv")["target"].abs().max() < before["target"].abs().max() * 3
    # ...but training a fold into that run with today's default would mix unscaled and scaled folds
    with pytest.raises(PipelineError, match="model.target_scaling: 'none' -> 'standardize'"):
        T.run(today, folds=[0], progress=False)


def test_far_targets_learn_within_the_demo_budget_with_the_embedded_model(tmp_path):
    """The demo's config and budget (embedded MiniLM, 2 epochs) on its data moved to a mean of 50 and std 5: fold 0
    clearly beats predicting the training mean. Without scaling the head spends the budget learning the offset."""
    from pipeline.config import load_config
    from pipeline.demo import make_demo_data

    data = make_demo_data(tmp_path / "far")
    df = pd.read_csv(data / "train.csv")
    df["target"] = 50 + 5 * (df["target"] - df["target"].mean()) / df["target"].std()
    df.to_csv(data / "train.csv", index=False)
    cfg = load_config("configs/demo.yaml", [f"data.dir={data}", f"output_dir={tmp_path / 'oof'}"])
    m = T.run(cfg, folds=[0], progress=False)[0]
    prep = T.prepare(cfg)
    y = prep.enc.targets
    constant = float(np.sqrt(np.mean((y[prep.fold == 0] - y[prep.fold != 0].mean()) ** 2)))
    assert m["score"] < 0.7 * constant, (m["score"], constant)
