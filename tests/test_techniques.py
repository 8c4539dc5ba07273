"""Property tests of the switchable fine-tuning techniques, in the style of timm's tests/test_layers_drop.py.

Each test checks numbers a wrong implementation would get wrong, on the tiny 2-layer BERT of conftest:

1. Multi-Sample Dropout (Inoue, 2019): evaluation is exactly the plain linear head; training gives
   (samples, batch, outputs) logits that differ per sample, and the loss is the mean of the per-sample losses.
2. Mixout (Lee et al., ICLR 2020): p=0 and evaluation are the plain Linear; the drop rate per input column is p;
   dropped columns get exactly zero gradient; the pretrained copy is a non-persistent buffer that follows the
   weight's device; only backbone Linears are swapped; a mixout state dict is a plain model's; bf16 autocast;
   p outside [0, 1) is refused.
3. R-Drop (Liang et al., NeurIPS 2021): consistency > 0 with dropout and exactly 0 without; the symmetric KL
   computed by hand; train_fold's loss grows by alpha times the disagreement of two dropout passes; a warning
   when R-Drop runs with every dropout at 0.
4. model.dropout=0: no dropout left anywhere (BERT and DistilBERT configs), deterministic training passes.
5. Re-init of the top k layers (Zhang et al., 2021): only the top layers change; k too large is an error.
6. Layer-wise LR decay: lr * d**depth per layer, embeddings lowest, head at lr; no decay on bias/LayerNorm.
7. Every technique trains 3 optimizer steps under bf16 autocast on CPU (fp16 on CUDA, marked gpu), its Linear
   layers computing in that precision in training and evaluation.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, DistilBertConfig, DistilBertModel, ModernBertConfig, ModernBertModel

from pipeline import data as D
from pipeline import model as M
from pipeline import train as T
from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.losses import rdrop_consistency, task_loss
from pipeline.model import backbone_config, build_model, encoder_layers, load_tokenizer, model_from_saved
from pipeline.regularization import MixLinear, active_dropout, apply_mixout, set_dropout
from tests.conftest import WORDS, tiny_config

CLASSES = ("a", "b", "c")
OUTPUTS = {"regression": 1, "binary": 2, "multiclass": 3}
NO_DROPOUT = ["model.dropout=0", "model.head_dropout=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- helpers


def build(tmp_path, backbone, *overrides: str, task: str = "regression"):
    """(cfg, model, HF config) for the tiny backbone with `overrides`, the model in train mode."""
    classes = CLASSES if task == "multiclass" else ("neg", "pos")
    cfg = tiny_config(tmp_path, backbone, task=task, classes=classes, extra=list(overrides))
    model, config = build_model(cfg.model, OUTPUTS[task])
    return cfg, model.train(), config


@functools.cache
def _tokenizer(backbone: str):
    return load_tokenizer(backbone)


def tiny_batch(backbone, task: str = "regression", n: int = 6) -> D.Batch:
    """n texts of different lengths with regression targets (n, 1) or class indices (n,)."""
    texts = [" ".join(WORDS[i:i + 3 + 2 * i]) for i in range(n)]
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(n, 1)).astype(np.float32) if task == "regression" else np.arange(n) % OUTPUTS[task]
    tokenizer = _tokenizer(str(backbone))
    enc = D.encode(tokenizer, pd.DataFrame({"text": texts}), ["text"], 32, targets)
    return D.collate(enc, list(range(n)), tokenizer.pad_token_id or 0)


def doubled(inputs: dict) -> dict:
    return {k: torch.cat([v, v]) for k, v in inputs.items()}


def seeded(seed: int, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def dropout_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def mixlinear(in_features: int = 64, out_features: int = 16, p: float = 0.3, shift: float = 1.0) -> MixLinear:
    """A MixLinear in train mode whose weight has moved `shift` away from its pretrained copy."""
    torch.manual_seed(0)
    layer = MixLinear.from_linear(nn.Linear(in_features, out_features), p)
    with torch.no_grad():
        layer.weight.add_(shift)
    return layer.train()


# ---------------------------------------------------------------- (1) Multi-Sample Dropout


def test_msd_eval_is_exactly_the_plain_linear_head(tmp_path, tiny_backbone):
    _, msd, _ = build(tmp_path, tiny_backbone, "model.head=msd", "model.msd_samples=4", "model.msd_dropout=0.5")
    _, linear, _ = build(tmp_path, tiny_backbone, "model.head=linear")
    linear.load_state_dict(msd.state_dict())  # the same weights: dropout has none
    inputs = tiny_batch(tiny_backbone).inputs
    msd.eval(), linear.eval()
    with torch.no_grad():
        pooled = msd.features(**inputs)
        by_hand = F.linear(pooled, msd.head.out.weight, msd.head.out.bias)
        assert torch.equal(msd(**inputs), by_hand)
        assert torch.equal(linear(**inputs), by_hand)
        assert msd.sample_logits(**inputs).shape == (1, 6, 1)


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_msd_train_gives_distinct_samples_and_the_mean_of_their_losses(tmp_path, tiny_backbone, task):
    _, model, _ = build(tmp_path, tiny_backbone, "model.head=msd", "model.msd_samples=4", task=task)
    batch = tiny_batch(tiny_backbone, task)
    logits = seeded(1, model.sample_logits, **batch.inputs)
    assert logits.shape == (4, 6, OUTPUTS[task]) and logits.dtype == torch.float32
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(logits[i], logits[j]), f"samples {i} and {j} share a dropout mask"
    per_sample = torch.stack([task_loss(task, logits[s], batch.targets) for s in range(4)])
    loss = seeded(1, T.training_loss, model, batch, task, 0.0)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # Not the loss of the averaged logits: by Jensen's inequality that is strictly smaller here.
    assert task_loss(task, logits.mean(0), batch.targets).item() < loss.item() - 1e-6


# ---------------------------------------------------------------- (2) Mixout


def test_mixout_p0_is_the_plain_linear_in_train_mode():
    torch.manual_seed(0)
    plain = nn.Linear(16, 8).train()
    x = torch.randn(5, 16)
    assert torch.equal(MixLinear.from_linear(plain, 0.0).train()(x), plain(x))
    fresh = MixLinear(16, 8, p=0.0).train()
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh(x), plain(x))


def test_mixout_eval_is_the_plain_linear():
    layer = mixlinear(p=0.5)
    x = torch.randn(5, 64)
    assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # train mode mixes
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_mixout_drops_whole_columns_at_rate_p():
    p, passes = 0.3, 200  # 80,000 columns drawn: the rate's standard error is 0.0016
    layer = mixlinear(in_features=400, out_features=8, p=p)
    u, w = layer.pretrained, layer.weight.detach()
    kept_value = u + (w - u) / (1 - p)
    torch.manual_seed(0)
    masks = []
    for _ in range(passes):
        mixed = layer.mixed_weight().detach()
        dropped = (mixed == u).all(0)
        assert torch.equal((mixed == u).any(0), dropped), "the mask is per input column"
        torch.testing.assert_close(mixed[:, ~dropped], kept_value[:, ~dropped])
        masks.append(dropped)
    masks = torch.stack(masks).float()
    assert masks.mean().item() == pytest.approx(p, abs=0.01)  # 12 standard errors: 0.28 or 0.32 fails
    assert len({tuple(m.tolist()) for m in masks}) == passes  # a fresh mask every pass


def test_mixout_gradient_is_zero_on_dropped_columns_and_scaled_on_kept():
    p = 0.5
    layer = mixlinear(p=p)
    x = torch.randn(5, 64)
    mixed = seeded(3, layer.mixed_weight).detach()
    dropped = (mixed == layer.pretrained).all(0)
    assert 0 < dropped.sum() < 64
    seeded(3, layer, x).pow(2).sum().backward()
    grad = layer.weight.grad
    assert torch.all(grad[:, dropped] == 0)
    assert torch.all(grad[:, ~dropped].abs().sum(0) > 0)
    # Kept columns: the gradient at the mixed weight, times 1 / (1 - p).
    at_mixed = mixed.clone().requires_grad_()
    F.linear(x, at_mixed, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(grad, at_mixed.grad * (~dropped) / (1 - p))


def test_mixout_pretrained_copy_is_a_non_persistent_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert apply_mixout(model, 0.3) == 2
    layer = model[0]
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "0.pretrained" in dict(model.named_buffers())
    assert all(p is not layer.pretrained for p in model.parameters())
    assert layer.pretrained.data_ptr() != layer.weight.data_ptr()  # a copy, not the weight itself
    before = layer.pretrained.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert not torch.equal(layer.weight, before) and torch.equal(layer.pretrained, before)
    for target in [torch.float64, "meta"] + (["cuda"] if torch.cuda.is_available() else []):
        model.to(target)
        for mix in (model[0], model[2]):
            assert mix.pretrained.device == mix.weight.device and mix.pretrained.dtype == mix.weight.dtype


def test_mixout_without_bias_matches_a_biasless_linear():
    torch.manual_seed(0)
    plain = nn.Linear(8, 4, bias=False)
    mix = MixLinear.from_linear(plain, 0.3).eval()
    x = torch.randn(3, 8)
    assert mix.bias is None and set(mix.state_dict()) == {"weight"}
    assert torch.equal(mix(x), plain(x))


def test_build_model_mixout_swaps_only_backbone_linears(tmp_path, tiny_backbone):
    _, plain, _ = build(tmp_path, tiny_backbone, "model.pooling=attention")
    _, model, config = build(tmp_path, tiny_backbone, "model.mixout=0.3", "model.pooling=attention")
    backbone_linears = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    assert len(backbone_linears) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer; pooler
    assert all(type(m) is MixLinear and m.p == 0.3 for m in backbone_linears)
    head_linears = [m for m in [*model.head.modules(), *model.attention_pool.modules()] if isinstance(m, nn.Linear)]
    assert type(model.head.out) is nn.Linear and len(head_linears) == 3
    assert all(type(m) is nn.Linear for m in head_linears)
    # The pretrained copies are the checkpoint's weights, and mixout adds no parameter.
    plain_params = dict(plain.backbone.named_parameters())
    for name, m in model.backbone.named_modules():
        if isinstance(m, MixLinear):
            assert torch.equal(m.pretrained, plain_params[f"{name}.weight"]), name
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    # Mixout replaces dropout: none left in the backbone.
    assert active_dropout(model.backbone) == [] and dropout_layers(model.backbone) == []
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert active_dropout(plain.backbone) != []


def test_mixout_state_dict_loads_into_a_plain_model(tmp_path, tiny_backbone):
    cfg, model, config = build(tmp_path, tiny_backbone, "model.mixout=0.3")
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: every weight away from its pretrained copy
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config.save_pretrained(tmp_path / "backbone")
    plain = model_from_saved(cfg.model, tmp_path / "backbone", 1, model.state_dict())  # strict load
    assert not any(isinstance(m, MixLinear) for m in plain.modules())
    inputs = tiny_batch(tiny_backbone).inputs
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs), model(**inputs), rtol=0, atol=1e-6)
        model.train()
        assert not torch.allclose(seeded(0, model, **inputs), plain(**inputs))  # training mixes


def test_mixout_runs_under_bf16_autocast():
    layer = mixlinear(in_features=16, out_features=8, p=0.3)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    for grad in (layer.weight.grad, layer.bias.grad, x.grad):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_mixout_probability_outside_0_1_is_refused(tmp_path, tiny_backbone, p):
    with pytest.raises(ValueError, match="mixout"):
        MixLinear(4, 4, p=p)
    with pytest.raises(ValueError, match="mixout"):
        MixLinear.from_linear(nn.Linear(4, 4), p)
    with pytest.raises(ValueError, match="mixout"):
        apply_mixout(nn.Sequential(nn.Linear(4, 4)), p)
    with pytest.raises(PipelineError, match="model.mixout"):
        tiny_config(tmp_path, tiny_backbone, extra=[f"model.mixout={p}"])


# ---------------------------------------------------------------- (3) R-Drop


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_rdrop_consistency_is_positive_with_dropout_and_zero_without(tmp_path, tiny_backbone, task):
    inputs = doubled(tiny_batch(tiny_backbone, task).inputs)
    _, model, _ = build(tmp_path, tiny_backbone, task=task)  # the checkpoint's dropout, 0.1
    a, b = seeded(0, model.sample_logits, **inputs).chunk(2, dim=1)
    assert rdrop_consistency(task, a, b).item() > 1e-8
    _, model, _ = build(tmp_path, tiny_backbone, *NO_DROPOUT, task=task)
    a, b = seeded(0, model.sample_logits, **inputs).chunk(2, dim=1)
    assert torch.equal(a, b)
    assert rdrop_consistency(task, a, b).item() == 0.0


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_rdrop_consistency_is_the_symmetric_kl(task):
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, OUTPUTS[task]), torch.randn(3, 5, OUTPUTS[task])  # (samples, batch, classes)
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    kl_pq = (p * (p.log() - q.log())).sum(-1).mean()
    kl_qp = (q * (q.log() - p.log())).sum(-1).mean()
    expected = 0.5 * (kl_pq + kl_qp)
    torch.testing.assert_close(rdrop_consistency(task, a, b), expected)
    torch.testing.assert_close(rdrop_consistency(task, b, a), expected)
    assert expected.item() > 0.1


def test_rdrop_consistency_regression_is_the_mean_squared_difference():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(rdrop_consistency("regression", a, b), ((a - b) ** 2).mean())


@pytest.mark.parametrize("task, head", [("regression", "linear"), ("multiclass", "msd")])
def test_rdrop_adds_alpha_times_the_disagreement_of_two_dropout_passes(tmp_path, tiny_backbone, task, head):
    """train_fold's first step sees the same batch and dropout masks at any alpha: its logged loss is
    task + alpha * consistency, so the loss grows linearly with alpha, and only if the two passes differ."""
    first_losses = []
    for alpha in (1.0, 2.0, 4.0):
        cfg = tiny_config(tmp_path, tiny_backbone, task=task, classes=CLASSES, extra=[
            f"model.head={head}", f"train.rdrop={alpha}", "train.precision=fp32", "train.device=cpu",
            "train.eval_every=1", "train.epochs=0.2", f"experiment=rdrop{alpha}"])  # one step
        T.run(cfg, folds=[0], progress=False)
        first_losses.append(pd.read_csv(cfg.run_dir / "fold0" / "log.csv")["train_loss"].iloc[0])
    at_1, at_2, at_4 = first_losses
    consistency = at_2 - at_1
    assert consistency > 1e-3 * at_1, first_losses  # the two passes disagree: independent dropout masks
    assert at_4 - at_2 == pytest.approx(2 * consistency, rel=1e-3)


def test_rdrop_without_dropout_warns(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=NO_DROPOUT + [
        "train.rdrop=1.0", "train.precision=fp32", "train.device=cpu", "train.batch_size=16"])
    with pytest.warns(UserWarning, match="dropout"):
        T.train_fold(T.prepare(cfg), 0, progress=False)


# ---------------------------------------------------------------- (4) dropout = 0


def train_outputs_agree(model: nn.Module, inputs: dict) -> bool:
    """Two train-mode passes under different RNG states give identical outputs."""
    with torch.no_grad():
        return torch.equal(seeded(0, model, **inputs), seeded(1, model, **inputs))


def test_dropout_0_leaves_no_dropout_and_deterministic_training(tmp_path, tiny_backbone):
    inputs = tiny_batch(tiny_backbone).inputs
    _, default, _ = build(tmp_path, tiny_backbone)
    assert dropout_layers(default) and active_dropout(default)  # the test can tell
    assert not train_outputs_agree(default, inputs)
    _, model, config = build(tmp_path, tiny_backbone, "model.dropout=0.0")
    assert dropout_layers(model) == [] and active_dropout(model) == []  # backbone and head
    assert model.head.dropout.p == 0.0
    assert train_outputs_agree(model, inputs)
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0


def test_backbone_config_sets_every_dropout_key(tiny_backbone):
    source = str(tiny_backbone)
    keys = ["hidden_dropout_prob", "attention_probs_dropout_prob"]
    pretrained = backbone_config(ModelConfig(backbone=source), source)
    assert [getattr(pretrained, k) for k in keys] == [0.1, 0.1]
    config = backbone_config(ModelConfig(backbone=source, dropout=0.0), source)
    assert [getattr(config, k) for k in keys] == [0.0, 0.0]
    assert all(v == 0.0 for k, v in config.to_dict().items() if "dropout" in k and isinstance(v, float))
    split = backbone_config(ModelConfig(backbone=source, dropout=0.2, attention_dropout=0.05), source)
    assert [getattr(split, k) for k in keys] == [0.2, 0.05]


class StableDropout(nn.Module):
    """DeBERTa's dropout: not an nn.Dropout, its probability is `drop_prob`."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob


