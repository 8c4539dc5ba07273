"""`pipeline grid --backend ray`: one process per fold, side by side on the GPUs Ray hands out, finished folds
skipped, a failed fold reported by name while the others finish, and the same numbers as the local backend.

One Ray for the whole session (it takes seconds to start), with 2 CPUs and 2 GPUs that are declared, not present:
Ray hands out their ids all the same. Most tests train with a stand-in for `pipeline train` that writes a fold as a
real one would; one trains the tiny BERT for real.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import grid_ray
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.folds import folds_path
from tests.test_reliability import build, fail, fail_untouched, invoke, sets, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

# Stands in for `pipeline train CONFIG --fold K --resume --set ...`: reads the same arguments, sleeps, and writes
# config.yaml, the fold's predictions and metrics.json as training does; records its GPUs and when it ran.
FAKE_TRAIN = '''
import csv, json, os, sys, time
from pathlib import Path

import yaml
from pipeline.config import load_config

records, folds_csv, failing, _train, config, _fold, fold, _resume, *sets = sys.argv[1:]
cfg, fold, start = load_config(config, sets[1::2]), int(fold), time.time()
time.sleep(2)
Path(records, f"{cfg.experiment}-{fold}-{start}.json").write_text(json.dumps(
    {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}))
if f"{cfg.experiment} fold {fold}" == failing:
    sys.exit(f"boom: {cfg.experiment} fold {fold}")
out = cfg.run_dir / f"fold{fold}"
out.mkdir(parents=True, exist_ok=True)
(cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
with open(folds_csv) as f:
    ids = [row["id"] for row in csv.DictReader(f) if int(row["fold"]) == fold]
(out / "valid_predictions.csv").write_text("id,target\\n" + "".join(f"{i},0.5\\n" for i in ids))
(out / "metrics.json").write_text(json.dumps({"fold": fold, "score": 0.0, "train_seconds": 2.0}))
'''


@pytest.fixture(scope="session")
def ray_session():
    """The session's Ray: 2 CPUs, 2 declared GPUs; the backend joins it instead of starting its own."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # an empty one would contradict the declared GPUs
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


def ray_grid(*args, exit_code: int = 0) -> str:
    """`pipeline grid ... --backend ray`; its output (job lines to stdout, the error to stderr)."""
    result = runner.invoke(app, ["grid", *map(str, args), "--backend", "ray"])
    assert result.exit_code == exit_code, result.output
    return result.output


class FakeTrain:
    """The stand-in's records (one per job that ran, failed ones included), and the job it should fail."""

    def __init__(self, folder: Path):
        self.folder, self.failing = folder, ""

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.iterdir())]


@pytest.fixture
def fake_train(tmp_path, tiny_backbone, monkeypatch, ray_session) -> FakeTrain:
    """exp.yaml over 2 folds, its jobs run by the stand-in."""
    return stand_in(tmp_path, tiny_backbone, monkeypatch)


@pytest.fixture
def fake_processes(tmp_path, tiny_backbone, monkeypatch) -> FakeTrain:
    """The same for `--backend processes`, which needs no Ray."""
    return stand_in(tmp_path, tiny_backbone, monkeypatch)


def stand_in(tmp_path, tiny_backbone, monkeypatch) -> FakeTrain:
    build(tmp_path, tiny_backbone, ["train.precision=fp32", "train.device=cpu"])
    script, fake = tmp_path / "fake_train.py", FakeTrain(tmp_path / "records")
    script.write_text(FAKE_TRAIN)
    fake.folder.mkdir()
    folds_csv = folds_path(load_config(tmp_path / "exp.yaml"))
    monkeypatch.setattr(grid_ray, "train_command", lambda job, gpus: [
        sys.executable, str(script), str(fake.folder), str(folds_csv), fake.failing, *grid_ray.train_args(job)])
    return fake


def most_at_once(records: list[dict]) -> int:
    return max(sum(r["start"] <= s["start"] < r["end"] for r in records) for s in records)


