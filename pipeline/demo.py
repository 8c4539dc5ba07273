"""A small readability dataset the project generates itself, for `make demo` (competition data cannot be
redistributed). Each text mixes plain and learned vocabulary; its target falls as the share of long,
rare words and the sentence length rise, plus noise, so a model that reads the words beats the mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import write_csv_atomic

EASY = ("the cat dog sun ran sat big red hat fun day we go play see run jump home mom dad ball tree box "
        "bird fish milk bed cup toy car bus hot cold good bad little girl boy happy sad look come").split()
HARD = ("notwithstanding epistemological ubiquitous juxtaposition quintessential meticulously "
        "unprecedented phenomenological incontrovertible perspicacious magnanimous idiosyncratic "
        "obfuscation circumlocution recalcitrant vicissitudes disproportionate ameliorate "
        "conscientiousness indefatigable heterogeneous substantiate paradigmatic consequential "
        "jurisprudence equivocation indeterminate reverberation philanthropic subsequently").split()
LINK = "and but so then because while when although".split()


def _text(rng: np.random.Generator, difficulty: float) -> str:
    sentences = []
    for _ in range(rng.integers(2, 5)):
        n = int(rng.integers(4, 8) + 10 * difficulty * rng.random())
        words = [rng.choice(HARD) if rng.random() < difficulty else rng.choice(EASY) for _ in range(n)]
        if n > 6:
            words.insert(n // 2, rng.choice(LINK))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def make_demo_data(out_dir: Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        difficulty = float(rng.beta(1.5, 1.5))
        rows.append({"id": f"d{i:05d}", "text": _text(rng, difficulty),
                     "target": round(1.0 - 3.5 * difficulty + float(rng.normal(0, 0.25)), 4)})
    df = pd.DataFrame(rows)
    out_dir = Path(out_dir)
    write_csv_atomic(out_dir / "train.csv", df.iloc[:n_train])
    write_csv_atomic(out_dir / "test.csv", df.iloc[n_train:][["id", "text"]])
    write_csv_atomic(out_dir / "sample_submission.csv", df.iloc[n_train:][["id"]].assign(target=0.0))
    return out_dir
