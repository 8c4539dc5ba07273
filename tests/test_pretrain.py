"""`pipeline pretrain`: masked-LM pre-training on the competition's texts, and training from its backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, BertTokenizer
from typer.testing import CliRunner

from pipeline import pretrain as PT
from pipeline import train as T
from pipeline.cli import app
from pipeline.config import load_config, save_config
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.report import NOT_A_CHANGE
from pipeline.runs import check_same_config, differing_keys, load_run_config
from tests.conftest import WORDS, tiny_config

# A small corpus that repeats a few sentences: a tiny model can learn it in a few epochs.
SENTENCES = ["the red cat sat under the green tree", "a blue dog ran over the dark stone",
             "light falls on the river by the house", "alpha beta gamma delta epsilon zeta"]


def pretrain_config(tmp_path: Path, backbone: Path, extra: list[str] | None = None):
    return tiny_config(tmp_path, backbone, extra=["pretrain.lr=5e-3", "pretrain.batch_size=8",
                                                  "pretrain.eval_fraction=0.2", f"pretrain.output={tmp_path / 'bb'}",
                                                  *(extra or [])])


def repetitive_dataset(data_dir: Path, n: int = 48) -> None:
    rng = np.random.default_rng(0)
    texts = [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(n)]  # distinct rows, repeated sentences
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts, "target": rng.normal(size=n)}) \
        .to_csv(data_dir / "train.csv", index=False)
    pd.DataFrame({"id": ["t0", "t1"], "text": [SENTENCES[0], SENTENCES[1]]}).to_csv(data_dir / "test.csv", index=False)


def test_held_out_mlm_loss_falls_and_the_cli_says_where_the_backbone_went(tmp_path, tiny_backbone, one_thread):
    cfg = pretrain_config(tmp_path, tiny_backbone, ["pretrain.epochs=6"])
    repetitive_dataset(Path(cfg.data.dir))
    save_config(cfg, tmp_path / "mlm.yaml")
    result = CliRunner().invoke(app, ["pretrain", str(tmp_path / "mlm.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "bb"
    assert f"backbone: {out}" in result.output
    assert "has no masked-LM head weights" in result.output and "Traceback" not in result.output
    summary = json.loads((out / "pretrain.json").read_text())
    assert f"held-out MLM loss {summary['loss_before']:.4f} -> {summary['loss_after']:.4f}" in result.output
    assert summary["loss_after"] < summary["loss_before"] - 1.0, summary  # a clear fall, not noise
    assert summary["masking"] == "whole-word" and summary["fresh_head"] is True
    assert summary["texts"] == 50 and summary["eval_texts"] == 10  # 48 train rows + 2 test rows, none duplicated
    log = pd.read_csv(out / "pretrain_log.csv")
    assert log["epoch"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # before, then after every epoch
    assert log["eval_loss"].iloc[0] == summary["loss_before"] and log["eval_loss"].iloc[-1] == summary["loss_after"]
    train, held = PT.split_texts(50, 0.2, 42)
    assert len(held) == 10 and sorted([*train, *held]) == list(range(50))  # the held-out texts are never trained on


def test_pretrained_backbone_trains_a_fold_with_its_own_weights(tmp_path, tiny_backbone, one_thread):
    cfg = pretrain_config(tmp_path, tiny_backbone, ["pretrain.epochs=2"])
    out = Path(PT.run(cfg, progress=False)["output"])
    written = load_file(out / "model.safetensors")
    original = load_file(tiny_backbone / "model.safetensors")
    assert set(written) == set(original)  # the whole encoder, pooler included: AutoModel misses nothing
    assert not torch.equal(written["encoder.layer.0.attention.self.query.weight"],
                           original["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(written["pooler.dense.weight"], original["pooler.dense.weight"])  # MLM has no pooler
    _, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    train_cfg = tiny_config(tmp_path / "ft", out, extra=[f"model.backbone={out}", "model.dropout=0.0"])
    model, config = build_model(train_cfg.model, 1)
    assert config.hidden_dropout_prob == 0.0  # the experiment's dropout still applies to a local backbone
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, written[name]), name
    (metrics,) = T.run(train_cfg, [0], progress=False)
    assert np.isfinite(metrics["score"])
    assert (train_cfg.run_dir / "fold0" / "metrics.json").exists()
    assert (train_cfg.run_dir / "backbone" / "tokenizer.json").exists()


def labelled_dataset(data_dir: Path, seed: int) -> None:
    """The same texts with other labels and another non-text column: only the texts may reach pre-training."""
    rng = np.random.default_rng(seed)
    n = 40
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, size=6)) for i in range(n)]
    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts,
                  "label": rng.choice(["zzlabel_neg", "zzlabel_pos"], size=n),
                  "notes": [f"zzlabel_note {rng.integers(1000)}" for _ in range(n)]}) \
        .to_csv(data_dir / "train.csv", index=False)
    pd.DataFrame({"id": ["t0"], "text": ["red cat"], "notes": ["zzlabel_test"]}).to_csv(data_dir / "test.csv",
                                                                                      index=False)


def test_labels_and_other_columns_never_reach_pretraining(tmp_path, tiny_backbone, one_thread):
    weights = []
    for seed in (1, 2):
        labelled_dataset(tmp_path / f"data{seed}", seed)
        cfg = load_config(None, [f"data.dir={tmp_path / f'data{seed}'}", "data.task=binary",
                                 "data.target_columns=[label]", "data.classes=[zzlabel_neg, zzlabel_pos]",
                                 f"model.backbone={tiny_backbone}", "data.max_length=32", "pretrain.epochs=1",
                                 "pretrain.batch_size=8", "pretrain.lr=1e-3",
                                 f"pretrain.output={tmp_path / f'bb{seed}'}"])
        texts, _ = PT.corpus(cfg)
        assert len(texts) == 41 and all(len(t) == 1 for t in texts)
        assert not any("zzlabel" in part for t in texts for part in t)
        PT.run(cfg, progress=False)
        weights.append(load_file(tmp_path / f"bb{seed}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


@pytest.fixture
def wordpiece(tmp_path) -> BertTokenizer:
    """A WordPiece tokenizer that cuts every word of WORDS into pieces of two letters."""
    pieces = set()
    for word in WORDS:
        chunks = [word[i:i + 2] for i in range(0, len(word), 2)]
        pieces.update([chunks[0], *(f"##{c}" for c in chunks[1:])])
    folder = tmp_path / "wordpiece"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(pieces)]))
    return BertTokenizer.from_pretrained(folder)


def masked_draws(tokenizer, whole_word: bool, rate: float, draws: int):
    """The tokens, each token's word (-1: special) and `draws` masked batches of 40 texts of 8 words."""
    rng = np.random.default_rng(0)
    texts = [(" ".join(rng.choice(WORDS, size=8)),) for _ in range(40)]
    tokens = PT.tokenize(tokenizer, texts, 64, whole_word)
    words = torch.full((len(texts), max(len(w) for w in tokens.words)), -1)
    for i, w in enumerate(PT.tokenize(tokenizer, texts, 64, True).words):
        words[i, :len(w)] = torch.from_numpy(w)
    masker = PT.Masker(tokens, rate, tokenizer.mask_token_id, len(tokenizer), 0, 1, True)
    generator = torch.Generator().manual_seed(0)
    return tokens, words, [masker.batch(list(range(len(texts))), generator) for _ in range(draws)]


