"""Shared fixtures: a tiny BERT and tiny decoder LLMs built from a config (no download), small fabricated datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast

from pipeline.config import load_config
from pipeline.model import EMBEDDED_BACKBONE, resolve_backbone

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma tau upsilon phi chi psi "
         "omega red green blue cat dog tree house river stone light dark").split()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with the embedded MiniLM's tokenizer, saved like a pretrained model."""
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(EMBEDDED_BACKBONE))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def decoder_tokenizer(family: str, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level BPE learned from WORDS (whole words are single tokens) with each family's special tokens:
    Qwen2's end-of-text, which is also its pad token, and no bos; elsewhere bos (prepended, as Llama's and Gemma's
    do) and eos, and no pad token, as Llama, Mistral and GPT-2 ship."""
    specials = ["<|endoftext|>"] if family == "qwen2" else ["<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "qwen2":
        return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=specials[0], pad_token=specials[0],
                                       padding_side=padding_side, model_input_names=["input_ids", "attention_mask"])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", padding_side=padding_side,
                                   model_input_names=["input_ids", "attention_mask"])


DECODER_FAMILIES = ("qwen2", "llama", "gemma2")  # the Kaggle LLM families; gpt2 too where absolute positions matter


def decoder_config(family: str, vocab_size: int, bos: int, eos: int):
    """Hidden 32, 2 layers, what makes each family itself: grouped key/value heads (Qwen2, Llama), Gemma-2's
    sliding window and softcapping, GPT-2's learned absolute positions."""
    shared = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, **shared)
    if family == "qwen2":
        return transformers.Qwen2Config(**sizes)
    if family == "llama":
        return transformers.LlamaConfig(**sizes)
    if family == "gemma2":
        return transformers.Gemma2Config(**sizes, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **shared)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """make(family, padding_side="right") -> a decoder backbone directory (config, random weights, tokenizer), saved
    like a pretrained model; one per family and side per session."""
    made = {}

    def make(family: str, padding_side: str = "right") -> Path:
        if (family, padding_side) not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{padding_side}")
            tokenizer = decoder_tokenizer(family, padding_side)
            torch.manual_seed(0)
            config = decoder_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
            AutoModel.from_config(config).save_pretrained(out)
            tokenizer.save_pretrained(out)
            made[family, padding_side] = out
        return made[family, padding_side]

    return make


def make_dataset(out: Path, task: str, n: int = 60, n_test: int = 12, targets: int = 1, seed: int = 0,
                 classes: tuple = ("neg", "pos")) -> Path:
    """Texts whose targets depend on the words, so even a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n + n_test):
        words = rng.choice(WORDS, size=rng.integers(3, 15))
        score = float(np.mean([WORDS.index(w) for w in words])) / len(WORDS)
        row = {"id": f"r{i:04d}", "text": " ".join(words)}
        if task == "regression":
            for t in range(targets):
                row[f"target{t}" if targets > 1 else "target"] = score * (t + 1) + rng.normal(0, 0.05)
        else:
            row["label"] = classes[min(int(score * len(classes) * 1.6), len(classes) - 1)] if i % 7 else \
                classes[i % len(classes)]
        rows.append(row)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.iloc[:n].to_csv(out / "train.csv", index=False)
    df.iloc[n:][["id", "text"]].to_csv(out / "test.csv", index=False)
    sample = df.iloc[n:][["id"]].copy()
    if task == "regression":
        for c in [c for c in df.columns if c.startswith("target")]:
            sample[c] = 0.0
    elif task == "binary":
        sample["label"] = 0.5
    else:
        for c in classes:
            sample[c] = 0.0
    sample.to_csv(out / "sample_submission.csv", index=False)
    return out


def tiny_config(tmp_path: Path, backbone: Path, task: str = "regression", targets: int = 1,
                classes: tuple = ("neg", "pos"), extra: list[str] | None = None, n: int = 60):
    """A config over a fabricated dataset and the tiny backbone, with outputs under tmp_path/oof."""
    data_dir = make_dataset(tmp_path / "data", task, n=n, targets=targets, classes=classes)
    target_cols = ["label"] if task != "regression" else (
        [f"target{t}" for t in range(targets)] if targets > 1 else ["target"])
    overrides = [f"data.dir={data_dir}", f"data.task={task}", "data.text_columns=[text]",
                 f"data.target_columns=[{','.join(target_cols)}]", "data.n_folds=3", "data.max_length=32",
                 f"model.backbone={backbone}", "train.epochs=1", "train.batch_size=8", "train.lr=1e-3",
                 "train.eval_batch_size=16", f"output_dir={tmp_path / 'oof'}", f"experiment=tiny_{task}",
                 "data.name=tiny"]
    if task != "regression":
        overrides.append(f"data.classes=[{','.join(classes)}]")
    return load_config(None, overrides + (extra or []))


@pytest.fixture
def copy_tree():
    return shutil.copytree


@pytest.fixture
def one_thread():
    """Torch on one thread: the tiny model gains nothing from more, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
