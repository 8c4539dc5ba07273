"""The winners' techniques on the tiny BERT: AWP, FGM, EMA, SWA and layer freezing, each through its own entry
point and through `train_fold`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import data as D
from pipeline import train as T
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.model import build_model, fit_target_scaling
from pipeline.techniques import AWP, EMA, FGM, SWA
from pipeline.techniques.averaging import ema_decay
from tests.conftest import tiny_config

NO_DROPOUT = ["model.dropout=0", "model.head_dropout=0", "train.precision=fp32", "train.device=cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_batch(tmp_path, backbone, extra=()):
    """A tiny model (dropout 0) with the gradients of one fixed batch in .grad, and a rerun like the loop's."""
    cfg = tiny_config(tmp_path, backbone, extra=NO_DROPOUT + list(extra))
    prep = T.prepare(cfg)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 1)
    fit_target_scaling(model, "standardize", prep.enc.targets)
    model.train()
    batch = D.collate(prep.enc, list(range(16)), prep.tokenizer.pad_token_id)
    losses = []

    def rerun() -> torch.Tensor:
        loss = T.training_loss(model, batch, "regression", 0.0)
        loss.backward()
        losses.append(loss.item())
        return loss

    rerun()
    return model, rerun, losses


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- AWP


def test_awp_perturbs_within_eps_raises_the_loss_and_restores_every_weight(tmp_path, tiny_backbone):
    model, rerun, losses = tiny_batch(tmp_path, tiny_backbone)
    before, seen = weights(model), {}

    def watching_rerun():
        seen.update(weights(model))  # the weights the adversarial pass runs at
        return rerun()

    AWP(strength=1.0, eps=0.02, start_step=0).after_backward(model, watching_rerun, step=0)
    assert len(losses) == 2 and losses[1] >= losses[0]  # clean, then adversarial: the loss went up
    moved = [n for n in before if not torch.equal(seen[n], before[n])]
    assert moved and all("weight" in n for n in moved)  # weight matrices (and LayerNorm weights), no bias
    for n in moved:
        assert ((seen[n] - before[n]).abs() <= 0.02 * before[n].abs() + 1e-7).all(), n
    for n, w in weights(model).items():
        assert torch.equal(w, before[n]), n  # put back bit for bit


def test_awp_does_nothing_before_its_start(tmp_path, tiny_backbone):
    model, rerun, losses = tiny_batch(tmp_path, tiny_backbone)
    before = weights(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    AWP(strength=1.0, eps=0.02, start_step=5).after_backward(model, rerun, step=4)
    assert len(losses) == 1  # no adversarial pass
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)


# ---------------------------------------------------------------- FGM


def test_fgm_moves_the_embeddings_by_epsilon_raises_the_loss_and_restores_them(tmp_path, tiny_backbone):
    model, rerun, losses = tiny_batch(tmp_path, tiny_backbone)
    embeddings = model.backbone.get_input_embeddings().weight
    before, grad, seen = weights(model), embeddings.grad.clone(), {}

    def watching_rerun():
        seen.update(weights(model))
        return rerun()

    FGM(epsilon=0.5).after_backward(model, watching_rerun, step=0)
    name = next(n for n, p in model.named_parameters() if p is embeddings)
    step = seen[name] - before[name]
    torch.testing.assert_close(step, 0.5 * grad / grad.norm())  # epsilon along the gradient's direction
    assert all(torch.equal(seen[n], before[n]) for n in before if n != name)  # nothing else moves
    assert len(losses) == 2 and losses[1] >= losses[0]
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())


# ---------------------------------------------------------------- EMA and SWA


def ema_closed_form(history: list[dict], name: str, decay: float, n: int) -> torch.Tensor:
    """avg_n = (prod_k d_k) w_0 + sum_k (1 - d_k) (prod_{j>k} d_j) w_k, d_k = min(decay, (1 + k) / (10 + k))."""
    d = [None] + [min(decay, (1 + k) / (10 + k)) for k in range(1, n + 1)]
    total = float(np.prod(d[1:n + 1])) * history[0][name]
    for k in range(1, n + 1):
        total = total + (1 - d[k]) * float(np.prod(d[k + 1:n + 1])) * history[k][name]
    return total


def test_ema_warms_up_to_its_decay():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11) and ema_decay(0.999, 10_000) == 0.999


