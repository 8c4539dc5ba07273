"""Reliability promises, checked through the CLI as a user meets them.

Bad input and stages run out of order fail with exit code 1 and one line `error: ...` naming the file,
column, key or value, and leave every earlier output under oof/ byte-for-byte as it was. A training run
killed with SIGKILL resumes to the same predictions as an uninterrupted one and leaves nothing truncated
that looks complete; a diverging loss stops the run naming the step; the same config and seed give the
same folds, OOF predictions and ensemble weights. A property test covers fold assignment (blend weights: in
test_ensemble_submission.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, BertConfig, BertModel
from typer.testing import CliRunner

from pipeline import data as D
from pipeline.cli import app
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.folds import assign_folds
from pipeline.inference import cpu_has_bf16
from pipeline.model import EMBEDDED_BACKBONE, resolve_backbone
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Experiments trained once per module (2 folds each) and copied by the tests that need trained runs.
EXPERIMENTS = {
    "exp": [],
    "seed7": ["train.seed=7"],
    "otherfolds": ["data.fold_seed=7"],
    "othertarget": ["data.target_columns=[other]"],
}


def sets(*overrides: str) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]


def exp_sets(name: str) -> list[str]:
    return sets(f"experiment={name}", *EXPERIMENTS[name]) if name != "exp" else []


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stderr


def fail(*args) -> str:
    """Run a command that must fail cleanly; return its one-line message (without `error: `)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__} escaped: {result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("error:")] == lines[-1:], result.stderr
    return lines[-1].removeprefix("error: ")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root and its content hash."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fail_untouched(work: Path, *args) -> str:
    """`fail`, and the outputs under work/oof are exactly what they were before the command."""
    before = snapshot(work / "oof")
    message = fail(*args)
    assert snapshot(work / "oof") == before, f"a failing command changed oof/: {message}"
    return message


def build(root: Path, backbone: Path, extra: list[str] | None = None) -> Path:
    """Data (with a second numeric column, `other`) and root/exp.yaml over the tiny backbone."""
    cfg = tiny_config(root, backbone, extra=["data.n_folds=2", *(extra or [])])
    train = pd.read_csv(root / "data" / "train.csv")
    train["other"] = train["target"].rank().to_numpy() / len(train)
    train.to_csv(root / "data" / "train.csv", index=False)
    return write_yaml(root / "exp.yaml", cfg.to_dict())


def write_yaml(path: Path, values: dict) -> Path:
    values = {k: v for k, v in values.items() if k != "experiment"}  # the file stem names the experiment
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def variant(work: Path, changes: dict[str, object]) -> Path:
    """work/bad/exp.yaml: exp.yaml with dotted keys changed (or added), same experiment name."""
    values = yaml.safe_load((work / "exp.yaml").read_text())
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        node = values
        for s in sections:
            node = node.setdefault(s, {})
        node[key] = value
    return write_yaml(work / "bad" / "exp.yaml", values)


def _retarget(value, old: str, new: str):
    if isinstance(value, dict):
        return {k: _retarget(v, old, new) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old):]
    return value


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone) -> Path:
    base = tmp_path_factory.mktemp("trained")
    config = build(base, tiny_backbone)
    invoke("folds", config)
    for name in EXPERIMENTS:
        invoke("train", config, *exp_sets(name))
        invoke("oof", config, *exp_sets(name))
    for name in ("exp", "seed7"):
        invoke("predict", config, *exp_sets(name))
    return base


@pytest.fixture
def work(trained, tmp_path) -> Path:
    """A private copy of the trained runs, its configs pointing at the copy."""
    root = tmp_path / "w"
    shutil.copytree(trained, root)
    for path in [root / "exp.yaml", *root.glob("oof/*/config.yaml")]:
        path.write_text(yaml.safe_dump(_retarget(yaml.safe_load(path.read_text()), str(trained), str(root)),
                                       sort_keys=False))
    return root


# ---------------------------------------------------------------- bad data


