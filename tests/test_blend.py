"""Blend methods (hill climbing, stacking with nested folds, seed means, blends of blends) and the decisions tuned
on OOF (thresholds, class weights, QWK cut points): what each promises on OOF, and that submit applies exactly
what was fit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import cohen_kappa_score

from pipeline import blend as B
from pipeline import decision as Dn
from pipeline import ensemble as E
from pipeline import submission as S
from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.kaggle import package
from pipeline.metrics import score
from pipeline.runs import load_run_config
from tests.conftest import tiny_config
from tests.test_ensemble_submission import classification_members, regression_members, truth, write_run

FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- hill climbing


@FAST
@given(seed=st.integers(0, 2**31 - 1), members=st.integers(1, 5), negative=st.booleans(),
       metric=st.sampled_from(["rmse", "mae", "logloss", "accuracy"]))
def test_property_hill_climbing_never_lowers_the_oof_score(seed, members, negative, metric):
    """It starts from the best member and takes only improving steps: never worse than the best member."""
    classification = metric in ("logloss", "accuracy")
    y, preds = classification_members(seed, members) if classification else regression_members(seed, members)
    w = B.hill_climb(y, preds, metric, negative=negative and not classification)
    assert w.sum() == pytest.approx(1.0)
    assert negative or (w >= 0).all()
    blended = score(metric, y, B.apply(B.linear(w), preds))
    best = min(score(metric, y, p) for p in preds) if metric in ("rmse", "mae", "logloss") else \
        max(score(metric, y, p) for p in preds)
    assert (blended <= best + 1e-12) if metric in ("rmse", "mae", "logloss") else (blended >= best - 1e-12)


def test_hill_climbing_subtracts_a_member_only_with_negative_weights():
    """a = y + e and b = y + 2e share their error: 2a - b = y, a blend with a negative weight on b."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(400, 1))
    e = rng.normal(size=y.shape)
    preds = [y + e, y + 2 * e]
    positive = B.hill_climb(y, preds, "rmse")
    negative = B.hill_climb(y, preds, "rmse", negative=True)
    assert (positive >= 0).all() and negative[1] < -0.5
    assert score("rmse", y, B.apply(B.linear(negative), preds)) < 0.2 * score("rmse", y, preds[0])


def test_hill_climbing_mixes_independent_members():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(2000, 1))
    preds = [y + rng.normal(size=y.shape) for _ in range(3)]
    w = B.hill_climb(y, preds, "rmse")
    assert (w > 0.2).all()  # every member earns a share
    assert score("rmse", y, B.apply(B.linear(w), preds)) < 0.65 * min(score("rmse", y, p) for p in preds)


# ---------------------------------------------------------------- stacking


@pytest.mark.parametrize("classification", [False, True])
def test_stacking_never_fits_on_the_fold_it_predicts(classification):
    """Fold 0's stacked OOF predictions do not move when fold 0's labels change; the other folds' do."""
    y, preds = classification_members(3, 3, n=150) if classification else regression_members(3, 3, n=150)
    fold = np.arange(len(y)) % 5
    _, before = B.fit_stack(y, preds, fold, classification)
    changed = y.copy()
    rng = np.random.default_rng(4)
    changed[fold == 0] = rng.integers(0, 3, (fold == 0).sum()) if classification else \
        rng.normal(size=changed[fold == 0].shape) * 10
    _, after = B.fit_stack(changed, preds, fold, classification)
    np.testing.assert_array_equal(before[fold == 0], after[fold == 0])
    assert not np.allclose(before[fold != 0], after[fold != 0])


def test_stacking_undoes_what_a_weighted_mean_cannot():
    """Members off by a scale and an offset: a linear second stage corrects them, the simplex cannot."""
    rng = np.random.default_rng(5)
    y = rng.normal(size=(500, 1))
    preds = [2 * y + 1 + 0.1 * rng.normal(size=y.shape), -y + 0.3 * rng.normal(size=y.shape)]
    fold = np.arange(len(y)) % 5
    spec, oof = B.fit_stack(y, preds, fold, False)
    nnls = B.apply(B.linear(B.fit_weights(y, preds, "rmse")), preds)
    assert score("rmse", y, oof) < 0.1 < score("rmse", y, nnls)
    assert spec["kind"] == "stack" and spec["model"] == "ridge"


