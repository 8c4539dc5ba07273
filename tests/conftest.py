"""Shared fixtures: a tiny BERT built from a config (no download) and small fabricated datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

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
