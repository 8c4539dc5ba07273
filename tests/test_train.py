"""The training loop on the tiny BERT: gradient accumulation, predictions joined by id, the schedule, the logs."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import data as D
from pipeline import oof as O
from pipeline import train as T
from pipeline.folds import load_folds
from pipeline.metrics import score
from pipeline.model import build_model, encoder_layers, fit_target_scaling, load_tokenizer, model_from_saved
from tests.conftest import WORDS, tiny_config

BUILD_OPTIMIZER = T.build_optimizer
NO_DROPOUT = ["model.dropout=0", "model.head_dropout=0", "train.precision=fp32", "train.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def texts_of_many_lengths(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]


def encoded(backbone, texts: list[str], targets: np.ndarray | None = None, max_length: int = 64):
    tokenizer = load_tokenizer(backbone)
    enc = D.encode(tokenizer, pd.DataFrame({"text": texts}), ["text"], max_length, targets)
    return enc, tokenizer.pad_token_id or 0


# ---------------------------------------------------------------- (1) gradient accumulation


def record_steps(monkeypatch, keep_grads: bool = True) -> list[dict]:
    """Patch train_fold's optimizer and loss so every optimizer step records what it applies.

    Each step records the training rows (positions) of its micro-batches, each micro-batch's rows and input shape
    (`micro`), the learning rate it applies (the highest of the groups) and, with keep_grads, the parameters just
    before the step and the gradients the step applies, by parameter name.
    """
    steps, micro = [], []
    loss = T.training_loss

    def recording_loss(model, batch, task, rdrop):
        micro.append({"rows": batch.positions.tolist(), "shape": tuple(batch.inputs["input_ids"].shape)})
        return loss(model, batch, task, rdrop)

    def recording_optimizer(model, cfg, **kwargs):
        optimizer = BUILD_OPTIMIZER(model, cfg, **kwargs)

        def hook(opt, args, kwargs):
            step = {"rows": [r for m in micro for r in m["rows"]], "micro": list(micro),
                    "lr": max(g["lr"] for g in opt.param_groups)}
            micro.clear()
            if keep_grads:
                step["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
                step["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.grad is not None}
            steps.append(step)

        optimizer.register_step_pre_hook(hook)
        return optimizer

    monkeypatch.setattr(T, "training_loss", recording_loss)
    monkeypatch.setattr(T, "build_optimizer", recording_optimizer)
    return steps


def test_train_fold_applies_the_mean_gradient_of_each_steps_rows(tmp_path, tiny_backbone, monkeypatch):
    """In train_fold itself: micro-batches of 4 with grad_accum=3 step with the gradient of the mean loss over
    their 12 rows (4 in the short last group), recomputed here in one batch at the parameters of that step,
    and train exactly like batches of 12 without accumulation."""
    common = NO_DROPOUT + ["train.length_grouping=false", "train.max_grad_norm=0", "train.eval_every=1",
                           "train.warmup_ratio=0", "train.lr=3e-3"]
    runs = {}
    for name, batch, accum in [("big", 12, 1), ("accum", 4, 3)]:
        steps = record_steps(monkeypatch)
        cfg = tiny_config(tmp_path, tiny_backbone, extra=common + [f"train.batch_size={batch}",
                                                                  f"train.grad_accum={accum}",
                                                                  f"experiment={name}"])
        metrics = T.run(cfg, folds=[0], progress=False)[0]
        runs[name] = (cfg, metrics, steps)
    (cfg_big, m_big, s_big), (cfg_acc, m_acc, s_acc) = runs["big"], runs["accum"]
    assert m_acc["train_rows"] == 40  # micro-batches of 4 grouped 3+3+3+1: steps of 12, 12, 12 and 4 rows
    assert m_big["steps"] == m_acc["steps"] == len(s_big) == len(s_acc) == 4
    assert [len(s["rows"]) for s in s_acc] == [12, 12, 12, 4]
    prep = T.prepare(cfg_acc)
    assert sorted(r for s in s_acc for r in s["rows"]) == np.flatnonzero(prep.fold != 0).tolist()

    model, _ = build_model(cfg_acc.model, 1)
    fit_target_scaling(model, cfg_acc.model.target_scaling, prep.enc.targets[prep.fold != 0])  # as train_fold does
    for i, step in enumerate(s_acc):
        model.load_state_dict(step["params"], strict=False)
        model.zero_grad()
        model.train()
        T.training_loss(model, D.collate(prep.enc, step["rows"], 0), "regression", 0.0).backward()
        assert step["grads"].keys() == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(step["grads"][name], p.grad, rtol=1e-3, atol=1e-6,
                                           msg=lambda m, i=i, name=name: f"step {i + 1}, {name}: {m}")
    for i, (big, acc) in enumerate(zip(s_big, s_acc, strict=True)):
        assert big["rows"] == acc["rows"]
        for name in big["grads"]:
            torch.testing.assert_close(acc["grads"][name], big["grads"][name], rtol=1e-3, atol=1e-6,
                                       msg=lambda m, i=i, name=name: f"step {i + 1}, {name}: {m}")
    log_big = pd.read_csv(cfg_big.run_dir / "fold0" / "log.csv")
    log_acc = pd.read_csv(cfg_acc.run_dir / "fold0" / "log.csv")
    assert log_big["step"].tolist() == log_acc["step"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(log_acc["lr"], log_big["lr"])
    np.testing.assert_allclose(log_acc["rmse"], log_big["rmse"], rtol=1e-4)
    state_big = torch.load(cfg_big.run_dir / "fold0" / "model.pt")
    state_acc = torch.load(cfg_acc.run_dir / "fold0" / "model.pt")
    for key in state_big:
        torch.testing.assert_close(state_acc[key], state_big[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_grad_accum_with_clipping_trains_like_one_big_batch(tmp_path, tiny_backbone, monkeypatch, task):
    """train_fold at batch 16 and at batch 4 x grad_accum 4, clipping on at a norm every step exceeds: the same
    rows per optimizer step (no length grouping: both runs cut the same seeded permutation), the same model."""
    norms = []
    clip = torch.nn.utils.clip_grads_with_norm_  # what accelerator.clip_grad_norm_ clips with

    def recording_clip(params, max_norm, total_norm, foreach=None):
        norms.append(float(total_norm))
        return clip(params, max_norm, total_norm, foreach)

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", recording_clip)
    common = NO_DROPOUT + ["train.length_grouping=false", "train.max_grad_norm=0.05", "train.eval_every=1",
                           "train.lr=3e-3"]
    runs = {}
    for name, batch, accum in [("big", 16, 1), ("accum", 4, 4)]:
        steps = record_steps(monkeypatch, keep_grads=False)
        norms.clear()
        cfg = tiny_config(tmp_path, tiny_backbone, task=task, classes=("a", "b", "c"),
                          extra=common + [f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                          f"experiment={name}"])
        metrics = T.run(cfg, folds=[0], progress=False)[0]
        runs[name] = (cfg.run_dir / "fold0", [s["rows"] for s in steps])
        assert metrics["steps"] == 3  # 40 rows: 16 + 16 + 8
        assert len(norms) == 3 and min(norms) > 0.05 * 3, norms  # every step clipped, by a wide margin
    (big, rows_big), (acc, rows_acc) = runs["big"], runs["accum"]
    assert rows_acc == rows_big and [len(r) for r in rows_big] == [16, 16, 8]
    state_big, state_acc = torch.load(big / "model.pt"), torch.load(acc / "model.pt")
    for key in state_big:
        torch.testing.assert_close(state_acc[key], state_big[key], rtol=1e-4, atol=1e-5, msg=key)
    preds_big, preds_acc = pd.read_csv(big / "valid_predictions.csv"), pd.read_csv(acc / "valid_predictions.csv")
    assert preds_acc["id"].tolist() == preds_big["id"].tolist()
    np.testing.assert_allclose(preds_acc.drop(columns="id"), preds_big.drop(columns="id"), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- (2) predictions are joined by id


def test_batch_widths_round_up_to_the_multiple_but_never_past_max_length(tiny_backbone):
    enc, pad_id = encoded(tiny_backbone, texts_of_many_lengths(60, seed=2), max_length=30)
    assert enc.lengths.max() == 30 and enc.lengths.min() < 10
    long_rows = [int(i) for i in np.flatnonzero(enc.lengths > 24)]  # widths 25-30: a multiple of 8 would be 32
    for positions in ([int(np.argmin(enc.lengths))], list(range(60)), long_rows):
        longest = int(enc.lengths[positions].max())
        batch = D.collate(enc, positions, pad_id, multiple=8)
        width = batch.inputs["input_ids"].shape[1]
        assert width == min(-(-longest // 8) * 8, 30)
        assert int(batch.inputs["attention_mask"].sum()) == int(enc.lengths[positions].sum())
        assert D.collate(enc, positions, pad_id).inputs["input_ids"].shape[1] == longest


def test_predict_returns_rows_in_the_order_of_positions(tiny_backbone, tmp_path):
    cfg = tiny_config(tmp_path, tiny_backbone, task="multiclass", classes=("a", "b", "c"), extra=NO_DROPOUT)
    texts = texts_of_many_lengths(40, seed=1)
    enc, pad_id = encoded(tiny_backbone, texts)
    assert enc.lengths.max() - enc.lengths.min() > 20
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 3)
    with torch.no_grad():
        model.head.out.bias.zero_()
        model.head.out.weight.mul_(20)  # spread the predictions so a misaligned row shows
    positions = np.random.default_rng(0).permutation(40)[:30]
    cpu = torch.device("cpu")
    together = T.predict(model, enc, positions, "multiclass", cpu, "fp32", 4, pad_id)
    alone = np.concatenate([T.predict(model, enc, np.array([p]), "multiclass", cpu, "fp32", 1, pad_id)
                            for p in positions])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    padded = T.predict(model, enc, positions, "multiclass", cpu, "fp32", 4, pad_id, multiple=8)
    np.testing.assert_allclose(padded, alone, atol=1e-5)  # the extra padding is masked out
    np.testing.assert_allclose(together.sum(1), 1.0, atol=1e-6)
    # Rows differ enough that any reordering would be caught.
    by_length = np.argsort(-enc.lengths[positions], kind="stable")
    assert np.abs(together[by_length] - alone).max() > 1e-2


def many_length_dataset(tmp_path, n: int = 45, binary: bool = False):
    """Ids in random order, texts from 1 to 120 words, a target (or a balanced label) that depends on the words."""
    rng = np.random.default_rng(7)
    ids = [f"id{int(i)}" for i in rng.permutation(1000)[:n]]
    texts = texts_of_many_lengths(n, seed=3)
    texts = [t if i % 3 else " ".join([t] * 3) for i, t in enumerate(texts)]
    target = np.array([np.mean([WORDS.index(w) for w in t.split()]) / len(WORDS) for t in texts])
    df = pd.DataFrame({"id": ids, "text": texts})
    if binary:
        df["label"] = np.where(target > np.median(target), "pos", "neg")
    else:
        df["target"] = target
    data = tmp_path / "lengths"
    data.mkdir(parents=True, exist_ok=True)
    df.to_csv(data / "train.csv", index=False)
    return data


def use_dataset(cfg, data_dir, name: str):
    cfg.data.dir, cfg.data.test_file, cfg.data.sample_submission_file, cfg.data.name = \
        str(data_dir), None, None, name
    return cfg


def test_oof_rows_are_the_fold_predictions_joined_by_id(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + ["train.eval_every=2", "data.max_length=64"])
    use_dataset(cfg, many_length_dataset(tmp_path), "lengths")
    T.run(cfg, progress=False)
    result = O.run(cfg)
    train = pd.read_csv(cfg.data.train_path)
    oof = pd.read_csv(cfg.run_dir / "oof.csv")
    assert oof["id"].tolist() == train["id"].tolist()
    np.testing.assert_array_equal(oof["fold"], load_folds(cfg, D.load_train(cfg)))

    prep = T.prepare(cfg)
    assert prep.enc.lengths.max() - prep.enc.lengths.min() > 30
    cpu = torch.device("cpu")
    for k in range(3):
        valid = pd.read_csv(cfg.run_dir / f"fold{k}" / "valid_predictions.csv")
        assert sorted(valid["id"]) == sorted(train["id"][oof["fold"] == k])
        joined = valid.merge(oof, on="id", suffixes=("", "_oof"))
        assert len(joined) == len(valid) and (joined["fold"] == k).all()
        np.testing.assert_allclose(joined["target_oof"], joined["target"], rtol=1e-12)
        # The saved predictions are the fold's best model on each row, row by row.
        state = torch.load(cfg.run_dir / f"fold{k}" / "model.pt")
        model = model_from_saved(cfg.model, cfg.run_dir / "backbone", 1, state)
        position = {i: p for p, i in enumerate(train["id"])}
        alone = [T.predict(model, prep.enc, np.array([position[i]]), "regression", cpu, "fp32", 1, 0)[0, 0]
                 for i in valid["id"]]
        np.testing.assert_allclose(valid["target"], alone, atol=1e-5)
        assert np.std(alone) > 1e-4  # distinct predictions: a misaligned row would show
    y = train["target"].to_numpy()
    assert result["cv"] == pytest.approx(score("rmse", y, oof["target"].to_numpy()), rel=1e-6)


COLOURS = set(WORDS[18:])  # red, green, ..., dark: the target is the share of these words in a text


def colour_share(text: str) -> float:
    words = text.split()
    return sum(w in COLOURS for w in words) / len(words)


def test_a_tiny_model_learns_from_batches_that_carry_their_own_rows_targets(tmp_path, tiny_backbone, monkeypatch):
    """The target is a function of the text and the ids run in another order than the file: every training batch
    pairs each text with its own target, and three folds of training beat predicting the training mean."""
    rng = np.random.default_rng(3)
    is_colour = np.isin(WORDS, sorted(COLOURS))
    texts = []
    for q in rng.uniform(0.05, 0.95, size=90):  # q: how likely each word is a colour
        weights = np.where(is_colour, q, 1 - q)
        texts.append(" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)), p=weights / weights.sum())))
    data = tmp_path / "colours"
    data.mkdir()
    pd.DataFrame({"id": [f"c{i:03d}" for i in rng.permutation(90)], "text": texts,
                  "target": [colour_share(t) for t in texts]}).to_csv(data / "train.csv", index=False)
    cfg = use_dataset(tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + ["train.epochs=4", "train.lr=3e-3"]),
                      data, "colours")
    seen, loss = [], T.training_loss

    def recording_loss(model, batch, task, rdrop):
        seen.append(batch)
        return loss(model, batch, task, rdrop)

    monkeypatch.setattr(T, "training_loss", recording_loss)
    T.run(cfg, progress=False)
    tokenizer = load_tokenizer(tiny_backbone)
    pairs = [(colour_share(tokenizer.decode(ids, skip_special_tokens=True)), float(target))
             for batch in seen for ids, target in zip(batch.inputs["input_ids"].tolist(), batch.targets[:, 0])]
    assert len(pairs) == 3 * 4 * 60  # every training row of every fold and epoch
    np.testing.assert_allclose(*zip(*pairs), atol=1e-6)
    result = O.run(cfg)
    assert result["cv"] < 0.6 * result["constant"], result


# ---------------------------------------------------------------- (3) the schedule counts optimizer steps


def linear_lr(base: float, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return base * step / max(1, warmup)
    return base * max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize("epochs, micro_batches", [(1, 5), (2, 10), (1.5, 8)])
def test_schedule_counts_optimizer_steps(tmp_path, tiny_backbone, monkeypatch, epochs, micro_batches):
    steps = record_steps(monkeypatch, keep_grads=False)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + [
        "train.grad_accum=2", "train.batch_size=8", f"train.epochs={epochs}", "train.eval_every=1",
        "train.warmup_ratio=0.25", "train.lr=1e-3"])
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    assert math.ceil(metrics["train_rows"] / 8) == 5
    expected = math.ceil(micro_batches / 2)
    assert metrics["steps"] == expected == len(steps)
    log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")
    assert log["step"].tolist() == list(range(1, expected + 1))
    warmup = round(0.25 * expected)
    np.testing.assert_allclose(log["lr"], [linear_lr(1e-3, s, expected, warmup) for s in log["step"]], atol=1e-12)
    assert log["lr"].iloc[-1] == 0.0  # the schedule ends exactly at the last optimizer step
    np.testing.assert_allclose(log["epoch"].iloc[-1], micro_batches / 5, atol=1e-3)


@pytest.mark.parametrize("scheduler, lrs", [  # the rate after each of 5 steps, one of them warmup
    ("linear", [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [1.0, 0.853553, 0.5, 0.146447, 0.0]),  # half a cosine period after the warmup
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),  # transformers' `constant` has no warmup
])
def test_the_learning_rate_follows_the_schedule(tmp_path, tiny_backbone, monkeypatch, scheduler, lrs):
    steps = record_steps(monkeypatch, keep_grads=False)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + [
        f"train.scheduler={scheduler}", "train.warmup_ratio=0.2", "train.eval_every=1", "train.lr=2e-3"])
    T.run(cfg, folds=[0], progress=False)
    log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")
    np.testing.assert_allclose(log["lr"], np.array(lrs) * 2e-3, rtol=1e-5, atol=1e-12)
    # The optimizer applies the rate of the step before: the warmup's first step has none.
    applied = [0.0 if scheduler != "constant" else 1.0, *lrs[:-1]]
    np.testing.assert_allclose([s["lr"] for s in steps], np.array(applied) * 2e-3, rtol=1e-5, atol=1e-12)


def test_head_lr_is_the_rate_of_the_head_and_pooling_only(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["train.head_lr=2e-2", "train.lr=1e-3", "train.llrd=0.8",
                                                      "model.pooling=attention"])
    model, _ = build_model(cfg.model, 1)
    optimizer = T.build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    head = {name: lr_of[id(p)] for name, p in model.named_parameters() if not name.startswith("backbone.")}
    assert {n.split(".")[0] for n in head} == {"head", "attention_pool"} and set(head.values()) == {2e-2}
    backbone = {lr_of[id(p)] for name, p in model.named_parameters() if name.startswith("backbone.")}
    assert max(backbone) == pytest.approx(1e-3) and min(backbone) == pytest.approx(1e-3 * 0.8**2)


# ---------------------------------------------------------------- (4) log.csv and metrics.json


@pytest.mark.parametrize("task, metric, extra, evaluated", [  # 40 rows, batches of 8, 3 epochs: 15 steps
    ("regression", "rmse", ["train.eval_every=2"], [2, 4, 6, 8, 10, 12, 14, 15]),  # and always the last
    ("regression", "rmse", ["train.eval_every=2", "train.eval_start=0.5"], [8, 10, 12, 14, 15]),  # from 7.5 on
    ("regression", "rmse", ["train.eval_every=0"], [3, 6, 9, 12, 15]),  # twice per 5-step epoch: every 3
    ("binary", "auc", ["train.metric=auc", "train.eval_every=4", "train.lr=5e-3"], [4, 8, 12, 15]),  # higher wins
])
def test_log_has_one_row_per_evaluation_and_metrics_keep_the_best(tmp_path, tiny_backbone, task, metric, extra,
                                                                   evaluated):
    cfg = tiny_config(tmp_path, tiny_backbone, task=task, extra=NO_DROPOUT + extra + ["train.epochs=3"])
    use_dataset(cfg, many_length_dataset(tmp_path, n=60, binary=task == "binary"), "balanced")
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    out = cfg.run_dir / "fold0"
    log = pd.read_csv(out / "log.csv")
    assert metrics["steps"] == 15
    assert log["step"].tolist() == evaluated
    assert {"step", "epoch", "lr", "train_loss", metric, "eval_s", "elapsed_s"} <= set(log.columns)
    between = log["elapsed_s"].diff().fillna(log["elapsed_s"])  # an evaluation is part of the time since the last
    assert (log["eval_s"] >= 0).all() and (log["eval_s"] <= between + 0.01).all()
    assert log[metric].nunique() > 1  # the model changed between evaluations
    best_row = log[metric].idxmin() if metric == "rmse" else log[metric].idxmax()
    assert metrics["score"] == pytest.approx(log[metric][best_row], rel=1e-12)
    assert metrics["best_step"] == log["step"][best_row]
    assert metrics["metric"] == metric and metrics["fold"] == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # valid_predictions.csv is the best evaluation's predictions: rescoring it gives the best score.
    train = D.load_train(cfg)
    valid = pd.read_csv(out / "valid_predictions.csv")
    truth = train.set_index("id").loc[valid["id"]]
    if task == "regression":
        rescored = score(metric, truth[["target"]].to_numpy(), valid[["target"]].to_numpy())
    else:
        rescored = score(metric, (truth["label"] == "pos").to_numpy(int), valid[["neg", "pos"]].to_numpy())
    assert rescored == pytest.approx(metrics["score"], rel=1e-5)
    assert not (out / "state.pt").exists()  # the resume state goes once the fold is complete


def test_peak_memory_is_counted_per_fold():
    """A grid trains many folds in one process: a fold is not charged with an earlier fold's peak."""
    cpu = torch.device("cpu")
    big = torch.ones(128 * 2**20)  # 512 MiB, written to, so resident
    earlier_peak = T.peak_memory_mb(cpu)
    del big
    T.reset_peak_memory(cpu)
    if T.peak_memory_mb(cpu) >= earlier_peak:
        pytest.skip("this system cannot reset the resident high-water mark (/proc/self/clear_refs)")
    fresh = T.peak_memory_mb(cpu)
    assert fresh < earlier_peak - 400
    again = torch.ones(64 * 2**20)  # 256 MiB in the new fold: its own peak still counts
    assert T.peak_memory_mb(cpu) > fresh + 200 and float(again[0]) == 1.0


