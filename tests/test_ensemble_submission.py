"""Blending experiments and writing the submission, on run directories written by hand (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import blend as B
from pipeline import ensemble as E
from pipeline import submission as S
from pipeline.config import save_config
from pipeline.data import load_train
from pipeline.errors import PipelineError
from pipeline.metrics import score
from tests.conftest import tiny_config

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- fit_weights


def regression_members(seed: int, members: int, n: int = 80, targets: int = 1):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, targets))
    scales = rng.uniform(0.1, 2.0, size=members)
    biases = rng.normal(0, 0.5, size=members)
    return y, [y + b + s * rng.normal(size=y.shape) for s, b in zip(scales, biases, strict=True)]


def classification_members(seed: int, members: int, n: int = 80, k: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    preds = []
    for _ in range(members):
        logits = rng.normal(size=(n, k)) + rng.uniform(0, 3) * np.eye(k)[y]
        p = np.exp(logits)
        preds.append(p / p.sum(1, keepdims=True))
    return y, preds


def check_weights(w: np.ndarray, members: int) -> None:
    assert w.shape == (members,)
    assert (w >= 0).all(), w
    assert w.sum() == pytest.approx(1.0, abs=1e-9)


@FAST
@given(seed=st.integers(0, 2**31 - 1), members=st.integers(1, 5),
       metric=st.sampled_from(["rmse", "mcrmse", "mae", "logloss", "auc", "accuracy"]))
def test_property_weights_are_on_the_simplex(seed, members, metric):
    if metric in ("rmse", "mcrmse", "mae"):
        y, preds = regression_members(seed, members, targets=2 if metric == "mcrmse" else 1)
    else:
        y, preds = classification_members(seed, members)
    check_weights(B.fit_weights(y, preds, metric), members)


@FAST
@given(seed=st.integers(0, 2**31 - 1), members=st.integers(2, 5), metric=st.sampled_from(["rmse", "mcrmse", "logloss"]))
def test_property_no_blend_of_the_members_beats_the_fitted_one(seed, members, metric):
    """On smooth metrics the fitted weights are the best on the simplex: 100 random blends never beat them (the
    best single member or the equal blend, kept as fallbacks, often would)."""
    if metric == "logloss":
        y, preds = classification_members(seed, members)
    else:
        y, preds = regression_members(seed, members, targets=2 if metric == "mcrmse" else 1)
    stack = np.stack(preds)
    fitted = score(metric, y, np.tensordot(B.fit_weights(y, preds, metric), stack, axes=1))
    others = np.random.default_rng(seed).dirichlet(np.ones(members), size=100)
    best_other = min(score(metric, y, np.tensordot(w, stack, axes=1)) for w in others)
    assert fitted <= best_other * (1 + 1e-5), (fitted, best_other)  # SLSQP stops within ~3e-7


def test_independent_members_blend_better_than_either():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2000, 1))
    a, b = y + rng.normal(size=y.shape), y + rng.normal(size=y.shape)
    w = B.fit_weights(y, [a, b], "rmse")
    check_weights(w, 2)
    assert w == pytest.approx([0.5, 0.5], abs=0.05)
    blend = score("rmse", y, w[0] * a + w[1] * b)
    assert blend < 0.8 * min(score("rmse", y, a), score("rmse", y, b))  # ~1/sqrt(2) of either


def test_a_useless_member_gets_no_weight():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(500, 1))
    good, noise = y + 0.1 * rng.normal(size=y.shape), rng.normal(size=y.shape) * 5
    w = B.fit_weights(y, [noise, good], "rmse")
    check_weights(w, 2)
    assert w[1] > 0.97


# ---------------------------------------------------------------- ensemble.run on written run directories


def write_run(tmp_path: Path, name: str, oof_values: np.ndarray, fold: np.ndarray | None = None,
              test_values: np.ndarray | None = None, **cfg_kwargs):
    """A run directory as `pipeline train` + `pipeline oof` (+ `predict`) leave it."""
    cfg = tiny_config(tmp_path, tmp_path / "no-backbone-needed", **cfg_kwargs)
    cfg.experiment = name
    run_dir = cfg.run_dir
    save_config(cfg, run_dir / "config.yaml")
    train = load_train(cfg)
    columns = cfg.data.target_columns if cfg.data.task == "regression" else list(cfg.data.classes)
    oof = pd.DataFrame({"id": train["id"], "fold": np.arange(len(train)) % 3 if fold is None else fold})
    oof[columns] = oof_values
    oof.to_csv(run_dir / "oof.csv", index=False)
    if test_values is not None:
        test = pd.read_csv(cfg.data.test_path)[["id"]]
        test[columns] = test_values
        test.to_csv(run_dir / "test_predictions.csv", index=False)
    return cfg


def truth(cfg) -> np.ndarray:
    """Regression targets as read from the CSV (float64), class indices in data.classes order."""
    train = load_train(cfg)
    if cfg.data.task == "regression":
        return train[cfg.data.target_columns].to_numpy()
    return train["label"].map({c: i for i, c in enumerate(cfg.data.classes)}).to_numpy()


def test_ensemble_of_identical_oofs_equals_each_member(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(0)
    values = y + rng.normal(0, 0.1, size=y.shape)
    test_values = rng.normal(size=(12, 1))
    for name in ("a", "b", "c"):
        write_run(tmp_path, name, values, test_values=test_values)
    result = E.run(["a", "b", "c"], "blend", str(tmp_path / "oof"))
    member = score("rmse", y, values)
    assert result["members"] == pytest.approx({"a": member, "b": member, "c": member})
    # The pipeline scores against float32 targets, this test against the CSV's float64 values.
    assert result["cv"] == pytest.approx(result["members"]["a"], rel=1e-12)
    assert result["cv"] == pytest.approx(member, rel=1e-6)
    assert sum(result["weights"].values()) == pytest.approx(1.0) and min(result["weights"].values()) >= 0
    blend = pd.read_csv(tmp_path / "oof" / "blend" / "oof.csv")
    member_oof = pd.read_csv(tmp_path / "oof" / "a" / "oof.csv")
    assert blend["id"].tolist() == member_oof["id"].tolist() and blend["fold"].tolist() == member_oof["fold"].tolist()
    np.testing.assert_allclose(blend["target"], member_oof["target"], atol=1e-9)
    test = pd.read_csv(tmp_path / "oof" / "blend" / "test_predictions.csv")
    np.testing.assert_allclose(test["target"], test_values[:, 0], atol=1e-9)
    cv = json.loads((tmp_path / "oof" / "blend" / "cv.json").read_text())
    assert cv["cv"] == pytest.approx(member)


def test_ensemble_blend_uses_the_reported_weights(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused", task="multiclass", classes=("a", "b", "c"))
    y = truth(cfg)
    rng = np.random.default_rng(1)
    values, tests = [], []
    for name in ("m1", "m2"):
        logits = rng.normal(size=(len(y), 3)) + 2 * np.eye(3)[y]
        values.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
        tests.append(rng.dirichlet(np.ones(3), size=12))
        write_run(tmp_path, name, values[-1], test_values=tests[-1], task="multiclass", classes=("a", "b", "c"))
    result = E.run(["m1", "m2"], "blend", str(tmp_path / "oof"))
    w = np.array([result["weights"]["m1"], result["weights"]["m2"]])
    check_weights(w, 2)
    blend = pd.read_csv(tmp_path / "oof" / "blend" / "oof.csv")[["a", "b", "c"]].to_numpy()
    np.testing.assert_allclose(blend, w[0] * values[0] + w[1] * values[1], atol=1e-9)
    assert result["cv"] == pytest.approx(score("logloss", y, blend), rel=1e-6)
    assert result["cv"] <= min(result["members"].values()) + 1e-12
    test = pd.read_csv(tmp_path / "oof" / "blend" / "test_predictions.csv")[["a", "b", "c"]].to_numpy()
    np.testing.assert_allclose(test, w[0] * tests[0] + w[1] * tests[1], atol=1e-9)


def test_ensemble_truth_is_joined_by_id_when_the_oof_rows_are_not_in_file_order(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(2)
    order = rng.permutation(len(y))
    errors = {"near": 0.05, "far": 0.2}
    for name, noise in errors.items():
        write_run(tmp_path, name, y + rng.normal(0, noise, size=y.shape))
        path = tmp_path / "oof" / name / "oof.csv"
        pd.read_csv(path).iloc[order].to_csv(path, index=False)  # as a run whose OOF rows come in another order
    result = E.run(list(errors), "blend", str(tmp_path / "oof"))
    by_id = pd.Series(y[:, 0], index=load_train(cfg)["id"])
    for name in errors:
        oof = pd.read_csv(tmp_path / "oof" / name / "oof.csv")
        assert result["members"][name] == pytest.approx(score("rmse", by_id[oof["id"]].to_numpy(), oof["target"]))
    assert result["members"]["near"] < 0.07 < result["members"]["far"] < 0.3  # each member's own noise, not ~1


def test_ensemble_of_experiments_on_other_folds_is_an_error(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    write_run(tmp_path, "first", y)
    write_run(tmp_path, "shifted", y, fold=(np.arange(len(y)) + 1) % 3)
    with pytest.raises(PipelineError, match="'shifted' was trained on other folds than 'first'"):
        E.run(["first", "shifted"], "blend", str(tmp_path / "oof"))
    assert not (tmp_path / "oof" / "blend").exists()


def test_ensemble_of_experiments_with_other_targets_is_an_error(tmp_path):
    # The same training file, one experiment on one of its targets, the other on both.
    first = write_run(tmp_path, "first", 0.0, targets=2, extra=["data.target_columns=[target0]"])
    assert first.data.target_columns == ["target0"]
    write_run(tmp_path, "two_targets", 0.0, targets=2)
    with pytest.raises(PipelineError, match="'two_targets' was trained on other data or targets than 'first'"):
        E.run(["first", "two_targets"], "blend", str(tmp_path / "oof"))


def test_ensemble_name_must_not_overwrite_a_member(tmp_path):
    with pytest.raises(PipelineError, match="would overwrite a member"):
        E.run(["a", "b"], "a", str(tmp_path / "oof"))


def test_ensemble_of_an_untrained_experiment(tmp_path):
    with pytest.raises(PipelineError, match="no config.yaml"):
        E.run(["ghost"], "blend", str(tmp_path / "oof"))


# ---------------------------------------------------------------- submission.build


SAMPLE_PATH = Path("inputs/comp/sample_submission.csv")


def shuffled(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    out = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    assert out["id"].tolist() != df["id"].tolist()
    return out


def test_submission_has_sample_ids_order_and_columns_joined_by_id():
    rng = np.random.default_rng(0)
    ids = [f"t{i:03d}" for i in rng.permutation(30)]
    sample = pd.DataFrame({"id": ids, "content": 0.0, "wording": 0.0})
    preds = pd.DataFrame({"id": ids, "wording": rng.normal(size=30), "content": rng.normal(size=30)})
    out = S.build(shuffled(preds), sample, "id", "regression", None, SAMPLE_PATH)
    assert out.columns.tolist() == ["id", "content", "wording"]
    assert out["id"].tolist() == ids
    expected = preds.set_index("id").loc[ids]
    np.testing.assert_array_equal(out["content"], expected["content"])
    np.testing.assert_array_equal(out["wording"], expected["wording"])


def test_submission_with_integer_ids():
    sample = pd.DataFrame({"id": [5, 3, 9, 1], "target": 0.0})
    preds = pd.DataFrame({"id": [1, 3, 5, 9], "target": [0.1, 0.3, 0.5, 0.9]})
    out = S.build(preds, sample, "id", "regression", None, SAMPLE_PATH)
    assert out["id"].tolist() == [5, 3, 9, 1]
    assert out["target"].tolist() == [0.5, 0.3, 0.9, 0.1]


@pytest.mark.parametrize("sample_ids, pred_ids", [
    (["a", "b", "c"], ["a", "b", "x"]),  # one id differs
    (["a", "b", "c"], ["a", "b"]),  # a prediction missing
    (["a", "b"], ["a", "b", "c"]),  # an extra prediction
    ([1, 2, 3], ["a", "b", "c"]),  # integer ids in the sample, strings predicted
    (["a", "b", "c"], [1, 2, 3]),  # string ids in the sample, integers predicted
], ids=["other_id", "missing", "extra", "int_sample", "str_sample"])
def test_submission_ids_differ_is_an_error(sample_ids, pred_ids):
    sample = pd.DataFrame({"id": sample_ids, "target": 0.0})
    preds = pd.DataFrame({"id": pred_ids, "target": np.arange(len(pred_ids), dtype=float)})
    with pytest.raises(PipelineError, match="test ids differ from sample_submission") as err:
        S.build(preds, sample, "id", "regression", None, SAMPLE_PATH)
    assert str(SAMPLE_PATH) in str(err.value)


def test_submission_columns_that_do_not_match():
    sample = pd.DataFrame({"id": ["a", "b"], "score": 0.0})
    preds = pd.DataFrame({"id": ["a", "b"], "target": [1.0, 2.0]})
    with pytest.raises(PipelineError, match=r"columns \['score'\] do not match"):
        S.build(preds, sample, "id", "regression", None, SAMPLE_PATH)


def test_submission_without_the_id_column():
    with pytest.raises(PipelineError, match="no id column 'id'"):
        S.build(pd.DataFrame({"id": ["a"], "target": [1.0]}), pd.DataFrame({"ID": ["a"], "target": [0.0]}),
                "id", "regression", None, SAMPLE_PATH)


def test_binary_submission_is_the_positive_class_probability():
    rng = np.random.default_rng(1)
    ids = [f"t{i}" for i in range(20)]
    pos = rng.uniform(size=20)
    preds = pd.DataFrame({"id": ids, "neg": 1 - pos, "pos": pos})
    sample = pd.DataFrame({"id": ids[::-1], "label": 0.5})
    out = S.build(shuffled(preds), sample, "id", "binary", ["neg", "pos"], SAMPLE_PATH)
    assert out.columns.tolist() == ["id", "label"] and out["id"].tolist() == ids[::-1]
    np.testing.assert_allclose(out["label"], pos[::-1])


def test_multiclass_submission_with_per_class_columns_is_probabilities():
    rng = np.random.default_rng(2)
    ids = [f"t{i}" for i in range(25)]
    probs = rng.dirichlet(np.ones(3), size=25)
    preds = pd.DataFrame({"id": ids, "a": probs[:, 0], "b": probs[:, 1], "c": probs[:, 2]})
    sample = pd.DataFrame({"id": ids, "c": 0.0, "a": 0.0, "b": 0.0})  # the sample's column order wins
    out = S.build(shuffled(preds), sample, "id", "multiclass", ["a", "b", "c"], SAMPLE_PATH)
    assert out.columns.tolist() == ["id", "c", "a", "b"] and out["id"].tolist() == ids
    np.testing.assert_allclose(out[["a", "b", "c"]].to_numpy(), probs)
    np.testing.assert_allclose(out[["a", "b", "c"]].sum(1), 1.0)


def test_multiclass_submission_with_one_label_column_is_the_likeliest_class():
    ids = ["x", "y", "z"]
    preds = pd.DataFrame({"id": ids, "a": [0.7, 0.1, 0.2], "b": [0.2, 0.1, 0.5], "c": [0.1, 0.8, 0.3]})
    sample = pd.DataFrame({"id": ["z", "x", "y"], "label": "a"})
    out = S.build(shuffled(preds, 3), sample, "id", "multiclass", ["a", "b", "c"], SAMPLE_PATH)
    assert out["id"].tolist() == ["z", "x", "y"] and out["label"].tolist() == ["b", "a", "c"]


def test_submit_run_writes_the_sample_shape(tmp_path):
    cfg = write_run(tmp_path, "exp", np.zeros((60, 2)), test_values=np.zeros((12, 2)), task="binary")
    test_ids = pd.read_csv(cfg.data.test_path)["id"]
    pos = np.linspace(0, 1, 12)
    preds = pd.DataFrame({"id": test_ids, "neg": 1 - pos, "pos": pos})
    shuffled(preds).to_csv(cfg.run_dir / "test_predictions.csv", index=False)
    out = S.run("exp", tmp_path / "submission.csv", str(tmp_path / "oof"))
    sub, sample = pd.read_csv(out), pd.read_csv(cfg.data.sample_submission_path)
    assert sub.columns.tolist() == sample.columns.tolist()
    assert sub["id"].tolist() == sample["id"].tolist()
    np.testing.assert_allclose(sub["label"], preds.set_index("id").loc[sample["id"], "pos"])
