"""LoRA adapters (model.lora_*) on the tiny BERT and tiny decoders, and bitsandbytes' settings on a CPU machine.

What a user relies on: only the adapters, the head and the pooling train (and only they reach the optimizer or
its averages); the backbone's weights do not move; checkpointing changes no gradient; a fold checkpoint is a small
fraction of the model and predicts exactly as the fold did; --resume continues bit for bit; the CLI chain and the
Kaggle kit take a LoRA run as any other; what cannot combine with LoRA, or cannot run here (8-bit, 4-bit), is an
error naming the key before any work.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModel, BertModel, GemmaConfig, LlamaConfig, Qwen2Config
from typer.testing import CliRunner

from pipeline import data as D
from pipeline import predict
from pipeline import train as T
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.inference import autocast
from pipeline.kaggle import kernel as KR
from pipeline.kaggle import wheels as W
from pipeline.model import build_model, checkpoint_state, encoder_layers, fit_target_scaling, load_tokenizer
from pipeline.techniques.lora import apply_lora
from tests.conftest import tiny_config

LORA = ["model.lora_r=4", "train.precision=fp32", "train.device=cpu"]
NO_DROPOUT = ["model.dropout=0", "model.head_dropout=0", "model.lora_dropout=0"]
BERT_TARGETS = {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"}
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapted_layers(model) -> set[str]:
    """Names of the backbone's modules that carry an adapter."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def capture_trainer(monkeypatch) -> list:
    """Every fold's Trainer as train_fold made it: its model is the fold's trained model afterwards."""
    made, make = [], T.make_trainer
    monkeypatch.setattr(T, "make_trainer", lambda *a: made.append(make(*a)) or made[-1])
    return made


# ---------------------------------------------------------------- what trains


def test_only_adapters_head_and_pooling_train_and_the_optimizer_holds_them_alone(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + ["model.pooling=attention"])
    model, _ = build_model(cfg.model, 1)
    names = trainable(model)
    assert names and all(".lora_" in n or n.startswith(("head.", "attention_pool.")) for n in names)
    assert {n for n in names if not n.startswith("backbone.")} == \
        {n for n, _ in model.named_parameters() if not n.startswith("backbone.")}
    # the default targets: every Linear of both transformer layers, none outside them (BERT's pooler)
    assert adapted_layers(model) == {f"backbone.encoder.layer.{i}.{t}" for i in (0, 1) for t in BERT_TARGETS}
    optimizer = T.build_optimizer(model, cfg)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in names}
    # the weight-decay rule of train.decays still holds: matrices decay (adapters too), biases do not
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if n in names:
            assert decay[id(p)] == (cfg.train.weight_decay if p.ndim >= 2 else 0.0), n


def tiny_decoder(config_class):
    torch.manual_seed(0)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return AutoModel.from_config(config)


@pytest.mark.parametrize("config_class", [Qwen2Config, LlamaConfig, GemmaConfig])
def test_decoders_get_adapters_on_every_projection_by_default_or_on_those_named(config_class):
    backbone = tiny_decoder(config_class)
    cfg = load_config(None, ["model.lora_r=4"]).model
    names = apply_lora(backbone, encoder_layers(backbone), cfg)
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(names) == sorted(f"layers.{i}.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}"
                                   for i in (0, 1) for k in kinds)
    assert all("lora_" in n for n, p in backbone.named_parameters() if p.requires_grad)
    backbone = tiny_decoder(config_class)
    named = load_config(None, ["model.lora_r=4", "model.lora_target_modules=[q_proj, v_proj]"]).model
    assert sorted(apply_lora(backbone, encoder_layers(backbone), named)) == \
        [f"layers.{i}.self_attn.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")]
    wrong = load_config(None, ["model.lora_r=4", "model.lora_target_modules=[query]"]).model
    with pytest.raises(PipelineError, match="model.lora_target_modules.*query names no Linear.*q_proj"):
        apply_lora(backbone := tiny_decoder(config_class), encoder_layers(backbone), wrong)


def test_training_moves_the_adapters_and_head_and_not_one_backbone_weight(tmp_path, tiny_backbone, monkeypatch):
    made = capture_trainer(monkeypatch)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + ["train.weight_decay=0.1", "train.epochs=2"])
    T.run(cfg, folds=[0], progress=False)
    model = made[0].bare
    pretrained = AutoModel.from_pretrained(tiny_backbone).state_dict()
    base = {n.removeprefix("backbone.").replace(".base_layer", ""): p for n, p in model.named_parameters()
            if n.startswith("backbone.") and ".lora_" not in n}
    assert base.keys() == {k for k in pretrained if k in base} and len(base) == len(list(
        AutoModel.from_pretrained(tiny_backbone).parameters()))
    assert all(torch.equal(p, pretrained[n]) for n, p in base.items())  # weight decay 0.1 reached none
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every adapter trained


