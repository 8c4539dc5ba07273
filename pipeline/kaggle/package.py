"""`pipeline package`: the kit a Kaggle code competition's offline notebook needs, built from a trained
experiment or an ensemble (every member with a non-zero blend weight).

Everything is checked before anything is written (every fold finished, every member present, every model
rebuildable from its own files with no download, the metadata within kaggle-api's rules); the kit is built in a
hidden sibling folder and moved into place whole, so an interrupted run leaves no kit that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import bow, decision
from pipeline import data as D
from pipeline import quantization as Q
from pipeline.blend import blend_frames
from pipeline.config import Config
from pipeline.ensemble import leaves_of, rebase
from pipeline.errors import PipelineError
from pipeline.inference import resolve_device
from pipeline.io import folder_atomic, read_json, write_json_atomic
from pipeline.kaggle import manifest as M
from pipeline.kaggle import metadata as K
from pipeline.kaggle import wheels as W
from pipeline.model import load_saved_tokenizer, model_from_saved
from pipeline.predict import check_complete, checkpoints, predict_table
from pipeline.runs import load_run_config

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SCRIPT = "inference.py"
MEASURE_ROWS = 256  # training rows added to the test rows when measuring what fp16/bf16 weights change


@dataclass
class Member:
    name: str
    weight: float | None  # None: an input of a stacker (the manifest's `stack` says how)
    run_dir: Path
    cfg: Config
    columns: list[str]
    scikit_learn: list[str] = field(default_factory=list)  # tfidf: the versions that saved its fold models


@dataclass
class Kit:
    out: Path
    models: str
    wheels: str
    kernel: str
    competition: str
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per folder
    dependencies: dict[str, str] = field(default_factory=dict)
    difference: float | None = None  # max |fp32 - stored dtype| over the measured rows, blended
    measured_rows: int = 0

    def commands(self) -> list[str]:
        return [f"kaggle datasets create -p {self.out / 'models'} --dir-mode zip",
                f"kaggle datasets create -p {self.out / 'wheels'}",
                f"kaggle kernels push -p {self.out / 'kernel'}",
                # A code competition takes a notebook version's output, not an uploaded file.
                f"kaggle competitions submit {self.competition} -k {self.kernel} -v VERSION -f submission.csv "
                f"-m 'pipeline kit'"]


def kaggle_username() -> str | None:
    """KAGGLE_USERNAME, else ~/.kaggle/kaggle.json's username (read as a file: importing kaggle logs in)."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    path = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    try:
        return json.loads(path.read_text()).get("username")
    except (OSError, ValueError):
        return None


def members_of(experiment: str, output_dir: Path) -> tuple[list[Member], dict | None]:
    """The trained experiments the kit predicts with, and for a stacked blend how they feed its stacker.

    A weighted blend (of experiments or of weighted blends) becomes one weight per experiment, and experiments
    with weight zero are left out; a stacked blend keeps every experiment and its members' weighted sums.
    """
    run_dir = output_dir / experiment
    if not run_dir.is_dir():
        raise PipelineError(f"package: no experiment '{experiment}' in {output_dir}")
    blend = run_dir / "ensemble.json"
    saved = read_json(blend) if blend.exists() else None
    stack = None
    if saved is None:
        weights = {experiment: 1.0}
    elif saved.get("blend", {}).get("kind") == "stack":
        at = rebase(experiment, saved)  # names under the blend's output directory, as paths under output_dir
        leaves = {m: {at(leaf): v for leaf, v in saved["leaves"][m].items()} for m in saved["members"]}
        names = list(dict.fromkeys(leaf for m in leaves.values() for leaf in m))
        stack = {"members": [[leaves[m].get(n, 0.0) for n in names] for m in saved["members"]],
                 "spec": saved["blend"]}
        weights = dict.fromkeys(names)
    else:
        weights = leaves_of(output_dir, experiment)
    members = []
    for name, weight in weights.items():
        if weight is not None and weight == 0:
            continue  # nothing of it reaches the blend
        member_dir = output_dir / name
        if not (member_dir / "config.yaml").exists():
            raise PipelineError(f"package: member '{name}' of {blend} is missing ({member_dir}/config.yaml)")
        cfg = load_run_config(member_dir)
        check_complete(cfg, member_dir)
        head = D.read_table(member_dir / "fold0" / "valid_predictions.csv", "fold predictions",
                            [cfg.data.id_column], cfg.data.id_column)
        members.append(Member(name, weight, member_dir, cfg, [c for c in head.columns
                                                              if c != cfg.data.id_column]))
    first = members[0]
    for m in members[1:]:
        if (m.cfg.data.id_column, m.cfg.data.task, m.columns) != \
                (first.cfg.data.id_column, first.cfg.data.task, first.columns):
            raise PipelineError(f"package: member '{m.name}' predicts {m.columns} ({m.cfg.data.task}), "
                                f"'{first.name}' {first.columns} ({first.cfg.data.task})")
    return members, stack


