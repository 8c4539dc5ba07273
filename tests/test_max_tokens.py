"""`train.max_tokens` and `train.eval_max_tokens`: batches capped by a token budget (rows x padded width).

The batches themselves (every row once, within the budget as `collate` pads them, the same count every epoch),
then train_fold under a budget: what each micro-batch holds, how an optimizer step averages micro-batches of
different sizes, and `--resume` in the middle of an epoch.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import data as D
from pipeline import train as T
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.model import build_model, fit_target_scaling
from tests.conftest import tiny_config
from tests.test_train import NO_DROPOUT, record_steps, run_interrupted

# The tiny datasets' 40 training rows are 5 to 19 tokens long: widths 8, 16 and 24 at multiples of 8, so a budget
# of 64 tokens makes batches of 8 (the batch_size cap), 4 or 2 rows: 10 batches an epoch instead of 5.
BUDGET = ["train.max_tokens=64", "train.batch_size=8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_rows(lengths: list[int], max_length: int | None) -> D.Encoded:
    return D.Encoded([[1] * n for n in lengths], None, None, max_length)


def padded_tokens(enc: D.Encoded, batch: list[int], multiple: int) -> int:
    """What the batch really holds once padded: rows x width of the tensor `collate` builds."""
    return D.collate(enc, batch, 0, multiple).inputs["input_ids"].numel()


# ---------------------------------------------------------------- the keys


@pytest.mark.parametrize("overrides, message", [
    (["train.max_tokens=0"], "config key 'train.max_tokens': must be at least 1 token, or null (off), got 0"),
    (["train.max_tokens=-512"], "config key 'train.max_tokens': must be at least 1"),
    (["train.eval_max_tokens=0"], "config key 'train.eval_max_tokens': must be at least 1"),
    (["train.max_tokens=2.5"], "config key 'train.max_tokens': expected an integer, got 2.5"),
    (["train.max_tokens=4096", "train.length_grouping=false"],
     "config key 'train.max_tokens': packs rows of similar length into each batch, which train.length_grouping"),
    (["model.kind=tfidf", "train.max_tokens=4096"], "train.max_tokens do not apply to model.kind tfidf"),
])
def test_bad_budgets_are_refused_naming_the_key(overrides, message):
    with pytest.raises(PipelineError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_budgets_are_off_by_default_and_null_turns_them_off():
    assert (load_config(None).train.max_tokens, load_config(None).train.eval_max_tokens) == (None, None)
    cfg = load_config(None, ["train.max_tokens=4096", "train.eval_max_tokens=1", "train.max_tokens=null"])
    assert (cfg.train.max_tokens, cfg.train.eval_max_tokens) == (None, 1)


# ---------------------------------------------------------------- the batches


@settings(max_examples=150, deadline=None, database=None)
@given(n=st.integers(1, 200), max_length=st.integers(8, 160), max_tokens=st.integers(1, 2000),
       max_rows=st.integers(1, 64), multiple=st.sampled_from([1, 8, 32]), seed=st.integers(0, 2**16))
def test_token_batches_hold_every_row_once_within_the_budget(n, max_length, max_tokens, max_rows, multiple, seed):
    lengths = np.random.default_rng(seed).integers(1, max_length + 1, size=n)
    enc = fake_rows(lengths.tolist(), max_length)
    batches = D.token_batches(lengths, max_tokens, max_rows, seed, multiple, max_length)
    assert sorted(r for b in batches for r in b) == list(range(n))
    short = 0  # batches holding fewer rows than the budget and batch_size allow at their width
    for b in batches:
        width = D.collate(enc, b, 0, multiple).inputs["input_ids"].shape[1]
        assert 1 <= len(b) <= max_rows
        assert len(b) == 1 or len(b) * width <= max_tokens, (b, lengths[b])
        short += len(b) < min(max_rows, max(1, max_tokens // width))
    assert short <= 1, short  # greedy: only the batch of the narrowest rows may be left short
    assert batches == D.token_batches(lengths, max_tokens, max_rows, seed, multiple, max_length)  # deterministic
    assert len(D.token_batches(lengths, max_tokens, max_rows, seed + 1, multiple, max_length)) == len(batches)


def test_rows_fill_the_budget_and_a_row_over_it_goes_alone():
    lengths = np.array([30] * 10 + [100] + [3] * 7)  # widths 32, 104 and 8 at multiples of 8 (max length 128)
    enc = fake_rows(lengths.tolist(), 128)
    batches = D.token_batches(lengths, 100, 16, 0, 8, 128)
    assert [10] in batches  # 104 tokens once padded: over the budget, alone
    # 3 rows of width 32 per batch (96 tokens); the last 32-wide row takes 2 short ones along; 5 short rows remain
    assert sorted(len(b) for b in batches) == [1, 3, 3, 3, 3, 5]
    assert max(padded_tokens(enc, b, 8) for b in batches if b != [10]) == 96


def test_the_batch_count_is_the_same_every_epoch_while_batches_and_their_order_change():
    lengths = np.random.default_rng(1).integers(1, 200, size=300)
    epochs = [D.token_batches(lengths, 1024, 32, seed, 8, 256) for seed in range(12)]
    assert len({len(e) for e in epochs}) == 1
    assert len({tuple(map(tuple, e)) for e in epochs}) == 12
    members = {frozenset(b) for e in epochs for b in e}
    assert len(members) > 3 * len(epochs[0])  # rows of one width meet different neighbours from epoch to epoch
    widths = [[int(D.padded_width(int(lengths[b].max()), 8, 256)) for b in e] for e in epochs]
    assert all(w != sorted(w, reverse=True) and w != sorted(w) for w in widths)  # not run by length


def test_batch_size_caps_the_rows_and_no_budget_is_the_plain_row_count():
    lengths = np.full(50, 4)
    assert sorted(len(b) for b in D.token_batches(lengths, 10_000, 16, 0, 8, 64)) == [2, 16, 16, 16]
    order = np.argsort(-lengths, kind="stable")
    assert D.eval_batches(lengths, 16) == [order[i:i + 16].tolist() for i in range(0, 50, 16)]


@settings(max_examples=30, deadline=None, database=None)
@given(n=st.integers(1, 150), max_tokens=st.integers(1, 600), batch_size=st.integers(1, 40),
       multiple=st.sampled_from([1, 8]), seed=st.integers(0, 2**16))
def test_evaluation_batches_run_longest_first_within_the_budget(n, max_tokens, batch_size, multiple, seed):
    lengths = np.random.default_rng(seed).integers(1, 65, size=n)
    enc = fake_rows(lengths.tolist(), 64)
    batches = D.eval_batches(lengths, batch_size, max_tokens, multiple, 64)
    assert [r for b in batches for r in b] == np.argsort(-lengths, kind="stable").tolist()
    for b in batches:
        assert len(b) <= batch_size and (len(b) == 1 or padded_tokens(enc, b, multiple) <= max_tokens)


def test_predictions_under_an_evaluation_budget_are_the_same_rows_in_smaller_batches(tmp_path, tiny_backbone,
                                                                                      monkeypatch):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT)
    prep = T.prepare(cfg)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 1)
    positions = np.arange(len(prep.enc))
    cpu = torch.device("cpu")
    sizes, collate = [], D.collate

    def recording_collate(enc, rows, pad_id, multiple=1):
        batch = collate(enc, rows, pad_id, multiple)
        sizes.append(tuple(batch.inputs["input_ids"].shape))
        return batch

    monkeypatch.setattr(D, "collate", recording_collate)
    plain = T.predict(model, prep.enc, positions, "regression", cpu, "fp32", 64, 0, 8)
    assert sizes == [(60, 24)]
    sizes.clear()
    budget = T.predict(model, prep.enc, positions, "regression", cpu, "fp32", 64, 0, 8, max_tokens=100)
    assert len(sizes) > 5 and all(rows * width <= 100 for rows, width in sizes), sizes
    np.testing.assert_allclose(budget, plain, atol=1e-5)
    assert np.std(plain) > 1e-4  # distinct predictions: a misaligned row would show


# ---------------------------------------------------------------- train_fold under a budget


def test_a_fold_trains_on_every_row_once_an_epoch_in_batches_within_the_budget(tmp_path, tiny_backbone,
                                                                                 monkeypatch):
    steps = record_steps(monkeypatch, keep_grads=False)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + BUDGET + ["train.epochs=2", "train.eval_every=3"])
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    micro = [m for s in steps for m in s["micro"]]
    assert len(micro) == 20 and metrics["steps"] == 20  # 10 budgeted batches an epoch, not ceil(40 / 8) = 5
    prep = T.prepare(cfg)
    train_rows = np.flatnonzero(prep.fold != 0).tolist()
    for epoch in (micro[:10], micro[10:]):
        assert sorted(r for m in epoch for r in m["rows"]) == train_rows
    assert all(rows <= 8 and rows * width <= 64 for rows, width in (m["shape"] for m in micro))
    assert {rows for rows, _ in (m["shape"] for m in micro)} == {2, 4, 8}
    assert [m["rows"] for m in micro[:10]] != [m["rows"] for m in micro[10:]]  # another order each epoch
    log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")
    assert log["step"].tolist() == [3, 6, 9, 12, 15, 18, 20] and log["epoch"].iloc[-1] == 2.0
    assert log["lr"].iloc[-1] == 0.0  # the schedule ends at the last step: it counted the budgeted batches


def test_an_optimizer_step_averages_its_micro_batches_each_counting_the_same(tmp_path, tiny_backbone, monkeypatch):
    """With grad_accum, a step's micro-batches hold different numbers of rows under a budget: each micro-batch's
    mean loss counts 1 / grad_accum (the documented choice), so a row of a 2-row batch weighs twice one of a 4-row
    batch. Recomputed here at each step's parameters."""
    steps = record_steps(monkeypatch)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + BUDGET + [
        "train.grad_accum=3", "train.max_grad_norm=0", "train.eval_every=1", "train.lr=3e-3"])
    T.run(cfg, folds=[0], progress=False)
    assert [len(s["micro"]) for s in steps] == [3, 3, 3, 1]  # 10 micro-batches: the last step has one
    assert any(len({m["shape"][0] for m in s["micro"]}) > 1 for s in steps)  # steps mixing batch sizes
    prep = T.prepare(cfg)
    model, _ = build_model(cfg.model, 1)
    fit_target_scaling(model, cfg.model.target_scaling, prep.enc.targets[prep.fold != 0])
    model.train()
    for i, step in enumerate(steps):
        model.load_state_dict(step["params"], strict=False)
        model.zero_grad()
        for m in step["micro"]:
            loss = T.training_loss(model, D.collate(prep.enc, m["rows"], 0, 8), "regression", 0.0)
            (loss / len(step["micro"])).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(step["grads"][name], p.grad, rtol=1e-4, atol=1e-7,
                                           msg=lambda msg, i=i, name=name: f"step {i + 1}, {name}: {msg}")