def run_interrupted(cfg, monkeypatch, module, name: str, at_call: int) -> dict:
    """Train fold 0 with `module.name` raising KeyboardInterrupt at its `at_call`-th call, as a kill would stop it
    there; the state.pt it leaves for `--resume`."""
    real, calls = getattr(module, name), []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crash)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, folds=[0], progress=False)
    monkeypatch.setattr(module, name, real)
    return torch.load(cfg.run_dir / "fold0" / "state.pt", weights_only=False)


def test_a_fold_interrupted_before_its_first_evaluation_resumes_from_the_last_epoch(tmp_path, tiny_backbone,
                                                                                     monkeypatch):
    """Evaluations may begin late (train.eval_start), so the state is also saved at each epoch's end."""
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["train.epochs=3", "train.eval_every=2", "train.eval_start=0.9",
                                                      "train.precision=fp32", "train.device=cpu"])
    straight = T.run(copy.deepcopy(cfg), folds=[0], progress=False)[0]  # 40 rows, batches of 8: 5 steps per epoch
    straight_preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    straight_log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")

    cfg.experiment = "interrupted"
    state = run_interrupted(cfg, monkeypatch, D, "collate", 12)  # the third epoch's second batch: no evaluation yet
    assert state["step"] == 10 and state["log"] == []
    resumed = T.run(cfg, folds=[0], resume=True, progress=False)[0]
    assert resumed["score"] == pytest.approx(straight["score"], abs=1e-6)
    resumed_preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    np.testing.assert_allclose(resumed_preds["target"], straight_preds["target"], rtol=0, atol=1e-6)
    resumed_log = pd.read_csv(cfg.run_dir / "fold0" / "log.csv")
    np.testing.assert_allclose(resumed_log["train_loss"], straight_log["train_loss"], rtol=0, atol=1e-6)