def word_masks(words: torch.Tensor, selected: torch.Tensor):
    """Per word of each row: the mask of its pieces."""
    for row in range(words.shape[0]):
        for w in range(int(words[row].max()) + 1):
            yield selected[row, words[row] == w]


def test_whole_word_masking_takes_every_piece_of_a_word_or_none(wordpiece):
    tokens, words, draws = masked_draws(wordpiece, True, 0.15, 200)
    assert tokens.whole_word
    assert max(np.bincount(w[w >= 0]).max() for w in tokens.words) >= 3  # words really are cut into pieces
    chosen = total = 0
    for _, labels in draws:
        selected = labels != -100
        assert not torch.isin(labels, torch.tensor(wordpiece.all_special_ids)).any()  # [CLS], [SEP], [PAD] never
        for pieces in word_masks(words, selected):
            assert pieces.all() or not pieces.any(), "a word was masked in part"
            chosen, total = chosen + int(pieces.all()), total + 1
    assert total == 200 * 40 * 8
    joined = PT.tokenize(wordpiece, [("red cat", "blue dog", "tree")], 64, True)  # three columns: [SEP]-joined
    sep = np.array(joined.enc.input_ids[0]) == wordpiece.sep_token_id
    assert sep.sum() == 3 and (joined.words[0][sep] == -1).all()  # the joining [SEP]s are never masked
    assert chosen / total == pytest.approx(0.15, abs=0.01)  # the rate counts words