def test_gradients_with_and_without_checkpointing_match(tmp_path, tiny_backbone, monkeypatch):
    """Also under reentrant checkpointing, where transformers does not make the embeddings' output require grad
    itself (before 5.x, or a model whose main input is not input_ids): the frozen embeddings would otherwise give
    the checkpointed layers inputs without grad, and no gradient would reach their adapters."""
    grads, passes = {}, {}
    for mode in ("plain", "non-reentrant", "reentrant"):
        cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + NO_DROPOUT + [
            f"model.gradient_checkpointing={str(mode != 'plain').lower()}", f"experiment={mode}"])
        prep = T.prepare(cfg)
        torch.manual_seed(0)
        with monkeypatch.context() as patch:
            if mode == "reentrant":  # transformers 5.x hooks the embeddings for models read from input_ids
                patch.setattr(BertModel, "main_input_name", "not_input_ids")
            model, _ = build_model(cfg.model, 1)
            if mode == "reentrant":
                model.backbone.activation_checkpointing_enable({"use_reentrant": True})
        fit_target_scaling(model, "standardize", prep.enc.targets)
        with torch.no_grad():  # B = 0 at the start would leave every A without gradient
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        calls = []
        for layer in encoder_layers(model.backbone):  # backward's replay of a layer runs its first part again
            next(layer.children()).register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        T.training_loss(model, D.collate(prep.enc, list(range(16)), prep.tokenizer.pad_token_id), "regression",
                        0.0).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        passes[mode] = len(calls)
    assert passes == {"plain": 2, "non-reentrant": 4, "reentrant": 4}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["plain"].values())
    for mode in ("non-reentrant", "reentrant"):
        assert grads[mode].keys() == grads["plain"].keys()
        for n, g in grads["plain"].items():
            assert grads[mode][n] is not None, (mode, n)
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {n}")