def test_set_dropout_reaches_every_kind_of_dropout():
    model = nn.Sequential(nn.Dropout(0.3), nn.Dropout1d(0.2), nn.Sequential(StableDropout(0.1), nn.Linear(2, 2)))
    assert active_dropout(model) == ["0", "1", "2.0"]
    assert set_dropout(model, 0.0) == 3
    assert active_dropout(model) == [] and model[2][0].drop_prob == 0.0


def test_dropout_0_holds_where_the_config_does_not_control_dropout(tmp_path, tiny_backbone, monkeypatch):
    """An architecture whose dropout keys backbone_config does not know: the modules are still set to 0."""
    monkeypatch.setattr(M, "backbone_config", lambda cfg, source: AutoConfig.from_pretrained(source))
    _, model, config = build(tmp_path, tiny_backbone, "model.dropout=0")
    assert config.hidden_dropout_prob == 0.1  # the config kept the checkpoint's dropout ...
    assert dropout_layers(model.backbone) == [] and active_dropout(model) == []  # ... the modules did not
    assert train_outputs_agree(model, tiny_batch(tiny_backbone).inputs)


def save_tiny(model: nn.Module, out, tiny_backbone):
    """Save `model` like a pretrained checkpoint, with the tiny BERT's tokenizer files beside it."""
    model.save_pretrained(out)
    for f in tiny_backbone.iterdir():
        if f.is_file() and f.name not in {"config.json", "model.safetensors"}:
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_distilbert(tiny_backbone, tmp_path_factory):
    """A 2-layer DistilBERT: its dropout keys are `dropout`, `attention_dropout`, `qa_dropout`, ..."""
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=_tokenizer(str(tiny_backbone)).vocab_size, dim=32, n_layers=2, n_heads=2,
                              hidden_dim=64, max_position_embeddings=128)
    return save_tiny(DistilBertModel(config), tmp_path_factory.mktemp("tiny-distilbert"), tiny_backbone)


