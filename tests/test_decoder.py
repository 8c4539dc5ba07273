"""Decoder LLM backbones on tiny Qwen2, Llama, Gemma-2 (and GPT-2) models built from a config: padding on either
side, `model.pooling: last`, the pad token, the techniques over decoder layers, gradient checkpointing, and the
whole CLI chain down to the Kaggle kernel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModel
from typer.testing import CliRunner

from pipeline import data as D
from pipeline import pseudo as P
from pipeline import train as T
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.kaggle import kernel as KR
from pipeline.kaggle import wheels as W
from pipeline.model import build_model, encoder_layers, last_pool, load_tokenizer
from pipeline.regularization import active_dropout, set_dropout
from tests.conftest import DECODER_FAMILIES, make_dataset, tiny_config
from tests.test_train import texts_of_many_lengths

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
FP32 = ["train.precision=fp32", "train.device=cpu"]
NO_DROPOUT = ["model.dropout=0", "model.head_dropout=0"]
runner = CliRunner()


def decoder_model(tmp_path, backbone, *overrides: str, outputs: int = 3):
    cfg = tiny_config(tmp_path, backbone, extra=FP32 + list(overrides))
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, outputs)
    return cfg, model


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def encoded(backbone, texts: list[str], max_length: int = 64) -> tuple[D.Encoded, int]:
    tokenizer = load_tokenizer(backbone)
    return D.encode(tokenizer, pd.DataFrame({"text": texts}), ["text"], max_length), tokenizer.pad_token_id


# ---------------------------------------------------------------- padding and pooling


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", [*DECODER_FAMILIES, "gpt2"])
def test_a_row_gives_the_same_logits_alone_and_in_a_padded_batch(tmp_path, tiny_decoder, family, side):
    """Every row of a padded batch predicts what it predicts alone, padded on the tokenizer's side, with last and
    with mean pooling. GPT-2's learned absolute positions show a left-padded row whose positions are not counted
    from its first real token; the rotary families would differ by rounding only."""
    backbone = tiny_decoder(family, side)
    enc, pad_id = encoded(backbone, texts_of_many_lengths(8))
    rows = np.arange(8)
    batch = D.collate(enc, rows.tolist(), pad_id, 8).inputs
    padded = batch["attention_mask"] == 0
    assert padded.any() and bool(padded[:, 0 if side == "left" else -1].any())  # the side the tokenizer pads on
    for pooling in ("last", "mean"):
        _, model = decoder_model(tmp_path, backbone, f"model.pooling={pooling}", *NO_DROPOUT)
        with torch.no_grad():
            model.head.out.weight.mul_(20)  # outputs far apart, so a padded token read would show
        alone = T.predict(model, enc, rows, "regression", CPU, "fp32", 1, pad_id)
        together = T.predict(model, enc, rows, "regression", CPU, "fp32", 8, pad_id, multiple=8)
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5, err_msg=pooling)
        # The test can tell: the same batch with its padding attended to moves a padded row's outputs.
        unmasked = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
        with torch.no_grad():
            moved = model.eval()(**unmasked).numpy()
        assert np.abs(moved - together).max() > 1e-2, pooling


def test_last_pooling_reads_each_rows_last_real_token():
    hidden = torch.arange(5.0).repeat(3, 1).unsqueeze(-1).expand(3, 5, 2)  # hidden[b, t] = (t, t)
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding: token 2
                         [0, 0, 1, 1, 1],    # left padding: token 4
                         [1, 1, 1, 1, 1]])  # none: token 4
    assert last_pool(hidden, mask).tolist() == [[2.0, 2.0], [4.0, 4.0], [4.0, 4.0]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_pooling_is_the_backbones_state_at_the_text_end(tmp_path, tiny_decoder, side):
    """Through the model: the pooled features of a padded batch are the backbone's last hidden state of each text run
    alone, i.e. after its final token."""
    backbone = tiny_decoder("llama", side)
    texts = ["red cat", "alpha beta gamma delta epsilon zeta", "dog"]
    enc, pad_id = encoded(backbone, texts)
    _, model = decoder_model(tmp_path, backbone, "model.pooling=last", *NO_DROPOUT)
    model.eval()
    with torch.no_grad():
        pooled = model.features(**D.collate(enc, [0, 1, 2], pad_id, 8).inputs)
        for i in range(3):
            alone = model.backbone(input_ids=torch.tensor([enc.input_ids[i]])).last_hidden_state[0, -1]
            torch.testing.assert_close(pooled[i], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_are_padded_as_the_tokenizer_pads(tiny_decoder, side):
    """collate (training, evaluation, predict, the kernel) pads on the tokenizer's side, with its pad token: the
    tokenizer's own `pad` gives the same tensors. Llama's tokenizer ships without a pad token: eos pads."""
    tokenizer = load_tokenizer(tiny_decoder("llama", side))
    assert tokenizer.padding_side == side and tokenizer.pad_token == tokenizer.eos_token == "</s>"
    enc, pad_id = encoded(tiny_decoder("llama", side), ["red cat", "alpha beta gamma delta", "dog tree"])
    ours = D.collate(enc, [0, 1, 2], pad_id).inputs
    theirs = tokenizer.pad({"input_ids": enc.input_ids}, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_empty_text_is_one_token_and_predicts_like_any_row(tmp_path, tiny_decoder, side):
    """Qwen2's tokenizer adds no special token: an empty test text would be a row of nothing to attend to or pool
    (NaN from attention, a pooled position of -1). It becomes its eos token, alone and in a padded batch."""
    backbone = tiny_decoder("qwen2", side)
    enc, pad_id = encoded(backbone, ["", "red cat alpha beta"])
    assert enc.input_ids[0] == [load_tokenizer(backbone).eos_token_id]
    _, model = decoder_model(tmp_path, backbone, "model.pooling=last", *NO_DROPOUT)
    together = model.eval()(**D.collate(enc, [0, 1], pad_id).inputs)
    alone = model(**D.collate(enc, [0], pad_id).inputs)
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-5)


def test_pseudo_labelled_rows_are_padded_like_the_true_rows(tiny_decoder):
    """A student's batches mix its true rows and a teacher's pseudo-labelled rows: all padded on the left here."""
    backbone = tiny_decoder("llama", "left")
    enc, pad_id = encoded(backbone, ["red cat", "alpha beta gamma delta"])
    enc.targets = np.zeros((2, 1), np.float32)
    extra, _ = encoded(backbone, ["dog", "tree house river stone light dark"])
    pseudo = P.PseudoLabels(np.array(["p0", "p1"]), extra, [np.zeros((2, 1), np.float32)], Path("pseudo.csv"))
    rows = P.fold_rows(enc, pseudo, 0, np.arange(2), np.array([]), "regression", 1, 1.0)
    mask = D.collate(rows.enc, rows.positions.tolist(), pad_id).inputs["attention_mask"]
    assert len(mask) == 4 and bool(mask[:, -1].all()) and not bool(mask[:, 0].all())
    staged = P.pseudo_rows(pseudo, 0, np.array([]))  # stage mode: the pseudo rows alone
    mask = D.collate(staged.enc, staged.positions.tolist(), pad_id).inputs["attention_mask"]
    assert len(mask) == 2 and bool(mask[:, -1].all()) and not bool(mask[:, 0].all())


def test_a_decoder_ignores_segment_ids(tmp_path, tiny_decoder):
    """A tokenizer may hand out token_type_ids (all 0); decoders were pretrained without them. GPT-2's forward takes
    them and would add its id-0 token embedding to every position."""
    _, model = decoder_model(tmp_path, tiny_decoder("gpt2"), "model.pooling=last", *NO_DROPOUT)
    enc, pad_id = encoded(tiny_decoder("gpt2"), ["red cat", "alpha beta gamma"])
    batch = D.collate(enc, [0, 1], pad_id)
    with torch.no_grad():
        plain = model.eval()(**batch.inputs)
        with_types = model(**batch.inputs, token_type_ids=torch.zeros_like(batch.inputs["input_ids"]))
    assert torch.equal(with_types, plain)


def test_a_decoder_keeps_its_own_pad_token_and_refuses_cls_pooling(tmp_path, tiny_decoder):
    """Qwen2 ships a pad token (its end-of-text): it stays. cls reads the first token, which in a causal model has
    seen only itself (and with left padding is padding): refused, naming the key."""
    tokenizer = load_tokenizer(tiny_decoder("qwen2"))
    assert tokenizer.pad_token == "<|endoftext|>"
    for family in DECODER_FAMILIES:
        with pytest.raises(PipelineError, match="'model.pooling': cls reads the first token.*use last"):
            decoder_model(tmp_path, tiny_decoder(family), "model.pooling=cls")


# ---------------------------------------------------------------- model building: attention, techniques, dropout


def test_pipeline_attention_leaves_a_decoder_its_own(tmp_path, tiny_decoder):
    """The pipeline's CPU kernel is an encoder's: decoders keep transformers' choice (SDPA; eager for Gemma-2,
    whose attention softcapping SDPA lacks). A training pass runs, and Gemma-2 computes what eager attention does."""
    _, qwen = decoder_model(tmp_path, tiny_decoder("qwen2"))
    assert qwen.backbone.config._attn_implementation == "sdpa"
    _, gemma = decoder_model(tmp_path, tiny_decoder("gemma2"), *NO_DROPOUT)
    _, eager = decoder_model(tmp_path, tiny_decoder("gemma2"), "model.attention=eager", *NO_DROPOUT)
    assert gemma.backbone.config._attn_implementation == "eager"
    enc, pad_id = encoded(tiny_decoder("gemma2"), texts_of_many_lengths(4))
    inputs = D.collate(enc, [0, 1, 2, 3], pad_id).inputs
    torch.testing.assert_close(gemma.train()(**inputs), eager.train()(**inputs), rtol=0, atol=1e-6)
    with pytest.raises(PipelineError, match="'model.attention': sdpa does not work with Gemma2Model"):
        decoder_model(tmp_path, tiny_decoder("gemma2"), "model.attention=sdpa")


def test_a_decoders_attention_dropout_counts_as_dropout_and_model_dropout_0_stops_it(tmp_path, tiny_decoder):
    """Llama's attention hands a float to its kernel, with no nn.Dropout anywhere in the model: R-Drop and MSD see
    it as dropout (no "every dropout is 0" warning), and set_dropout sets it."""
    _, model = decoder_model(tmp_path, tiny_decoder("llama"), "model.attention_dropout=0.3", "model.head_dropout=0")
    assert active_dropout(model) == ["backbone.layers.0.self_attn", "backbone.layers.1.self_attn"]
    enc, pad_id = encoded(tiny_decoder("llama"), texts_of_many_lengths(4))
    inputs = D.collate(enc, [0, 1, 2, 3], pad_id).inputs
    assert not torch.equal(model.train()(**inputs), model(**inputs))  # it drops
    assert set_dropout(model, 0.0) == 2 + 1 and active_dropout(model) == []  # the attentions and the head's
    torch.testing.assert_close(model.train()(**inputs), model(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_techniques_find_the_decoder_layers(tmp_path, tiny_decoder, family):
    """LLRD, re-init, freezing and mixout act on `model.layers` of a decoder (there is no `encoder`), and
    model.dropout reaches the attention dropout, which decoders name `attention_dropout`."""
    backbone = tiny_decoder(family)
    pretrained = AutoModel.from_pretrained(backbone).state_dict()
    cfg, model = decoder_model(tmp_path, backbone, "train.llrd=0.5", "train.lr=1e-3", "model.dropout=0.1")
    layers = encoder_layers(model.backbone)
    assert layers is model.backbone.layers and len(layers) == 2
    lr_of = {p: g["lr"] for g in T.build_optimizer(model, cfg).param_groups for p in g["params"]}
    assert {lr_of[p] for p in layers[1].parameters()} == {1e-3}
    assert {lr_of[p] for p in layers[0].parameters()} == {5e-4}
    assert lr_of[model.backbone.embed_tokens.weight] == 2.5e-4
    assert lr_of[model.backbone.norm.weight] == 1e-3  # above the layers
    assert [m.attention_dropout for m in model.backbone.modules() if hasattr(m, "attention_dropout")] == [0.1, 0.1]

    _, model = decoder_model(tmp_path, backbone, "model.reinit_layers=1", "model.freeze_layers=0",
                             "model.mixout=0.2", *NO_DROPOUT)
    state = model.backbone.state_dict()
    top = [k for k in state if k.startswith("layers.1.") and k.endswith("proj.weight")]
    assert top and all(not torch.equal(state[k], pretrained[k]) for k in top)  # re-initialized
    assert all(torch.equal(state[k], pretrained[k]) for k in state if k.startswith("layers.0."))
    assert not model.backbone.embed_tokens.weight.requires_grad
    assert sum(type(m).__name__ == "MixLinear" for m in model.backbone.modules()) == 2 * 7  # q k v o gate up down
    enc, pad_id = encoded(backbone, texts_of_many_lengths(4))
    batch = D.collate(enc, [0, 1, 2, 3], pad_id)
    batch.targets = torch.zeros(4, 3)
    loss = T.training_loss(model.train(), batch, "regression", 0.0)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_gpt2_embeddings_are_below_the_layers_for_llrd_and_freezing(tmp_path, tiny_decoder):
    """GPT-2 names its embeddings `wte` and `wpe`: LLRD gives both the bottom rate and freezing freezes both (the
    learned positions as well as the tokens), while the final LayerNorm stays above the layers."""
    backbone = tiny_decoder("gpt2")
    cfg, model = decoder_model(tmp_path, backbone, "train.llrd=0.5", "train.lr=1e-3", *NO_DROPOUT)
    lr_of = {p: g["lr"] for g in T.build_optimizer(model, cfg).param_groups for p in g["params"]}
    gpt2 = model.backbone
    assert lr_of[gpt2.wte.weight] == lr_of[gpt2.wpe.weight] == 2.5e-4  # two layers below the top rate
    assert lr_of[gpt2.ln_f.weight] == 1e-3
    _, model = decoder_model(tmp_path, backbone, "model.freeze_layers=1", *NO_DROPOUT)
    gpt2 = model.backbone
    assert not gpt2.wte.weight.requires_grad and not gpt2.wpe.weight.requires_grad
    assert not any(p.requires_grad for p in gpt2.h[0].parameters())
    assert all(p.requires_grad for p in [*gpt2.h[1].parameters(), *gpt2.ln_f.parameters()])


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(tmp_path, tiny_decoder, family):
    """With attention dropout live and left padding; and the backbone keeps no key/value cache (nothing generates)."""
    backbone = tiny_decoder(family, "left")
    enc, pad_id = encoded(backbone, texts_of_many_lengths(6))
    batch = D.collate(enc, list(range(6)), pad_id, 8)
    batch.targets = torch.linspace(-1, 1, 6).unsqueeze(1)
    grads, passes = {}, {}
    for checkpointing in (False, True):
        _, model = decoder_model(tmp_path, backbone, "model.attention_dropout=0.2",
                                 f"model.gradient_checkpointing={str(checkpointing).lower()}", outputs=1)
        calls = []
        for layer in model.backbone.layers:  # backward's replay of a layer runs its attention again
            layer.self_attn.register_forward_hook(lambda module, args, out, calls=calls: calls.append(1))
        torch.manual_seed(1)
        T.training_loss(model.train(), batch, "regression", 0.0).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters()}
        passes[checkpointing] = len(calls)
        with torch.no_grad():
            assert len(model.backbone.eval()(**batch.inputs)) == 1  # last_hidden_state alone: no cache
    assert passes == {False: 2, True: 4}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_init_writes_last_pooling_for_a_decoder_backbone(tmp_path, tiny_decoder, tiny_backbone):
    data = make_dataset(tmp_path / "comp", "regression")
    for name, backbone, pooling in (("llm", tiny_decoder("qwen2"), "last"), ("bert", tiny_backbone, "mean")):
        invoke("init", data, "--name", name, "--config-dir", tmp_path, "--set", f"model.backbone={backbone}")
        assert load_config(tmp_path / f"{name}.yaml").model.pooling == pooling


# ---------------------------------------------------------------- the whole chain


def no_wheels(out, image, extra=()):
    """The kit's wheels are not what this test checks (tests/test_kaggle_kit.py builds them): a stand-in."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{W.PROJECT}-0.1.0-py3-none-any.whl").write_bytes(b"")
    (out / W.REQUIREMENTS).write_text("")
    return {}


