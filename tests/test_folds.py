"""Folds: disjoint and complete, stratified, deterministic, group-aware, shared per dataset, checked on load."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Config
from pipeline.data import load_train
from pipeline.errors import PipelineError
from pipeline.folds import assign_folds, folds_path, load_folds, make_folds
from tests.conftest import tiny_config

# sklearn warns when a class has fewer rows than folds; several tests build exactly that on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def data_config(**values) -> Config:
    cfg = Config()
    if values.get("task", "regression") != "regression":
        cfg.data.target_columns = ["label"]  # the label column of the classification tables below
    for key, value in values.items():
        setattr(cfg.data, key, value)
    return cfg


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin b holds the rows ranked in the b-th n_bins-quantile of the target."""
    ranks = pd.Series(values).rank(method="first").to_numpy() - 1
    return (ranks * n_bins // len(values)).astype(int)


def assert_complete(fold: np.ndarray, n: int, k: int) -> None:
    assert fold.shape == (n,)
    assert set(np.unique(fold)) == set(range(k)), f"folds used: {sorted(set(fold))}, expected 0..{k - 1}"


def assert_even_split(keys: np.ndarray, fold: np.ndarray, k: int) -> None:
    """Every stratum (bin or class) is spread over the folds as evenly as possible: counts differ by <= 1."""
    table = pd.crosstab(keys, fold).reindex(columns=range(k), fill_value=0).to_numpy()
    spread = table.max(axis=1) - table.min(axis=1)
    assert (spread <= 1).all(), f"per-fold counts of each stratum:\n{table}"


# ---------------------------------------------------------------- regression, one target


def test_regression_folds_are_disjoint_complete_and_balanced():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"target": rng.normal(size=103)})
    fold = assign_folds(df, data_config(n_folds=5))
    assert_complete(fold, 103, 5)
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1, sizes


def test_regression_folds_follow_the_target_distribution():
    # A skewed target sorted in file order: an unstratified or unshuffled split would put the tail in one fold.
    rng = np.random.default_rng(1)
    y = np.sort(rng.lognormal(size=500))
    fold = assign_folds(pd.DataFrame({"target": y}), data_config(n_folds=5, fold_bins=10))
    assert_even_split(quantile_bins(y, 10), fold, 5)
    qs = [0.1, 0.5, 0.9]
    overall = np.quantile(y, qs)
    for k in range(5):
        part = y[fold == k]
        for q, want, got in zip(qs, overall, np.quantile(part, qs), strict=True):
            # Within one quantile bin (10%) of the overall quantile.
            assert np.mean(y <= got) == pytest.approx(np.mean(y <= want), abs=0.1), (k, q)


@FAST
@given(n_folds=st.integers(2, 6), extra=st.integers(0, 120), fold_bins=st.integers(2, 15),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_property_regression(n_folds, extra, fold_bins, seed, ties):
    n = n_folds * 2 + extra
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n).astype(float) if ties else rng.normal(size=n)
    fold = assign_folds(pd.DataFrame({"target": y}), data_config(n_folds=n_folds, fold_bins=fold_bins))
    assert_complete(fold, n, n_folds)
    assert_even_split(quantile_bins(y, min(fold_bins, n // n_folds)), fold, n_folds)


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("task, counts", [("binary", [150, 30]), ("multiclass", [100, 50, 20, 10])])
def test_classification_folds_keep_class_proportions(task, counts):
    rng = np.random.default_rng(2)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    fold = assign_folds(pd.DataFrame({"label": labels}), data_config(task=task, n_folds=5))
    assert_complete(fold, len(labels), 5)
    assert_even_split(labels, fold, 5)
    overall = np.bincount(labels) / len(labels)
    for k in range(5):
        part = np.bincount(labels[fold == k], minlength=len(counts)) / (fold == k).sum()
        np.testing.assert_allclose(part, overall, atol=0.03)


def test_a_rare_class_does_not_switch_stratification_off():
    # 3 rows of a rare class cannot reach 5 folds; the other classes must still be stratified.
    labels = np.random.default_rng(0).permutation(np.array([0] * 100 + [1] * 50 + [2] * 3))
    fold = assign_folds(pd.DataFrame({"label": labels}), data_config(task="multiclass", n_folds=5))
    assert_complete(fold, len(labels), 5)
    assert_even_split(labels, fold, 5)


@FAST
@given(n_folds=st.integers(2, 6), n_classes=st.integers(2, 8), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_property_classification(n_folds, n_classes, seed, data):
    counts = data.draw(st.lists(st.integers(1, 40), min_size=n_classes, max_size=n_classes))
    counts[0] = max(counts[0], n_folds, n_folds * 2 - sum(counts[1:]))  # >= 2 rows per fold in all
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), counts))
    task = "binary" if n_classes == 2 else "multiclass"
    fold = assign_folds(pd.DataFrame({"label": labels}), data_config(task=task, n_folds=n_folds))
    assert_complete(fold, len(labels), n_folds)
    assert_even_split(labels, fold, n_folds)


# ---------------------------------------------------------------- several targets


def test_several_targets_are_stratified_jointly():
    rng = np.random.default_rng(3)
    n = 400
    a = np.sort(rng.normal(size=n))  # file order follows target a
    b = rng.exponential(size=n)
    c = a * 0.5 + rng.normal(size=n)
    df = pd.DataFrame({"a": a, "b": b, "c": c})
    fold = assign_folds(df, data_config(n_folds=5, fold_bins=5, target_columns=["a", "b", "c"]))
    assert_complete(fold, n, 5)
    for col in "abc":
        # Iterative stratification is approximate: each (bin, fold) cell holds 16 +- 1 rows on average, where a
        # random split (or stratifying on the first target only) is off by about 2.5 rows per cell.
        y = df[col].to_numpy()
        table = pd.crosstab(quantile_bins(y, 5), fold).to_numpy()
        assert np.abs(table - n / 25).mean() < 1.0, f"{col}:\n{table}"
        for k in range(5):
            assert abs(y[fold == k].mean() - y.mean()) < 0.12 * y.std(), col


@FAST
@given(n_folds=st.integers(2, 5), extra=st.integers(0, 80), targets=st.integers(2, 4),
       fold_bins=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_property_several_targets(n_folds, extra, targets, fold_bins, seed):
    n = n_folds * 2 + extra
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, targets)), columns=[f"t{j}" for j in range(targets)])
    fold = assign_folds(df, data_config(n_folds=n_folds, fold_bins=fold_bins, target_columns=list(df.columns)))
    assert_complete(fold, n, n_folds)