def test_folds_run_two_at_once_one_gpu_each_and_a_rerun_runs_nothing(tmp_path, fake_train):
    out = ray_grid(tmp_path / "exp.yaml", "--seed", "42", "--seed", "7", "--gpus-per-job", "1")
    jobs = fake_train.records()
    assert len(jobs) == 4, out  # exp and exp-seed7, 2 folds each
    assert all(j["devices"] in ("0", "1") for j in jobs), jobs  # exactly one GPU each, of the two declared
    assert most_at_once(jobs) == 2  # 2 GPUs: two folds side by side, never three
    for a in jobs:
        for b in jobs:
            if a is not b and a["start"] <= b["start"] < a["end"]:
                assert a["devices"] != b["devices"], jobs  # side by side, never on the same GPU
    for name in ("exp", "exp-seed7"):
        assert (tmp_path / "oof" / name / "oof.csv").exists()  # gathered
        for k in (0, 1):
            assert f"{name} fold {k}: done in" in out
    saved = yaml.safe_load((tmp_path / "oof" / "exp-seed7" / "config.yaml").read_text())
    assert saved["train"]["seed"] == 7  # the job was given the seed's overrides

    before = snapshot(tmp_path / "oof")
    out = ray_grid(tmp_path / "exp.yaml", "--seed", "42", "--seed", "7", "--gpus-per-job", "1")
    assert len(fake_train.records()) == 4 and snapshot(tmp_path / "oof") == before
    assert "exp: complete, skipped" in out and "exp-seed7: complete, skipped" in out

    message = fail("grid", tmp_path / "exp.yaml", *sets("train.lr=5e-4"), "--backend", "ray")
    assert "train.lr: 0.001 -> 0.0005" in message, message
    assert len(fake_train.records()) == 4 and snapshot(tmp_path / "oof") == before  # refused before any job started


def test_a_job_of_two_gpus_gets_both_and_runs_alone(tmp_path, fake_train):
    """--gpus-per-job 2 (one fold by DDP on two GPUs): each job sees both declared GPUs, so one job at a time."""
    ray_grid(tmp_path / "exp.yaml", "--gpus-per-job", "2")
    jobs = fake_train.records()
    assert len(jobs) == 2 and all(sorted(j["devices"].split(",")) == ["0", "1"] for j in jobs), jobs
    assert most_at_once(jobs) == 1


def test_a_failed_fold_is_reported_by_name_while_the_others_finish(tmp_path, fake_train):
    # One job at a time, on CPUs: the failing job runs first and the three others still run after it.
    fake_train.failing = "exp fold 0"
    grid = (tmp_path / "exp.yaml", "--seed", "42", "--seed", "7", "--gpus-per-job", "0", "--max-parallel", "1")
    out = ray_grid(*grid, exit_code=1)
    reported = [line for line in out.splitlines() if ": failed (exit" in line]
    assert len(reported) == 1 and reported[0].startswith("exp fold 0: failed (exit 1)"), out
    assert "    boom: exp fold 0" in out, out  # the last lines of its stderr
    assert "error: 1 of 4 job(s) failed: exp fold 0 (exit 1)." in out, out
    runs = tmp_path / "oof"
    finished = {(n, k) for n in ("exp", "exp-seed7") for k in (0, 1)
                if (runs / n / f"fold{k}" / "metrics.json").exists()}
    assert finished == {("exp", 1), ("exp-seed7", 0), ("exp-seed7", 1)}, out  # the others went on
    assert (runs / "exp-seed7" / "oof.csv").exists() and not (runs / "exp" / "oof.csv").exists()
    jobs = fake_train.records()
    assert most_at_once(jobs) == 1 and {j["devices"] for j in jobs} == {""}  # no GPU for a CPU job

    fake_train.failing = ""
    kept = (runs / "exp" / "fold1" / "metrics.json").stat().st_mtime_ns
    out = ray_grid(*grid)
    assert len(fake_train.records()) == 5 and "1 job(s)" in out, out  # only the failed fold ran again
    assert (runs / "exp" / "oof.csv").exists()
    assert (runs / "exp" / "fold1" / "metrics.json").stat().st_mtime_ns == kept


def test_ray_backend_trains_the_same_folds_as_the_local_one(tmp_path, tiny_backbone, ray_session):
    extra = ["train.precision=fp32", "train.device=cpu", "train.num_threads=1"]
    local, remote = (build(tmp_path / name, tiny_backbone, extra) for name in ("local", "ray"))
    invoke("grid", local, "--seed", "7", "--backend", "local")
    out = ray_grid(remote, "--seed", "7", "--gpus-per-job", "0")
    assert "exp-seed7 fold 1: done in" in out, out
    runs = {name: tmp_path / name / "oof" / "exp-seed7" for name in ("local", "ray")}
    for k in (0, 1):
        scores = [json.loads((runs[n] / f"fold{k}" / "metrics.json").read_text())["score"] for n in runs]
        np.testing.assert_allclose(scores[1], scores[0], rtol=0, atol=1e-6)
    oof = {n: pd.read_csv(runs[n] / "oof.csv") for n in runs}
    assert (oof["ray"][["id", "fold"]] == oof["local"][["id", "fold"]]).all().all()
    np.testing.assert_allclose(oof["ray"]["target"], oof["local"]["target"], rtol=0, atol=1e-6)


