"""Stage mode of pseudo-labels (train.pseudo_epochs): the pseudo rows alone, then the true labels on a fresh schedule.

What a fold trains on in each stage, the restart of the optimizer and schedule, the checkpoint, `--resume` across the
stage boundary (and in mix mode), and the keys refused. Fold safety against texts copied under other ids: the leak
test of tests/test_pseudo.py, in both modes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import bow
from pipeline import data as D
from pipeline import train as T
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.folds import load_folds
from pipeline.io import read_json
from pipeline.metrics import score
from tests.conftest import tiny_config
from tests.test_pseudo import FP32, pseudo_cli, record_losses, teacher_config

pytestmark = pytest.mark.usefixtures("one_thread")
NO_DROPOUT = ["model.dropout=0", "model.head_dropout=0"]


def labelled_training_texts(tmp_path: Path, backbone: Path, recognizable: bool = True) -> Path:
    """A TF-IDF teacher's labels of the training texts; recognizable: replaced by teacher fold k's label of row i =
    100 x (k + 1) + i (the true targets are near 0.5)."""
    tiny_config(tmp_path, backbone, extra=FP32)  # writes the dataset (60 rows; 2 folds: 30 training rows a fold)
    teacher = teacher_config(tmp_path, tmp_path / "data", "regression")
    bow.run(teacher)
    pseudo_cli("teacher", "--texts", teacher.data.train_path, "--output-dir", tmp_path / "oof")
    path = tmp_path / "oof" / "teacher" / "pseudo" / "train.csv"
    if recognizable:
        table = pd.read_csv(path, dtype={"id": str})
        for k in range(2):
            table[f"target@fold{k}"] = 100.0 * (k + 1) + np.arange(len(table))
        table.to_csv(path, index=False)
    return path


def staged(tmp_path, backbone, path, *extra, name="staged"):
    return tiny_config(tmp_path, backbone, extra=FP32 + [f"train.pseudo={path}", f"experiment={name}", *extra])


def log_of(cfg, fold: int = 0) -> pd.DataFrame:
    return pd.read_csv(cfg.run_dir / f"fold{fold}" / "log.csv").drop(columns=["eval_s", "elapsed_s"])


def linear_lr(base: float, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return base * step / max(1, warmup)
    return base * max(0.0, (total - step) / max(1, total - warmup))


# ---------------------------------------------------------------- what each stage trains on


def test_the_pseudo_stage_trains_on_the_folds_pseudo_rows_alone_and_the_true_stage_on_its_true_rows_alone(
        tmp_path, tiny_backbone, monkeypatch):
    """Fold 1, 2 pseudo epochs then 1 true epoch: first every pseudo row of fold 1's training ids twice, with teacher
    fold 1's labels and no weights (none of a validation id); then every true training row once; nothing mixed."""
    path = labelled_training_texts(tmp_path, tiny_backbone)
    cfg = staged(tmp_path, tiny_backbone, path, "train.pseudo_epochs=2", "train.epochs=1")
    prep = T.prepare(cfg)
    ids = prep.train_df["id"].to_numpy()
    train_pos, valid_pos = np.flatnonzero(prep.fold != 1), np.flatnonzero(prep.fold == 1)
    collated, collate = [], D.collate

    def recording_collate(enc, positions, *args):
        collated.append(("true" if enc is prep.enc else "pseudo", list(positions)))
        return collate(enc, positions, *args)

    monkeypatch.setattr(D, "collate", recording_collate)
    calls = record_losses(monkeypatch)
    metrics = T.train_fold(prep, 1, progress=False)

    training = [(table, p) for table, positions in collated for p in positions
                if table == "pseudo" or p not in set(valid_pos)]  # (evaluation batches: validation rows)
    first_true = next(i for i, (table, _) in enumerate(training) if table == "true")
    pseudo, true = training[:first_true], training[first_true:]
    assert {table for table, _ in true} == {"true"}  # no pseudo row after the stage boundary
    pseudo_ids = pd.read_csv(path, dtype={"id": str})["id"].to_numpy()
    seen = pd.Series([pseudo_ids[p] for _, p in pseudo]).value_counts()
    assert set(seen.index) == set(ids[train_pos]) and (seen == 2).all()  # 2 pseudo epochs, no validation id
    assert sorted(p for _, p in true) == sorted(train_pos.tolist())  # 1 true epoch, every training row once

    targets = [c[0].numpy()[:, 0] for c in calls]
    assert all(c[1] is None for c in calls)  # no loss weights in either stage (a plain fold has none)
    n_pseudo_batches = math.ceil(30 / 8) * 2
    mean, std = prep.enc.targets[train_pos, 0].mean(), prep.enc.targets[train_pos, 0].std()
    rows = np.array(sorted(int(np.flatnonzero(pseudo_ids == ids[i])[0]) for i in train_pos))
    np.testing.assert_allclose(np.sort(np.concatenate(targets[:n_pseudo_batches])),
                               np.sort(np.repeat((200.0 + rows - mean) / std, 2)), rtol=1e-5)  # teacher fold 1's
    assert np.abs(np.concatenate(targets[n_pseudo_batches:])).max() < 10  # then the true z-scores

    assert metrics["pseudo_rows"] == 30 and metrics["pseudo_steps"] == n_pseudo_batches
    assert metrics["steps"] == n_pseudo_batches + math.ceil(30 / 8) and metrics["train_rows"] == 30
    log = log_of(cfg, 1)
    assert log["stage"].tolist() == ["pseudo"] * 4 + ["true"] * 2  # twice per epoch, each stage
    assert log["step"].tolist() == [2, 4, 6, 8, 10, 12]  # counted from the fold's start
    assert log["epoch"].tolist() == [0.5, 1.0, 1.5, 2.0, 0.5, 1.0]  # each stage's own epochs
    assert metrics["pseudo_score"] == log.loc[3, "rmse"]
    assert metrics["best_step"] in (10, 12) and metrics["score"] == log["rmse"].iloc[4:].min()


