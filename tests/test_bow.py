"""Bag-of-words experiments (`model.kind: tfidf`): written like a fine-tuned run, so that every later command takes
them unchanged (oof, predict, ensemble with a transformer on the same folds, submit, report, the Kaggle kit), fit on
each fold's training rows alone, and configured by keys that fail loudly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
import yaml
from typer.testing import CliRunner

from pipeline import bow, ensemble, folds, oof, predict, train
from pipeline import report as R
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.kaggle import rehearse as RH
from tests.conftest import WORDS, tiny_config
from tests.test_kaggle_kit import FP32, built_wheels, check_same_submission, reference, reuse_wheels, work  # noqa: F401
from tests.test_kaggle_kit import trained as trained_transformer

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

KEYWORDS = ("sunny", "rainy", "stormy")
# What train.py writes in every fold's metrics.json, the keys oof, report and the CLI read among them.
TRANSFORMER_METRICS = {"fold", "metric", "score", "best_step", "steps", "train_rows", "valid_rows", "precision",
                       "device", "processes", "train_seconds", "peak_memory_mb", "skipped_steps"}


def keyword_data(out: Path, task: str, labels: tuple = ("neg", "pos"), n: int = 300, n_test: int = 15,
                 seed: int = 0) -> Path:
    """Filler words plus keywords that set the target: `sunny` adds 2 and `rainy` takes 1 (regression), or one
    keyword per label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n + n_test):
        words = list(rng.choice(WORDS, size=rng.integers(4, 10)))
        row = {"id": f"t{i:04d}"}
        if task == "regression":
            present = [w for w in KEYWORDS[:2] if rng.random() < 0.5]
            row["target"] = 2.0 * ("sunny" in present) - 1.0 * ("rainy" in present) + rng.normal(0, 0.1)
        else:
            j = int(rng.integers(0, len(labels)))
            present, row["label"] = [KEYWORDS[j]], labels[j]
        for keyword in present:
            words.insert(int(rng.integers(0, len(words) + 1)), keyword)
        row["text"] = " ".join(words)
        rows.append(row)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.iloc[:n].to_csv(out / "train.csv", index=False)
    df.iloc[n:][["id", "text"]].to_csv(out / "test.csv", index=False)
    sample = df.iloc[n:][["id"]].copy()
    for col in (["target"] if task == "regression" else ["label"] if task == "binary" else list(map(str, labels))):
        sample[col] = 0.0
    sample.to_csv(out / "sample_submission.csv", index=False)
    return out


def tfidf_yaml(tmp_path: Path, name: str, data_dir: Path, task: str, classes: list | None = None,
               tfidf: dict | None = None, n_folds: int = 3, data_name: str | None = None) -> Path:
    """A config file as a user writes one: the data, model.kind tfidf and nothing of the transformer's."""
    data = {"name": data_name or name, "dir": str(data_dir), "task": task, "text_columns": ["text"],
            "target_columns": ["target" if task == "regression" else "label"], "n_folds": n_folds,
            "classes": classes}
    values = {"data": data, "model": {"kind": "tfidf"}, "output_dir": str(tmp_path / "oof")}
    if tfidf:
        values["tfidf"] = tfidf
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def columns_of(path: Path) -> list[str]:
    return pd.read_csv(path, nrows=0).columns.tolist()


# ---------------------------------------------------------------- 1. the chain through the CLI, every task