@pytest.fixture(scope="module")
def tiny_modernbert(tiny_backbone, tmp_path_factory):
    """A 2-layer ModernBERT: no key the head's default dropout is read from (embedding_/mlp_/attention_dropout)."""
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=_tokenizer(str(tiny_backbone)).vocab_size, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=128, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                              bos_token_id=101, eos_token_id=102)
    return save_tiny(ModernBertModel(config), tmp_path_factory.mktemp("tiny-modernbert"), tiny_backbone)


def test_dropout_0_on_distilbert(tmp_path, tiny_backbone, tiny_distilbert):
    inputs = tiny_batch(tiny_backbone).inputs  # with the BERT tokenizer's token_type_ids: DistilBERT ignores them
    keys = ["dropout", "attention_dropout", "qa_dropout", "seq_classif_dropout"]
    _, default, config = build(tmp_path, tiny_distilbert)
    assert [getattr(config, k) for k in keys] == [0.1, 0.1, 0.1, 0.2] and active_dropout(default)
    _, model, config = build(tmp_path, tiny_distilbert, "model.dropout=0")
    assert [getattr(config, k) for k in keys] == [0.0] * 4
    assert len(encoder_layers(model.backbone)) == 2
    assert dropout_layers(model) == [] and active_dropout(model) == []
    assert train_outputs_agree(model, inputs)