def test_training_a_finished_fold_again_marks_it_unfinished_until_done(tmp_path, tiny_backbone, monkeypatch):
    """Without --resume a fold starts over: its old metrics.json must not vouch for a half-trained model.pt."""
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["train.precision=fp32", "train.device=cpu"])
    T.run(cfg, folds=[0], progress=False)
    fold0 = cfg.run_dir / "fold0"
    assert (fold0 / "metrics.json").exists()
    monkeypatch.setattr(D, "collate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, folds=[0], progress=False)
    assert not (fold0 / "metrics.json").exists() and not (fold0 / "valid_predictions.csv").exists()
    assert 0 in O.missing_folds(cfg)


# ---------------------------------------------------------------- (5) what a switch or a counter promises


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same(tmp_path, tiny_backbone, monkeypatch):
    calls = []
    build = T.build_model

    def counting_layers(cfg, outputs, **kwargs):
        model, config = build(cfg, outputs, **kwargs)
        for layer in encoder_layers(model.backbone):  # backward's replay of a layer runs its first part again
            next(layer.children()).register_forward_hook(lambda module, args, out: calls.append(module.training))
        return model, config

    monkeypatch.setattr(T, "build_model", counting_layers)
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + [
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"experiment=gc_{checkpointing}"])
        T.run(cfg, folds=[0], progress=False)
        runs[checkpointing] = (sum(calls), cfg.run_dir / "fold0")  # layer passes in training mode
    (plain_passes, plain), (gc_passes, gc) = runs[False], runs[True]
    assert plain_passes == 2 * 5 and gc_passes == 2 * plain_passes  # 2 layers, 5 steps; recomputed in backward
    for name in ("log.csv", "valid_predictions.csv"):
        a, b = pd.read_csv(plain / name), pd.read_csv(gc / name)
        np.testing.assert_allclose(b.select_dtypes("number").drop(columns=["eval_s", "elapsed_s"], errors="ignore"),
                                   a.select_dtypes("number").drop(columns=["eval_s", "elapsed_s"], errors="ignore"),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")  # torch: the 1st step was skipped
def test_skipped_steps_are_the_steps_the_grad_scaler_skipped(tmp_path, tiny_backbone, monkeypatch):
    """fp16's GradScaler (accelerate's, given here on the CPU) skips every step whose scaled gradients overflow,
    finite loss or not, and halves its scale: the fold counts exactly those steps, and takes the others."""
    scalers, make = [], T.make_accelerator

    def with_huge_scale(device, precision):
        accelerator = make(device, precision)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # the gradients overflow at first
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(T, "make_accelerator", with_huge_scale)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + ["train.epochs=2", "train.max_grad_norm=0"])
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    halvings = round(math.log2(2.0**126 / scalers[0].get_scale()))  # one per skipped step; 10 steps cannot grow it
    assert 0 < metrics["skipped_steps"] == halvings < metrics["steps"]
    assert np.isfinite(pd.read_csv(cfg.run_dir / "fold0" / "log.csv")["train_loss"]).all()


def test_a_multiclass_log_loss_evaluation_prints_no_warning(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, task="multiclass", classes=("a", "b", "c"),
                      extra=NO_DROPOUT + ["train.eval_every=1"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sum to one")  # scikit-learn's, at every evaluation
        T.run(cfg, progress=False)
        result = O.run(cfg)
    assert cfg.metric == "logloss" and np.isfinite(result["cv"])
    preds = pd.read_csv(cfg.run_dir / "oof.csv")[["a", "b", "c"]]
    np.testing.assert_allclose(preds.sum(axis=1), 1.0, rtol=0, atol=1e-12)