CASES = {  # task, labels in the data, data.classes, the prediction columns a transformer run writes
    "regression": ("regression", None, None, ["target"]),
    # data.classes in non-alphabetical order: the probabilities must follow it, not the labels' sort
    "binary": ("binary", ("neg", "pos"), ["pos", "neg"], ["pos", "neg"]),
    # numeric labels, classes inferred: numeric order (2, 7, 10), which no text sort gives
    "multiclass": ("multiclass", (10, 2, 7), None, ["2", "7", "10"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chain_writes_what_a_transformer_run_writes_and_beats_the_constant(tmp_path, case):
    task, labels, classes, columns = CASES[case]
    data = keyword_data(tmp_path / "data", task, labels or ("neg", "pos"))
    config = tfidf_yaml(tmp_path, case, data, task, classes)
    out = invoke("train", config).output
    assert all(f"{case} fold {k}: " in out for k in range(3)), out
    invoke("oof", config)
    invoke("predict", config)
    invoke("submit", case, "--out", tmp_path / "submission.csv", "--output-dir", tmp_path / "oof")

    run_dir = tmp_path / "oof" / case
    train_ids = pd.read_csv(data / "train.csv", dtype={"id": str})["id"].tolist()
    test_ids = pd.read_csv(data / "test.csv", dtype={"id": str})["id"].tolist()
    oof_df = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
    assert oof_df.columns.tolist() == ["id", "fold", *columns] and oof_df["id"].tolist() == train_ids
    test = pd.read_csv(run_dir / "test_predictions.csv", dtype={"id": str})
    assert test.columns.tolist() == ["id", *columns] and test["id"].tolist() == test_ids
    for k in range(3):
        fold_dir = run_dir / f"fold{k}"
        assert columns_of(fold_dir / "valid_predictions.csv") == ["id", *columns]
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        assert TRANSFORMER_METRICS <= set(metrics) and metrics["scikit_learn"] == sklearn.__version__
        assert {"step", metrics["metric"]} <= set(columns_of(fold_dir / "log.csv"))
        assert (fold_dir / bow.MODEL_FILE).is_file() and not (fold_dir / "model.pt").exists()
    if task != "regression":
        np.testing.assert_allclose(test[columns].sum(axis=1), 1.0, atol=1e-9)
        np.testing.assert_allclose(oof_df[columns].sum(axis=1), 1.0, atol=1e-9)

    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["cv"] < 0.5 * cv["constant"], cv  # rmse / logloss: the keyword is learned, far beyond the floor
    sub = pd.read_csv(tmp_path / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(data / "sample_submission.csv", dtype={"id": str})
    assert sub.columns.tolist() == sample.columns.tolist() and sub["id"].tolist() == sample["id"].tolist()


# ---------------------------------------------------------------- 2. fold safety


def test_a_fold_never_sees_its_validation_text(tmp_path):
    """A word only in fold 0's validation rows is absent from fold 0's word and character vocabularies, and present
    in fold 1's (whose training rows they are): the vectorizers are fit on the fold's training rows only."""
    data = keyword_data(tmp_path / "data", "regression")
    cfg = load_config(tfidf_yaml(tmp_path, "safe", data, "regression", tfidf={"min_df": 1}))
    fold_of = folds.load_folds(cfg, pd.read_csv(data / "train.csv", dtype={"id": str}))
    df = pd.read_csv(data / "train.csv", dtype={"id": str})
    df.loc[fold_of == 0, "text"] += " zqxvalidword"
    df.to_csv(data / "train.csv", index=False)
    train.run(cfg)

    def vocabularies(k: int) -> dict:
        features = joblib.load(cfg.run_dir / f"fold{k}" / bow.MODEL_FILE)["features"]
        return {name: v.vocabulary_ for name, v in features.transformer_list}

    fold0, fold1 = vocabularies(0), vocabularies(1)
    assert "zqxvalidword" not in fold0["word"] and not any("zqxv" in g for g in fold0["char"])
    assert "zqxvalidword" in fold1["word"] and " zqxv" in fold1["char"]


# ---------------------------------------------------------------- 3. the saved models are the ones scored and averaged


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_predictions_come_from_the_saved_fold_models(tmp_path, task):
    """Validation predictions are what scikit-learn's own Pipeline, fit on the fold's training rows, predicts, and
    what the saved fold model predicts; test predictions are the mean of the saved fold models'."""
    labels = ("neg", "pos", "mid")
    data = keyword_data(tmp_path / "data", task, labels)
    classes = list(labels) if task != "regression" else None
    cfg = load_config(tfidf_yaml(tmp_path, "saved", data, task, classes))
    train.run(cfg)
    predict.run(cfg)
    columns = ["target"] if task == "regression" else list(labels)
    train_df = pd.read_csv(data / "train.csv", dtype={"id": str})
    test_df = pd.read_csv(data / "test.csv", dtype={"id": str})
    fold_of = folds.load_folds(cfg, train_df)
    y = train_df[["target"]].to_numpy("float32") if task == "regression" else train_df["label"].map(labels.index)

    def sklearn_own(model, texts) -> np.ndarray:  # classes were fit as indices 0, 1, 2: all in every fold
        return model.predict(texts).reshape(len(texts), -1) if task == "regression" else model.predict_proba(texts)

    saved_test = []
    for k in range(3):
        valid = pd.read_csv(cfg.run_dir / f"fold{k}" / "valid_predictions.csv", dtype={"id": str})
        rows = train_df.set_index("id").loc[valid["id"]]
        refit = bow.build_model(cfg.tfidf, task).fit(train_df["text"][fold_of != k].to_numpy(), y[fold_of != k])
        np.testing.assert_allclose(valid[columns], sklearn_own(refit, rows["text"].to_numpy()), rtol=1e-9, atol=1e-9)
        saved = bow.load_fold_model(cfg.run_dir / f"fold{k}" / bow.MODEL_FILE)
        np.testing.assert_allclose(valid[columns], bow.predict_rows(saved, rows["text"].to_numpy(), task, len(columns)),
                                   rtol=1e-12, atol=1e-12)
        assert bow.predict_rows(saved, rows["text"].to_numpy()[:0], task, len(columns)).shape == (0, len(columns))
        saved_test.append(sklearn_own(refit, test_df["text"].to_numpy()))
    written = pd.read_csv(cfg.run_dir / "test_predictions.csv", dtype={"id": str})
    assert written["id"].tolist() == test_df["id"].tolist()
    np.testing.assert_allclose(written[columns], np.mean(saved_test, axis=0), rtol=1e-9, atol=1e-9)

    # Deterministic: the same config in another run directory writes the same predictions, digit for digit.
    again = load_config(tfidf_yaml(tmp_path, "saved", data, task, classes), [f"output_dir={tmp_path / 'again'}"])
    train.run(again)
    for k in range(3):
        name = f"fold{k}/valid_predictions.csv"
        assert (again.run_dir / name).read_bytes() == (cfg.run_dir / name).read_bytes()


# ---------------------------------------------------------------- 4. ensemble and report beside a transformer


def test_ensemble_and_report_with_a_transformer_on_the_same_folds(tmp_path, tiny_backbone):
    transformer = tiny_config(tmp_path, tiny_backbone)  # data in tmp_path/data, dataset "tiny", 3 folds
    folds.make_folds(transformer)
    train.run(transformer, progress=False)
    oof.run(transformer)
    predict.run(transformer)
    config = tfidf_yaml(tmp_path, "words", tmp_path / "data", "regression", tfidf={"alpha": 0.5}, data_name="tiny")
    for stage in ("train", "oof", "predict"):
        invoke(stage, config)

    out = tmp_path / "oof"
    for name in ("oof.csv", "test_predictions.csv", "fold0/valid_predictions.csv", "fold0/log.csv"):
        theirs, ours = columns_of(out / "tiny_regression" / name), columns_of(out / "words" / name)
        assert ours == theirs if "log" not in name else set(ours) <= set(theirs), name
    assert set(json.loads((out / "tiny_regression/fold0/metrics.json").read_text())) <= \
        set(json.loads((out / "words/fold0/metrics.json").read_text()))

    invoke("ensemble", "tiny_regression", "words", "--name", "blend", "--output-dir", out)
    result = json.loads((out / "blend" / "ensemble.json").read_text())
    assert sum(result["weights"].values()) == pytest.approx(1.0)
    assert result["cv"] <= min(result["members"].values()) + 1e-12
    assert (out / "blend" / "test_predictions.csv").exists()

    # Other folds: refused, as for any two experiments.
    other = tfidf_yaml(tmp_path, "other_folds", tmp_path / "data", "regression", data_name="tiny")
    invoke("train", other, "--set", "data.fold_seed=7")
    invoke("oof", other, "--set", "data.fold_seed=7")
    refused = invoke("ensemble", "tiny_regression", "other_folds", "--name", "bad", "--output-dir", out, code=1)
    assert "trained on other folds" in refused.output

    # The report lists what the tfidf row sets, not the fine-tuning keys it ignores.
    report = R.write(["words"], "tiny_regression", tmp_path / "reports" / "r.md", out)
    row = next(line for line in report.read_text().splitlines() if line.startswith("| words |"))
    assert "| model.kind=tfidf, tfidf.alpha=0.5 |" in row, row
    swapped = R.write(["tiny_regression"], "words", tmp_path / "reports" / "s.md", out).read_text()
    assert "TF-IDF (word 1-2-grams, char_wb 2-5-grams) + Ridge alpha 0.5" in swapped
    row = next(line for line in swapped.splitlines() if line.startswith("| tiny_regression |"))
    assert "model.kind=transformer" in row and "model.backbone=" in row and "tfidf." not in row, row


# ---------------------------------------------------------------- 5. the Kaggle kit


def tfidf_run(tmp_path: Path, name: str, task: str = "regression", tfidf: dict | None = None):
    """A tfidf run over the data the kit tests' transformer uses (dataset "tiny", 2 folds), through oof and predict."""
    if not (tmp_path / "data" / "train.csv").exists():
        keyword_data(tmp_path / "data", task)
    cfg = load_config(tfidf_yaml(tmp_path, name, tmp_path / "data", task, tfidf=tfidf, n_folds=2, data_name="tiny",
                                 classes=None if task == "regression" else ["neg", "pos"]))
    train.run(cfg)
    oof.run(cfg)
    predict.run(cfg)
    return cfg


def package(cfg, name: str, *args: str, code: int = 0) -> str:
    return invoke("package", name, "--out", Path(cfg.output_dir).parent / "kit", "--output-dir", cfg.output_dir,
                  "--competition", "tiny-comp", "--dataset", "tester/tiny-words", *args, code=code).output


def test_kit_of_a_tfidf_run_rehearses_offline(tmp_path, work):  # noqa: F811
    cfg = tfidf_run(tmp_path, "words", "binary")
    assert "--weights fp16 stores transformer weights" in package(cfg, "words", "--weights", "fp16", code=1)
    package(cfg, "words")
    kit = tmp_path / "kit"
    manifest = json.loads((kit / "models" / "MANIFEST.json").read_text())
    (member,) = manifest["members"]
    assert (member["kind"], member["scikit_learn"]) == ("tfidf", [sklearn.__version__])
    assert {"words/fold0/model.joblib", "words/fold1/model.joblib", "words/config.yaml"} <= set(manifest["files"])
    assert not (kit / "models" / "words" / "backbone").exists()

    rehearsal = RH.run(kit, Path(cfg.data.dir), work)
    check_same_submission(rehearsal.submission, reference(cfg, "words"), cfg.data.sample_submission_path, atol=1e-9)
    assert "warning" not in rehearsal.output

    # Kaggle's image may hold another scikit-learn: the kernel says so, in one line (its own process: the CLI's
    # commands above replaced this one's warning printer).
    root = tmp_path / "input"
    RH.input_tree(root, kit, Path(cfg.data.dir))
    code = ("import sys, sklearn; sklearn.__version__ = '0.24.0'; from pipeline.kaggle import kernel; "
            f"sys.exit(kernel.main(['--input', {str(root)!r}, '--out', {str(tmp_path / 'sub.csv')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    saved = re.escape(sklearn.__version__)
    assert re.search(rf"^warning: \S+/words: the fold models were saved by scikit-learn {saved} and are predicting "
                     r"with 0\.24\.0", out.stderr, re.M), out.stderr


def test_kit_blending_a_transformer_and_a_tfidf_run(tmp_path, tiny_backbone, work):  # noqa: F811
    transformer = trained_transformer(tmp_path, tiny_backbone)  # dataset "tiny", 2 folds, in tmp_path/data
    tfidf_run(tmp_path, "words")
    members = [transformer.experiment, "words"]
    # Equal weights: the fit gives the tiny transformer almost nothing, and a member of weight 0 would be left out
    # of the kit.
    ensemble.run(members, "blend", str(transformer.output_dir), method="mean")
    package(transformer, "blend", "--weights", "fp16")
    kit = tmp_path / "kit"
    manifest = json.loads((kit / "models" / "MANIFEST.json").read_text())
    assert [(m["name"], m["kind"]) for m in manifest["members"]] == [(transformer.experiment, "transformer"),
                                                                    ("words", "tfidf")]
    ours = Path(transformer.output_dir) / "words" / "fold0" / bow.MODEL_FILE
    assert (kit / "models" / "words" / "fold0" / bow.MODEL_FILE).read_bytes() == ours.read_bytes()  # as saved

    rehearsal = RH.run(kit, Path(transformer.data.dir), work)
    check_same_submission(rehearsal.submission, reference(transformer, "blend"),
                          transformer.data.sample_submission_path, atol=manifest["weights"]["max_abs_difference"])


def test_predicting_a_tfidf_run_imports_nothing_only_training_needs(tmp_path):
    cfg = tfidf_run(tmp_path, "words")
    code = ("import sys, pandas as pd; from pipeline.kaggle import kernel; from pipeline.runs import load_run_config; "
            f"cfg = load_run_config({str(cfg.run_dir)!r}); "
            f"kernel.predict_table(cfg, cfg.run_dir, pd.read_csv({str(cfg.data.test_path)!r}), ['target']); "
            "print([m for m in sys.modules if m.split('.')[0] in ('iterstrat', 'typer') "
            "or m in ('pipeline.train', 'pipeline.folds', 'pipeline.cli')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------- 6. config


@pytest.mark.parametrize("overrides, named", [
    (["model.mixout=0.1"], "model.mixout"),
    (["train.rdrop=1.0", "train.awp=1.0"], "train.rdrop, train.awp"),
    (["model.head=msd"], "model.head"),
    (["train.ema=0.999"], "train.ema"),
    (["model.freeze_layers=2", "train.llrd=0.8"], "model.freeze_layers, train.llrd"),
    (["train.epochs=1"], "train.epochs"),
    (["model.backbone=microsoft/deberta-v3-base"], "model.backbone"),
])
def test_transformer_keys_are_an_error_for_a_tfidf_experiment(overrides, named):
    with pytest.raises(PipelineError, match=rf"config key\(s\) {named} do not apply to model.kind tfidf"):
        load_config(None, ["model.kind=tfidf", *overrides])


def test_tfidf_keys_fail_loudly():
    ok = load_config(None, ["model.kind=tfidf", "train.seed=7", "train.metric=mae", "train.device=cpu"])
    assert (ok.tfidf.word_ngrams, ok.tfidf.char_ngrams, ok.tfidf.char_analyzer) == ([1, 2], [2, 5], "char_wb")
    with pytest.raises(PipelineError, match="unknown key 'tfidf.alhpa'. Did you mean 'tfidf.alpha'"):
        load_config(None, ["model.kind=tfidf", "tfidf.alhpa=2"])
    with pytest.raises(PipelineError, match=r"tfidf.alpha do not apply to model.kind transformer"):
        load_config(None, ["tfidf.alpha=2"])
    with pytest.raises(PipelineError, match=r"'tfidf.word_ngrams': expected \[shortest, longest\]"):
        load_config(None, ["model.kind=tfidf", "tfidf.word_ngrams=[2, 1]"])
    with pytest.raises(PipelineError, match="'tfidf.C': must be positive"):
        load_config(None, ["model.kind=tfidf", "tfidf.C=0"])
    with pytest.raises(PipelineError, match="'model.kind': 'bert' is not one of transformer, tfidf"):
        load_config(None, ["model.kind=bert"])


def test_a_run_directory_refuses_other_tfidf_settings(tmp_path):
    data = keyword_data(tmp_path / "data", "regression")
    config = tfidf_yaml(tmp_path, "words", data, "regression")
    invoke("train", config, "--fold", "0")
    refused = invoke("train", config, "--fold", "1", "--set", "tfidf.alpha=3", code=1)
    assert "tfidf.alpha: 1.0 -> 3.0" in refused.output
    invoke("train", config, "--fold", "1", "--fold", "2")
    refused = invoke("predict", config, "--set", "tfidf.char_ngrams=null", code=1)
    assert "tfidf.char_ngrams: trained with [2, 5], asked for None" in refused.output
    (tmp_path / "oof" / "words" / "fold2" / bow.MODEL_FILE).unlink()
    assert "no checkpoint for fold(s) 2 (model.joblib)" in invoke("predict", config, code=1).output


def test_grid_trains_and_gathers_a_tfidf_config_and_skips_it_when_complete(tmp_path):
    data = keyword_data(tmp_path / "data", "regression")
    config = tfidf_yaml(tmp_path, "words", data, "regression")
    invoke("grid", config, "--seed", "3")
    assert json.loads((tmp_path / "oof" / "words-seed3" / "cv.json").read_text())["metric"] == "rmse"
    assert "words-seed3: complete, skipped" in invoke("grid", config, "--seed", "3").output


def test_resume_fits_only_the_unfinished_folds(tmp_path):
    data = keyword_data(tmp_path / "data", "regression")
    config = tfidf_yaml(tmp_path, "words", data, "regression")
    invoke("train", config, "--fold", "0")
    finished = tmp_path / "oof" / "words" / "fold0"
    stamps = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    invoke("train", config, "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == stamps
    assert all((tmp_path / "oof" / "words" / f"fold{k}" / "metrics.json").exists() for k in (1, 2))


KAGGLE_SKLEARN = "scikit-learn==1.6.1"  # image.yaml's header: the scikit-learn of Kaggle's image


@pytest.mark.slow
def test_kit_predicts_under_kaggles_older_scikit_learn(tmp_path, work):  # noqa: F811
    """The rehearsal's environment gets Kaggle's scikit-learn from the package index (the one step with network),
    then runs the kit of a classification run offline: a LogisticRegression pickled by a newer scikit-learn fails to
    predict under 1.6 (no `multi_class` attribute), which is why a fold saves its linear model as arrays."""
    cfg = tfidf_run(tmp_path, "words", "binary")
    package(cfg, "words")
    spec = RH.W.load_image()
    image = tmp_path / "image.yaml"
    image.write_text(json.dumps({"python": spec["python"], "platform": spec["platform"],
                                 "packages": sorted(spec["packages"] - {"scikit-learn"}),
                                 "exclude": sorted(spec["exclude"])}))
    python = RH.image_env(tmp_path / "work" / "image-env", RH.W.load_image(image))
    assert subprocess.run([str(python), "-c", "import sklearn"], capture_output=True).returncode != 0  # not linked
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", KAGGLE_SKLEARN], check=True)
    rehearsal = RH.run(tmp_path / "kit", Path(cfg.data.dir), tmp_path / "work", image)
    assert "predicting with 1.6.1" in rehearsal.output
    check_same_submission(rehearsal.submission, reference(cfg, "words"), cfg.data.sample_submission_path, atol=1e-9)