def test_ema_is_its_closed_form_and_evaluation_swaps_it_in_and_out(tmp_path, tiny_backbone):
    model, _, _ = tiny_batch(tmp_path, tiny_backbone)
    ema, decay = EMA(0.5), 0.5  # d_k: 2/11, 3/12, 4/13, then 0.5
    ema.start(model)
    history = [weights(model)]
    for k in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * k)
        history.append(weights(model))
        ema.after_step(model, k)
    live = weights(model)
    for name in live:
        torch.testing.assert_close(ema.average[name], ema_closed_form(history, name, decay, len(history) - 1),
                                   rtol=1e-5, atol=1e-6)
    with ema.evaluation_weights(model):
        assert all(torch.equal(p, ema.average[n]) for n, p in model.named_parameters())
    assert all(torch.equal(w, live[n]) for n, w in weights(model).items())  # training goes on from the live ones


def test_swa_of_identical_weights_returns_them_and_averages_from_its_start(tmp_path, tiny_backbone):
    model, _, _ = tiny_batch(tmp_path, tiny_backbone)
    swa, w0 = SWA(start_step=2), weights(model)
    swa.at_evaluation(model, 1)  # before the start: not averaged
    assert swa.average is None
    for step in (2, 3, 4):
        swa.at_evaluation(model, step)
    assert swa.count == 3 and all(torch.equal(swa.average[n], w0[n]) for n in w0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    swa.at_evaluation(model, 5)  # (w0 + w0 + w0 + (w0 + 3)) / 4
    for n in w0:
        torch.testing.assert_close(swa.average[n], w0[n] + 0.75)


def record_weights_after_each_step(monkeypatch) -> list[dict]:
    """The live trainable weights after every optimizer step of train_fold, first the initial ones."""
    history, build = [], T.build_optimizer

    def recording(model, cfg, **kwargs):
        optimizer = build(model, cfg, **kwargs)
        history.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.register_step_post_hook(lambda *_: history.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        return optimizer

    monkeypatch.setattr(T, "build_optimizer", recording)
    return history


def trained_with(tmp_path, backbone, monkeypatch, sets: list[str]) -> tuple[list[dict], dict, dict]:
    """A 2-epoch fold evaluated at every step: the live weights after each step, the metrics, the checkpoint."""
    history = record_weights_after_each_step(monkeypatch)
    cfg = tiny_config(tmp_path, backbone, extra=NO_DROPOUT + sets + ["train.eval_every=1", "train.lr=3e-3",
                                                                      "train.epochs=2"])
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    return history, metrics, torch.load(cfg.run_dir / "fold0" / "model.pt")


def test_train_fold_evaluates_and_saves_the_ema_weights_and_trains_the_live_ones(tmp_path, tiny_backbone,
                                                                                 monkeypatch):
    history, metrics, saved = trained_with(tmp_path, tiny_backbone, monkeypatch, ["train.ema=0.8"])
    best, decay = metrics["best_step"], 0.8
    for name in history[0]:
        torch.testing.assert_close(saved[name], ema_closed_form(history, name, decay, best), rtol=1e-4, atol=1e-6,
                                   msg=name)
    live = history[best]
    assert any(not torch.allclose(saved[n], live[n]) for n in live)  # not the live weights
    # training went on from the live weights: each step's weights differ from the last by one optimizer update,
    # the same as without EMA
    plain = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + ["train.eval_every=1", "train.lr=3e-3",
                                                                     "train.epochs=2", "experiment=plain"])
    history.clear()
    T.run(plain, folds=[0], progress=False)
    for name, w in live.items():
        torch.testing.assert_close(history[best][name], w, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("technique", ["train.ema=0.7", "train.swa=0.3"])
def test_an_interrupted_fold_resumes_its_average_too(tmp_path, tiny_backbone, monkeypatch, technique):
    extra = NO_DROPOUT + [technique, "train.eval_every=1", "train.lr=3e-3", "train.epochs=3"]
    straight = tiny_config(tmp_path, tiny_backbone, extra=extra + ["experiment=straight"])
    T.run(straight, folds=[0], progress=False)

    cfg = tiny_config(tmp_path, tiny_backbone, extra=extra + ["experiment=stopped"])
    save = T.save_state

    def stop_after_step_4(path, tr, fs, started):
        save(path, tr, fs, started)
        if fs.step >= 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_state", stop_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, folds=[0], progress=False)
    assert torch.load(cfg.run_dir / "fold0" / "state.pt", weights_only=False)["techniques"][0]["average"]
    monkeypatch.setattr(T, "save_state", save)
    T.run(cfg, folds=[0], resume=True, progress=False)
    a = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    b = pd.read_csv(straight.run_dir / "fold0" / "valid_predictions.csv")
    np.testing.assert_allclose(a["target"], b["target"], rtol=0, atol=1e-7)
    sa, sb = torch.load(cfg.run_dir / "fold0" / "model.pt"), torch.load(straight.run_dir / "fold0" / "model.pt")
    assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-7) for k in sb)