def _edit_train(fn):
    def mutate(work: Path) -> None:
        path = work / "data" / "train.csv"
        df = pd.read_csv(path)
        changed = fn(df)
        df = df if changed is None else changed
        df.to_csv(path, index=False)
    return mutate


def _set(col, row, value):
    def fn(df):
        df[col] = df[col].astype(object)
        df.loc[row, col] = value
        return df
    return fn


def _edit_folds(fn):
    def mutate(work: Path) -> None:
        path = work / "oof" / "folds" / "tiny-k2-seed42.csv"
        fn(df := pd.read_csv(path))
        df.to_csv(path, index=False)
    return mutate


TRAIN = "data/train.csv"
BAD_DATA = {  # case: (mutation, substrings the message must contain; {w} is the work dir)
    "missing_train_file": (lambda w: (w / TRAIN).unlink(), ["train file not found", "{w}/data/train.csv"]),
    "missing_id_column": (_edit_train(lambda df: df.rename(columns={"id": "ident"})),
                          ["{w}/data/train.csv", "missing column(s) id", "columns found: ident, text, target"]),
    "missing_text_column": (_edit_train(lambda df: df.drop(columns="text")),
                            ["missing column(s) text", "columns found: id, target, other"]),
    "missing_target_column": (_edit_train(lambda df: df.drop(columns="target")),
                              ["missing column(s) target", "columns found: id, text, other"]),
    "empty_text": (_edit_train(_set("text", 3, "")), ["{w}/data/train.csv", "column 'text'", "'r0003'"]),
    "blank_text": (_edit_train(_set("text", 5, "   ")), ["column 'text'", "'r0005'"]),
    "missing_target": (_edit_train(_set("target", 4, np.nan)), ["target column 'target'", "'r0004'"]),
    "non_numeric_target": (_edit_train(_set("target", 2, "high")), ["target column 'target'", "'r0002'",
                                                                     "'high'"]),
    "duplicate_ids": (_edit_train(_set("id", 7, "r0006")), ["column 'id'", "duplicate ids", "'r0006'"]),
    "folds_of_another_dataset": (_edit_folds(lambda df: df.__setitem__("id", "x" + df["id"])),
                                 ["{w}/oof/folds/tiny-k2-seed42.csv", "made for another dataset"]),
    "fold_index_out_of_range": (_edit_folds(lambda df: df.__setitem__("fold", df["fold"].where(df.index != 9, 5))),
                                ["tiny-k2-seed42.csv", "fold index 5 is out of range 0..1"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_named(work, case):
    mutate, expected = BAD_DATA[case]
    mutate(work)
    message = fail_untouched(work, "train", work / "exp.yaml")
    for part in expected:
        assert part.format(w=work) in message, message


def test_texts_are_read_as_written_and_a_row_needs_text_in_one_column(work):
    """`NA`, `None`, `null` are texts; a tweet without a keyword is a row; a row with no text at all is not."""
    df = pd.read_csv(work / TRAIN)
    df.loc[[1, 2, 3], "text"] = ["NA", "None", "null"]
    df.insert(1, "keyword", np.where(np.arange(len(df)) % 3 == 0, "", "alpha"))
    df.to_csv(work / TRAIN, index=False)
    config = variant(work, {"data.text_columns": ["keyword", "text"]})
    invoke("train", config, "--fold", "0", *sets("experiment=keyword"))
    train = D.load_train(load_config(config))
    assert train["text"].iloc[1:4].tolist() == ["NA", "None", "null"] and train["keyword"].iloc[0] == ""
    df.loc[4, "text"], df.loc[4, "keyword"] = " ", ""
    df.to_csv(work / TRAIN, index=False)
    message = fail_untouched(work, "train", config, "--fold", "1", *sets("experiment=keyword"))
    assert f"{work}/data/train.csv: 1 row(s) are empty in every text column (keyword, text), first at id 'r0004' " \
           f"(line 6)" == message, message


def test_a_command_shows_its_warnings_as_one_line_and_leaves_the_process_as_it_was(work, monkeypatch):
    """`warning: ...` on stderr while a command runs; the caller's own warning display afterwards (a notebook's)."""
    def before(*args, **kwargs):
        pass

    monkeypatch.setattr(warnings, "showwarning", before)
    test = pd.read_csv(work / "data" / "test.csv")
    test.loc[0, "text"] = ""
    test.to_csv(work / "data" / "test.csv", index=False)
    assert "\nwarning: " in "\n" + invoke("predict", work / "exp.yaml")
    assert warnings.showwarning is before


def test_a_test_row_without_text_is_predicted_and_named_in_a_warning(work):
    """A hidden test set with an empty text must not stop the Kaggle kernel: the row is predicted, and named."""
    test = pd.read_csv(work / "data" / "test.csv")
    test.loc[2, "text"] = ""
    test.to_csv(work / "data" / "test.csv", index=False)
    stderr = invoke("predict", work / "exp.yaml")
    assert f"{work}/data/test.csv: column 'text' has 1 empty text(s), first at id {test.loc[2, 'id']!r} (line 4): " \
           "predicted from an empty text" in stderr, stderr
    predicted = pd.read_csv(work / "oof" / "exp" / "test_predictions.csv")
    assert predicted["id"].tolist() == test["id"].tolist() and np.isfinite(predicted["target"]).all()


def test_a_class_named_none_is_a_class_and_an_empty_label_is_missing(work):
    df = pd.read_csv(work / TRAIN)
    df["label"] = np.where(df["target"] > df["target"].median(), "Some", "None")
    df.to_csv(work / TRAIN, index=False)
    config = variant(work, {"data.task": "binary", "data.target_columns": ["label"]})
    assert D.class_names(load_config(config), D.load_train(load_config(config))["label"]) == ["None", "Some"]
    df.loc[6, "label"] = ""
    df.to_csv(work / TRAIN, index=False)
    message = fail_untouched(work, "train", config)
    assert message == f"{work}/data/train.csv: label column 'label' has 1 missing label(s)", message


def test_unknown_class_label_is_named(work):
    df = pd.read_csv(work / TRAIN)
    df["label"] = np.where(df["target"] > df["target"].median(), "pos", "neg")
    df.loc[11, "label"] = "maybe"
    df.to_csv(work / TRAIN, index=False)
    config = variant(work, {"data.task": "binary", "data.target_columns": ["label"], "data.classes": ["neg", "pos"]})
    message = fail_untouched(work, "train", config)
    assert all(p in message for p in ["label column 'label'", "'maybe'", "['neg', 'pos']"]), message


def test_test_ids_differ_from_sample_submission(work):
    sample = pd.read_csv(work / "data" / "sample_submission.csv")
    sample.loc[2, "id"] = "r9999"
    sample.to_csv(work / "data" / "sample_submission.csv", index=False)
    message = fail_untouched(work, "submit", "exp", "--out", work / "sub.csv", "--output-dir", work / "oof")
    assert "sample_submission.csv" in message and "test ids differ" in message and "r9999" in message, message
    assert not (work / "sub.csv").exists()


def test_submission_columns_must_match_predictions(work):
    sample = pd.read_csv(work / "data" / "sample_submission.csv").rename(columns={"target": "score"})
    sample.to_csv(work / "data" / "sample_submission.csv", index=False)
    message = fail_untouched(work, "submit", "exp", "--out", work / "sub.csv", "--output-dir", work / "oof")
    assert "sample_submission columns ['score'] do not match the predicted columns ['target']" in message, message
    assert not (work / "sub.csv").exists()


def test_a_tokenizer_beyond_its_models_embeddings_is_named(tmp_path):
    """Weights saved beside another model's tokenizer (or tokens added without resizing): named, not IndexError."""
    backbone = tmp_path / "mismatched"
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(resolve_backbone(EMBEDDED_BACKBONE)).save_pretrained(backbone)
    config = write_yaml(tmp_path / "exp.yaml", tiny_config(tmp_path, backbone, extra=["data.n_folds=2"]).to_dict())
    message = fail("train", config, "--fold", "0")
    assert f"config key 'model.backbone': the tokenizer of {backbone} gives token id" in message, message
    assert "but its model has 1000 token embeddings (ids 0..999)" in message, message
    assert not (tmp_path / "oof" / "exp" / "fold0" / "metrics.json").exists()


def test_a_padding_id_beyond_the_embeddings_is_named():
    enc = D.Encoded([[1, 2, 3], [2]], None, None)
    D.check_vocabulary([enc], 3, 4, "m")  # ids 0..3 all index the table
    with pytest.raises(PipelineError, match=r"the tokenizer of m pads with token id 4, but its model has 4 token"):
        D.check_vocabulary([enc], 4, 4, "m")
    with pytest.raises(PipelineError, match=r"the tokenizer of m gives token id 3, but its model has 3 token"):
        D.check_vocabulary([D.Encoded([[1]], None, None), enc], 0, 3, "m")


# ---------------------------------------------------------------- bad config

BAD_CONFIG = {  # case: (changed keys, substrings of the message)
    "unknown_key": ({"train.lrr": 0.01}, ["unknown key 'train.lrr'", "Did you mean 'train.lr'?"]),
    "unknown_section": ({"trian.lr": 0.01}, ["unknown key 'trian'", "Did you mean 'train'?"]),
    "unknown_data_key": ({"data.max_lenght": 64}, ["unknown key 'data.max_lenght'", "'data.max_length'"]),
    "wrong_type_int": ({"train.batch_size": "eight"}, ["'train.batch_size'", "expected an integer, got 'eight'"]),
    "wrong_type_float": ({"train.lr": "fast"}, ["'train.lr'", "expected a number, got 'fast'"]),
    "wrong_type_choice": ({"model.pooling": "max"}, ["'model.pooling'", "'max' is not one of cls, mean, attention"]),
    "wrong_type_list": ({"data.text_columns": 3}, ["'data.text_columns'", "expected a list, got 3"]),
    "section_not_mapping": ({"train": 5}, ["'train' must be a mapping"]),
    "mixout_one": ({"model.mixout": 1.0}, ["'model.mixout'", "must be in [0, 1), got 1.0"]),
    "mixout_negative": ({"model.mixout": -0.1}, ["'model.mixout'", "must be in [0, 1), got -0.1"]),
    "grad_accum_zero": ({"train.grad_accum": 0}, ["'train.grad_accum'", "must be at least 1, got 0"]),
    "negative_lr": ({"train.lr": -0.001}, ["'train.lr'", "must be positive, got -0.001"]),
    "max_length_beyond_model": ({"data.max_length": 600},
                                ["'data.max_length'", "600 is beyond the model's maximum of 512"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_is_named(work, case):
    changes, expected = BAD_CONFIG[case]
    config = variant(work, changes)
    message = fail_untouched(work, "train", config)
    for part in expected:
        assert part in message, message


def test_yaml_exponent_spelling_is_a_number(work):
    """YAML 1.1 reads `-1e-3` (no dot) as a string: it must still be read as the number the user wrote."""
    config = variant(work, {})
    config.write_text(config.read_text().replace("\n  lr: 0.001\n", "\n  lr: -1e-3\n"))
    assert "must be positive, got -0.001" in fail_untouched(work, "train", config)


def test_fp16_on_cpu_falls_back_with_a_warning(work):
    config = variant(work, {"train.precision": "fp16", "train.device": "cpu"})
    stderr = invoke("train", config, "--fold", "0")
    fallback = "bf16" if cpu_has_bf16() else "fp32"
    assert f"warning: train.precision=fp16 needs a CUDA device; using {fallback} on cpu" in stderr, stderr
    assert json.loads((work / "oof" / "exp" / "fold0" / "metrics.json").read_text())["precision"] == fallback


@pytest.mark.parametrize("major, native", [(7, False), (8, True)])  # a T4 or V100; an A100, L4 or H100
def test_auto_precision_on_a_gpu_counts_only_native_bf16(monkeypatch, major, native):
    """torch's default bf16 check says yes on a T4, where bf16 is emulated: `auto` must pick fp16 there."""
    import torch

    from pipeline.inference import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp16")


# ---------------------------------------------------------------- stages out of order


def test_oof_before_folds_finished_names_them(work):
    message = fail_untouched(work, "oof", work / "exp.yaml", *sets("experiment=untrained"))
    assert "untrained" in message and "fold(s) 0, 1 have not finished" in message, message
    (work / "oof" / "exp" / "fold1" / "metrics.json").unlink()
    message = fail_untouched(work, "oof", work / "exp.yaml")
    assert "fold(s) 1 have not finished" in message, message


def test_predict_without_checkpoints_names_the_folds(work):
    message = fail_untouched(work, "predict", work / "exp.yaml", *sets("experiment=untrained"))
    assert "fold(s) 0, 1 have not finished" in message, message
    (work / "oof" / "exp" / "fold0" / "model.pt").unlink()
    message = fail_untouched(work, "predict", work / "exp.yaml")
    assert "no checkpoint for fold(s) 0 " in message, message


def test_predict_refuses_an_unfinished_fold_and_its_half_trained_checkpoint(work):
    (work / "oof" / "exp" / "fold1" / "metrics.json").unlink()  # as while `train` runs this fold again
    message = fail_untouched(work, "predict", work / "exp.yaml")
    assert "fold(s) 1 have not finished" in message, message


def test_predict_refuses_settings_the_checkpoints_were_not_trained_with(work):
    message = fail_untouched(work, "predict", work / "exp.yaml", *sets("data.max_length=8"))
    assert "data.max_length: trained with 32, asked for 8" in message, message
    invoke("predict", work / "exp.yaml", *sets("train.precision=fp32", "train.seed=3"))  # these do not matter


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_training_into_a_run_with_other_settings_is_refused(work, resume):
    """Folds trained with different settings in one directory would give a CV that belongs to neither."""
    message = fail_untouched(work, "train", work / "exp.yaml", "--fold", "1", *resume, *sets("train.lr=2e-3"))
    assert "oof/exp/config.yaml was written by a run with other settings (train.lr: 0.001 -> 0.002)" in message
    assert "Use another experiment name" in message, message


@pytest.mark.parametrize("command", [["train", "--fold", "1"], ["train", "--resume"], ["oof"]])
def test_a_run_refuses_a_training_file_edited_since_its_folds_learned_from_it(work, command):
    """A fixed label under the same ids: folds from both versions, or a CV against targets no fold saw."""
    _edit_train(_set("target", 4, 9.5))(work)
    message = fail_untouched(work, command[0], work / "exp.yaml", *command[1:])
    assert f"{work}/data/train.csv (data.train_file) changed since the folds in {work}/oof/exp were trained" in message
    assert "inputs.json" in message and "Use another experiment name" in message, message
    invoke("train", work / "exp.yaml", "--fold", "1", *sets("experiment=fixed"))  # a new experiment may
    message = fail_untouched(work, "ensemble", "exp", "seed7", "--name", "blend", "--output-dir", work / "oof")
    assert f"{work}/data/train.csv (data.train_file) changed since the folds in {work}/oof/exp were trained" in message


def test_the_same_training_file_elsewhere_is_the_same_run(work, tmp_path):
    """inputs.json records contents, not paths: data.dir may move (a clone, a Kaggle dataset mount)."""
    moved = tmp_path / "moved"
    shutil.copytree(work / "data", moved)
    invoke("train", work / "exp.yaml", "--resume", *sets(f"data.dir={moved}"))
    invoke("oof", work / "exp.yaml", *sets(f"data.dir={moved}"))
    (work / "oof" / "exp" / "inputs.json").unlink()  # a run saved before inputs.json: not checked
    _edit_train(_set("target", 4, 9.5))(work)
    invoke("oof", work / "exp.yaml")


@pytest.mark.parametrize("other, expected", [("otherfolds", "'otherfolds' was trained on other folds than 'exp'"),
                                             ("othertarget", "'othertarget' was trained on other data or targets")])
def test_ensemble_refuses_mismatched_members(work, other, expected):
    message = fail_untouched(work, "ensemble", "exp", other, "--name", "blend", "--output-dir", work / "oof")
    assert expected in message, message
    assert not (work / "oof" / "blend").exists()


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("how", ["huge_lr", "huge_target"])
def test_nan_loss_stops_the_run_naming_the_step(work, how):
    if how == "huge_target":
        df = pd.read_csv(work / TRAIN)
        df["target"] = df["target"] * 1e300  # finite in the CSV, inf in float32
        df.to_csv(work / TRAIN, index=False)
    before = snapshot(work / "oof")
    message = fail("train", work / "exp.yaml", "--fold", "0",
                   *sets("experiment=diverged", "train.precision=fp32", *(["train.lr=1e10"] * (how == "huge_lr"))))
    assert re.search(r"diverged fold 0: loss is (nan|inf) at optimizer step \d+", message), message
    fold0 = work / "oof" / "diverged" / "fold0"
    assert not (fold0 / "valid_predictions.csv").exists() and not (fold0 / "metrics.json").exists()
    assert {k: v for k, v in snapshot(work / "oof").items() if not k.startswith("diverged/")} == before


# ---------------------------------------------------------------- interruption and determinism


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_killed_run_resumes_to_the_same_predictions(tmp_path, tiny_backbone, restore_threads):
    # 30 training rows in batches of 4 for 2 epochs: 16 optimizer steps, state saved every 2.
    config = build(tmp_path, tiny_backbone, ["train.epochs=2", "train.batch_size=4", "train.eval_every=2",
                                             "train.num_threads=1"])
    out = tmp_path / "oof"
    invoke("train", config, "--fold", "1")
    fold0 = out / "exp" / "fold0"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(config), "--fold", "0"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + 240
            while not (fold0 / "state.pt").exists():
                assert proc.poll() is None, f"training ended before it could be killed:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, "no state.pt within 240 s"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-run: only files a later stage does not trust as a finished fold, none truncated.
    state = torch.load(fold0 / "state.pt", weights_only=False)
    assert 0 < state["step"] < 16, state["step"]
    assert not (fold0 / "metrics.json").exists() and not (fold0 / "valid_predictions.csv").exists()
    visible = {p.name for p in fold0.iterdir() if not p.name.startswith(".")}
    assert visible <= {"state.pt", "model.pt", "log.csv"}, visible
    assert len(pd.read_csv(fold0 / "log.csv")) >= len(state["log"])
    message = fail_untouched(tmp_path, "oof", config)
    assert "fold(s) 0 have not finished" in message, message

    invoke("train", config, "--fold", "0", "--resume")
    invoke("train", config, "--fold", "0", *sets("experiment=straight"))
    resumed = pd.read_csv(fold0 / "valid_predictions.csv")
    straight = pd.read_csv(out / "straight" / "fold0" / "valid_predictions.csv")
    assert resumed["id"].tolist() == straight["id"].tolist()
    np.testing.assert_allclose(resumed["target"], straight["target"], rtol=0, atol=1e-6)
    log_resumed, log_straight = pd.read_csv(fold0 / "log.csv"), pd.read_csv(out / "straight" / "fold0" / "log.csv")
    assert log_resumed["step"].tolist() == log_straight["step"].tolist() == list(range(2, 17, 2))
    np.testing.assert_allclose(log_resumed[["train_loss", "rmse"]], log_straight[["train_loss", "rmse"]],
                               rtol=0, atol=1e-6)
    assert not (fold0 / "state.pt").exists()
    invoke("oof", config)


def test_same_config_and_seed_give_identical_outputs(work, tmp_path, tiny_backbone):
    """A second run from scratch reproduces the folds file, the OOF predictions and the ensemble weights."""
    again = tmp_path / "again"
    config = build(again, tiny_backbone)
    for name in ("exp", "seed7"):
        invoke("train", config, *exp_sets(name))
        invoke("oof", config, *exp_sets(name))
    folds = "folds/tiny-k2-seed42.csv"
    assert (again / "oof" / folds).read_bytes() == (work / "oof" / folds).read_bytes()
    for name in ("exp", "seed7"):
        a, b = pd.read_csv(work / "oof" / name / "oof.csv"), pd.read_csv(again / "oof" / name / "oof.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    weights = []
    for root in (work, again):
        invoke("ensemble", "exp", "seed7", "--name", "blend", "--output-dir", root / "oof")
        weights.append(json.loads((root / "oof" / "blend" / "ensemble.json").read_text())["weights"])
    assert weights[0] == weights[1]


# ---------------------------------------------------------------- properties

PROPERTY = settings(max_examples=20, deadline=None, database=None)  # no .hypothesis/ left behind


@PROPERTY
@given(n_folds=st.integers(2, 6), extra_rows=st.integers(0, 120), task=st.sampled_from(["regression", "multiclass"]),
       targets=st.integers(1, 3), n_classes=st.integers(2, 6), fold_bins=st.integers(2, 20),
       groups=st.one_of(st.none(), st.integers(0, 40)), seed=st.integers(0, 2**16))
def test_folds_property(n_folds, extra_rows, task, targets, n_classes, fold_bins, groups, seed):
    rng = np.random.default_rng(seed)
    n = n_folds + extra_rows
    cfg = Config()
    d = cfg.data
    d.n_folds, d.fold_bins, d.task, d.fold_seed = n_folds, fold_bins, task, seed
    df = pd.DataFrame({"id": np.arange(n)})
    if task == "regression":
        d.target_columns = [f"t{j}" for j in range(targets)]
        for c in d.target_columns:
            df[c] = rng.normal(size=n).round(int(rng.integers(0, 3)))  # rounding makes ties
    else:
        d.target_columns = ["label"]
        df["label"] = rng.integers(0, n_classes, size=n)
    if groups is not None:
        n_groups = min(n, n_folds + groups)
        d.group_column = "g"
        df["g"] = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, size=n - n_groups)])

    fold = assign_folds(df, cfg)
    assert fold.shape == (n,) and set(fold.tolist()) == set(range(n_folds)), np.bincount(fold)
    assert (assign_folds(df, cfg) == fold).all()  # the same settings, the same folds
    if groups is not None:
        assert (df.assign(fold=fold).groupby("g")["fold"].nunique() == 1).all()
    elif task == "regression" and targets == 1 or task != "regression":
        sizes = np.bincount(fold, minlength=n_folds)
        assert sizes.max() - sizes.min() <= 1, sizes
        counts = np.bincount(df["label"]) if task != "regression" else None
        if counts is not None and counts[counts > 0].min() >= n_folds:  # stratified: every class in every fold
            per_fold = pd.crosstab(fold, df["label"]).to_numpy()
            assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all(), per_fold


def test_folds_refuse_impossible_splits():
    cfg = Config()
    cfg.data.n_folds = 5
    with pytest.raises(PipelineError, match="4 rows cannot be split into 5 folds"):
        assign_folds(pd.DataFrame({"id": range(4), "target": np.arange(4.0)}), cfg)
    cfg.data.group_column = "g"
    df = pd.DataFrame({"id": range(20), "target": np.arange(20.0), "g": np.arange(20) % 3})
    with pytest.raises(PipelineError, match="group column 'g' has 3 groups, fewer than data.n_folds=5"):
        assign_folds(df, cfg)
