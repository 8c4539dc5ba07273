"""The kit's inference, as the Kaggle notebook runs it: find the kit and the competition's files under the input
root, check the kit's hashes, predict with every member and fold, blend, write submission.csv.

Imports only predict-time code (no training, no Typer or Rich), and reads no training data: the classes and
the blend come from MANIFEST.json. `python -m pipeline.kaggle.kernel --help` for the options.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

from pipeline import data as D
from pipeline.blend import blend_frames
from pipeline.errors import PipelineError
from pipeline.io import write_csv_atomic
from pipeline.kaggle import manifest as M
from pipeline.predict import predict_table
from pipeline.runs import load_run_config
from pipeline.submission import build

MAX_DEPTH = 6  # /kaggle/input/<slug>/ or /kaggle/input/datasets/<owner>/<slug>/, and a kit's folder below


def walk(root: Path, name: str) -> list[Path]:
    """Every file called `name` under `root`, following links (Kaggle's mounts may be links), not too deep."""
    found = []
    root = Path(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        depth = len(Path(folder).relative_to(root).parts)
        if depth >= MAX_DEPTH:
            dirs[:] = []
        dirs.sort()
        if name in files:
            found.append(Path(folder) / name)
    return sorted(found)


def find_kit(root: Path, dataset: str | None = None) -> Path:
    """The folder holding the kit's MANIFEST.json (the one written for `dataset` when several are attached)."""
    kits = [p.parent for p in walk(root, M.NAME)]
    if dataset:
        kits = [k for k in kits if M.read(k).get("dataset") == dataset]
    if len(kits) != 1:
        which = f" for dataset {dataset}" if dataset else ""
        listed = ", ".join(map(str, kits)) or "none"
        raise PipelineError(f"{root}: expected one kit ({M.NAME}){which}, found {len(kits)}: {listed}; attach the "
                            f"models dataset to the notebook")
    return kits[0]


def find_competition_file(root: Path, name: str, beside: str | None, competition: str | None,
                          skip: list[Path]) -> Path:
    """The competition's `name` (test.csv, sample_submission.csv) under the input root, outside the kit.

    Where several folders hold one, the folder named after the competition wins, then the one that also holds
    `beside` (test.csv beside sample_submission.csv).
    """
    found = [p for p in walk(root, name) if not any(p.resolve().is_relative_to(s.resolve()) for s in skip)]
    for prefer in (lambda p: p.parent.name == competition, lambda p: beside and (p.parent / beside).exists()):
        if len(found) > 1 and any(prefer(p) for p in found):
            found = [p for p in found if prefer(p)]
    if len(found) != 1:
        listed = ", ".join(map(str, found)) or "none"
        raise PipelineError(f"{root}: expected one {name} of competition '{competition}', found {len(found)}: "
                            f"{listed}; attach the competition's data, or pass --test and --sample")
    return found[0]


def predict_kit(kit: Path, manifest: dict, test_path: Path, device: str | None = None,
                precision: str | None = None) -> tuple[pd.DataFrame, list[tuple[str, float]]]:
    """(blended test predictions, [(member, seconds)]) for every member's folds."""
    frames, timings = [], []
    for member in manifest["members"]:
        start = time.perf_counter()
        cfg = load_run_config(kit / member["dir"])
        test = D.load_test(cfg, test_path)
        frames.append(predict_table(cfg, kit / member["dir"], test, manifest["columns"], device, precision))
        timings.append((member["name"], time.perf_counter() - start))
    weights = [m["weight"] for m in manifest["members"]]
    return blend_frames(frames, manifest["id_column"], manifest["columns"], weights, manifest.get("stack")), timings


def run(root: Path, out: Path, dataset: str | None = None, test: Path | None = None, sample: Path | None = None,
        device: str = "auto", precision: str | None = None) -> Path:
    kit = find_kit(root, dataset)
    manifest = M.read(kit)
    M.verify(kit, manifest)
    print(f"kit: {kit} ({manifest['experiment']}, {len(manifest['members'])} member(s), hashes checked)")
    skip = [kit, *[p.parent for p in walk(root, "WHEELS.json")]]
    competition = manifest.get("competition")
    test = test or find_competition_file(root, manifest["test_file"], manifest["sample_submission_file"],
                                         competition, skip)
    sample = sample or find_competition_file(root, manifest["sample_submission_file"], manifest["test_file"],
                                             competition, skip)
    print(f"test: {test}\nsample submission: {sample}")
    preds, timings = predict_kit(kit, manifest, test, device, precision)
    for name, seconds in timings:
        print(f"{name}: {seconds:.1f}s")
    id_col = manifest["id_column"]
    sample_df = D.read_table(sample, "sample_submission", [id_col], id_col)
    classes = None if manifest["task"] == "regression" else manifest["columns"]
    submission = build(preds, sample_df, id_col, manifest["task"], classes, sample, manifest["metric"],
                       manifest.get("decision"))
    write_csv_atomic(Path(out), submission)
    print(f"submission: {out} ({len(submission)} rows)")
    return Path(out)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of the notebook's log (e.g. fold models saved by another scikit-learn than the image's)."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = show_warning
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m pipeline.kaggle.kernel", description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=Path("/kaggle/input"), help="Kaggle's input root")
    parser.add_argument("--out", type=Path, default=Path("/kaggle/working/submission.csv"))
    parser.add_argument("--dataset", help="owner/slug of the models dataset, when several kits are attached")
    parser.add_argument("--test", type=Path, help="the test CSV (default: found under --input)")
    parser.add_argument("--sample", type=Path, help="sample_submission.csv (default: found under --input)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: a GPU where there is one)")
    parser.add_argument("--precision", help="fp32, bf16, fp16 or auto (default: each member's config)")
    args = parser.parse_args(argv)
    try:
        run(args.input, args.out, args.dataset, args.test, args.sample, args.device, args.precision)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