# ---------------------------------------------------------------- checkpoints and resume


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the frozen base in bf16 at training and predict time
def test_fold_checkpoints_are_a_small_fraction_and_predict_as_their_folds_did(tmp_path, tiny_backbone, precision):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + [f"train.precision={precision}"])
    T.run(cfg, folds=[0, 1], progress=False)
    base = cfg.run_dir / "backbone" / "model.safetensors"
    assert base.read_bytes() == (tiny_backbone / "model.safetensors").read_bytes()  # the pretrained file, once
    table = D.load_train(cfg)
    # predict's own loader (one backbone, each fold's adapters in turn) on every row: each fold's validation rows
    # get what the fold wrote when it evaluated them
    for k, got in zip((0, 1), predict.fold_predictions(cfg, cfg.run_dir, table, ["target"])):
        fold = cfg.run_dir / f"fold{k}"
        assert (fold / "model.pt").stat().st_size < 0.02 * base.stat().st_size
        saved = torch.load(fold / "model.pt", weights_only=True)
        assert saved and all(".lora_" in key or key.startswith(("head.", "target_scale.")) for key in saved)
        valid = pd.read_csv(fold / "valid_predictions.csv")
        rows = table.reset_index().set_index("id").loc[valid["id"], "index"].to_numpy()
        np.testing.assert_allclose(got[rows, 0], valid["target"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_a_16_bit_frozen_base_computes_what_autocast_made_of_the_fp32_one(tmp_path, tiny_backbone, request, family):
    """Under bf16 the frozen Linear weights are stored in bf16 (GPT-2's Conv1D too): logits and adapter gradients
    equal to the last bit those of fp32 weights cast by autocast at each forward, in fewer bytes; adapters,
    embeddings and norms stay fp32."""
    backbone = tiny_backbone if family == "bert" else request.getfixturevalue("tiny_decoder")(family)
    pooling = ["model.pooling=last"] if family != "bert" else []
    cfg = tiny_config(tmp_path, backbone, extra=LORA + NO_DROPOUT + pooling)
    models = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        models[precision], _ = build_model(cfg.model, 2, precision=precision)
        with torch.no_grad():  # B starts at zero: make the adapters count, the same in both
            for name, p in models[precision].named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    full, half = models["fp32"], models["bf16"]
    dtypes = {name: p.dtype for name, p in half.named_parameters()}
    frozen_linear = [n for n in dtypes if "base_layer" in n] + (["backbone.pooler.dense.weight"] * (family == "bert"))
    assert frozen_linear and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    assert {dtypes[n] for n, p in half.named_parameters() if p.requires_grad} == {torch.float32}
    assert all(dtypes[n] == torch.float32 for n in dtypes if "embed" in n or "wte" in n or "norm" in n or "ln_" in n)

    def size(model):  # bytes of the frozen Linear weights
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in frozen_linear)

    assert size(half) * 2 == size(full)
    tokenizer = load_tokenizer(backbone)
    enc = D.encode(tokenizer, D.load_train(cfg).head(6), ["text"], 32)
    inputs = D.collate(enc, list(range(6)), tokenizer.pad_token_id or 0).inputs
    with autocast(torch.device("cpu"), "bf16"):
        out = {k: m.train()(**inputs) for k, m in models.items()}
    assert torch.equal(out["fp32"], out["bf16"])
    for logits in out.values():
        logits.sum().backward()
    grads = {k: {n: p.grad for n, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}
    assert grads["fp32"].keys() == grads["bf16"].keys()
    assert all(torch.equal(grads["fp32"][n], grads["bf16"][n]) for n in grads["fp32"])


def test_resume_with_lora_continues_bit_for_bit(tmp_path, tiny_backbone, monkeypatch):
    extra = LORA + ["train.epochs=3", "train.eval_every=2", "train.ema=0.7", "train.lr=3e-3"]
    straight = tiny_config(tmp_path, tiny_backbone, extra=extra + ["experiment=straight"])
    T.run(straight, folds=[0], progress=False)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=extra + ["experiment=stopped"])
    save, sizes = T.save_state, []

    def stop_after_step_6(path, tr, fs, started):
        save(path, tr, fs, started)
        sizes.append(len(torch.load(path, weights_only=False)["model"]))
        if fs.step >= 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_state", stop_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, folds=[0], progress=False)
    model, _ = build_model(cfg.model, 1)
    assert sizes[-1] == len(checkpoint_state(model))  # the resume state holds no frozen weight either
    monkeypatch.setattr(T, "save_state", save)
    T.run(cfg, folds=[0], resume=True, progress=False)
    for name in ("valid_predictions.csv", "log.csv"):
        a, b = pd.read_csv(cfg.run_dir / "fold0" / name), pd.read_csv(straight.run_dir / "fold0" / name)
        numbers = [c for c in b.select_dtypes("number").columns if c not in ("eval_s", "elapsed_s")]
        pd.testing.assert_frame_equal(a[numbers], b[numbers])
    sa, sb = torch.load(cfg.run_dir / "fold0" / "model.pt"), torch.load(straight.run_dir / "fold0" / "model.pt")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb)


# ---------------------------------------------------------------- the techniques under LoRA


def test_llrd_gives_each_adapter_its_layers_rate(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + ["train.llrd=0.5"])
    model, _ = build_model(cfg.model, 1)
    lr_of = {id(p): g["lr"] for g in T.build_optimizer(model, cfg).param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if ".lora_" in n:
            depth = 1 - int(n.split(".")[3])  # backbone.encoder.layer.<i>: the top layer is depth 0
            assert lr_of[id(p)] == pytest.approx(cfg.train.lr * 0.5**depth), n
        elif p.requires_grad:
            assert lr_of[id(p)] == cfg.train.lr, n  # the head


@pytest.mark.parametrize("technique", ["train.ema=0.9", "train.swa=0.5"])
def test_averages_hold_the_adapters_and_head_alone(tmp_path, tiny_backbone, monkeypatch, technique):
    made = capture_trainer(monkeypatch)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + [technique, "train.eval_every=1"])
    T.run(cfg, folds=[0], progress=False)
    average = made[0].techniques[0].average
    assert set(average) == trainable(made[0].bare)
    assert sum(t.numel() for t in average.values()) < 0.05 * sum(p.numel() for p in made[0].bare.parameters())