def test_the_true_stage_restarts_the_schedule_and_trains_as_a_fold_started_from_the_pseudo_stages_weights(
        tmp_path, tiny_backbone, monkeypatch):
    """Without dropout: the second stage's rates, losses, scores and predictions are exactly those of a fold without
    pseudo-labels whose model starts at the weights the pseudo stage ended with (a fresh AdamW, a fresh warmup)."""
    path = labelled_training_texts(tmp_path, tiny_backbone)
    sets = NO_DROPOUT + ["train.eval_every=1", "train.warmup_ratio=0.25", "train.epochs=2", "train.lr=1e-3"]
    cfg = staged(tmp_path, tiny_backbone, path, *sets, "train.pseudo_epochs=1.5", "train.pseudo_lr=3e-3")
    boundary, build = [], T.build_optimizer

    def recording(model, cfg, **kwargs):  # the weights each stage's optimizer starts from
        boundary.append(copy.deepcopy(model.state_dict()))
        return build(model, cfg, **kwargs)

    monkeypatch.setattr(T, "build_optimizer", recording)
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    log = log_of(cfg)
    first = metrics["pseudo_steps"]
    assert first == 6 and metrics["steps"] == 6 + 8 and len(boundary) == 2
    pseudo, true = log[log["stage"] == "pseudo"], log[log["stage"] == "true"]
    assert pseudo["step"].tolist() == list(range(1, 7)) and true["step"].tolist() == list(range(7, 15))
    np.testing.assert_allclose(pseudo["lr"], [linear_lr(3e-3, s, 6, 2) for s in range(1, 7)], rtol=1e-6)
    np.testing.assert_allclose(true["lr"], [linear_lr(1e-3, s, 8, 2) for s in range(1, 9)], rtol=1e-6)

    new_model = T.new_model

    def from_the_pseudo_stage(prep, train_pos, main, *args):
        model = new_model(prep, train_pos, main, *args)
        model.load_state_dict(boundary[1])
        return model

    monkeypatch.setattr(T, "new_model", from_the_pseudo_stage)
    plain = tiny_config(tmp_path, tiny_backbone, extra=FP32 + sets + ["experiment=plain"])
    plain_metrics = T.run(plain, folds=[0], progress=False)[0]
    plain_log = log_of(plain)
    pd.testing.assert_frame_equal(true.drop(columns="stage").reset_index(drop=True),
                                  plain_log.assign(step=plain_log["step"] + first), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv"),
                                  pd.read_csv(plain.run_dir / "fold0" / "valid_predictions.csv"), check_exact=True)
    assert metrics["score"] == plain_metrics["score"] and metrics["best_step"] == plain_metrics["best_step"] + first