CHAINS = {"regression": ("qwen2", "left", dict(task="regression"), []),
          "multiclass": ("gemma2", "right", dict(task="multiclass", classes=("a", "b", "c")), []),
          "multiclass_lora": ("llama", "left", dict(task="multiclass", classes=("a", "b", "c")), ["model.lora_r=4"]),
          "regression_lora": ("qwen2", "right", dict(task="regression"), ["model.lora_r=4"])}


@pytest.mark.parametrize("case", list(CHAINS))
def test_whole_chain_on_a_decoder_blended_with_an_encoder(tmp_path, tiny_decoder, tiny_backbone, monkeypatch, case):
    """folds, train, oof, predict on a decoder with last pooling (full fine-tuning, or LoRA adapters on the base
    weights); an encoder run on the same folds; ensemble, submit, package, and the kit's kernel run offline, whose
    submission equals submit's."""
    family, side, task, keys = CHAINS[case]
    cfg = tiny_config(tmp_path, tiny_decoder(family, side), **task, extra=FP32 + ["model.pooling=last"] + keys)
    config = tmp_path / "decoder.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "experiment"}))
    out = tmp_path / "oof"
    for stage in ("folds", "train", "oof", "predict"):
        invoke(stage, config)
    run_dir = out / "decoder"
    assert np.isfinite(json.loads((run_dir / "cv.json").read_text())["cv"])
    saved = load_tokenizer(run_dir / "backbone")
    assert saved.padding_side == side and saved.pad_token_id is not None
    assert AutoConfig.from_pretrained(run_dir / "backbone").pad_token_id == saved.pad_token_id
    if keys:  # LoRA: a fold's checkpoint holds the adapters and the head, the base weights sit in backbone/
        base = sum(f.stat().st_size for f in (run_dir / "backbone").glob("*.safetensors"))
        assert 0 < (run_dir / "fold0" / "model.pt").stat().st_size < 0.3 * base  # (r 4 of hidden 32)
    # Test predictions do not depend on how the rows were batched and padded.
    first = pd.read_csv(run_dir / "test_predictions.csv")
    invoke("predict", config, "--set", "train.eval_batch_size=1")
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "test_predictions.csv"), first, rtol=0, atol=1e-5)

    encoder = ["--set", f"model.backbone={tiny_backbone}", "--set", "model.pooling=mean", "--set", "experiment=encoder"]
    for stage in ("train", "oof", "predict"):
        invoke(stage, config, *encoder)
    invoke("ensemble", "decoder", "encoder", "--name", "blend", "--method", "mean", "--output-dir", out)
    invoke("submit", "blend", "--out", tmp_path / "submission.csv", "--output-dir", out)
    monkeypatch.setattr(W, "build", no_wheels)
    invoke("package", "blend", "--out", tmp_path / "kit", "--output-dir", out, "--competition", "tiny-comp",
           "--dataset", "tester/tiny-decoder")
    kernel_csv = KR.run(tmp_path / "kit" / "models", tmp_path / "kernel.csv", test=cfg.data.test_path,
                        sample=cfg.data.sample_submission_path, device="cpu")
    got, want = pd.read_csv(kernel_csv), pd.read_csv(tmp_path / "submission.csv")
    assert got.columns.tolist() == want.columns.tolist() and got["id"].tolist() == want["id"].tolist()
    np.testing.assert_allclose(got.drop(columns="id"), want.drop(columns="id"), rtol=0, atol=1e-6)

    # A test file with no rows (a code competition's public one may have none): a header-only submission, not a crash
    for name, path in (("test", cfg.data.test_path), ("sample", cfg.data.sample_submission_path)):
        pd.read_csv(path).iloc[:0].to_csv(tmp_path / f"empty_{name}.csv", index=False)
    empty = KR.run(tmp_path / "kit" / "models", tmp_path / "empty.csv", test=tmp_path / "empty_test.csv",
                   sample=tmp_path / "empty_sample.csv", device="cpu")
    assert pd.read_csv(empty).columns.tolist() == want.columns.tolist() and len(pd.read_csv(empty)) == 0