TECHNIQUES = {"rdrop": ["train.rdrop=1.0"], "msd": ["model.head=msd"], "awp": ["train.awp=1.0", "train.awp_start=0"],
              "ema": ["train.ema=0.9"], "swa": ["train.swa=0.5"], "dropout0": ["model.dropout=0"],
              "attention_pool": ["model.pooling=attention"], "llrd": ["train.llrd=0.8"],
              "checkpointing": ["model.gradient_checkpointing=true"]}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_every_technique_that_applies_trains_with_lora_under_bf16(tmp_path, tiny_backbone, technique):
    from tests.test_techniques import train_three_steps

    train_three_steps(tmp_path, tiny_backbone, ["model.lora_r=4"] + TECHNIQUES[technique], "bf16", "cpu")


@pytest.mark.parametrize("sets, key, reason", [
    (["model.mixout=0.3"], "model.mixout", "mixes trained weights back toward their pretrained values"),
    (["model.mixout=0.3", "model.load_in=4bit"], "model.mixout", "load_in=4bit quantizes them"),
    (["model.reinit_layers=1"], "model.reinit_layers", "frozen at random weights"),
    (["model.freeze_layers=1"], "model.freeze_layers", "freezes every backbone weight"),
    (["train.fgm=1.0"], "train.fgm", "word embeddings along their gradient"),
    (["model.lora_r=0", "model.lora_dropout=0.1"], "model.lora_dropout", "model.lora_r is 0"),
    (["model.lora_r=0", "model.load_in=8bit"], "model.load_in", "cannot be fine-tuned itself"),
    (["model.lora_r=-1"], "model.lora_r", "must be >= 0"),
    (["model.lora_alpha=0"], "model.lora_alpha", "must be positive"),
    (["model.lora_dropout=1"], "model.lora_dropout", r"must be in \[0, 1\)"),
    (["model.lora_target_modules=[]"], "model.lora_target_modules", "name at least one"),
    (["model.load_in=2bit"], "model.load_in", "is not one of 8bit, 4bit"),
    (["train.optimizer=sgd"], "train.optimizer", "is not one of adamw"),
])
def test_what_cannot_combine_with_lora_is_refused_naming_the_key(sets, key, reason):
    with pytest.raises(PipelineError, match=f"'{key}'.*{reason}"):
        load_config(None, ["model.lora_r=8", *sets])


# ---------------------------------------------------------------- bitsandbytes and peft where they cannot run


@pytest.mark.parametrize("sets, key", [(["model.lora_r=4", "model.load_in=4bit"], "model.load_in"),
                                       (["model.lora_r=4", "model.load_in=8bit"], "model.load_in"),
                                       (["train.optimizer=adamw_8bit"], "train.optimizer"),
                                       (["train.optimizer=paged_adamw_8bit"], "train.optimizer")])
