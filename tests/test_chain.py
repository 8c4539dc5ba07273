"""The whole chain through the CLI on tiny models: folds -> train -> oof -> predict -> ensemble -> submit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import tiny_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model gains nothing from more; the machine is shared

CASES = {
    "regression": dict(task="regression"),
    "multi_target": dict(task="regression", targets=3),
    "binary": dict(task="binary"),
    "multiclass": dict(task="multiclass", classes=("a", "b", "c")),
}


def write_config(cfg, path):
    values = cfg.to_dict()
    values.pop("experiment")
    path.write_text(yaml.safe_dump(values))
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_whole_chain(tmp_path, tiny_backbone, case):
    cfg = tiny_config(tmp_path, tiny_backbone, **CASES[case])
    cfg.experiment = case
    config = write_config(cfg, tmp_path / f"{case}.yaml")
    out = tmp_path / "oof"
    invoke("folds", config)
    invoke("train", config)
    result = invoke("oof", config)
    assert "CV" in result.output
    invoke("predict", config)
    run_dir = out / case
    cv = json.loads((run_dir / "cv.json").read_text())
    assert set(cv["folds"]) == {"0", "1", "2"} and np.isfinite(cv["cv"])
    oof = pd.read_csv(run_dir / "oof.csv")
    train = pd.read_csv(tmp_path / "data" / "train.csv")
    assert oof["id"].tolist() == train["id"].tolist()
    for k in range(3):
        log = pd.read_csv(run_dir / f"fold{k}" / "log.csv")
        assert {"step", "lr", "train_loss", cfg.metric}.issubset(log.columns)

    # A second experiment on the same folds, blended with the first.
    invoke("train", config, "--set", "train.seed=7", "--set", "experiment=second")
    invoke("oof", config, "--set", "train.seed=7", "--set", "experiment=second")
    invoke("predict", config, "--set", "experiment=second")
    result = invoke("ensemble", case, "second", "--name", "blend", "--output-dir", out)
    weights = json.loads((out / "blend" / "ensemble.json").read_text())["weights"]
    assert abs(sum(weights.values()) - 1) < 1e-9 and min(weights.values()) >= 0

    invoke("submit", "blend", "--out", tmp_path / "submission.csv", "--output-dir", out)
    sub = pd.read_csv(tmp_path / "submission.csv")
    sample = pd.read_csv(tmp_path / "data" / "sample_submission.csv")
    assert sub.columns.tolist() == sample.columns.tolist()
    assert sub["id"].tolist() == sample["id"].tolist()
    assert sub.drop(columns="id").notna().all().all()
    if case == "binary":
        assert sub["label"].between(0, 1).all()


def test_ids_that_look_like_numbers_or_missing_values_stay_as_written(tmp_path, tiny_backbone):
    """`0007` is not the number 7 and `NA` is not a missing id: both reach the submission as written."""
    cfg = tiny_config(tmp_path, tiny_backbone)
    cfg.experiment = "ids"
    data = tmp_path / "data"
    renamed = {}
    for name in ("train.csv", "test.csv", "sample_submission.csv"):
        df = pd.read_csv(data / name)
        df["id"] = df["id"].map(lambda x: renamed.setdefault(x, f"{len(renamed):04d}"))
        df.to_csv(data / name, index=False)
    train = pd.read_csv(data / "train.csv", dtype={"id": str})
    train.loc[5, "id"] = "NA"
    train.to_csv(data / "train.csv", index=False)
    config = write_config(cfg, tmp_path / "ids.yaml")
    for stage in ("folds", "train", "oof", "predict"):
        invoke(stage, config)
    oof = pd.read_csv(tmp_path / "oof" / "ids" / "oof.csv", dtype=str, keep_default_na=False)
    assert oof["id"].tolist() == train["id"].tolist() and "NA" in set(oof["id"])
    invoke("submit", "ids", "--out", tmp_path / "submission.csv", "--output-dir", tmp_path / "oof")
    sub = (tmp_path / "submission.csv").read_text().splitlines()
    sample = (data / "sample_submission.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in sub] == [line.split(",")[0] for line in sample]
    assert sub[1].startswith("00")  # e.g. 0060, not 60


@pytest.mark.filterwarnings("error:The y_prob values do not sum to one")
def test_numeric_labels_in_a_column_called_label(tmp_path, tiny_backbone):
    """Eleven classes 0..10 in a column named `label`, data.classes null: predictions carry the classes in numeric
    order and a one-column submission holds class labels. Class 10, the most frequent, comes first in no
    text order, so a submission of indices or of string-sorted classes would name another class."""
    cfg = tiny_config(tmp_path, tiny_backbone, task="multiclass", n=66,
                      extra=["data.classes=null", "train.epochs=3", "train.lr=5e-3", "train.eval_every=3"])
    cfg.experiment = "numeric"
    data = tmp_path / "data"
    train = pd.read_csv(data / "train.csv")
    train["label"] = np.where(np.arange(66) < 33, 10, np.arange(66) % 10)  # half the rows are class 10
    train.to_csv(data / "train.csv", index=False)
    sample = pd.read_csv(data / "sample_submission.csv")[["id"]].assign(label=0)
    sample.to_csv(data / "sample_submission.csv", index=False)
    config = write_config(cfg, tmp_path / "numeric.yaml")
    for stage in ("train", "oof", "predict"):
        invoke(stage, config)
    classes = [str(i) for i in range(11)]
    run_dir = tmp_path / "oof" / "numeric"
    oof = pd.read_csv(run_dir / "oof.csv")
    test = pd.read_csv(run_dir / "test_predictions.csv")
    assert oof.columns.tolist() == ["id", "fold", *classes] and test.columns.tolist() == ["id", *classes]
    assert oof[classes].mean().idxmax() == "10"  # the model learned the most frequent class under its own name
    invoke("submit", "numeric", "--out", tmp_path / "submission.csv", "--output-dir", tmp_path / "oof")
    sub = pd.read_csv(tmp_path / "submission.csv", dtype={"label": str})
    assert sub.columns.tolist() == ["id", "label"] and sub["id"].tolist() == sample["id"].tolist()
    assert sub["label"].tolist() == test[classes].idxmax(axis=1).tolist()
    assert sub["label"].value_counts().idxmax() == "10"