def test_the_checkpoint_comes_from_the_true_stage_even_where_the_pseudo_stage_scored_better(tmp_path, tiny_backbone):
    """A true stage at a rate that wrecks the model (0.1) scores worse than the pseudo stage did: the fold's model,
    predictions and score are still the true stage's best."""
    path = labelled_training_texts(tmp_path, tiny_backbone, recognizable=False)
    cfg = staged(tmp_path, tiny_backbone, path, "train.pseudo_epochs=2", "train.pseudo_lr=1e-3", "train.lr=0.1")
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    log = log_of(cfg)
    assert metrics["pseudo_score"] == log.loc[log["stage"] == "pseudo", "rmse"].iloc[-1]
    assert log.loc[log["stage"] == "pseudo", "rmse"].min() < log.loc[log["stage"] == "true", "rmse"].min()
    assert metrics["best_step"] > metrics["pseudo_steps"]
    assert metrics["score"] == log.loc[log["stage"] == "true", "rmse"].min()
    preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv", dtype={"id": str})
    truth = pd.read_csv(cfg.data.train_path, dtype={"id": str}).set_index("id").loc[preds["id"], "target"]
    assert score("rmse", truth.to_numpy()[:, None], preds[["target"]].to_numpy()) == pytest.approx(metrics["score"])


# ---------------------------------------------------------------- --resume


def stop_after_saving(monkeypatch, stage: int, step: int) -> None:
    """Interrupt training right after the state of optimizer step `step` of stage `stage` is saved."""
    save = T.save_state

    def saving(path, tr, fs, started):
        save(path, tr, fs, started)
        if (fs.stage, fs.step) == (stage, step):
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_state", saving)


def check_resumes_exactly(tmp_path, monkeypatch, straight, stage: int, step: int) -> dict:
    """Train `straight` to the end; a copy of it interrupted after saving (stage, step), then resumed: the same
    predictions, log (but for times), metrics and checkpoint, to the bit. Returns the state it resumed from."""
    T.run(straight, folds=[0], progress=False)
    cfg = copy.deepcopy(straight)
    cfg.experiment = "interrupted"
    stop_after_saving(monkeypatch, stage, step)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, folds=[0], progress=False)
    state = torch.load(cfg.run_dir / "fold0" / "state.pt", weights_only=False)
    monkeypatch.undo()
    resumed = T.run(cfg, folds=[0], resume=True, progress=False)[0]

    a, b = cfg.run_dir / "fold0", straight.run_dir / "fold0"
    pd.testing.assert_frame_equal(pd.read_csv(a / "valid_predictions.csv"), pd.read_csv(b / "valid_predictions.csv"),
                                  check_exact=True)
    pd.testing.assert_frame_equal(log_of(cfg), log_of(straight), check_exact=True)
    metrics = read_json(b / "metrics.json")
    assert {k: v for k, v in resumed.items() if k not in ("train_seconds", "peak_memory_mb")} == \
        {k: v for k, v in metrics.items() if k not in ("train_seconds", "peak_memory_mb")}
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in mb)
    assert not (a / "state.pt").exists()
    return state


@pytest.mark.parametrize("stage, step", [(0, 4), (1, 0), (1, 6)], ids=["in-pseudo-stage", "at-boundary",
                                                                         "in-true-stage"])
