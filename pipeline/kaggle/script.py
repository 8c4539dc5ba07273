"""Kaggle inference kernel written by `pipeline package`: offline, it installs the pipeline from the attached
wheels dataset, then predicts the competition's test set with the attached models dataset.

Standard library only until the wheels are installed. Kaggle mounts datasets under /kaggle/input at more
than one path, so both datasets are found by the JSON file at their top (MANIFEST.json, WHEELS.json) and the
dataset id written in it. PIPELINE_KAGGLE_INPUT and PIPELINE_KAGGLE_OUTPUT move the roots (for rehearsals).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

MODELS = "owner/models-slug"  # the models dataset, written by `pipeline package`
WHEELS = "owner/wheels-slug"  # the wheels dataset, written by `pipeline package`
INPUT = Path(os.environ.get("PIPELINE_KAGGLE_INPUT", "/kaggle/input"))
OUTPUT = Path(os.environ.get("PIPELINE_KAGGLE_OUTPUT", "/kaggle/working"))


def find(name, dataset):
    """The folder under INPUT holding the file `name` whose "dataset" is `dataset`."""
    found = []
    for folder, dirs, files in os.walk(INPUT, followlinks=True):
        if len(Path(folder).relative_to(INPUT).parts) >= 6:
            dirs[:] = []
        if name in files and json.loads((Path(folder) / name).read_text()).get("dataset") == dataset:
            found.append(Path(folder))
    if len(found) != 1:
        sys.exit(f"error: expected one {name} of dataset {dataset} under {INPUT}, found {found or 'none'}; "
                 f"attach the dataset to the notebook")
    return found[0]


def install(wheels):
    """pip install from the wheels folder alone: no index, hashes checked first."""
    listed = json.loads((wheels / "WHEELS.json").read_text())
    for name, digest in listed["files"].items():
        path = wheels / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            sys.exit(f"error: {path} is missing or differs from WHEELS.json; upload the wheels again")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--quiet"]
    steps = [["--no-deps", "--force-reinstall", str(wheels / listed["project_wheel"])]]
    if (wheels / "requirements.txt").read_text().strip():
        steps.insert(0, ["-r", str(wheels / "requirements.txt")])
    for args in steps:
        if subprocess.run([*pip, *args]).returncode != 0:
            sys.exit(f"error: pip could not install {args[-1]} from {wheels} alone (no index, no network): a "
                     f"wheel is missing or not for this Python ({sys.version.split()[0]}); run pipeline package "
                     f"with the image file of this Kaggle image")


def main():
    install(find("WHEELS.json", WHEELS))
    command = [sys.executable, "-m", "pipeline.kaggle.kernel", "--input", str(INPUT), "--dataset", MODELS,
               "--out", str(OUTPUT / "submission.csv")]
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