@pytest.mark.parametrize("dropout, head", [(0.0, 0.0), (0.2, 0.2)])
def test_head_dropout_follows_model_dropout_on_modernbert(tmp_path, tiny_backbone, tiny_modernbert, dropout, head):
    """model.head_dropout unset: the head takes model.dropout, even where the config has no hidden dropout key."""
    _, model, config = build(tmp_path, tiny_modernbert, f"model.dropout={dropout}")
    assert config.mlp_dropout == config.embedding_dropout == dropout
    assert model.head.dropout.p == head
    if dropout == 0.0:
        assert active_dropout(model) == []
        assert train_outputs_agree(model, tiny_batch(tiny_backbone).inputs)


# ---------------------------------------------------------------- (5) re-init of the top k layers


def test_reinit_changes_only_the_top_layers(tmp_path, tiny_backbone):
    torch.manual_seed(0)
    _, base, _ = build(tmp_path, tiny_backbone)
    torch.manual_seed(1)
    _, reinit, config = build(tmp_path, tiny_backbone, "model.reinit_layers=1")
    base_params = dict(base.backbone.named_parameters())
    top = "encoder.layer.1."
    compared = 0
    for name, p in reinit.backbone.named_parameters():
        if not name.startswith(top):
            assert torch.equal(p, base_params[name]), f"{name} changed but is below the re-initialized layer"
            compared += 1
    assert compared > 16 and any(n.startswith("embeddings.") for n in base_params)
    linears = [(n, m) for n, m in encoder_layers(reinit.backbone)[1].named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6
    base_top = encoder_layers(base.backbone)[1]
    for name, m in linears:
        assert not torch.equal(m.weight, base_top.get_submodule(name).weight), f"{top}{name} was not re-initialized"
        # BERT's own initialization: normal(0, initializer_range), zero bias; not torch's default Linear init.
        assert m.weight.std().item() == pytest.approx(config.initializer_range, rel=0.15)
        assert torch.all(m.bias == 0)


def test_reinit_more_layers_than_the_backbone_has_is_an_error(tmp_path, tiny_backbone):
    build(tmp_path, tiny_backbone, "model.reinit_layers=2")  # all of them is fine
    with pytest.raises(PipelineError, match="model.reinit_layers"):
        build(tmp_path, tiny_backbone, "model.reinit_layers=3")


# ---------------------------------------------------------------- (6) layer-wise LR decay


def test_llrd_learning_rates_and_weight_decay(tmp_path, tiny_backbone):
    cfg, model, _ = build(tmp_path, tiny_backbone, "train.llrd=0.8", "train.weight_decay=0.01",
                          "model.pooling=attention")
    lr, n = cfg.train.lr, 2
    optimizer = T.build_optimizer(model, cfg)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = list(model.named_parameters())
    assert len(group_of) == len(named) == sum(len(g["params"]) for g in optimizer.param_groups)
    layer_lrs = set()
    for name, p in named:
        group = group_of[id(p)]
        if name.startswith("backbone.encoder.layer."):
            i = n - 1 - int(name.split(".")[3])  # depth from the top
            assert group["lr"] == pytest.approx(lr * 0.8**i, rel=1e-12), name
            layer_lrs.add(round(group["lr"], 15))
        elif name.startswith("backbone.embeddings."):
            assert group["lr"] == pytest.approx(lr * 0.8**n, rel=1e-12), name
        elif not name.startswith("backbone."):
            assert group["lr"] == lr, name  # head and attention pooling
        no_decay = name.endswith(".bias") or "LayerNorm" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.01), name
    assert layer_lrs == {round(lr, 15), round(lr * 0.8, 15)}
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([lr * 0.8**2, lr * 0.8, lr])


