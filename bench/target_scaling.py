"""Regression targets far from zero: each `model.target_scaling` on the demo data moved to a mean of 50 and std 5.

    python bench/target_scaling.py [--set data.max_length=64] [--modes standardize mean none]

The demo's config and budget (embedded MiniLM, 2 epochs, 5 folds), the demo's texts and folds, its target
standardized and mapped to 50 + 5 z: what the words explain is unchanged, only the offset and scale. Prints each
mode's OOF CV beside the best constant's and writes bench/results/target_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import oof, train  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.demo import make_demo_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def far_data(out: Path, mean: float = 50.0, std: float = 5.0) -> Path:
    data = make_demo_data(out)
    df = pd.read_csv(data / "train.csv")
    df["target"] = mean + std * (df["target"] - df["target"].mean()) / df["target"].std()
    df.to_csv(data / "train.csv", index=False)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--modes", nargs="+", default=["standardize", "mean", "none"])
    parser.add_argument("--work", type=Path, default=ROOT / "oof" / "bench_target_scaling")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "target_scaling.json")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    data = far_data(args.work / "data")
    results = {}
    for mode in args.modes:
        cfg = load_config(ROOT / "configs" / "demo.yaml",
                          [f"data.dir={data}", f"output_dir={args.work}", f"experiment=far_{mode}",
                           f"model.target_scaling={mode}", *args.overrides])
        train.run(cfg, resume=True, progress=False)
        result = oof.run(cfg)
        results[mode] = {k: result[k] for k in ("cv", "folds", "constant", "constant_is", "train_seconds")}
        print(f"{mode}: CV {result['metric']} {result['cv']:.4f} (best constant {result['constant']:.4f}), "
              f"folds " + " ".join(f"{v:.4f}" for v in result["folds"].values()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/target_scaling.py " + " ".join(sys.argv[1:]),
                                    "overrides": args.overrides, "machine": platform.processor() or platform.machine(),
                                    "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
