"""Pseudo-labels and distillation: fold-safe labels, refusals, the loss on soft and weighted rows, off = as before."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline import bow
from pipeline import data as D
from pipeline import pseudo as P
from pipeline import train as T
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.folds import folds_path
from pipeline.losses import task_loss
from pipeline.metrics import score
from pipeline.model import load_tokenizer
from pipeline.predict import predict_table
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FP32 = ["train.precision=fp32", "train.device=cpu", "data.n_folds=2"]


def teacher_config(tmp_path: Path, data_dir: Path, task: str, classes: tuple | None = None, name: str = "teacher",
                   extra: list[str] | None = None):
    """A TF-IDF teacher (fast, and with min_df 1 and a weak penalty it memorizes its training rows)."""
    overrides = [f"data.dir={data_dir}", f"data.task={task}", "data.text_columns=[text]",
                 f"data.target_columns=[{'target' if task == 'regression' else 'label'}]", "data.n_folds=2",
                 "data.name=tiny", "model.kind=tfidf", "tfidf.word_ngrams=[1,1]", "tfidf.char_ngrams=null",
                 "tfidf.min_df=1", "tfidf.C=100", f"output_dir={tmp_path / 'oof'}", f"experiment={name}"]
    if classes:
        overrides.append(f"data.classes=[{','.join(classes)}]")
    return load_config(None, overrides + (extra or []))


def pseudo_cli(*args, code: int = 0):
    result = runner.invoke(app, ["pseudo", *map(str, args)])
    assert result.exit_code == code, result.output
    return result


# ---------------------------------------------------------------- the loss


def test_soft_cross_entropy_on_one_hot_targets_is_the_hard_loss_and_weights_weigh():
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 4)  # 3 dropout samples, 8 rows, 4 classes
    labels = torch.randint(0, 4, (8,))
    hard = task_loss("multiclass", logits, labels)
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    torch.testing.assert_close(task_loss("multiclass", logits, one_hot), hard, rtol=0, atol=1e-6)
    # Weights: the mean of weight x row loss (a row of weight 0 is not learnt from, one of 2 counts double).
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 0.0, 1.0])
    rows = torch.stack([task_loss("multiclass", logits[:, i:i + 1], labels[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(task_loss("multiclass", logits, one_hot, weights), (rows * weights).mean(),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(task_loss("multiclass", logits, labels, weights), (rows * weights).mean(),
                               rtol=0, atol=1e-6)
    # Regression: weighted squared errors, per row averaged over the targets.
    pred, target = torch.randn(8, 2), torch.randn(8, 2)
    torch.testing.assert_close(task_loss("regression", pred, target, weights),
                               (((pred - target) ** 2).mean(1) * weights).mean(), rtol=0, atol=1e-6)
    # Soft targets away from one-hot: cross-entropy with the teacher's distribution.
    soft = torch.softmax(torch.randn(8, 4), -1)
    expected = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(task_loss("multiclass", logits, soft), expected, rtol=0, atol=1e-6)


def test_temperature_softens_or_sharpens_the_teachers_probabilities():
    p = np.array([[0.8, 0.2]])
    np.testing.assert_allclose(P.soften(p, "binary", 1.0), p, atol=1e-7)
    np.testing.assert_allclose(P.soften(p, "binary", 2.0), [[2 / 3, 1 / 3]], atol=1e-6)  # sqrt(.8):sqrt(.2) = 2:1
    np.testing.assert_allclose(P.soften(p, "binary", 0.5), [[16 / 17, 1 / 17]], atol=1e-6)  # .64:.04


# ---------------------------------------------------------------- off: exactly as before


def test_without_pseudo_labels_a_fold_trains_bit_for_bit_as_without_the_feature(tmp_path, tiny_backbone, monkeypatch):
    """train.pseudo null: the same batches, random draws, weights and predictions as with the pseudo module cut out."""
    cfg = tiny_config(tmp_path, tiny_backbone, task="multiclass", classes=("a", "b", "c"),
                      extra=FP32 + ["train.rdrop=0.5", "train.epochs=2"])
    torch.manual_seed(123)
    prep = T.prepare(cfg)
    rng = torch.get_rng_state()
    rows = P.fold_rows(prep.enc, prep.pseudo, 0, np.flatnonzero(prep.fold != 0), np.array([]), "multiclass", 3, 1.0)
    assert prep.pseudo is None and rows.enc is prep.enc and rows.enc.weights is None
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    T.train_fold(prep, 0, progress=False)
    with_module = torch.load(cfg.run_dir / "fold0" / "model.pt")
    preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")

    bare = copy.deepcopy(cfg)
    bare.experiment = "bare"
    monkeypatch.setattr(T.P, "fold_rows", lambda enc, pseudo, fold, train_pos, *rest: P.FoldRows(enc, train_pos))
    T.train_fold(T.prepare(bare), 0, progress=False)
    without = torch.load(bare.run_dir / "fold0" / "model.pt")
    assert all(torch.equal(with_module[k], without[k]) for k in without)
    pd.testing.assert_frame_equal(preds, pd.read_csv(bare.run_dir / "fold0" / "valid_predictions.csv"),
                                  check_exact=True)


# ---------------------------------------------------------------- the teacher's labels, fold by fold


def test_pipeline_pseudo_writes_each_teacher_folds_predictions_and_what_made_them(tmp_path):
    data = tmp_path / "data"
    tiny_config(tmp_path, Path("unused"), task="multiclass", classes=("a", "b", "c"))  # writes the dataset
    teacher = teacher_config(tmp_path, data, "multiclass", ("a", "b", "c"))
    bow.run(teacher)
    pseudo_cli("teacher", "--texts", data / "test.csv", "--output-dir", tmp_path / "oof")
    out = tmp_path / "oof" / "teacher" / "pseudo" / "test.csv"
    written = pd.read_csv(out)
    test = pd.read_csv(data / "test.csv")
    assert written.columns.tolist() == ["id", "text", "a@fold0", "b@fold0", "c@fold0", "a@fold1", "b@fold1", "c@fold1"]
    assert written["id"].tolist() == test["id"].tolist()
    for k in range(2):  # fold k's own model, not an average
        saved = bow.load_fold_model(teacher.run_dir / f"fold{k}" / bow.MODEL_FILE)
        expected = bow.predict_rows(saved, bow.texts(test, ["text"]), "multiclass", 3)
        np.testing.assert_allclose(written[[f"{c}@fold{k}" for c in "abc"]], expected, atol=1e-9)
    assert not np.allclose(written["a@fold0"], written["a@fold1"])
    averaged = predict_table(teacher, teacher.run_dir, test, ["a", "b", "c"])
    np.testing.assert_allclose((written[["a@fold0", "b@fold0"]].to_numpy() + written[["a@fold1", "b@fold1"]]) / 2,
                               averaged[["a", "b"]], atol=1e-9)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["teacher"] == "teacher" and meta["task"] == "multiclass" and meta["columns"] == ["a", "b", "c"]
    assert meta["n_folds"] == 2 and meta["fold_seed"] == 42 and meta["folds_file"] == str(folds_path(teacher))
    assert meta["rows"] == len(test) and len(meta["folds_sha256"]) == 64

    (tmp_path / "no_text.csv").write_text("id,body\nx1,hello\n")
    result = pseudo_cli("teacher", "--texts", tmp_path / "no_text.csv", "--output-dir", tmp_path / "oof", code=1)
    assert "no_text.csv: missing column(s) text" in result.output


def test_a_blend_teaches_fold_k_with_its_members_fold_k_models_weighted_without_fold_ks_labels(tmp_path):
    """Distilling an ensemble: fold k's label is the members' fold-k predictions weighted by the blend's weights
    fit without fold k's rows (ensemble.json fold_weights), never by the weights fit on every row."""
    from pipeline import ensemble as E
    from pipeline import oof

    data = tmp_path / "data"
    tiny_config(tmp_path, Path("unused"), task="regression")  # writes the dataset
    members = {"words": teacher_config(tmp_path, data, "regression", name="words"),
               "chars": teacher_config(tmp_path, data, "regression", name="chars",
                                       extra=["tfidf.word_ngrams=null", "tfidf.char_ngrams=[2,4]", "tfidf.C=1"])}
    for cfg in members.values():
        bow.run(cfg)
        oof.run(cfg)
    blend = E.run(list(members), "blend", str(tmp_path / "oof"), method="nnls")
    pseudo_cli("blend", "--texts", data / "test.csv", "--output-dir", tmp_path / "oof")
    out = tmp_path / "oof" / "blend" / "pseudo" / "test.csv"
    written = pd.read_csv(out)
    test = pd.read_csv(data / "test.csv")
    for k in range(2):
        expected = sum(blend["fold_weights"][str(k)][name] * bow.predict_rows(
            bow.load_fold_model(cfg.run_dir / f"fold{k}" / bow.MODEL_FILE), bow.texts(test, ["text"]), "regression", 1)
            for name, cfg in members.items())
        np.testing.assert_allclose(written[[f"target@fold{k}"]], expected, atol=1e-9)
    assert blend["fold_weights"]["0"] != blend["fold_weights"]["1"]  # each fold's own weights
    assert json.loads(out.with_suffix(".json").read_text())["teacher_kind"] == "blend"

    E.run(list(members), "stacked", str(tmp_path / "oof"), method="stack")
    result = pseudo_cli("stacked", "--texts", data / "test.csv", "--output-dir", tmp_path / "oof", code=1)
    assert "no weights fit without each fold" in result.output


