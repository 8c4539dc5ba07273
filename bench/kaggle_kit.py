"""The Kaggle kit of a trained experiment: its size, and its kernel's wall time offline on this CPU.

    python bench/kaggle_kit.py [--experiment commonlit] [--data ../shared/data/commonlit] [--rows 2000]

Packages the experiment twice (fp32 weights, then fp16 with the difference measured), then rehearses the fp32
kit's kernel as Kaggle runs it (`pipeline rehearse`: only the image's packages, no network, no pip
configuration) on the competition's test.csv and on a test file of --rows rows (training excerpts under new ids:
Kaggle's hidden test set is about that size). The wall time is the whole kernel: installing the wheels,
importing torch, finding and hashing the kit, predicting with every fold, writing the submission. Writes
bench/results/kaggle_kit.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inference import cpu_has_bf16  # noqa: E402
from pipeline.kaggle import package, rehearse  # noqa: E402
from pipeline.runs import load_run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def big_test(data: Path, out: Path, rows: int, id_col: str, text_cols: list[str]) -> Path:
    """A test.csv of `rows` training texts under new ids, with a sample_submission of the same form."""
    train = pd.read_csv(data / "train.csv")
    sample = pd.read_csv(data / "sample_submission.csv")
    test = pd.read_csv(data / "test.csv")
    picked = train.sample(n=rows, replace=rows > len(train), random_state=0).reset_index(drop=True)
    big = picked[[c for c in test.columns if c in picked.columns]].copy()
    big[id_col] = [f"bench{i:05d}" for i in range(rows)]
    out.mkdir(parents=True, exist_ok=True)
    big.to_csv(out / "test.csv", index=False)
    form = pd.DataFrame({id_col: big[id_col]})
    for col in sample.columns[1:]:
        form[col] = sample[col].iloc[0]
    form.to_csv(out / "sample_submission.csv", index=False)
    return out


def timed_rehearsal(kit: Path, data: Path, work: Path) -> dict:
    result = rehearse.run(kit, data, work)
    rows = len(pd.read_csv(result.submission))
    predict = sum(float(s) for s in re.findall(r": ([0-9.]+)s\n", result.output))
    return {"rows": rows, "kernel_seconds": round(result.seconds, 1), "predict_seconds": round(predict, 1),
            "isolation": result.isolation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="commonlit")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "commonlit")
    parser.add_argument("--competition", default="commonlitreadabilityprize")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench-kaggle")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kaggle_kit.json")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = load_run_config(ROOT / "oof" / args.experiment)
    results: dict = {"command": "python bench/kaggle_kit.py " + " ".join(sys.argv[1:]),
                     "machine": platform.processor() or platform.machine(), "cpu_bf16": cpu_has_bf16(),
                     "kits": {}, "rehearsals": {}}
    for weights in ("fp32", "fp16"):
        start = time.perf_counter()
        kit = package.run(args.experiment, args.work / weights, "bench/commonlit-recipe", args.competition,
                          weights, output_dir=ROOT / "oof")
        results["kits"][weights] = {"megabytes": {k: round(v / 2**20, 1) for k, v in kit.sizes.items()},
                                    "package_seconds": round(time.perf_counter() - start, 1),
                                    "max_abs_difference": kit.difference, "measured_rows": kit.measured_rows,
                                    "wheels": kit.dependencies}
        print(weights, results["kits"][weights], flush=True)
    big = big_test(args.data, args.work / "big-test", args.rows, cfg.data.id_column, cfg.data.text_columns)
    for name, data in (("competition test.csv", args.data), (f"{args.rows} rows", big)):
        results["rehearsals"][name] = timed_rehearsal(args.work / "fp32", data, args.work / "rehearsal")
        print(name, results["rehearsals"][name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
