"""Train and gather a set of experiments over several seeds, skipping what is already complete.

A run for seed s of configs/x.yaml is `oof/x/` when s is the config's own seed and `oof/x-seed<s>/` otherwise,
which is how the report groups seeds. Interrupted runs continue from their last saved state. This is the local
backend, fold after fold in this process; grid_ray.py trains the folds side by side, each in its own process.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline import oof, train
from pipeline.config import Config, load_config
from pipeline.runs import check_same_config

console = Console()


def seed_overrides(path: Path, seed: int | None, overrides: list[str]) -> list[str]:
    """The overrides that make `path` the run for `seed`: what `pipeline train` needs to train that same run."""
    cfg = load_config(path, overrides)
    if seed is None or seed == cfg.train.seed:
        return list(overrides)
    return [*overrides, f"train.seed={seed}", f"experiment={cfg.experiment}-seed{seed}"]


def seed_config(path: Path, seed: int | None, overrides: list[str]) -> Config:
    return load_config(path, seed_overrides(path, seed, overrides))


def run(configs: list[Path], seeds: list[int] | None, overrides: list[str]) -> list[str]:
    """Returns the run names, in order; each is complete (all folds, oof.csv) when this returns."""
    names = []
    for path in configs:
        for seed in seeds or [None]:
            cfg = seed_config(path, seed, overrides)
            check_same_config(cfg, cfg.run_dir)  # an edited YAML must not be reported with its old results
            if (cfg.run_dir / "cv.json").exists() and not oof.missing_folds(cfg):
                console.print(f"{cfg.experiment}: complete, skipped")
            else:
                train.run(cfg, resume=True)
                result = oof.run(cfg)
                console.print(f"{cfg.experiment}: CV {result['metric']} {result['cv']:.5f}")
            names.append(cfg.experiment)
    return names