# ---------------------------------------------------------------- groups


def groups_in_several_folds(groups: np.ndarray, fold: np.ndarray) -> list:
    per_group = pd.Series(fold).groupby(groups).nunique()
    return per_group[per_group > 1].index.tolist()


def test_a_group_never_spans_two_folds():
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 40, size=300)
    df = pd.DataFrame({"target": rng.normal(size=300) + groups * 0.05, "essay": groups})
    fold = assign_folds(df, data_config(n_folds=5, group_column="essay"))
    assert_complete(fold, 300, 5)
    assert groups_in_several_folds(groups, fold) == []
    # Without the group column the same rows do get split across folds: the test can tell.
    assert groups_in_several_folds(groups, assign_folds(df, data_config(n_folds=5))) != []


@FAST
@given(n_folds=st.integers(2, 5), extra_groups=st.integers(0, 20), seed=st.integers(0, 2**31 - 1),
       task=st.sampled_from(["regression", "binary", "multiclass"]))
def test_property_groups_are_honoured(n_folds, extra_groups, seed, task):
    rng = np.random.default_rng(seed)
    n_groups = n_folds + extra_groups
    sizes = rng.integers(1, 8, size=n_groups)
    groups = rng.permutation(np.repeat([f"g{i}" for i in range(n_groups)], sizes))
    n = len(groups)
    if task == "regression":
        df = pd.DataFrame({"target": rng.normal(size=n), "g": groups})
    else:
        df = pd.DataFrame({"label": rng.integers(0, 2 if task == "binary" else 4, size=n), "g": groups})
    fold = assign_folds(df, data_config(task=task, n_folds=n_folds, group_column="g"))
    assert_complete(fold, n, n_folds)
    assert groups_in_several_folds(groups, fold) == []


def test_group_errors_name_the_column():
    df = pd.DataFrame({"target": np.arange(20.0), "g": np.arange(20) % 3})
    with pytest.raises(PipelineError, match="group column 'g' has 3 groups, fewer than data.n_folds=5"):
        assign_folds(df, data_config(n_folds=5, group_column="g"))
    with pytest.raises(PipelineError, match="group column 'grp' not found"):
        assign_folds(df, data_config(n_folds=5, group_column="grp"))


def test_too_few_rows():
    with pytest.raises(PipelineError, match="3 rows cannot be split into 5 folds"):
        assign_folds(pd.DataFrame({"target": [1.0, 2.0, 3.0]}), data_config(n_folds=5))


# ---------------------------------------------------------------- determinism


def test_same_settings_same_folds_other_seed_other_folds():
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"target": rng.normal(size=200)})
    a = assign_folds(df, data_config(n_folds=5, fold_seed=42))
    b = assign_folds(df.copy(), data_config(n_folds=5, fold_seed=42))
    c = assign_folds(df, data_config(n_folds=5, fold_seed=7))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


# ---------------------------------------------------------------- the folds file