def check_rebuildable(m: Member) -> None:
    """Every fold's model comes back from the run directory's own files, offline (what the kernel will do)."""
    if m.cfg.model.kind == "tfidf":
        m.scikit_learn = sorted({bow.load_fold_model(path)["scikit_learn"] for path in checkpoints(m.cfg, m.run_dir)})
        return
    backbone = m.run_dir / "backbone"
    os.environ["HF_HUB_OFFLINE"] = "1"
    problem = None if (backbone / "config.json").exists() else "no config.json"
    try:
        load_saved_tokenizer(backbone)
    except Exception as err:  # transformers' own errors too: remote code, a config it cannot read
        problem = problem or str(err)
    if problem:
        raise PipelineError(f"package: {backbone} cannot rebuild the model offline ({problem}); retrain the "
                            f"experiment with this pipeline")
    try:
        Q.check(m.cfg, resolve_device("auto"), predicting=True)  # a quantized backbone loads on CUDA only
    except PipelineError as err:
        raise PipelineError(f"package: member '{m.name}' cannot be checked here: {err}") from None
    for path in checkpoints(m.cfg, m.run_dir):
        try:
            model_from_saved(m.cfg.model, backbone, len(m.columns), torch.load(path, map_location="cpu",
                                                                                 weights_only=True))
        except Exception as err:  # any failure here is one Kaggle would hit after the upload
            raise PipelineError(f"package: {path} does not load into the model its config describes ({err})") \
                from None


def optional_dependencies(members: list[Member]) -> tuple[str, ...]:
    """The optional packages the kernel needs for these members: peft for LoRA adapters, bitsandbytes for a
    quantized backbone (shipped as wheels unless the image has them, like every other dependency)."""
    cfgs = [m.cfg.model for m in members if m.cfg.model.kind == "transformer"]
    return tuple(name for name, used in (("peft", any(c.lora_r for c in cfgs)),
                                         ("bitsandbytes", any(c.load_in for c in cfgs))) if used)


