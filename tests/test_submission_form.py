"""The submission follows the metric (labels for f1/accuracy, probabilities for logloss/auc), the binary threshold
tuned on OOF, and the floor `oof` prints: the metric's best constant prediction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline import submission as S
from pipeline.cli import app
from pipeline.metrics import best_constant, f1, score, tune_threshold
from tests.conftest import tiny_config

runner = CliRunner()
SAMPLE = "sample_submission.csv"


def probs_frame(p1: list[float], classes=("0", "1")) -> pd.DataFrame:
    p = np.asarray(p1)
    return pd.DataFrame({"id": [f"t{i}" for i in range(len(p))], classes[0]: 1 - p, classes[1]: p})


@pytest.mark.parametrize("metric, placeholder, expected", [
    ("f1", 0, [0, 1, 1]), ("accuracy", 0, [0, 1, 1]),   # labels, written as the numbers they are
    ("logloss", 0.5, [0.2, 0.6, 0.9]), ("auc", 0.5, [0.2, 0.6, 0.9]),  # the positive class's probability
])
def test_binary_single_column_follows_the_metric(metric, placeholder, expected):
    preds = probs_frame([0.2, 0.6, 0.9])
    sample = pd.DataFrame({"id": preds["id"], "target": placeholder})
    out = S.build(preds, sample, "id", "binary", ["0", "1"], SAMPLE, metric)
    assert out["target"].tolist() == pytest.approx(expected)


def test_labels_use_the_tuned_threshold_and_class_names():
    preds = probs_frame([0.2, 0.6, 0.9], classes=("ham", "spam"))
    sample = pd.DataFrame({"id": preds["id"], "label": "ham"})
    out = S.build(preds, sample, "id", "binary", ["ham", "spam"], SAMPLE, "f1",
                  {"kind": "threshold", "threshold": 0.7})
    assert out["label"].tolist() == ["ham", "ham", "spam"]
    assert S.build(preds, sample, "id", "binary", ["ham", "spam"], SAMPLE, "f1",
                   {"kind": "threshold", "threshold": 0.15})["label"].tolist() \
        == ["spam"] * 3


def test_multiclass_label_metric_with_class_columns_writes_one_hot_rows():
    preds = pd.DataFrame({"id": ["a", "b"], "x": [0.7, 0.1], "y": [0.2, 0.3], "z": [0.1, 0.6]})
    sample = pd.DataFrame({"id": ["a", "b"], "x": 0, "y": 0, "z": 0})
    out = S.build(preds, sample, "id", "multiclass", ["x", "y", "z"], SAMPLE, "accuracy")
    assert out[["x", "y", "z"]].to_numpy().tolist() == [[1, 0, 0], [0, 0, 1]]
    probs = S.build(preds, sample, "id", "multiclass", ["x", "y", "z"], SAMPLE, "logloss")
    assert probs[["x", "y", "z"]].to_numpy().tolist() == preds[["x", "y", "z"]].to_numpy().tolist()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 60), metric=st.sampled_from(["f1", "accuracy"]))
def test_tuned_threshold_is_never_worse_than_one_half_and_scores_what_it_says(seed, n, metric):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.round(rng.random(n), 1)  # ties: a cut may not split rows of equal probability
    probs = np.stack([1 - p1, p1], axis=1)
    threshold, value = tune_threshold(metric, y, probs)
    labels = (p1 >= threshold).astype(int)
    assert score(metric, y, np.eye(2)[labels]) == pytest.approx(value)
    assert value >= score(metric, y, np.eye(2)[(p1 >= 0.5).astype(int)]) - 1e-12


def test_best_constants():
    y = np.array([[1.0], [2.0], [10.0]])
    mean, name = best_constant("rmse", y, 2, 1)
    assert mean.tolist() == [[13 / 3], [13 / 3]] and name == "the training mean"
    assert best_constant("mae", y, 1, 1)[0].tolist() == [[2.0]]
    labels = np.array([0, 0, 0, 1])
    row, name = best_constant("f1", labels, 4, 2)
    assert name == "always the positive class" and f1(labels, row) == pytest.approx(2 * 0.25 / 1.25)
    assert best_constant("accuracy", labels, 1, 2)[0].tolist() == [[1.0, 0.0]]
    assert best_constant("logloss", np.array([0, 1, 2, 2]), 1, 3)[0].tolist() == [[0.25, 0.25, 0.5]]
    assert best_constant("f1", np.array([0, 1, 2, 2]), 1, 3)[1] == "always the majority class"


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_binary_f1_chain_prints_a_real_floor_and_submits_thresholded_labels(tmp_path, tiny_backbone):
    """An F1 competition with 0/1 labels: `oof` names the positive-class floor (not F1 0.00000), tunes the
    threshold on OOF, and `submit` writes 0/1 at that threshold; `--sample` takes another test file's sample."""
    cfg = tiny_config(tmp_path, tiny_backbone, task="binary", classes=("0", "1"),
                      extra=["train.metric=f1", "experiment=f1run"])
    data = cfg.data.train_path.parent
    for name in ("train.csv",):
        df = pd.read_csv(data / name)
        df["label"] = df["label"].astype(int)
        df.to_csv(data / name, index=False)
    pd.read_csv(data / SAMPLE).assign(label=0).to_csv(data / SAMPLE, index=False)
    config = tmp_path / "f1run.yaml"
    import yaml

    values = cfg.to_dict()
    values.pop("experiment")
    values["data"]["classes"] = None
    config.write_text(yaml.safe_dump(values))
    for stage in ("folds", "train"):
        invoke(stage, config)
    result = invoke("oof", config)
    cv = json.loads((tmp_path / "oof" / "f1run" / "cv.json").read_text())
    assert "always the positive class" in result.output and cv["constant"] > 0.3
    threshold = cv["decision"]["threshold"]
    assert cv["decision"]["kind"] == "threshold" and cv["cv_decided"] >= cv["cv"] and 0 < threshold <= 1
    invoke("predict", config)
    invoke("submit", "f1run", "--out", tmp_path / "sub.csv", "--output-dir", tmp_path / "oof")
    sub = pd.read_csv(tmp_path / "sub.csv")
    test = pd.read_csv(tmp_path / "oof" / "f1run" / "test_predictions.csv")
    assert sub["label"].tolist() == (test["1"] >= threshold).astype(int).tolist()
    assert pd.api.types.is_integer_dtype(sub["label"])

    # Another test file and its own sample_submission
    other = pd.read_csv(data / "test.csv").head(5)
    other.to_csv(tmp_path / "other_test.csv", index=False)
    other[["id"]].assign(label=0).to_csv(tmp_path / "other_sample.csv", index=False)
    invoke("predict", config, "--test", tmp_path / "other_test.csv")
    invoke("submit", "f1run", "--out", tmp_path / "other.csv", "--output-dir", tmp_path / "oof",
           "--sample", tmp_path / "other_sample.csv")
    assert pd.read_csv(tmp_path / "other.csv")["id"].tolist() == other["id"].tolist()
