"""Reading a finished run directory back: its saved config and its prediction files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from pipeline.config import Config, config_from_dict
from pipeline.errors import PipelineError


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise PipelineError(f"{run_dir}: no config.yaml; is this an experiment that has been trained?")
    return config_from_dict(yaml.safe_load(path.read_text()))


def read_predictions(run_dir: Path, name: str, hint: str) -> pd.DataFrame:
    path = Path(run_dir) / name
    if not path.exists():
        raise PipelineError(f"{path} not found; run `{hint}` first")
    return pd.read_csv(path)