def unique_word_data(out: Path, tokenizer, n: int = 80, seed: int = 0) -> Path:
    """Each text is one word of its own and the labels are random: only memorizing a row tells its label."""
    rng = np.random.default_rng(seed)
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 5)
    words = rng.choice(vocab, size=n, replace=False)
    labels = rng.permutation(np.array(["neg", "pos"] * (n // 2)))
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"id": [f"r{i:03d}" for i in range(n)], "text": words, "label": labels})
    df.to_csv(out / "train.csv", index=False)
    df[["id", "text"]].assign(id=lambda d: "copy-" + d["id"]).to_csv(out / "copies.csv", index=False)
    return out


def student_config(tmp_path, backbone, data_dir, name, pseudo=None, extra=None):
    overrides = [f"data.dir={data_dir}", "data.task=binary", "data.text_columns=[text]", "data.target_columns=[label]",
                 "data.classes=[neg,pos]", "data.name=tiny", "data.max_length=16", "data.test_file=null",
                 "data.sample_submission_file=null", f"model.backbone={backbone}", "model.dropout=0",
                 "model.head_dropout=0", "train.batch_size=8", "train.eval_every=1000", "train.metric=auc",
                 f"output_dir={tmp_path / 'oof'}", f"experiment={name}", *FP32]
    if pseudo:
        overrides.append(f"train.pseudo={pseudo}")
    return load_config(None, overrides + (extra or []))


def oof_auc(cfg) -> float:
    """Every row scored by the fold that held it out."""
    T.run(cfg, progress=False)
    preds = pd.concat([pd.read_csv(cfg.run_dir / f"fold{k}" / "valid_predictions.csv", dtype={"id": str})
                       for k in range(2)])
    truth = pd.read_csv(cfg.data.train_path).set_index("id").loc[preds["id"], "label"]
    return score("auc", (truth == "pos").to_numpy(int), preds[["neg", "pos"]].to_numpy())


@pytest.mark.parametrize("train", [
    ["train.epochs=20", "train.lr=5e-3", "train.pseudo_weight=2"],  # mix mode
    # stage mode (tests/test_pseudo_stage.py): 20 epochs on the pseudo rows alone; the true stage, which alone may give
    # the checkpoint, barely moves the weights, so what the pseudo stage learnt shows in the scores
    ["train.pseudo_epochs=20", "train.pseudo_lr=5e-3", "train.epochs=1", "train.lr=1e-5"],
], ids=["mix", "stage"])
def test_fold_k_labels_carry_nothing_of_fold_ks_validation_rows_where_an_average_of_the_folds_leaks(
        tmp_path, tiny_backbone, train):
    """Pseudo texts that are copies of the training texts under other ids (external data that overlaps the training
    set): the validation-id filter cannot see them; the per-fold columns keep them honest. A student trained on the
    teacher's folds averaged (built here by hand) scores far above chance on labels only memorizing can tell;
    the pipeline's student does not, in either mode."""
    data = unique_word_data(tmp_path / "data", load_tokenizer(tiny_backbone))
    teacher = teacher_config(tmp_path, data, "binary", ("neg", "pos"), extra=["tfidf.C=1000"])
    bow.run(teacher)
    pseudo_cli("teacher", "--texts", data / "copies.csv", "--output-dir", tmp_path / "oof")
    fair = tmp_path / "oof" / "teacher" / "pseudo" / "copies.csv"
    leaky = tmp_path / "leaky.csv"
    table = pd.read_csv(fair)
    for c in ("neg", "pos"):
        table[f"{c}@fold0"] = table[f"{c}@fold1"] = (table[f"{c}@fold0"] + table[f"{c}@fold1"]) / 2
    table.to_csv(leaky, index=False)
    leaky.with_suffix(".json").write_text(fair.with_suffix(".json").read_text())

    train = train + ["train.warmup_ratio=0", "train.scheduler=constant", "model.pooling=cls"]
    fair_auc = oof_auc(student_config(tmp_path, tiny_backbone, data, "fair", fair, train))
    leaky_auc = oof_auc(student_config(tmp_path, tiny_backbone, data, "leaky", leaky, train))
    assert leaky_auc > 0.9, leaky_auc  # the student learnt its validation rows' labels through the teacher
    assert fair_auc < 0.65, fair_auc  # chance is 0.5 (80 rows: a standard error near 0.065)


# ---------------------------------------------------------------- refusals


def pseudo_labelled_test_file(tmp_path, tiny_backbone):
    """A TF-IDF teacher's pseudo-labels of the tiny binary test file: (the teacher's config, the CSV's path)."""
    data = tmp_path / "data"
    tiny_config(tmp_path, tiny_backbone, task="binary")
    teacher = teacher_config(tmp_path, data, "binary", ("neg", "pos"))
    bow.run(teacher)
    pseudo_cli("teacher", "--texts", data / "test.csv", "--output-dir", tmp_path / "oof")
    return teacher, tmp_path / "oof" / "teacher" / "pseudo" / "test.csv"


def test_a_pseudo_file_made_on_other_folds_or_without_a_fold_column_is_refused(tmp_path, tiny_backbone):
    teacher, path = pseudo_labelled_test_file(tmp_path, tiny_backbone)

    def student(*extra):
        cfg = tiny_config(tmp_path, tiny_backbone, task="binary", extra=[*FP32, f"train.pseudo={path}", *extra])
        return T.prepare(cfg)

    assert len(student().pseudo.ids) == 12  # the teacher's folds: accepted
    with pytest.raises(PipelineError, match=r"n_folds 2, and this experiment has 3"):
        student("data.n_folds=3")
    with pytest.raises(PipelineError, match=r"fold_seed 42, and this experiment has 7"):
        student("data.fold_seed=7")
    folds = pd.read_csv(folds_path(teacher))  # the same settings, but a folds file edited by hand: one row moved
    folds.loc[0, "fold"] = 1 - folds.loc[0, "fold"]
    folds.to_csv(folds_path(teacher), index=False)
    with pytest.raises(PipelineError, match=r"trained on other folds"):
        student()
    folds_path(teacher).unlink()  # made again, as the teacher's
    table = pd.read_csv(path).drop(columns=["pos@fold1"])
    table.to_csv(path, index=False)
    with pytest.raises(PipelineError, match=r"test.csv: missing column\(s\) pos@fold1"):
        student()
    path.with_suffix(".json").unlink()
    with pytest.raises(PipelineError, match=r"test.json not found"):
        student()
    with pytest.raises(PipelineError, match=r"train.pseudo_weight.*train.pseudo is null"):
        tiny_config(tmp_path, tiny_backbone, extra=["train.pseudo_weight=0.5"])
    with pytest.raises(PipelineError, match=r"train.distill_temperature"):
        tiny_config(tmp_path, tiny_backbone, extra=[f"train.pseudo={path}", "train.distill_temperature=2"])


def test_a_student_refuses_a_pseudo_file_rewritten_since_its_folds_learned_from_it(tmp_path, tiny_backbone):
    """Same path, other labels (a retrained teacher): the student's folds would learn from either version."""
    _, path = pseudo_labelled_test_file(tmp_path, tiny_backbone)
    cfg = tiny_config(tmp_path, tiny_backbone, task="binary", extra=[*FP32, f"train.pseudo={path}"])
    T.train_fold(T.prepare(cfg), 0, progress=False)
    table = pd.read_csv(path)
    table[["neg@fold1", "pos@fold1"]] = table[["pos@fold1", "neg@fold1"]].to_numpy()
    table.to_csv(path, index=False)
    changed = rf"{path} \(train.pseudo\) changed since the folds in {cfg.run_dir} were trained"
    with pytest.raises(PipelineError, match=changed):
        T.train_fold(T.prepare(cfg), 1, progress=False)


# ---------------------------------------------------------------- what a fold trains on


def record_losses(monkeypatch) -> list[tuple]:
    """Every task_loss call inside training: (batch positions are not passed, so targets and weights are kept)."""
    calls, loss = [], T.task_loss

    def recording(task, logits, targets, weights=None):
        calls.append((targets.detach().clone(), None if weights is None else weights.clone()))
        return loss(task, logits, targets, weights)

    monkeypatch.setattr(T, "task_loss", recording)
    return calls


def test_distilling_on_the_training_texts_drops_the_folds_validation_ids_and_scales_like_the_targets(
        tmp_path, tiny_backbone, monkeypatch):
    """A regression teacher (a transformer) labels the training texts; the student's fold 0 learns from its training
    ids' pseudo rows (teacher fold 0's values, scaled with fold 0's target mean and std, weight 0.5), never from its
    validation ids'."""
    teacher = tiny_config(tmp_path, tiny_backbone, extra=FP32 + ["experiment=teacher"])
    T.run(teacher, progress=False)
    pseudo_cli("teacher", "--texts", teacher.data.train_path, "--output-dir", tmp_path / "oof")
    path = tmp_path / "oof" / "teacher" / "pseudo" / "train.csv"
    table = pd.read_csv(path, dtype={"id": str})
    table["target@fold0"] = 100.0 + np.arange(len(table))  # recognizable values, far from the targets (~0.5)
    table.to_csv(path, index=False)

    cfg = tiny_config(tmp_path, tiny_backbone, extra=FP32 + [f"train.pseudo={path}", "train.pseudo_weight=0.5"])
    prep = T.prepare(cfg)
    train_pos = np.flatnonzero(prep.fold != 0)
    ids = prep.train_df["id"].to_numpy()
    collated, collate = [], D.collate

    def recording_collate(enc, positions, *args):
        if enc.weights is not None:  # a training batch (evaluation batches come from the training table alone)
            collated.extend(positions)
        return collate(enc, positions, *args)

    monkeypatch.setattr(D, "collate", recording_collate)
    calls = record_losses(monkeypatch)
    metrics = T.train_fold(prep, 0, progress=False)

    n = len(ids)
    pseudo_seen = {int(p) - n for p in collated if p >= n}
    assert {ids[i] for i in pseudo_seen} == set(ids[train_pos])  # every training id's pseudo row; no validation id
    assert sorted(int(p) for p in collated if p < n) == sorted(train_pos.tolist())
    assert metrics["steps"] == np.ceil(2 * len(train_pos) / 8)  # an epoch is the true and the pseudo rows
    assert metrics["valid_rows"] == n - len(train_pos)  # scored on the true validation rows

    true = prep.enc.targets[train_pos]
    mean, std = true.mean(0), true.std(0)
    targets = torch.cat([c[0] for c in calls]).numpy()
    weights = torch.cat([c[1] for c in calls]).numpy()
    pseudo_values = (100.0 + np.array(sorted(pseudo_seen)) - mean) / std
    is_pseudo = targets[:, 0] > 50  # the true z-scores are within a few units of 0
    np.testing.assert_allclose(np.sort(targets[is_pseudo, 0]), pseudo_values, rtol=1e-5)
    assert (weights[is_pseudo] == 0.5).all() and (weights[~is_pseudo] == 1.0).all()
    assert is_pseudo.sum() == len(train_pos)
