"""`pipeline grid`: every config over every seed, complete runs skipped, interrupted ones resumed, and an edited
config refused rather than reported with results it did not produce."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.test_reliability import build, fail, invoke, sets, snapshot, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def grid(tmp_path, tiny_backbone):
    """Two experiment YAMLs over the tiny backbone: exp and a variant with another learning rate."""
    build(tmp_path, tiny_backbone, ["train.precision=fp32", "train.device=cpu"])
    values = yaml.safe_load((tmp_path / "exp.yaml").read_text())
    values["train"]["lr"] = 2e-3
    write_yaml(tmp_path / "fast.yaml", values)
    return tmp_path


def test_grid_trains_every_config_and_seed_then_skips_what_is_complete(grid):
    configs = [grid / "exp.yaml", grid / "fast.yaml"]
    invoke("grid", *configs, "--seed", "42", "--seed", "7")
    runs = sorted(p.name for p in (grid / "oof").iterdir() if (p / "cv.json").exists())
    assert runs == ["exp", "exp-seed7", "fast", "fast-seed7"]  # seed 42 is the configs' own: no suffix
    oof = {name: pd.read_csv(grid / "oof" / name / "oof.csv") for name in ("exp", "exp-seed7")}
    assert yaml.safe_load((grid / "oof" / "exp-seed7" / "config.yaml").read_text())["train"]["seed"] == 7
    assert np.abs(oof["exp-seed7"]["target"] - oof["exp"]["target"]).max() > 1e-3  # another seed, another model
    invoke("train", grid / "exp.yaml", *sets("train.seed=7", "experiment=direct7"))  # seed 7 asked for directly
    invoke("oof", grid / "exp.yaml", *sets("train.seed=7", "experiment=direct7"))
    direct = pd.read_csv(grid / "oof" / "direct7" / "oof.csv")
    np.testing.assert_allclose(oof["exp-seed7"]["target"], direct["target"], rtol=0, atol=1e-6)
    shutil.rmtree(grid / "oof" / "direct7")
    before = snapshot(grid / "oof")
    invoke("grid", *configs, "--seed", "42", "--seed", "7")
    assert snapshot(grid / "oof") == before  # nothing retrained or rewritten


def test_grid_resumes_an_interrupted_experiment(grid):
    invoke("grid", grid / "exp.yaml")
    fold1 = grid / "oof" / "exp" / "fold1"
    kept = (grid / "oof" / "exp" / "fold0" / "metrics.json").read_text()
    (fold1 / "metrics.json").unlink()  # as if killed during fold 1
    invoke("grid", grid / "exp.yaml")
    assert (fold1 / "metrics.json").exists()
    assert (grid / "oof" / "exp" / "fold0" / "metrics.json").read_text() == kept  # fold 0 was not retrained


def test_grid_refuses_a_config_edited_since_its_runs(grid):
    invoke("grid", grid / "exp.yaml")
    before = snapshot(grid / "oof")
    message = fail("grid", grid / "exp.yaml", *sets("train.lr=5e-4"))
    assert "train.lr: 0.001 -> 0.0005" in message, message
    assert snapshot(grid / "oof") == before