def test_stacked_probabilities_are_probabilities():
    y, preds = classification_members(6, 2, n=200)
    spec, oof = B.fit_stack(y, preds, np.arange(len(y)) % 4, True)
    for out in (oof, B.apply(spec, preds)):
        assert (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0)
    binary = [np.stack([1 - p[:, 0], p[:, 0]], axis=1) for p in preds]
    spec, oof = B.fit_stack((y == 0).astype(int), binary, np.arange(len(y)) % 4, True)
    assert oof.shape == (len(y), 2) and np.allclose(oof.sum(axis=1), 1.0)


def test_ensemble_stack_writes_the_test_predictions_of_the_stacker_fit_on_every_row(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(7)
    tests = {}
    for name, scale in (("m1", 2.0), ("m2", 0.5)):
        tests[name] = rng.normal(size=(12, 1))
        write_run(tmp_path, name, scale * y + rng.normal(0, 0.1, y.shape), test_values=tests[name])
    result = E.run(["m1", "m2"], "stacked", str(tmp_path / "oof"), method="stack")
    assert result["method"] == "stack" and "weights" not in result
    test = pd.read_csv(tmp_path / "oof" / "stacked" / "test_predictions.csv")
    np.testing.assert_allclose(test[["target"]].to_numpy(), B.apply(result["blend"], [tests["m1"], tests["m2"]]))
    oof = pd.read_csv(tmp_path / "oof" / "stacked" / "oof.csv")
    assert result["cv"] == pytest.approx(score("rmse", y, oof[["target"]].to_numpy()))
    assert result["cv"] < min(result["members"].values())


@pytest.mark.parametrize("classification", [False, True])
def test_lgbm_stacking_never_fits_on_the_fold_it_predicts(classification):
    y, preds = classification_members(13, 2, n=200) if classification else regression_members(13, 2, n=200)
    fold = np.arange(len(y)) % 4
    _, before = B.fit_stack(y, preds, fold, classification, "lgbm")
    changed = y.copy()
    changed[fold == 0] = (changed[fold == 0] + 1) % 3 if classification else -changed[fold == 0] * 5
    _, after = B.fit_stack(changed, preds, fold, classification, "lgbm")
    np.testing.assert_array_equal(before[fold == 0], after[fold == 0])
    assert not np.allclose(before[fold != 0], after[fold != 0])
    if classification:
        assert np.allclose(after.sum(axis=1), 1.0)
        import lightgbm

        x = B.features(preds, True)  # apply() must compute what the fitted classifier predicts on its features
        reference = lightgbm.LGBMClassifier(**B.LGBM_PARAMS).fit(x, y).predict_proba(x)
        np.testing.assert_allclose(B.apply(B.fit_stacker(x, y, True, 3, "lgbm"), preds), reference, atol=1e-12)


def test_lgbm_stacker_learns_what_a_linear_one_cannot_and_the_kernel_applies_it(tmp_path):
    """One member knows how far a target is from the median, the other on which side: the target is their product,
    which trees fit and a linear stacker cannot. The test predictions written are the all-rows stacker's, which
    is what the kernel computes from the manifest's `stack`."""
    cfg = tiny_config(tmp_path, tmp_path / "unused", n=400)
    d = truth(cfg) - np.median(truth(cfg))
    rng = np.random.default_rng(14)
    members = {"m1": np.abs(d) + rng.normal(0, 0.01, d.shape), "m2": np.sign(d) + rng.normal(0, 0.01, d.shape)}
    tests = {m: rng.normal(size=(12, 1)) for m in members}
    for m, v in members.items():
        write_run(tmp_path, m, v, test_values=tests[m], n=400)
    out = str(tmp_path / "oof")
    linear = E.run(list(members), "linear", out, method="stack")
    trees = E.run(list(members), "trees", out, method="stack", stacker="lgbm")
    assert trees["blend"]["model"] == "lgbm" and trees["cv"] < linear["cv"]
    frames = [pd.read_csv(tmp_path / "oof" / m / "test_predictions.csv") for m in members]
    kernel = B.blend_frames(frames, "id", ["target"], stack={"members": [[1, 0], [0, 1]], "spec": trees["blend"]})
    written = pd.read_csv(tmp_path / "oof" / "trees" / "test_predictions.csv")
    np.testing.assert_allclose(kernel["target"], written["target"], atol=1e-12)
    with pytest.raises(PipelineError, match="--stacker is an option of --method stack"):
        E.run(list(members), "x", out, method="nnls", stacker="lgbm")


# ---------------------------------------------------------------- seeds and blends of blends


def test_seed_mean_and_a_blend_of_blends_flatten_to_trained_experiments(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(8)
    tests = {}
    for name in ("a", "a-seed43", "a-seed7", "b"):
        tests[name] = rng.normal(size=(12, 1))
        write_run(tmp_path, name, y + rng.normal(0, 0.3, y.shape), test_values=tests[name])
    out = str(tmp_path / "oof")
    mean = E.run(["a"], "a_seeds", out, method="mean", seeds=True)
    assert list(mean["members"]) == ["a", "a-seed7", "a-seed43"]
    assert list(mean["weights"].values()) == pytest.approx([1 / 3] * 3)
    top = E.run(["a_seeds", "b"], "top", out, method="hill")
    w = top["weights"]
    leaves = E.leaves_of(tmp_path / "oof", "top")
    assert leaves == pytest.approx({"a": w["a_seeds"] / 3, "a-seed7": w["a_seeds"] / 3,
                                    "a-seed43": w["a_seeds"] / 3, "b": w["b"]})
    test = pd.read_csv(tmp_path / "oof" / "top" / "test_predictions.csv")["target"].to_numpy()
    np.testing.assert_allclose(test, sum(v * tests[k][:, 0] for k, v in leaves.items()), atol=1e-9)

    E.run(["a", "b"], "stacked", out, method="stack")
    with pytest.raises(PipelineError, match="'stacked' is a stacked blend"):
        E.run(["stacked", "b"], "again", out)
    with pytest.raises(PipelineError, match="--negative is an option of --method hill"):
        E.run(["a", "b"], "x", out, method="nnls", negative=True)


def test_negative_weights_are_refused_for_probabilities(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused", task="binary")
    y = truth(cfg)
    for name in ("p", "q"):
        write_run(tmp_path, name, np.eye(2)[y] * 0.8 + 0.1, task="binary")
    with pytest.raises(PipelineError, match="negative"):
        E.run(["p", "q"], "x", str(tmp_path / "oof"), method="hill", negative=True)


# ---------------------------------------------------------------- decisions tuned on OOF


def test_qwk_is_the_quadratic_kappa_of_rounded_values_and_of_argmax():
    rng = np.random.default_rng(9)
    y = rng.integers(1, 7, size=(300, 1)).astype(float)
    pred = y + rng.normal(0, 0.8, y.shape)
    rounded = np.clip(np.floor(pred + 0.5), 1, 6)
    assert score("qwk", y, pred) == pytest.approx(cohen_kappa_score(y[:, 0], rounded[:, 0], weights="quadratic"))
    labels = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300) + np.eye(4)[labels]
    assert score("qwk", labels, probs) == pytest.approx(
        cohen_kappa_score(labels, probs.argmax(1), weights="quadratic"))


@FAST
@given(seed=st.integers(0, 2**31 - 1), squeeze=st.floats(0.3, 1.5))
def test_property_tuned_cuts_are_never_worse_than_rounding(seed, squeeze):
    rng = np.random.default_rng(seed)
    y = rng.integers(1, 6, size=(120, 1)).astype(float)
    pred = 3 + squeeze * (y - 3) + rng.normal(0, 0.6, y.shape)
    decision = Dn.fit("qwk", "regression", y, pred)
    assert decision["kind"] == "cuts" and decision["labels"] == [1, 2, 3, 4, 5]
    assert np.all(np.diff(decision["cuts"]) > 0)
    assert Dn.decided_score("qwk", y, pred, decision) >= score("qwk", y, pred) - 1e-12


def test_tuned_cuts_recover_a_squeezed_regression():
    """Predictions pulled toward the mean (what a regression on ordinal scores does): rounding loses the extreme
    labels, cut points tuned on OOF get them back."""
    rng = np.random.default_rng(10)
    y = rng.integers(1, 7, size=(2000, 1)).astype(float)
    pred = 3.5 + 0.4 * (y - 3.5) + rng.normal(0, 0.15, y.shape)
    decision = Dn.fit("qwk", "regression", y, pred)
    assert Dn.decided_score("qwk", y, pred, decision) > score("qwk", y, pred) + 0.05


@FAST
@given(seed=st.integers(0, 2**31 - 1), metric=st.sampled_from(["f1", "accuracy", "qwk"]))
def test_property_tuned_class_weights_are_never_worse_than_argmax(seed, metric):
    y, (probs,) = classification_members(seed, 1, n=60, k=3)
    decision = Dn.fit(metric, "multiclass", y, probs)
    assert decision["kind"] == "class_weights"
    tuned = Dn.decided_score(metric, y, probs, decision)
    assert tuned >= score(metric, y, probs) - 1e-12
    labels = Dn.apply(decision, probs)
    assert tuned == pytest.approx(score(metric, y, np.eye(3)[labels]))  # scores what apply() decides


def test_class_weights_fix_a_biased_classifier():
    """A model that under-predicts a rare class: macro F1 gains from a larger weight on it."""
    rng = np.random.default_rng(11)
    y = rng.choice(3, size=1500, p=[0.6, 0.3, 0.1])
    logits = rng.normal(size=(1500, 3)) + 1.5 * np.eye(3)[y] - np.array([0, 0, 2.0])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    decision = Dn.fit("f1", "multiclass", y, probs)
    assert decision["weights"][2] > decision["weights"][0]
    assert Dn.decided_score("f1", y, probs, decision) > score("f1", y, probs) + 0.03


def test_ordinal_submission_writes_the_labels_the_oof_cuts_decide(tmp_path):
    """oof -> cv.json's cuts -> submit: integer labels equal to the decision applied to the test predictions."""
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    rng = np.random.default_rng(12)
    test_values = rng.uniform(0, 5, size=(12, 1))
    write_run(tmp_path, "ordinal", 0.0, test_values=test_values)
    train = pd.read_csv(cfg.data.train_path)
    train["target"] = rng.integers(0, 5, len(train))  # integer scores, as an essay competition's
    train.to_csv(cfg.data.train_path, index=False)
    run_cfg = load_run_config(cfg.run_dir.parent / "ordinal")
    run_cfg.train.metric = "qwk"
    save_config(run_cfg, cfg.run_dir.parent / "ordinal" / "config.yaml")
    y = train[["target"]].to_numpy(float)
    oof = pd.read_csv(tmp_path / "oof" / "ordinal" / "oof.csv")
    oof["target"] = 2 + 0.5 * (y[:, 0] - 2) + rng.normal(0, 0.2, len(y))
    oof.to_csv(tmp_path / "oof" / "ordinal" / "oof.csv", index=False)

    with pytest.raises(PipelineError, match="cut points come from the OOF predictions"):
        S.run("ordinal", tmp_path / "sub.csv", str(tmp_path / "oof"))
    assert not (tmp_path / "sub.csv").exists()
    result = E.run(["ordinal"], "ordinal_blend", str(tmp_path / "oof"))
    cv = json.loads((tmp_path / "oof" / "ordinal_blend" / "cv.json").read_text())
    assert cv["decision"]["kind"] == "cuts" and cv["cv_decided"] >= result["cv"]
    S.run("ordinal_blend", tmp_path / "sub.csv", str(tmp_path / "oof"))
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert pd.api.types.is_integer_dtype(sub["target"])
    expected = Dn.apply(cv["decision"], test_values)
    by_id = dict(zip(pd.read_csv(cfg.data.test_path)["id"], expected))
    assert sub["target"].tolist() == [by_id[i] for i in sub["id"]]


def test_non_integer_targets_are_refused_for_qwk(tmp_path):
    from pipeline.data import load_train

    cfg = tiny_config(tmp_path, tmp_path / "unused", extra=["train.metric=qwk"])
    with pytest.raises(PipelineError, match="target column 'target' has non-integer values"):
        load_train(cfg)


# ---------------------------------------------------------------- nested scores of fitted weights


def test_nested_score_scores_each_fold_with_weights_fit_without_it(tmp_path):
    """A blend's weights fit on every OOF row flatter it; the nested score blends fold k by weights fit on the
    other folds only, and is what the ensemble reports beside the fitted score."""
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(3)
    for name in ("m1", "m2", "m3"):
        write_run(tmp_path, name, y + rng.normal(0, 0.5, y.shape))
    result = E.run(["m1", "m2", "m3"], "hill", str(tmp_path / "oof"), method="hill")
    oof = pd.read_csv(tmp_path / "oof" / "m1" / "oof.csv")
    fold = oof["fold"].to_numpy()
    preds = [pd.read_csv(tmp_path / "oof" / m / "oof.csv")[["target"]].to_numpy() for m in ("m1", "m2", "m3")]
    expected = np.zeros_like(preds[0])
    for k in np.unique(fold):
        weights = B.hill_climb(y[fold != k], [p[fold != k] for p in preds], "rmse")
        expected[fold == k] = sum(w * p[fold == k] for w, p in zip(weights, preds))
    assert result["cv_nested"] == pytest.approx(score("rmse", y, expected))
    assert result["cv_nested"] != pytest.approx(result["cv"])  # weights that change with the folds
    assert result["cv"] <= result["cv_nested"]  # fit and scored on the same rows: the flattering one
    cv_json = read_json(tmp_path / "oof" / "hill" / "cv.json")
    assert cv_json["cv_nested"] == result["cv_nested"]
    stacked = E.run(["m1", "m2", "m3"], "stack", str(tmp_path / "oof"), method="stack")
    assert stacked["cv_nested"] == stacked["cv"]  # a stack's OOF is nested by construction


def test_a_member_in_a_subfolder_keeps_its_path_so_the_kit_finds_that_run(tmp_path):
    """`pipeline ensemble commonlit report/commonlit_ema`: the leaf is `report/commonlit_ema`, never a same-named
    run beside the blend (which the kit or a teacher would otherwise read in its place)."""
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(5)
    write_run(tmp_path, "b", y + rng.normal(0, 0.3, y.shape))
    shutil.copytree(tmp_path / "oof" / "b", tmp_path / "oof" / "report" / "b")  # as a grid under oof/report leaves it
    for name in ("a", "b"):  # oof/b: another run of the same name, outside report/
        write_run(tmp_path, name, y + rng.normal(0, 0.3, y.shape))
    out = str(tmp_path / "oof")
    inner = E.run(["a", "report/b"], "inner", out, method="nnls")
    assert inner["leaves"] == {"a": {"a": 1.0}, "report/b": {"report/b": 1.0}}
    E.run(["inner", "a"], "outer", out, method="mean")
    flat = E.leaves_of(tmp_path / "oof", "outer")
    assert set(flat) == {"a", "report/b"} and "b" not in flat
    assert set(E.fold_leaves(tmp_path / "oof", "outer", 0)) == {"a", "report/b"}


def test_a_blend_built_in_a_subfolder_names_its_members_there_when_read_from_the_parent(tmp_path, monkeypatch):
    """`pipeline ensemble a b --output-dir oof/report --name inner`, then `pipeline ensemble report/inner c` from
    oof/: inner's members are report/a and report/b, never the same-named runs beside oof/ (the kit and a teacher
    would read those in their place); the kit's member list and a teacher's fold weights agree."""
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    y = truth(cfg)
    rng = np.random.default_rng(6)
    for name in ("a", "b"):  # as a grid under oof/report leaves them
        write_run(tmp_path, name, y + rng.normal(0, 0.3, y.shape))
        shutil.move(tmp_path / "oof" / name, tmp_path / "oof" / "report" / name)
    for name in ("a", "b", "c"):  # oof/a, oof/b: other runs of the same names
        write_run(tmp_path, name, y + rng.normal(0, 0.3, y.shape))
    inner = E.run(["a", "b"], "inner", str(tmp_path / "oof" / "report"), method="mean")
    assert inner["root"] == ".."
    assert E.leaves_of(tmp_path / "oof" / "report", "inner") == pytest.approx({"a": 0.5, "b": 0.5})
    outer = E.run(["report/inner", "c"], "outer", str(tmp_path / "oof"), method="mean")
    assert outer["leaves"]["report/inner"] == pytest.approx({"report/a": 0.5, "report/b": 0.5})
    assert E.leaves_of(tmp_path / "oof", "report/inner") == pytest.approx({"report/a": 0.5, "report/b": 0.5})
    assert E.leaves_of(tmp_path / "oof", "outer") == pytest.approx({"report/a": 0.25, "report/b": 0.25, "c": 0.5})
    assert E.fold_leaves(tmp_path / "oof", "outer", 1) == pytest.approx({"report/a": 0.25, "report/b": 0.25,
                                                                          "c": 0.5})
    named = E.run(["report/a", "c"], "deep/blend", str(tmp_path / "oof"), method="mean")  # a --name with a folder
    assert named["root"] == "../.." and E.leaves_of(tmp_path / "oof", "deep/blend") == {"report/a": 0.5, "c": 0.5}

    for run in ("a", "b", "report/a", "report/b"):  # what the kit reads of a member besides its config
        oof = pd.read_csv(tmp_path / "oof" / run / "oof.csv")
        (tmp_path / "oof" / run / "fold0").mkdir()
        oof[oof["fold"] == 0].drop(columns="fold").to_csv(tmp_path / "oof" / run / "fold0" / "valid_predictions.csv")
    monkeypatch.setattr(package, "check_complete", lambda cfg, run_dir: None)
    E.run(["a", "b"], "stacked", str(tmp_path / "oof" / "report"), method="stack")
    for blend in ("report/inner", "report/stacked"):
        members, _ = package.members_of(blend, tmp_path / "oof")
        assert [(m.name, m.run_dir) for m in members] == [(f"report/{n}", tmp_path / "oof" / "report" / n)
                                                          for n in ("a", "b")]
