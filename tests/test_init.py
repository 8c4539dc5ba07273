"""`pipeline init` on files shaped like real competitions: the config it writes runs the whole chain, and the
submission has the form the metric scores. Ambiguous files stop with a message naming the columns and the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.demo import make_demo_data
from tests.conftest import WORDS

runner = CliRunner()


def _texts(rng, n: int, low: int, high: int) -> tuple[list[str], np.ndarray]:
    """Texts and a score in [0, 1] that depends on their words (a tiny model can learn it)."""
    texts, scores = [], []
    for _ in range(n):
        words = rng.choice(WORDS, size=rng.integers(low, high))
        texts.append(" ".join(words))
        scores.append(np.mean([WORDS.index(w) for w in words]) / len(WORDS))
    return texts, np.asarray(scores)


def write(folder: Path, train: pd.DataFrame, test: pd.DataFrame, sample: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    sample.to_csv(folder / "sample_submission.csv", index=False)
    return folder


def commonlit_like(folder: Path, n: int = 60, n_test: int = 12) -> Path:
    """One excerpt, one float target, side columns (url, license) mostly empty, standard_error only in train."""
    rng = np.random.default_rng(0)
    texts, score = _texts(rng, n + n_test, 6, 20)
    df = pd.DataFrame({"id": [f"c{i:05x}" for i in range(n + n_test)],
                       "url_legal": [None if i % 3 else f"https://x.org/{i}" for i in range(n + n_test)],
                       "license": [None if i % 3 else "CC BY" for i in range(n + n_test)], "excerpt": texts,
                       "target": -3 * score + 1, "standard_error": 0.5})
    test = df.iloc[n:][["id", "url_legal", "license", "excerpt"]]
    return write(folder, df.iloc[:n], test, test[["id"]].assign(target=0.0))


ESSAY_TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


def essays(folder: Path, n: int = 60, n_test: int = 12) -> Path:
    """Six scores on a 1-5 scale in half points (means near 3), one essay column, an id called text_id."""
    rng = np.random.default_rng(1)
    texts, score = _texts(rng, n + n_test, 10, 30)
    df = pd.DataFrame({"text_id": [f"{i:012X}" for i in range(n + n_test)], "full_text": texts})
    for j, c in enumerate(ESSAY_TARGETS):
        df[c] = np.clip(np.round((2.5 + 2 * score + rng.normal(0, 0.3, len(df)) + 0.1 * j) * 2) / 2, 1, 5)
    test = df.iloc[n:][["text_id", "full_text"]]
    return write(folder, df.iloc[:n], test, test[["text_id"]].assign(**{c: 3.0 for c in ESSAY_TARGETS}))


def tweets(folder: Path, n: int = 60, n_test: int = 12) -> Path:
    """Binary 0/1 scored by F1, a numeric id, short side columns keyword (few values) and location (gaps)."""
    rng = np.random.default_rng(2)
    texts, score = _texts(rng, n + n_test, 5, 15)
    df = pd.DataFrame({"id": np.arange(1, n + n_test + 1) * 3,
                       "keyword": rng.choice(["fire", "flood", "storm"], size=n + n_test),
                       "location": [None if i % 2 else f"town {i}" for i in range(n + n_test)], "text": texts,
                       "target": (score > np.median(score)).astype(int)})
    test = df.iloc[n:][["id", "keyword", "location", "text"]]
    return write(folder, df.iloc[:n], test, test[["id"]].assign(target=0))


AUTHORS = ["EAP", "HPL", "MWS"]


def authors(folder: Path, n: int = 60, n_test: int = 12) -> Path:
    """Multiclass scored by log loss: train has one label column, sample_submission a probability per class."""
    rng = np.random.default_rng(3)
    texts, score = _texts(rng, n + n_test, 5, 15)
    df = pd.DataFrame({"id": [f"id{i:05d}" for i in range(n + n_test)], "text": texts,
                       "author": np.asarray(AUTHORS)[np.searchsorted(np.quantile(score, [1 / 3, 2 / 3]), score)]})
    test = df.iloc[n:][["id", "text"]]
    # sample_submission's class order is not sorted: the config must follow it
    return write(folder, df.iloc[:n], test, test[["id"]].assign(MWS=1 / 3, EAP=1 / 3, HPL=1 / 3))


def pairs(folder: Path, n: int = 60, n_test: int = 12) -> Path:
    """A text pair: a question and an answer, a float score."""
    rng = np.random.default_rng(4)
    questions, _ = _texts(rng, n + n_test, 4, 8)
    answers, score = _texts(rng, n + n_test, 8, 20)
    df = pd.DataFrame({"pair_id": [f"p{i}" for i in range(n + n_test)], "question": questions, "answer": answers,
                       "score": np.round(score, 3)})
    test = df.iloc[n:][["pair_id", "question", "answer"]]
    return write(folder, df.iloc[:n], test, test[["pair_id"]].assign(score=0.5))


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def init(folder: Path, tmp_path: Path, *extra, code: int = 0):
    return invoke("init", folder, "--name", folder.name, "--config-dir", tmp_path / "configs", *extra, code=code)


def data_section(tmp_path: Path, name: str) -> dict:
    return yaml.safe_load((tmp_path / "configs" / f"{name}.yaml").read_text())


EXPECTED = {
    "commonlit": (commonlit_like, dict(id_column="id", target_columns=["target"], task="regression",
                                       text_columns=["excerpt"]), "rmse"),
    "essays": (essays, dict(id_column="text_id", target_columns=ESSAY_TARGETS, task="regression",
                            text_columns=["full_text"]), "mcrmse"),
    "tweets": (tweets, dict(id_column="id", target_columns=["target"], task="binary", classes=["0", "1"],
                            text_columns=["text"]), "f1"),
    "authors": (authors, dict(id_column="id", target_columns=["author"], task="multiclass",
                              classes=["MWS", "EAP", "HPL"], text_columns=["text"]), "logloss"),
    "pairs": (pairs, dict(id_column="pair_id", target_columns=["score"], task="regression",
                          text_columns=["answer", "question"]), "rmse"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_init_infers_the_competition_and_its_config_runs_the_chain(tmp_path, tiny_backbone, case):
    make, expected, metric = EXPECTED[case]
    folder = make(tmp_path / case)
    result = init(folder, tmp_path)
    written = data_section(tmp_path, case)
    assert {k: written["data"][k] for k in expected} == expected, result.output
    assert written["train"]["metric"] == metric
    text = (tmp_path / "configs" / f"{case}.yaml").read_text()
    assert "GUESSED" in text and all(f"  {k}: " in text and "#" in line
                                      for k in expected for line in text.splitlines() if line.startswith(f"  {k}:"))
    assert 32 <= written["data"]["max_length"] <= 128 and written["data"]["max_length"] % 32 == 0

    config = tmp_path / "configs" / f"{case}.yaml"
    tiny = ["--set", f"model.backbone={tiny_backbone}", "--set", "data.n_folds=2", "--set", "train.epochs=1",
            "--set", "train.batch_size=8", "--set", f"output_dir={tmp_path / 'oof'}", "--set", "train.lr=1e-3"]
    for stage in ("folds", "train", "oof", "predict"):
        invoke(stage, config, *tiny)
    out = tmp_path / "submission.csv"
    invoke("submit", case, "--out", out, "--output-dir", tmp_path / "oof")
    sub = pd.read_csv(out, dtype=str)
    sample = pd.read_csv(folder / "sample_submission.csv", dtype=str)
    assert sub.columns.tolist() == sample.columns.tolist()
    assert sub[expected["id_column"]].tolist() == sample[expected["id_column"]].tolist()
    values = sub.drop(columns=expected["id_column"])
    if case == "tweets":  # F1 is scored on labels: 0/1 as sample_submission writes them, not probabilities
        assert set(values["target"]) <= {"0", "1"}
    elif case == "authors":  # log loss: a probability per class, summing to one
        probs = values.astype(float).to_numpy()
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6) and ((probs > 0) & (probs < 1)).all()
    else:
        assert values.astype(float).notna().all().all()


def test_init_settles_a_key_given_with_set_and_never_overwrites(tmp_path):
    folder = essays(tmp_path / "essays")
    init(folder, tmp_path, "--set", "data.text_columns=[full_text]", "--set", "data.id_column=text_id")
    assert data_section(tmp_path, "essays")["data"]["text_columns"] == ["full_text"]
    before = (tmp_path / "configs" / "essays.yaml").read_text()
    result = init(folder, tmp_path, code=1)
    assert "never overwrites" in result.output
    assert (tmp_path / "configs" / "essays.yaml").read_text() == before


def test_every_key_given_with_set_is_written_and_checked(tmp_path):
    folder = tweets(tmp_path / "tweets")
    init(folder, tmp_path, "--set", "data.n_folds=3", "--set", "data.task=regression", "--set", "data.max_length=96")
    written = data_section(tmp_path, "tweets")
    assert written["data"]["n_folds"] == 3 and written["data"]["max_length"] == 96
    assert written["data"]["task"] == "regression" and written["train"]["metric"] == "rmse"
    assert "classes" not in written["data"]
    result = init(tmp_path / "tweets", tmp_path, "--name", "typo", "--set", "data.n_fold=3", code=1)
    assert "data.n_fold" in result.output and "data.n_folds" in result.output
    assert not (tmp_path / "configs" / "typo.yaml").exists()


def test_targets_given_by_hand_skip_the_target_inference(tmp_path):
    folder = essays(tmp_path / "essays")
    init(folder, tmp_path, "--set", "data.target_columns=[cohesion]")
    written = data_section(tmp_path, "essays")
    assert written["data"]["target_columns"] == ["cohesion"] and written["data"]["task"] == "regression"
    assert written["data"]["text_columns"] == ["full_text"] and written["train"]["metric"] == "rmse"


def test_two_id_candidates_name_both_and_the_key(tmp_path):
    folder = tweets(tmp_path / "tweets")
    for name in ("train.csv", "test.csv", "sample_submission.csv"):
        df = pd.read_csv(folder / name)
        df.insert(1, "row_id", [f"r{i}" for i in df["id"]])
        df.to_csv(folder / name, index=False)
    result = init(folder, tmp_path, code=1)
    assert "'id'" in result.output and "'row_id'" in result.output and "data.id_column" in result.output
    assert not (tmp_path / "configs" / "tweets.yaml").exists()
    init(folder, tmp_path, "--set", "data.id_column=row_id")
    assert data_section(tmp_path, "tweets")["data"]["id_column"] == "row_id"


def test_no_text_column_names_what_was_found(tmp_path):
    folder = tweets(tmp_path / "tweets")
    for name in ("train.csv", "test.csv"):
        pd.read_csv(folder / name).drop(columns="text").to_csv(folder / name, index=False)
    result = init(folder, tmp_path, code=1)
    assert "no free-text column" in result.output and "'keyword'" in result.output
    assert "data.text_columns" in result.output


def test_a_target_with_one_value_is_refused(tmp_path):
    folder = commonlit_like(tmp_path / "constant")
    train = pd.read_csv(folder / "train.csv").assign(target=1.5)
    train.to_csv(folder / "train.csv", index=False)
    result = init(folder, tmp_path, code=1)
    assert "'target'" in result.output and "single value" in result.output and "data.target_columns" in result.output


def test_short_side_columns_are_named_not_used(tmp_path):
    folder = tweets(tmp_path / "tweets")
    init(folder, tmp_path)
    text = (tmp_path / "configs" / "tweets.yaml").read_text()
    assert "keyword" in text and "location" in text
    assert data_section(tmp_path, "tweets")["data"]["text_columns"] == ["text"]


def test_init_on_the_demo_data_reproduces_the_demo_config(tmp_path):
    make_demo_data(tmp_path / "demo")
    init(tmp_path / "demo", tmp_path)
    inferred = load_config(tmp_path / "configs" / "demo.yaml").data
    shipped = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml").data
    inferred.dir = shipped.dir
    assert inferred == shipped


def test_none_and_na_are_values_not_gaps(tmp_path):
    """A class called None and a text that reads NA: what the pipeline reads as written, init reads so too."""
    folder = authors(tmp_path / "none")
    for name in ("train.csv", "sample_submission.csv"):
        path = folder / name
        path.write_text(path.read_text().replace("MWS", "None"))
    train = pd.read_csv(folder / "train.csv", keep_default_na=False)
    train.loc[0, "text"] = "NA"
    train.to_csv(folder / "train.csv", index=False)
    init(folder, tmp_path)
    data = data_section(tmp_path, "none")["data"]
    assert data["classes"] == ["None", "EAP", "HPL"] and data["text_columns"] == ["text"], data
