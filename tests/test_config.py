"""The experiment config: typos, wrong types and out-of-range values are errors that name the key."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config, parse_override
from pipeline.errors import PipelineError


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("override, typo, suggestion", [
    ("train.lrr=1e-4", "train.lrr", "train.lr"),
    ("train.batchsize=8", "train.batchsize", "train.batch_size"),
    ("model.drop_out=0.1", "model.drop_out", "model.dropout"),
    ("data.n_fold=5", "data.n_fold", "data.n_folds"),
    ("experimnt=abc", "experimnt", "experiment"),
    ("pretrain.mask_ratio=0.2", "pretrain.mask_ratio", "pretrain.mask_rate"),
])
def test_unknown_override_key_suggests_the_nearest(override, typo, suggestion):
    with pytest.raises(PipelineError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"unknown key '{typo}'" in message
    assert f"Did you mean '{suggestion}'?" in message


def test_unknown_key_in_yaml_names_the_file_and_suggests(tmp_path):
    path = write_yaml(tmp_path / "exp.yaml", {"train": {"lrr": 1e-4}})
    with pytest.raises(PipelineError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "unknown key 'train.lrr'" in str(err.value) and "Did you mean 'train.lr'?" in str(err.value)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="unknown key 'trian'.*Did you mean"):
        load_config(write_yaml(tmp_path / "exp.yaml", {"trian": {"lr": 1e-4}}))


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("train.lr=fast", "train.lr"),
    ("train.save_checkpoint=maybe", "train.save_checkpoint"),
    ("model.pooling=max", "model.pooling"),
    ("data.task=ranking", "data.task"),
    ("train.epochs=[1,2]", "train.epochs"),
    ("data.target_columns={a: 1}", "data.target_columns"),
    ("pretrain.whole_word=maybe", "pretrain.whole_word"),
    ("pretrain.extra_files={a: 1}", "pretrain.extra_files"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(PipelineError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    with pytest.raises(PipelineError, match="config key 'train.lr': expected a number"):
        load_config(write_yaml(tmp_path / "exp.yaml", {"train": {"lr": "fast"}}))


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(PipelineError, match="'train' must be a mapping"):
        load_config(write_yaml(tmp_path / "exp.yaml", {"train": 3}))


@pytest.mark.parametrize("override, key", [
    ("model.mixout=1.0", "model.mixout"),
    ("model.mixout=-0.1", "model.mixout"),
    ("model.dropout=1.0", "model.dropout"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.llrd=0", "train.llrd"),
    ("train.llrd=1.5", "train.llrd"),
    ("train.epochs=0", "train.epochs"),
    ("train.warmup_ratio=1", "train.warmup_ratio"),
    ("data.n_folds=1", "data.n_folds"),
    ("data.fold_bins=1", "data.fold_bins"),
    ("train.metric=auc", "train.metric"),  # auc does not fit the default regression task
    ("pretrain.mask_rate=0", "pretrain.mask_rate"),
    ("pretrain.mask_rate=1.0", "pretrain.mask_rate"),
    ("pretrain.eval_fraction=0", "pretrain.eval_fraction"),
    ("pretrain.epochs=0", "pretrain.epochs"),
    ("pretrain.lr=0", "pretrain.lr"),
    ("pretrain.max_length=4", "pretrain.max_length"),
])
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(PipelineError, match=f"config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["model.mixout=0.0", "model.mixout=0.9", "train.grad_accum=1",
                                      "train.llrd=1.0", "train.warmup_ratio=0"])
def test_boundary_values_that_are_allowed(override):
    load_config(None, [override])


def test_override_parses_numbers_lists_and_null():
    assert parse_override("train.lr=3e-5") == {"train": {"lr": 3e-5}}
    assert parse_override("train.lr=3E-5") == {"train": {"lr": 3e-5}}
    assert parse_override("data.text_columns=[a,b]") == {"data": {"text_columns": ["a", "b"]}}
    assert parse_override("train.head_lr=null") == {"train": {"head_lr": None}}
    assert parse_override("experiment=abc") == {"experiment": "abc"}
    cfg = load_config(None, ["train.lr=3e-5", "data.text_columns=[title, body]", "train.batch_size=32",
                             "train.head_lr=1e-3", "model.backbone=microsoft/deberta-v3-base",
                             "data.dir=inputs/some.data"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.head_lr == 1e-3
    assert cfg.data.text_columns == ["title", "body"]
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)
    assert cfg.model.backbone == "microsoft/deberta-v3-base"
    assert cfg.data.dir == "inputs/some.data"


def test_later_overrides_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path / "exp.yaml", {"train": {"lr": 1e-4, "epochs": 2}})
    cfg = load_config(path, ["train.lr=2e-5"])
    assert cfg.train.lr == 2e-5 and cfg.train.epochs == 2.0
    assert cfg.train.batch_size == 16  # untouched default


@pytest.mark.parametrize("text", ["train.lr", "a.b.c=1"])
def test_malformed_override(text):
    with pytest.raises(PipelineError, match="section.key=value"):
        parse_override(text)


def test_experiment_name_is_the_yaml_stem(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "deberta_lr2e5.yaml", {"train": {"lr": 2e-5}}), ["output_dir=runs"])
    assert cfg.experiment == "deberta_lr2e5"
    assert str(cfg.run_dir) == "runs/deberta_lr2e5"


def test_experiment_set_in_the_yaml_names_the_run_but_a_base_may_not(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "exp.yaml", {"experiment": "deberta_v3", "train": {"lr": 2e-5}}))
    assert cfg.experiment == "deberta_v3"  # honoured, not silently replaced by the file name
    write_yaml(tmp_path / "named_base.yaml", {"experiment": "base_run"})
    write_yaml(tmp_path / "child.yaml", {"base": "named_base.yaml"})
    with pytest.raises(PipelineError, match=r"named_base.yaml: 'experiment' in a base file would name every"):
        load_config(tmp_path / "child.yaml")


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(PipelineError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config(bad)


def test_cli_bad_key_is_one_error_line_and_exit_1(tmp_path):
    path = write_yaml(tmp_path / "exp.yaml", {"train": {"lrr": 1e-4}})
    result = CliRunner().invoke(app, ["folds", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert "train.lrr" in lines[0] and "Did you mean 'train.lr'?" in lines[0]
    assert "Traceback" not in result.output


def test_cli_bad_override_is_one_error_line_and_exit_1(tmp_path):
    path = write_yaml(tmp_path / "exp.yaml", {"train": {"lr": 1e-4}})
    result = CliRunner().invoke(app, ["train", str(path), "--set", "train.grad_accum=0"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "train.grad_accum" in lines[0], result.output


def test_base_chain_applies_the_base_first_and_names_the_experiment_by_the_child(tmp_path):
    write_yaml(tmp_path / "baseline.yaml", {"train": {"lr": 1e-4, "epochs": 2}, "model": {"pooling": "cls"}})
    write_yaml(tmp_path / "child.yaml", {"base": "baseline.yaml", "train": {"lr": 3e-5}})
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.experiment, cfg.train.lr, cfg.train.epochs, cfg.model.pooling) == ("child", 3e-5, 2.0, "cls")


def test_base_chain_errors_name_the_file(tmp_path):
    write_yaml(tmp_path / "orphan.yaml", {"base": "missing.yaml"})
    with pytest.raises(PipelineError, match=r"config file not found: .*missing.yaml \(the base of .*orphan.yaml\)"):
        load_config(tmp_path / "orphan.yaml")
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(PipelineError, match="'base' chain loops back to itself"):
        load_config(tmp_path / "a.yaml")
    write_yaml(tmp_path / "typo.yaml", {"base": "baseline.yaml", "train": {"lrr": 1}})
    write_yaml(tmp_path / "baseline.yaml", {})
    with pytest.raises(PipelineError, match=r"typo.yaml: unknown key 'train.lrr'"):
        load_config(tmp_path / "typo.yaml")
