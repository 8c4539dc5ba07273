"""`pipeline rehearse`: run a kit's kernel here the way Kaggle will, before uploading it.

- An environment holding only what the image file lists: a new virtual environment into which the listed
  distributions (and what they require) are linked from this one. The project and any dependency the image lacks
  are absent, so only the kit's wheels can supply them.
- A Kaggle-like input tree: the competition's files under <root>/<competition>/, the two datasets under
  <root>/datasets/<owner>/<slug>/ (the kernel must find them by their JSON, not by a fixed path).
- No network (`unshare -n`, else sockets refused in-process), no package index, and no pip configuration or
  PIP_* variable from this machine: those point at local wheel folders and would hide a missing wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.kaggle import wheels as W
from pipeline.runs import load_run_config

BLOCK_SOCKETS = '''import socket

def _refuse(*args, **kwargs):
    raise OSError("network disabled: this rehearsal runs offline, as Kaggle's scoring run does")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
'''


@dataclass
class Rehearsal:
    submission: Path
    seconds: float
    output: str
    isolation: str


def image_closure(packages: set[str]) -> list[metadata.Distribution]:
    """The installed distributions the image lists, and everything they require (Kaggle has those too)."""
    from packaging.requirements import Requirement

    seen: dict[str, metadata.Distribution] = {}
    todo = list(packages)
    while todo:
        name = W.canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # listed but not installed here: nothing in the kernel can need it
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def image_env(dest: Path, image: dict) -> Path:
    """A virtual environment at `dest` with only the image's distributions (linked, not copied); its python."""
    python, marker = dest / "bin" / "python", dest / "IMAGE.json"
    wanted = json.dumps(sorted(image["packages"]))
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    shutil.rmtree(dest, ignore_errors=True)  # built for another image file
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
    site = next((tmp / "lib").glob("python3*/site-packages"))
    for dist in image_closure(image["packages"]):
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source, target = base / top, site / top
            if source.exists() and not target.exists() and top != "__pycache__":
                target.symlink_to(source)
    (tmp / "IMAGE.json").write_text(wanted)
    os.replace(tmp, dest)
    return python


def input_tree(root: Path, kit: Path, competition_dir: Path) -> Path:
    """<root>/<competition>/ with the competition's files; <root>/datasets/<owner>/<slug>/ for each dataset."""
    manifest = read_json(kit / "models" / "MANIFEST.json")
    shutil.rmtree(root, ignore_errors=True)
    (root / manifest["competition"]).mkdir(parents=True)
    for name in (manifest["test_file"], manifest["sample_submission_file"]):
        if not (competition_dir / name).is_file():
            raise PipelineError(f"rehearse: {competition_dir / name} not found")
        shutil.copy2(competition_dir / name, root / manifest["competition"] / name)
    for folder in ("models", "wheels"):
        ref = read_json(kit / folder / "dataset-metadata.json")["id"]
        target = root / "datasets" / ref
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(kit / folder, target)  # a copy: the kernel must not depend on this machine's paths
    return root


def offline_prefix() -> tuple[list[str], str]:
    """`unshare -n` where this machine allows it; otherwise sockets are refused inside Python."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"], "unshare -n (no network namespace)"
    return [], "sockets refused in-process (sitecustomize)"


def run(kit: Path, competition_dir: Path | None, work: Path, image: Path | None = None) -> Rehearsal:
    """Run kit/kernel/inference.py offline in a fresh image-like environment; the submission it wrote.

    `competition_dir` holds test.csv and sample_submission.csv; by default, the data folder the first member
    was trained on.
    """
    kit, work = Path(kit).resolve(), Path(work).resolve()
    if not (kit / "models" / "MANIFEST.json").exists():
        raise PipelineError(f"rehearse: {kit} is not a kit (no models/MANIFEST.json); run pipeline package")
    if competition_dir is None:
        first = read_json(kit / "models" / "MANIFEST.json")["members"][0]["dir"]
        competition_dir = Path(load_run_config(kit / "models" / first).data.dir)
    spec = W.load_image(image)
    python = image_env(work / "image-env", spec)
    env_dir = work / "run"
    shutil.rmtree(env_dir, ignore_errors=True)
    root = input_tree(env_dir / "input", kit, Path(competition_dir))
    working = env_dir / "working"
    working.mkdir()
    # A copy of the env for this run: what the kernel pip-installs must not leak into the next rehearsal.
    venv = env_dir / "env"
    shutil.copytree(python.parents[1], venv, symlinks=True)
    prefix, isolation = offline_prefix()
    if not prefix:
        site = next((venv / "lib").glob("python3*/site-packages"))
        (site / "sitecustomize.py").write_text(BLOCK_SOCKETS)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(env_dir), "PIP_CONFIG_FILE": os.devnull,
           "PIPELINE_KAGGLE_INPUT": str(root), "PIPELINE_KAGGLE_OUTPUT": str(working), "LANG": "C.UTF-8"}
    start = time.perf_counter()
    result = subprocess.run([*prefix, str(venv / "bin" / "python"), str(kit / "kernel" / "inference.py")],
                            cwd=working, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise PipelineError(f"rehearse: the kernel failed (exit {result.returncode}) offline, with only the "
                            f"image's packages:\n{output.strip()[-3000:]}")
    return Rehearsal(working / "submission.csv", seconds, output, isolation)