def test_bitsandbytes_settings_on_a_cpu_stop_before_any_work(tmp_path, tiny_backbone, sets, key):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=sets + ["train.device=cpu"])
    with pytest.raises(PipelineError, match=f"config key '{key}': .* needs a CUDA device; this run is on cpu"):
        T.run(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()  # not even the folds were written


def test_without_bitsandbytes_or_peft_the_error_names_the_package_and_the_extra(tmp_path, tiny_backbone,
                                                                                monkeypatch):
    from pipeline import quantization as Q

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it fails, as where it is not installed
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["train.optimizer=adamw_8bit"])
    with pytest.raises(PipelineError, match=r"'train.optimizer': adamw_8bit needs the bitsandbytes .*\.\[llm\]"):
        Q.check(cfg, torch.device("cuda"))
    Q.check(cfg, torch.device("cuda"), predicting=True)  # predicting needs no optimizer
    monkeypatch.setitem(sys.modules, "peft", None)
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA)
    with pytest.raises(PipelineError, match=r"'model.lora_r': LoRA adapters need the peft package.*\.\[llm\]"):
        T.run(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()  # before any work: not even the folds


def test_a_quantized_run_is_refused_at_predict_time_on_a_cpu(tmp_path, tiny_backbone):
    cfg = tiny_config(tmp_path, tiny_backbone, extra=LORA + ["model.load_in=4bit"])
    with pytest.raises(PipelineError, match="'model.load_in': 4bit .* needs a CUDA device"):
        next(predict.fold_predictions(cfg, cfg.run_dir, pd.DataFrame({"id": ["a"], "text": ["x"]}), ["target"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and bitsandbytes")
@pytest.mark.parametrize("load_in, optimizer", [("4bit", "paged_adamw_8bit"), ("8bit", "adamw_8bit")])
def test_qlora_trains_and_predicts_on_cuda(tmp_path, tiny_backbone, load_in, optimizer):
    """The real bitsandbytes path: a quantized frozen backbone, adapters in fp32, 8-bit optimizer states; the
    fold's checkpoint predicts its validation rows as the fold did."""
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tmp_path, tiny_backbone, extra=["model.lora_r=4", f"model.load_in={load_in}",
                                                      f"train.optimizer={optimizer}", "train.device=cuda",
                                                      "model.gradient_checkpointing=true"])
    metrics = T.run(cfg, folds=[0], progress=False)[0]
    assert np.isfinite(metrics["score"]) and metrics["device"].startswith("cuda")
    valid = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    rows = D.load_train(cfg).set_index("id").loc[valid["id"]].reset_index()
    got = next(predict.fold_predictions(cfg, cfg.run_dir, rows, ["target"]))
    np.testing.assert_allclose(got[:, 0], valid["target"], rtol=0, atol=1e-3)


# ---------------------------------------------------------------- the whole chain through the CLI


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def fake_wheels(built: list):
    def build(out: Path, image: dict, extra: tuple[str, ...] = ()) -> dict:
        """The wheelhouse without pip (tests/test_kaggle_kit.py builds and installs a real one)."""
        built.append(extra)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pipeline-0.1.0-py3-none-any.whl").write_bytes(b"")
        return {}

    return build


@pytest.mark.parametrize("task, classes", [("regression", ("neg", "pos")), ("multiclass", ("a", "b", "c"))])
def test_cli_chain_with_a_lora_run_and_a_full_one(tmp_path, tiny_backbone, monkeypatch, task, classes):
    """folds, train, oof, predict, ensemble with a fully fine-tuned run, submit, package: the kit carries the base
    weights once and each fold's adapters, and predicts what the ensemble predicted."""
    built = []
    monkeypatch.setattr(W, "build", fake_wheels(built))
    cfg = tiny_config(tmp_path, tiny_backbone, task=task, classes=classes, extra=LORA)
    values = cfg.to_dict()
    values.pop("experiment")
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "oof"
    invoke("folds", config)
    for stage in ("train", "oof", "predict"):
        invoke(stage, config)
    full = ["--set", "model.lora_r=0", "--set", "experiment=full"]
    for stage in ("train", "oof", "predict"):
        invoke(stage, config, *full)
    assert yaml.safe_load((out / "lora" / "config.yaml").read_text())["model"]["lora_r"] == 4
    lora_pt = (out / "lora" / "fold0" / "model.pt").stat().st_size
    assert lora_pt < 0.05 * (out / "full" / "fold0" / "model.pt").stat().st_size
    invoke("ensemble", "lora", "full", "--name", "blend", "--method", "mean", "--output-dir", out)
    invoke("submit", "blend", "--out", tmp_path / "submission.csv", "--output-dir", out)
    sub, sample = pd.read_csv(tmp_path / "submission.csv"), pd.read_csv(tmp_path / "data" / "sample_submission.csv")
    assert sub.columns.tolist() == sample.columns.tolist() and sub["id"].tolist() == sample["id"].tolist()

    kit = tmp_path / "kit"
    invoke("package", "blend", "--out", kit, "--output-dir", out, "--dataset", "tester/tiny-lora",
           "--competition", "tiny-comp")
    manifest = json.loads((kit / "models" / "MANIFEST.json").read_text())
    assert built == [("peft",)]  # a wheel of peft goes in where the image lacks it
    assert [m["name"] for m in manifest["members"]] == ["lora", "full"]
    assert "lora/backbone/model.safetensors" in manifest["files"]
    assert "full/backbone/model.safetensors" not in manifest["files"]  # a full run's folds carry their backbone
    preds, _ = KR.predict_kit(kit / "models", manifest, Path(cfg.data.dir) / "test.csv", "cpu", "fp32")
    expected = pd.read_csv(out / "blend" / "test_predictions.csv")
    columns = manifest["columns"]
    np.testing.assert_allclose(preds[columns], expected[columns], rtol=0, atol=1e-6)


def test_kit_ships_peft_only_where_the_image_lacks_it(tmp_path):
    image = W.load_image()
    assert "peft" in image["packages"]
    assert W.needed(image, extra=("peft",)) == W.needed(image)  # Kaggle's image has it: nothing more to ship
    lacking = copy.deepcopy(image)
    lacking["packages"].discard("peft")
    shipped = W.needed(lacking, extra=("peft",))
    assert shipped["peft"] == W.metadata.version("peft") and "peft" not in W.needed(lacking)