# ---------------------------------------------------------------- (7) every technique trains under autocast

TECHNIQUES = {
    "msd": ["model.head=msd"],
    "mixout": ["model.mixout=0.3"],
    "rdrop": ["train.rdrop=1.0"],
    "dropout0": ["model.dropout=0"],
    "reinit": ["model.reinit_layers=1"],
    "llrd": ["train.llrd=0.8"],
    "attention": ["model.pooling=attention"],
    "cls": ["model.pooling=cls"],
    "mean": ["model.pooling=mean"],
    # the 2022-25 winners' techniques (tests/test_winners.py has their properties): AWP from the first step
    "awp": ["train.awp=0.5", "train.awp_start=0"],
    "fgm": ["train.fgm=1.0"],
    "ema": ["train.ema=0.9"],
    "swa": ["train.swa=0.3"],
    "freeze": ["model.freeze_layers=1"],
}


def train_three_steps(tmp_path, backbone, overrides: list[str], precision: str, device: str, task="regression"):
    """40 training rows in batches of 16: one epoch is 3 optimizer steps, every Linear computing in `precision`."""
    cfg = tiny_config(tmp_path, backbone, task=task, classes=CLASSES if task == "multiclass" else ("neg", "pos"),
                      extra=overrides + [f"train.precision={precision}", f"train.device={device}",
                                         "train.epochs=1", "train.batch_size=16"])
    linear_outputs = {True: set(), False: set()}  # dtypes in training steps, in evaluations

    def record(module, args, out):
        if isinstance(module, nn.Linear):
            linear_outputs[module.training].add(out.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = T.train_fold(T.prepare(cfg), 0, progress=False)
    finally:
        hook.remove()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert linear_outputs == {True: {half}, False: {half}}, linear_outputs
    assert not [w for w in caught if "need dropout" in str(w.message)]
    out = cfg.run_dir / "fold0"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 3 and metrics["precision"] == precision
    assert math.isfinite(metrics["score"])
    assert np.isfinite(pd.read_csv(out / "log.csv")["train_loss"]).all()
    return metrics


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_every_technique_trains_under_bf16_autocast(tmp_path, tiny_backbone, technique):
    train_three_steps(tmp_path, tiny_backbone, TECHNIQUES[technique], "bf16", "cpu")


def test_all_techniques_together_train_under_bf16_autocast(tmp_path, tiny_backbone):
    together = ["model.head=msd", "model.mixout=0.3", "train.rdrop=1.0", "model.reinit_layers=1",
                "train.llrd=0.8", "model.pooling=attention"]
    train_three_steps(tmp_path, tiny_backbone, together, "bf16", "cpu", task="multiclass")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_every_technique_trains_under_fp16_on_cuda(tmp_path, tiny_backbone, technique):
    metrics = train_three_steps(tmp_path, tiny_backbone, TECHNIQUES[technique], "fp16", "cuda")
    assert metrics["device"].startswith("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_winners_techniques_together_train_under_fp16_on_cuda(tmp_path, tiny_backbone):
    """AWP and FGM rerun the micro-batch on gradients the GradScaler has scaled; EMA averages the weights it steps."""
    together = ["train.awp=0.5", "train.awp_start=0", "train.fgm=1.0", "train.ema=0.9", "model.reinit_layers=1"]
    metrics = train_three_steps(tmp_path, tiny_backbone, together, "fp16", "cuda")
    assert metrics["device"].startswith("cuda")