def test_a_job_on_several_gpus_is_launched_by_accelerate_one_process_per_gpu(tmp_path):
    job = grid_ray.Job(tmp_path / "exp.yaml", ("train.seed=7", "experiment=exp-seed7"), "exp-seed7", 1)
    train = f"-m pipeline.cli train {tmp_path / 'exp.yaml'} --fold 1 --resume --set train.seed=7 " \
            f"--set experiment=exp-seed7"
    line = " ".join(grid_ray.train_command(job, 2))
    assert "accelerate launch --multi_gpu --num_processes 2 " in line and line.endswith(train), line
    assert " ".join(grid_ray.train_command(job, 1)) == f"{sys.executable} {train}"


def test_processes_run_two_folds_at_once_on_half_the_cores_each_and_a_rerun_runs_nothing(tmp_path, fake_processes):
    """`--backend processes`: Ray's scheduling without Ray, for one machine's CPUs (a 2-core CPU grid runs two
    one-thread folds side by side); a failed fold is reported by name while the others finish."""
    fake_processes.failing = "exp-seed7 fold 1"
    grid = ("grid", tmp_path / "exp.yaml", "--seed", "42", "--seed", "7", "--backend", "processes")
    result = runner.invoke(app, list(map(str, grid)))
    assert result.exit_code == 1 and "error: 1 of 4 job(s) failed: exp-seed7 fold 1 (exit 1)" in result.output
    assert "4 job(s), 2 at once" in result.output and "exp fold 0: done in" in result.output, result.output
    jobs = fake_processes.records()
    assert len(jobs) == 4 and most_at_once(jobs) == 2, jobs
    saved = yaml.safe_load((tmp_path / "oof" / "exp" / "config.yaml").read_text())["train"]
    assert saved["num_threads"] == max(1, os.cpu_count() // 2) and saved["seed"] == 42
    assert (tmp_path / "oof" / "exp" / "oof.csv").exists() and not (tmp_path / "oof" / "exp-seed7" / "oof.csv").exists()

    fake_processes.failing = ""
    result = runner.invoke(app, [*map(str, grid), "--max-parallel", "3", *sets("train.num_threads=1")])
    assert result.exit_code == 0 and "1 job(s), 3 at once" in result.output, result.output  # only the failed fold
    assert yaml.safe_load((tmp_path / "oof" / "exp-seed7" / "config.yaml").read_text())["train"]["num_threads"] == 1
    assert "exp: complete, skipped" in result.output and (tmp_path / "oof" / "exp-seed7" / "oof.csv").exists()
    message = fail(*grid, "--gpus-per-job", "1")
    assert "--gpus-per-job and --address are options of --backend ray" in message, message


def test_processes_backend_trains_the_same_folds_as_the_local_one(tmp_path, tiny_backbone):
    extra = ["train.precision=fp32", "train.device=cpu", "train.num_threads=1"]
    local, pool = (build(tmp_path / name, tiny_backbone, extra) for name in ("local", "pool"))
    invoke("grid", local, "--seed", "7", "--backend", "local")
    invoke("grid", pool, "--seed", "7", "--backend", "processes")
    runs = {name: tmp_path / name / "oof" / "exp-seed7" for name in ("local", "pool")}
    oof = {n: pd.read_csv(runs[n] / "oof.csv") for n in runs}
    assert (oof["pool"][["id", "fold"]] == oof["local"][["id", "fold"]]).all().all()
    np.testing.assert_allclose(oof["pool"]["target"], oof["local"]["target"], rtol=0, atol=1e-6)


def test_gpus_beyond_the_cluster_are_refused_before_anything_is_written(tmp_path, tiny_backbone, ray_session):
    config = build(tmp_path, tiny_backbone)
    message = fail_untouched(tmp_path, "grid", config, "--backend", "ray", "--gpus-per-job", "3")
    assert "each job asks for 3 GPU(s), but the Ray cluster has 2" in message, message
    message = fail("grid", config, "--gpus-per-job", "1")  # the local backend has no such option
    assert "options of --backend ray" in message, message


def test_without_ray_the_backend_says_how_to_install_it(tmp_path, tiny_backbone, monkeypatch):
    config = build(tmp_path, tiny_backbone)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    message = fail_untouched(tmp_path, "grid", config, "--backend", "ray")
    assert "pip install 'pipeline[ray]'" in message, message