def file_config(tmp_path, **extra):
    overrides = [f"{k}={v}" for k, v in extra.items()]
    return tiny_config(tmp_path, tmp_path / "no-backbone-needed", extra=overrides)


def test_folds_file_every_id_exactly_once(tmp_path):
    cfg = file_config(tmp_path)
    path = make_folds(cfg)
    assert path == folds_path(cfg) and path.exists()
    folds = pd.read_csv(path)
    train = pd.read_csv(cfg.data.train_path)
    assert folds.columns.tolist() == ["id", "fold"]
    assert not folds["id"].duplicated().any()
    assert sorted(folds["id"]) == sorted(train["id"])
    assert set(folds["fold"]) == {0, 1, 2}


def test_folds_file_is_deterministic(tmp_path):
    a = make_folds(file_config(tmp_path / "a"))
    b = make_folds(file_config(tmp_path / "b"))
    assert a != b and a.read_bytes() == b.read_bytes()


def test_folds_file_is_shared_by_experiments_on_the_same_dataset(tmp_path):
    first = file_config(tmp_path, experiment="first")
    second = file_config(tmp_path, experiment="second", **{"train.lr": "2e-5", "model.pooling": "cls"})
    other_data = file_config(tmp_path, experiment="third", **{"data.name": "other"})
    path = make_folds(first)
    before = path.read_bytes()
    assert folds_path(second) == path
    assert make_folds(second) == path and path.read_bytes() == before
    df = load_train(first)
    np.testing.assert_array_equal(load_folds(first, df), load_folds(second, df))
    assert folds_path(other_data) != path
    assert folds_path(file_config(tmp_path, **{"data.n_folds": 4})) != path


def test_load_folds_joins_by_id(tmp_path):
    cfg = file_config(tmp_path)
    path = make_folds(cfg)
    written = pd.read_csv(path)
    written.sample(frac=1, random_state=0).to_csv(path, index=False)  # same ids, another row order
    df = load_train(cfg)
    expected = written.set_index("id").loc[df["id"], "fold"].to_numpy()
    np.testing.assert_array_equal(load_folds(cfg, df), expected)


def rewrite_train(cfg, change):
    train = pd.read_csv(cfg.data.train_path)
    change(train).to_csv(cfg.data.train_path, index=False)


@pytest.mark.parametrize("change", [
    lambda t: t.assign(id=[f"x{i}" for i in range(len(t))]),  # same count, other ids
    lambda t: t.iloc[:-5],  # rows removed
    lambda t: pd.concat([t, t.iloc[:3].assign(id=["n1", "n2", "n3"])]),  # rows added
    lambda t: t.assign(id=np.arange(len(t))),  # integer ids where the folds file has strings
], ids=["other_ids", "fewer_rows", "more_rows", "int_ids"])
def test_folds_file_of_another_dataset_is_an_error_naming_it(tmp_path, change):
    cfg = file_config(tmp_path)
    path = make_folds(cfg)
    rewrite_train(cfg, change)
    with pytest.raises(PipelineError) as err:
        load_folds(cfg, load_train(cfg))
    assert str(path) in str(err.value)
    assert "pipeline folds --force" in str(err.value)


def test_folds_file_with_a_fold_out_of_range(tmp_path):
    cfg = file_config(tmp_path)
    path = make_folds(cfg)
    folds = pd.read_csv(path)
    folds.loc[0, "fold"] = 7
    folds.to_csv(path, index=False)
    with pytest.raises(PipelineError, match="fold index 7 is out of range 0..2") as err:
        load_folds(cfg, load_train(cfg))
    assert str(path) in str(err.value)


def test_force_rewrites_the_folds_file(tmp_path):
    cfg = file_config(tmp_path)
    path = make_folds(cfg)
    rewrite_train(cfg, lambda t: t.iloc[:-5])
    make_folds(cfg, force=True)
    assert len(pd.read_csv(path)) == len(pd.read_csv(cfg.data.train_path))
    assert len(load_folds(cfg, load_train(cfg))) == len(pd.read_csv(cfg.data.train_path))


def test_group_column_added_later_is_not_ignored(tmp_path):
    """Folds made without a group column must not silently serve an experiment that needs whole groups."""
    cfg = file_config(tmp_path)
    rewrite_train(cfg, lambda t: t.assign(essay=np.arange(len(t)) // 4))
    make_folds(cfg)
    grouped = copy.deepcopy(cfg)
    grouped.data.group_column = "essay"
    df = load_train(grouped)
    try:
        fold = load_folds(grouped, df)
    except PipelineError as err:
        assert "essay" in str(err) and str(folds_path(cfg)) in str(err)
    else:
        assert groups_in_several_folds(df["essay"].to_numpy(), fold) == []