def test_swa_in_train_fold_saves_the_average_of_the_evaluations_from_its_start(tmp_path, tiny_backbone,
                                                                               monkeypatch):
    # evaluations only from the SWA start on: each one is of an average, whichever is best
    history, metrics, saved = trained_with(tmp_path, tiny_backbone, monkeypatch, ["train.swa=0.5",
                                                                                  "train.eval_start=0.5"])
    start, best = round(0.5 * metrics["steps"]), metrics["best_step"]
    assert metrics["steps"] == 10 and start <= best
    for name in history[0]:  # the saved checkpoint is the mean of the weights at steps start..best
        mean = torch.stack([history[k][name] for k in range(start, best + 1)]).mean(0)
        torch.testing.assert_close(saved[name], mean, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- freezing


def test_frozen_layers_do_not_change_and_get_no_optimizer_state(tmp_path, tiny_backbone, monkeypatch):
    optimizers, build = [], T.build_optimizer
    monkeypatch.setattr(T, "build_optimizer", lambda model, cfg, **kw: optimizers.append(build(model, cfg, **kw)) or
                        optimizers[-1])
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + ["model.freeze_layers=1", "train.lr=3e-3"])
    T.run(cfg, folds=[0], progress=False)
    model, _ = build_model(cfg.model, 1)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    layer0 = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()
              if n.startswith(("embeddings.", "encoder.layer.0."))}
    assert frozen == layer0
    saved = torch.load(cfg.run_dir / "fold0" / "model.pt")
    assert all(torch.equal(saved[n], pretrained[n]) for n in frozen)
    assert any(not torch.equal(saved[n], pretrained[n]) for n in pretrained if n.startswith("backbone.encoder.layer.1"))
    optimizer = optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert len(in_optimizer) == len(pretrained) - len(frozen)  # every trainable parameter, no frozen one
    assert {id(p) for p in optimizer.state} <= in_optimizer and len(optimizer.state) > 0  # no state for frozen ones


@pytest.mark.parametrize("sets, message", [
    (["train.ema=0.9", "train.swa=0.5"], "choose one"),
    (["train.fgm=1.0", "model.freeze_layers=0"], "model.freeze_layers freezes them"),
    (["train.awp=1.0", "train.awp_start=3", "train.epochs=3"], "that is never"),
    (["train.ema=1.0"], "train.ema"),
])
def test_combinations_that_cannot_work_are_refused_by_key(sets, message):
    with pytest.raises(PipelineError, match=message):
        load_config(None, sets)


@pytest.mark.parametrize("sets, message", [
    (["model.freeze_layers=2"], "would freeze all 2 encoder layers"),
    (["model.freeze_layers=1", "model.reinit_layers=2"], "overlap"),
])
def test_freezing_beyond_the_model_is_refused(tmp_path, tiny_backbone, sets, message):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + sets)
    with pytest.raises(PipelineError, match=message):
        build_model(cfg.model, 1)


def test_every_technique_together_trains_and_is_recorded(tmp_path, tiny_backbone):
    sets = ["train.awp=0.5", "train.awp_start=0.5", "train.fgm=0.5", "train.ema=0.9", "model.freeze_layers=0",
            "train.epochs=2"]
    with pytest.raises(PipelineError):  # FGM needs the embeddings that freeze_layers freezes
        tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + sets)
    sets.remove("model.freeze_layers=0")
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + sets)
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    assert np.isfinite(metrics["score"])
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert saved["train"]["awp"] == 0.5 and saved["train"]["fgm"] == 0.5 and saved["train"]["ema"] == 0.9