def test_a_fold_interrupted_mid_epoch_under_a_budget_resumes_bit_for_bit(tmp_path, tiny_backbone, monkeypatch):
    """Dropout on, grad_accum 2, a budget: killed after a state saved in the middle of the second epoch, the
    resumed fold continues with the same batches (the epoch's list is cut again from its seed) and ends exactly
    where an uninterrupted run ends."""
    cfg = tiny_config(tmp_path, tiny_backbone, extra=BUDGET + [
        "train.epochs=3", "train.grad_accum=2", "train.eval_every=2", "train.precision=fp32", "train.device=cpu"])
    straight = T.run(copy.deepcopy(cfg), folds=[0], progress=False)[0]
    assert straight["steps"] == 15  # 10 batches an epoch, 2 per step
    straight_preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    straight_log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")

    cfg.experiment = "interrupted"
    state = run_interrupted(cfg, monkeypatch, T, "training_loss", 17)  # the 17th micro-batch, after step 8's save
    assert state["step"] == 8 and state["micro"] == 16  # 6 batches into the second epoch
    resumed = T.run(cfg, folds=[0], resume=True, progress=False)[0]
    assert resumed["score"] == straight["score"] and resumed["best_step"] == straight["best_step"]
    resumed_preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    np.testing.assert_array_equal(resumed_preds["target"], straight_preds["target"])
    resumed_log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")
    columns = ["step", "epoch", "lr", "train_loss", "rmse"]
    np.testing.assert_array_equal(resumed_log[columns], straight_log[columns])