def store_weights(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    """A checkpoint, with its matrices in `dtype` when given (vectors and buffers stay float32: they are tiny,
    and the target scale's mean and std would lose digits)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dtype is None:
        shutil.copy2(src, dst)
        return
    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({k: v.to(dtype) if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}, dst)


def copy_member(m: Member, dst: Path, dtype: torch.dtype | None) -> None:
    dst.mkdir(parents=True)
    shutil.copy2(m.run_dir / "config.yaml", dst / "config.yaml")
    if m.cfg.model.kind == "tfidf":  # scikit-learn models as saved: no backbone, no torch weights to halve
        for path in checkpoints(m.cfg, m.run_dir):
            (dst / path.parent.name).mkdir()
            shutil.copy2(path, dst / path.parent.name / path.name)
        return
    shutil.copytree(m.run_dir / "backbone", dst / "backbone")
    for k, path in enumerate(checkpoints(m.cfg, m.run_dir)):
        store_weights(path, dst / f"fold{k}" / "model.pt", dtype)


def measure_rows(cfg: Config) -> pd.DataFrame:
    """The test rows and the first MEASURE_ROWS training rows (whichever of the files is here)."""
    data, parts = cfg.data, []
    for path, limit in ((data.test_path, None), (data.train_path, MEASURE_ROWS)):
        if path is not None and Path(path).is_file():
            parts.append(D.read_table(path, "data", [data.id_column, *data.text_columns], data.id_column)[:limit])
    if not parts:
        raise PipelineError(f"package: no data under {data.dir} to measure what stored weights change; run "
                            f"from the folder the experiment was trained in")
    return pd.concat(parts, ignore_index=True)


def difference(members: list[Member], stack: dict | None, kit_models: Path) -> tuple[float, int]:
    """Max |blend with fp32 weights - blend with the stored weights| over the measured rows, both in fp32."""
    rows = measure_rows(members[0].cfg)
    columns, id_col = members[0].columns, members[0].cfg.data.id_column

    def blended(where) -> np.ndarray:
        frames = [predict_table(m.cfg, where(m), rows, columns, "cpu", "fp32") for m in members]
        return blend_frames(frames, id_col, columns, [m.weight for m in members], stack)[columns].to_numpy()

    full, stored = blended(lambda m: m.run_dir), blended(lambda m: kit_models / m.name)
    return float(np.abs(full - stored).max()), len(rows)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ids(experiment: str, dataset: str | None) -> tuple[str, str, str]:
    """(models dataset, wheels dataset, kernel) ids, checked against kaggle-api's rules."""
    if dataset is None:
        owner = kaggle_username()
        if owner is None:
            raise PipelineError("package: --dataset owner/slug is needed (no Kaggle username in KAGGLE_USERNAME "
                                "or ~/.kaggle/kaggle.json)")
        slug = K.slugify(experiment)
        dataset = f"{owner}/{slug if len(slug) >= 6 else slug + '-models'}"
    owner, slug = K.split_ref(dataset, "--dataset")
    K.check_slug(slug, "--dataset", 6)
    base = slug[:K.SLUG_MAX - len("-inference")].rstrip("-")
    return dataset, f"{owner}/{base}-wheels", f"{owner}/{base}-inference"


def run(experiment: str, out: Path = Path("build/kaggle"), dataset: str | None = None,
        competition: str | None = None, weights: str = "fp32", image: Path | None = None,
        output_dir: Path = Path("oof"), gpu: bool = False) -> Kit:
    if weights not in DTYPES:
        raise PipelineError(f"package: --weights '{weights}'; choose one of {', '.join(DTYPES)}")
    output_dir, out = Path(output_dir), Path(out)
    members, stack = members_of(experiment, output_dir)
    if DTYPES[weights] is not None and all(m.cfg.model.kind == "tfidf" for m in members):
        raise PipelineError(f"package: --weights {weights} stores transformer weights in half precision, and "
                            f"'{experiment}' has none (model.kind tfidf: scikit-learn models, copied as saved); "
                            f"leave --weights at fp32")
    first = members[0].cfg
    image_spec = W.load_image(image)
    models_id, wheels_id, kernel_id = ids(experiment, dataset)
    competition = competition or K.slugify(Path(first.data.dir).name)
    models_meta = K.dataset_metadata(models_id, K.title_for(models_id.split("/")[1]))
    wheels_meta = K.dataset_metadata(wheels_id, K.title_for(wheels_id.split("/")[1]))
    kernel_slug = kernel_id.split("/")[1]
    kernel_meta = K.kernel_metadata(kernel_id, K.title_for(kernel_slug), SCRIPT, [models_id, wheels_id],
                                    competition, gpu)
    if out.exists() and any(out.iterdir()) and not (out / "models" / M.NAME).exists():
        raise PipelineError(f"package: {out} exists and is not a kit; choose another --out")
    for m in members:
        check_rebuildable(m)

    kit = Kit(out, models_id, wheels_id, kernel_id, competition)
    with folder_atomic(out) as tmp:  # a kit is whole or absent: an error leaves the earlier kit as it was
        models = tmp / "models"
        for m in members:
            copy_member(m, models / m.name, DTYPES[weights])
        stored = {"dtype": weights}
        if DTYPES[weights] is not None:
            kit.difference, kit.measured_rows = difference(members, stack, models)
            stored.update(max_abs_difference=kit.difference, measured_rows=kit.measured_rows)
        write_json_atomic(models / "dataset-metadata.json", models_meta)
        M.write(models, {
            "dataset": models_id, "experiment": experiment, "competition": competition,
            "task": first.data.task, "metric": first.metric, "id_column": first.data.id_column,
            "columns": members[0].columns, "decision": decision.load(output_dir / experiment),
            "test_file": first.data.test_file or "test.csv",
            "sample_submission_file": first.data.sample_submission_file or "sample_submission.csv",
            "members": [{"name": m.name, "dir": m.name, "weight": m.weight, "folds": m.cfg.data.n_folds,
                         "kind": m.cfg.model.kind, **({"scikit_learn": m.scikit_learn} if m.scikit_learn else {})}
                        for m in members],
            **({"stack": stack} if stack else {}),
            "weights": stored})

        wheels = tmp / "wheels"
        kit.dependencies = W.build(wheels, image_spec, optional_dependencies(members))
        project_wheel = next(p.name for p in wheels.glob(f"{W.PROJECT}-*.whl"))
        write_json_atomic(wheels / "dataset-metadata.json", wheels_meta)
        write_json_atomic(wheels / "WHEELS.json", {
            "dataset": wheels_id, "project_wheel": project_wheel, "python": image_spec["python"],
            "platform": image_spec["platform"], "files": M.file_hashes(wheels, ("WHEELS.json",
                                                                               "dataset-metadata.json"))})

        kernel = tmp / "kernel"
        kernel.mkdir()
        (kernel / SCRIPT).write_text(kernel_script(models_id, wheels_id))
        write_json_atomic(kernel / "kernel-metadata.json", kernel_meta)
        kit.sizes = {name: folder_size(tmp / name) for name in ("models", "wheels", "kernel")}
    return kit


def kernel_script(models_id: str, wheels_id: str) -> str:
    text = Path(__file__).with_name("script.py").read_text()
    for name, value in (("MODELS", models_id), ("WHEELS", wheels_id)):
        line = next(x for x in text.splitlines() if x.startswith(f"{name} = "))
        text = text.replace(line, f"{name} = {value!r}  # the {name.lower()} dataset")
    return text
