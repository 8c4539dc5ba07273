"""A run directory's records and reading them back: its saved config, the hashes of the files it learned from,
and its prediction files."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import pandas as pd
import yaml

from pipeline.config import Config, PretrainConfig, config_from_dict, save_config
from pipeline.errors import PipelineError
from pipeline.io import read_csv, read_json, sha256, write_json_atomic

# `pipeline grid` names the run of configs/x.yaml at another seed than the config's own `x-seed<N>`.
SEED_SUFFIX = re.compile(r"^(?P<base>.+)-seed(?P<seed>\d+)$")


def seed_runs(experiment: str, output_dir: Path) -> list[str]:
    """The experiment's runs at other seeds (`<experiment>-seed<N>`, trained), in seed order."""
    found = [p.name for p in Path(output_dir).glob(f"{experiment}-seed*")
             if (p / "config.yaml").exists() and (m := SEED_SUFFIX.match(p.name)) and m["base"] == experiment]
    return sorted(found, key=lambda n: int(SEED_SUFFIX.match(n)["seed"]))


def missing_folds(cfg: Config, run_dir: Path | None = None) -> list[int]:
    """Folds without metrics.json (written last: a fold without it has not finished)."""
    run_dir = Path(run_dir or cfg.run_dir)
    return [k for k in range(cfg.data.n_folds) if not (run_dir / f"fold{k}" / "metrics.json").exists()]


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise PipelineError(f"{run_dir}: no config.yaml; is this an experiment that has been trained?")
    return config_from_dict(yaml.safe_load(path.read_text()))


# Keys that say where or how fast a run executes, not what it computes: folds may be trained with them changed
# (e.g. some folds on a CPU in bf16, the rest on a GPU in fp16).
WHERE_KEYS = {"data.dir", "train.num_threads", "train.save_checkpoint", "train.device", "train.precision",
              "model.attention", "model.fast_dropout", "train.pad_to_multiple_of"}

# How `pipeline pretrain` makes a backbone: training reads only the result, through model.backbone.
PRETRAIN_KEYS = {f"pretrain.{f.name}" for f in dataclasses.fields(PretrainConfig)}


# Keys added after runs were saved without them, with the value those runs computed with where it differs from
# today's default: a saved config that lacks the key is compared with this value.
COMPUTED_BEFORE = {"model.target_scaling": "none"}


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(a: dict, b: dict, ignore: set[str] = frozenset()) -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) for each key of two config dicts that both have and set differently."""
    fa, fb = _flat(a), _flat(b)
    return [(k, fa[k], fb[k]) for k in fa if k in fb and k not in ignore and fa[k] != fb[k]]


INPUTS = "inputs.json"  # {config key: sha256 of the file it names}, beside config.yaml


def input_files(cfg: Config) -> dict[str, Path]:
    """The files the folds learn from, by the config key that names them: the training table, and train.pseudo's CSV
    when set."""
    files = {"data.train_file": Path(cfg.data.train_path)}
    if cfg.train.pseudo:
        files["train.pseudo"] = Path(cfg.train.pseudo)
    return files


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))  # once per file version a process sees, not once per fold or member


def input_hashes(cfg: Config) -> dict[str, str]:
    """sha256 of each of `input_files`. Contents, not paths: the same files under another data.dir are the same run."""
    hashes = {}
    for key, path in input_files(cfg).items():
        if path.exists():
            stat = path.stat()
            hashes[key] = _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return hashes


def record_run(cfg: Config) -> None:
    """Write what a fold of this run computes from: config.yaml, and inputs.json (`input_hashes`)."""
    save_config(cfg, cfg.run_dir / "config.yaml")
    write_json_atomic(cfg.run_dir / INPUTS, input_hashes(cfg))


def check_same_inputs(cfg: Config, run_dir: Path) -> None:
    """Refuse a run directory whose folds learned from other file contents than `cfg`'s files hold now.

    An edited train.csv (a fixed label, dropped rows under the same ids) would otherwise give folds trained on
    either version, and an out-of-fold score against targets some folds never saw. A run saved before inputs.json
    existed is not checked.
    """
    path = Path(run_dir) / INPUTS
    if not path.exists():
        return
    saved, now = read_json(path), input_hashes(cfg)
    changed = [key for key in saved if key in now and saved[key] != now[key]]
    if changed:
        files = input_files(cfg)
        listed = ", ".join(f"{files[key]} ({key})" for key in changed)
        raise PipelineError(f"{listed} changed since the folds in {run_dir} were trained ({path} holds the sha256 "
                            f"they learned from). Use another experiment name, or delete {run_dir} to start it over.")


def check_same_config(cfg: Config, run_dir: Path) -> None:
    """Refuse to add folds to a run directory whose saved config computes something else, or whose folds learned
    from other file contents (`check_same_inputs`).

    Mixing folds trained with different settings would give a CV that belongs to neither. Keys absent from an
    older saved config are not compared.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    for dotted, value in COMPUTED_BEFORE.items():
        section, key = dotted.split(".")
        saved.setdefault(section, {}).setdefault(key, value)
    changed = differing_keys(saved, cfg.to_dict(), WHERE_KEYS | PRETRAIN_KEYS)
    if changed:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        raise PipelineError(f"{path} was written by a run with other settings ({listed}). "
                            f"Use another experiment name, or delete {run_dir} to start it over.")
    check_same_inputs(cfg, run_dir)


def read_predictions(run_dir: Path, name: str, hint: str, id_column: str) -> pd.DataFrame:
    path = Path(run_dir) / name
    if not path.exists():
        raise PipelineError(f"{path} not found; run `{hint}` first")
    return read_csv(path, id_column)