def test_token_level_masking_and_the_80_10_10_rule(wordpiece):
    tokens, words, draws = masked_draws(wordpiece, False, 0.15, 200)
    assert not tokens.whole_word
    partial = chosen = as_mask = kept = 0
    for inputs, labels in draws:
        selected = labels != -100
        assert not torch.isin(labels, torch.tensor(wordpiece.all_special_ids)).any()
        partial += sum(int(pieces.any() and not pieces.all()) for pieces in word_masks(words, selected))
        chosen += int(selected.sum())
        as_mask += int((inputs["input_ids"][selected] == wordpiece.mask_token_id).sum())
        kept += int((inputs["input_ids"][selected] == labels[selected]).sum())
    assert partial > 0  # pieces of one word are masked one by one
    assert chosen / (200 * int((words >= 0).sum())) == pytest.approx(0.15, abs=0.01)  # the rate counts tokens
    assert as_mask / chosen == pytest.approx(0.8, abs=0.02)
    assert kept / chosen == pytest.approx(0.1, abs=0.02)  # unchanged (a random token rarely is the same one)


def test_bad_extra_files_are_named_and_an_earlier_backbone_survives_a_failed_run(tmp_path, tiny_backbone,
                                                                                one_thread, monkeypatch):
    cfg = pretrain_config(tmp_path, tiny_backbone, ["pretrain.epochs=1"])
    out = Path(PT.run(cfg, progress=False)["output"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    missing = pretrain_config(tmp_path, tiny_backbone, ["pretrain.extra_files=[more.csv]"])
    with pytest.raises(PipelineError, match=r"pretrain.extra_files: .*more.csv not found"):
        PT.run(missing, progress=False)
    pd.DataFrame({"body": ["some words"]}).to_csv(Path(cfg.data.dir) / "other.csv", index=False)
    no_column = pretrain_config(tmp_path, tiny_backbone, ["pretrain.extra_files=[other.csv]"])
    with pytest.raises(PipelineError, match=r"other.csv: missing column\(s\) text; columns found: body"):
        PT.run(no_column, progress=False)

    def fail_half_way(model, source, tokenizer, folder):  # the disk fills while the weights are written
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(PT, "save_encoder", fail_half_way)
    with pytest.raises(OSError):
        PT.run(pretrain_config(tmp_path, tiny_backbone, ["pretrain.epochs=2", "pretrain.seed=7"]), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_empty_corpus_and_a_folder_pretrain_did_not_write_are_refused(tmp_path, tiny_backbone):
    cfg = pretrain_config(tmp_path, tiny_backbone, ["data.test_file=null"])
    pd.DataFrame({"id": ["a", "b"], "text": ["", None], "target": [1.0, 2.0]}).to_csv(cfg.data.train_path,
                                                                                     index=False)
    with pytest.raises(PipelineError, match=r"no text to pre-train on: column\(s\) text are empty in .*train.csv"):
        PT.run(cfg, progress=False)
    (tmp_path / "bb").mkdir()
    (tmp_path / "bb" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="is not a backbone `pipeline pretrain` wrote"):
        PT.run(cfg, progress=False)
    assert (tmp_path / "bb" / "notes.txt").read_text() == "mine"


def test_pretrain_keys_never_refuse_a_training_run_nor_count_as_a_technique(tmp_path):
    run_dir = tmp_path / "oof" / "exp"
    cfg = load_config(None, [f"output_dir={tmp_path / 'oof'}", "experiment=exp"])
    saved = cfg.to_dict()
    del saved["pretrain"]  # a run saved before the section existed
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_run_config(run_dir).pretrain.mask_rate == 0.15
    save_config(cfg, run_dir / "config.yaml")
    edited = load_config(None, [f"output_dir={tmp_path / 'oof'}", "experiment=exp", "pretrain.lr=1e-4",
                                "pretrain.extra_files=[a.csv]", "pretrain.output=elsewhere"])
    check_same_config(edited, run_dir)
    assert differing_keys(edited.to_dict(), cfg.to_dict(), NOT_A_CHANGE) == []
    with pytest.raises(PipelineError, match="model.backbone"):
        check_same_config(load_config(None, [f"output_dir={tmp_path / 'oof'}", "experiment=exp",
                                             "model.backbone=backbones/exp"]), run_dir)
