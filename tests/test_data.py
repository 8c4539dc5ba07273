"""The training table and its batches: class names as written, text pairs, length-grouped epochs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import data as D
from pipeline import train as T
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- class names


def test_a_label_column_called_label_keeps_its_classes_in_numeric_order(tmp_path):
    """Labels 0..10 in a column named `label`, data.classes null: the classes are the labels as written, 10 last."""
    cfg = tiny_config(tmp_path, tmp_path / "unused", task="multiclass", extra=["data.classes=null"])
    train = pd.read_csv(cfg.data.train_path)
    labels = np.arange(len(train)) % 11
    train["label"] = labels[::-1]  # 10 comes first in the file: the order must not follow the file
    train.to_csv(cfg.data.train_path, index=False)
    df = D.load_train(cfg)
    classes = D.class_names(cfg, df["label"])
    assert classes == [str(i) for i in range(11)]
    np.testing.assert_array_equal(D.target_array(cfg, df), labels[::-1])  # class "10" has index 10, not 2


@pytest.mark.parametrize("labels, expected", [
    (["b", "a", "c", "a"], ["a", "b", "c"]),
    (["2.5", "-1", "10", "2.5", "3"], ["-1", "2.5", "3", "10"]),  # numbers in numeric order, written as read
    (["10", "9", "x"], ["10", "9", "x"]),  # not all numbers: text order
])
def test_inferred_class_order(tmp_path, labels, expected):
    cfg = tiny_config(tmp_path, tmp_path / "unused", task="multiclass", extra=["data.classes=null"])
    assert D.class_names(cfg, pd.Series(labels)) == expected


# ---------------------------------------------------------------- text pairs


def test_two_text_columns_reach_the_model_as_a_text_pair(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["data.text_columns=[text,title]", "data.max_length=64"])
    train = pd.read_csv(cfg.data.train_path)
    train["title"] = [f"title {w}" for w in train["text"].str.split().str[0]]
    train.to_csv(cfg.data.train_path, index=False)
    prep = T.prepare(cfg)
    assert prep.enc.token_type_ids is not None
    for i, (types, ids) in enumerate(zip(prep.enc.token_type_ids, prep.enc.input_ids)):
        first = types.index(1)
        assert set(types[first:]) == {1} and set(types[:first]) == {0}, types  # two segments, in order
        second = prep.tokenizer.decode(ids[first:], skip_special_tokens=True)
        assert second == train["title"][i], (second, train["title"][i])
    batch = D.collate(prep.enc, list(range(8)), prep.tokenizer.pad_token_id)
    assert int(batch.inputs["token_type_ids"].sum()) == sum(sum(t) for t in prep.enc.token_type_ids[:8])


# ---------------------------------------------------------------- epochs of batches


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 400), batch_size=st.integers(1, 40), mega=st.integers(1, 8), seed=st.integers(0, 2**16),
       group=st.booleans())
def test_an_epoch_of_batches_holds_every_row_once(n, batch_size, mega, seed, group):
    lengths = np.random.default_rng(seed).integers(1, 300, size=n)
    batches = D.train_batches(lengths, batch_size, seed, group_by_length=group, mega=mega)
    assert sorted(r for b in batches for r in b) == list(range(n))
    sizes = sorted(len(b) for b in batches)
    assert sizes[1:] == [batch_size] * (len(batches) - 1) and 0 < sizes[0] <= batch_size, sizes  # one short at most


def test_length_grouped_batches_pad_less():
    lengths = np.random.default_rng(0).integers(1, 300, size=400)
    padded = {group: sum(len(b) * lengths[b].max() for b in D.train_batches(lengths, 8, 0, group_by_length=group))
              for group in (True, False)}
    assert padded[True] < 0.7 * padded[False], padded
