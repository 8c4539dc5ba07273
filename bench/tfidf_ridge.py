"""A classical floor for any regression config: TF-IDF (word 1-2 grams) + Ridge on the pipeline's own folds.

    python bench/tfidf_ridge.py configs/commonlit_baseline.yaml --set data.dir=../shared/data/commonlit

Prints the RMSE per fold and the OOF CV, scored with the pipeline's metric, so it sits beside `pipeline oof`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data as D  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.folds import load_folds  # noqa: E402
from pipeline.metrics import score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.data.task != "regression":
        sys.exit(f"{args.config}: TF-IDF + Ridge is a regression floor; this config's task is {cfg.data.task}")
    df = D.load_train(cfg)
    fold = load_folds(cfg, df)
    texts = df[cfg.data.text_columns].astype(str).agg(" ".join, axis=1).to_numpy()
    y = D.target_array(cfg, df)
    oof = np.zeros_like(y, dtype=float)
    for k in range(cfg.data.n_folds):
        train, valid = fold != k, fold == k
        model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True), Ridge(args.alpha))
        model.fit(texts[train], y[train])
        oof[valid] = model.predict(texts[valid]).reshape(oof[valid].shape)
        print(f"fold {k}: {cfg.metric} {score(cfg.metric, y[valid], oof[valid]):.4f}")
    print(f"TF-IDF + Ridge CV {cfg.metric}: {score(cfg.metric, y, oof):.4f}")


if __name__ == "__main__":
    main()
