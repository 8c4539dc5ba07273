"""Every competition metric equals scikit-learn's on random data; `is_better` follows each metric's direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from pipeline import metrics as M

SEEDS = range(5)


def probs(rng, n, k):
    p = rng.dirichlet(np.ones(k), size=n)
    return p


@pytest.mark.parametrize("seed", SEEDS)
def test_rmse_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.normal(size=50), rng.normal(size=50)
    assert M.rmse(y, p) == pytest.approx(skm.mean_squared_error(y, p) ** 0.5, rel=1e-12)
    assert M.score("rmse", y, p) == pytest.approx(skm.mean_squared_error(y, p) ** 0.5, rel=1e-12)
    # Several columns: the RMSE over every entry.
    y2, p2 = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    assert M.rmse(y2, p2) == pytest.approx(skm.mean_squared_error(y2.ravel(), p2.ravel()) ** 0.5, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_mcrmse_is_the_mean_of_column_rmses(seed):
    rng = np.random.default_rng(seed)
    # Columns on different scales, so the mean of column RMSEs differs from the overall RMSE.
    y = rng.normal(size=(60, 4)) * np.array([1.0, 2.0, 5.0, 0.1])
    p = y + rng.normal(size=(60, 4)) * np.array([0.1, 1.0, 3.0, 0.05])
    expected = np.mean([skm.mean_squared_error(y[:, j], p[:, j]) ** 0.5 for j in range(4)])
    assert M.mcrmse(y, p) == pytest.approx(expected, rel=1e-12)
    assert M.mcrmse(y, p) != pytest.approx(M.rmse(y, p), rel=1e-3)
    # One column: plain RMSE.
    assert M.mcrmse(y[:, 0], p[:, 0]) == pytest.approx(skm.mean_squared_error(y[:, 0], p[:, 0]) ** 0.5)


@pytest.mark.parametrize("seed", SEEDS)
def test_mae_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.normal(size=(30, 2)), rng.normal(size=(30, 2))
    assert M.mae(y, p) == pytest.approx(skm.mean_absolute_error(y.ravel(), p.ravel()), rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("seed", SEEDS)
def test_logloss_equals_sklearn(seed, k):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=80)
    p = probs(rng, 80, k)
    assert M.logloss(y, p) == pytest.approx(skm.log_loss(y, p, labels=list(range(k))), rel=1e-12)


def test_logloss_with_a_class_absent_from_the_labels():
    # A fold's labels may miss a class; the probability columns still say how many classes there are.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=40)  # only classes 0 and 1 of 3
    p = probs(rng, 40, 3)
    expected = -np.mean(np.log(p[np.arange(40), y]))
    assert M.logloss(y, p) == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("error")
def test_logloss_of_float32_probabilities_warns_nothing_and_scores_them_rescaled():
    """A float32 softmax sums to one within ~1e-7, outside scikit-learn's tolerance: Kaggle's scorer rescales each
    row to sum to one, and so does ours (without a warning at every evaluation)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 11, size=200)
    p = np.asarray(torch.softmax(torch.randn(200, 11) * 3, dim=-1), dtype=np.float64)
    assert np.abs(p.sum(1) - 1).max() > 1e-8
    exact = p / p.sum(1, keepdims=True)
    assert M.logloss(y, p) == pytest.approx(-np.mean(np.log(exact[np.arange(200), y])), rel=1e-12)
    assert M.logloss(y, 2 * p) == pytest.approx(M.logloss(y, p), rel=1e-12)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_equals_sklearn(seed, k):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, k, size=70), probs(rng, 70, k)
    assert M.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p.argmax(1)))


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_binary_is_the_positive_class_f1(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, size=70), probs(rng, 70, 2)
    assert M.f1(y, p) == pytest.approx(skm.f1_score(y, (p[:, 1] > 0.5).astype(int)))
    assert M.f1(y, p) == pytest.approx(skm.f1_score(y, p.argmax(1), average="binary"))


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_multiclass_is_macro(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 4, size=90), probs(rng, 90, 4)
    assert M.f1(y, p) == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_binary_uses_the_positive_class(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=60)
    p = probs(rng, 60, 2)
    assert M.auc(y, p) == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    # Not the negative class's column: that would be 1 - AUC.
    assert M.auc(y, p) == pytest.approx(1 - skm.roc_auc_score(y, p[:, 0]))


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_multiclass_is_one_vs_rest_macro(seed):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(3), rng.integers(0, 3, size=57)])
    p = probs(rng, 60, 3)
    assert M.auc(y, p) == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_perfect_and_worst_predictions():
    y = np.array([0, 1, 1, 0, 1])
    perfect = np.eye(2)[y]
    assert M.accuracy(y, perfect) == 1.0 and M.f1(y, perfect) == 1.0 and M.auc(y, perfect) == 1.0
    assert M.auc(y, perfect[:, ::-1]) == 0.0
    assert M.rmse(np.arange(5.0), np.arange(5.0)) == 0.0


@pytest.mark.parametrize("metric", ["rmse", "mcrmse", "mae", "logloss"])
def test_is_better_lower(metric):
    assert M.is_better(metric, 0.1, 0.2)
    assert not M.is_better(metric, 0.3, 0.2)
    assert not M.is_better(metric, 0.2, 0.2)  # ties keep the earlier checkpoint
    assert M.is_better(metric, 5.0, None)


@pytest.mark.parametrize("metric", ["auc", "accuracy", "f1"])
def test_is_better_higher(metric):
    assert M.is_better(metric, 0.9, 0.8)
    assert not M.is_better(metric, 0.7, 0.8)
    assert not M.is_better(metric, 0.8, 0.8)
    assert M.is_better(metric, 0.0, None)


def test_every_metric_has_a_direction():
    assert set(M.METRIC_FUNCTIONS) == set(M.LOWER_IS_BETTER)