def test_an_interrupted_staged_fold_resumes_exactly_across_the_stage_boundary(tmp_path, tiny_backbone, monkeypatch,
                                                                               stage, step):
    """With dropout (the RNG matters) and EMA in the true stage (a technique's state matters): 2 pseudo epochs of
    4 steps, then 2 true epochs of 4 steps, the state saved every 2 steps and at the boundary."""
    path = labelled_training_texts(tmp_path, tiny_backbone)
    straight = staged(tmp_path, tiny_backbone, path, "train.pseudo_epochs=2", "train.pseudo_lr=2e-3",
                      "train.epochs=2", "train.eval_every=2", "train.ema=0.8")
    state = check_resumes_exactly(tmp_path, monkeypatch, straight, stage, step)
    assert (state["stage"], state["step"]) == (stage, step)
    if (stage, step) == (1, 0):  # the boundary: the pseudo stage's weights, a fresh optimizer and schedule
        assert state["optimizer"]["state"] == {} and state["scheduler"]["last_epoch"] == 0
        assert [row["stage"] for row in state["log"]] == ["pseudo"] * 4
        assert state["techniques"][0]["average"] is not None  # EMA starts at the true stage's first weights


def test_an_interrupted_fold_with_pseudo_rows_mixed_in_resumes_exactly(tmp_path, tiny_backbone, monkeypatch):
    path = labelled_training_texts(tmp_path, tiny_backbone)
    straight = staged(tmp_path, tiny_backbone, path, "train.pseudo_weight=0.5", "train.epochs=2",
                      "train.eval_every=2", "train.rdrop=0.5")
    state = check_resumes_exactly(tmp_path, monkeypatch, straight, 0, 6)
    assert state["step"] == 6 and state["stage"] == 0 and "stage" not in log_of(straight)  # one stage: no column


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("sets, message", [
    (["train.pseudo_epochs=1"], r"'train.pseudo_epochs': trains a first stage on pseudo-labelled rows, and "
                                r"train.pseudo is null"),
    (["train.pseudo=p.csv", "train.pseudo_epochs=-1"], r"'train.pseudo_epochs': must be >= 0, got -1"),
    (["train.pseudo=p.csv", "train.pseudo_lr=1e-4"], r"'train.pseudo_lr': is the learning rate of the pseudo stage, "
                                                     r"and train.pseudo_epochs is 0"),
    (["train.pseudo=p.csv", "train.pseudo_epochs=1", "train.pseudo_lr=0"], r"'train.pseudo_lr': must be positive"),
    (["train.pseudo=p.csv", "train.pseudo_epochs=1", "train.pseudo_weight=0.5"],
     r"'train.pseudo_weight': in stage mode .* only rescales the loss"),
])
def test_stage_mode_keys_that_cannot_act_are_refused_by_name(sets, message):
    with pytest.raises(PipelineError, match=message):
        load_config(None, sets)
    assert load_config(None, ["train.pseudo=p.csv", "train.pseudo_epochs=0.5", "train.pseudo_lr=1e-4",
                              "train.distill_temperature=1"]).train.pseudo_epochs == 0.5


def test_a_fold_left_without_pseudo_rows_in_stage_mode_is_named(tmp_path, tiny_backbone):
    """Every pseudo row is one of fold 0's validation ids: nothing for fold 0's pseudo stage to train on."""
    path = labelled_training_texts(tmp_path, tiny_backbone)
    cfg = staged(tmp_path, tiny_backbone, path, "train.pseudo_epochs=1")
    fold = load_folds(cfg, D.load_train(cfg))
    table = pd.read_csv(path, dtype={"id": str})
    table[table["id"].isin(D.load_train(cfg)["id"][fold == 0])].to_csv(path, index=False)
    prep = T.prepare(cfg)
    with pytest.raises(PipelineError, match=r"train.csv: no pseudo-labelled row is left for fold 0"):
        T.train_fold(prep, 0, progress=False)
    assert T.train_fold(prep, 1, progress=False)["pseudo_rows"] == 30  # fold 1 trains on all of them
