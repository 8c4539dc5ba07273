"""One fold on two processes (torchrun, gloo, CPU) against the same fold on one: the loop's DDP path.

Every run here is a real `pipeline train` launch of two processes (tests/ddp_worker.py is `python -m pipeline`
that also records which files each process writes). torchrun, unlike `accelerate launch --cpu`, starts two
processes on a CPU; the pipeline's Accelerator joins them over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import train as T
from pipeline.config import save_config
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
# 166 rows in 2 folds: 83 validation rows (odd, so the processes' shares differ) and 83 training rows, cut in
# batches of 16 whose last (3 rows) splits 2 + 1 between the processes.
EXACT = ["data.n_folds=2", "model.dropout=0", "model.head_dropout=0", "train.precision=fp32", "train.device=cpu",
         "train.batch_size=16", "train.epochs=2", "train.eval_every=2", "train.lr=3e-3", "train.warmup_ratio=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def launch(config: Path, watched: Path, processes: int, *args: str, sleep: float = 0.0,
           wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PIPELINE_TEST_ROOT": str(watched)}
    if sleep:
        env["PIPELINE_TEST_STEP_SLEEP"] = str(sleep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(WORKER), "train", str(config), "--fold", "0", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def config_file(tmp_path: Path, backbone: Path, name: str, extra: list[str]) -> tuple[Path, object]:
    cfg = tiny_config(tmp_path, backbone, n=166, extra=EXACT + extra + [f"experiment={name}"])
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path, cfg


def fold0(cfg) -> Path:
    return cfg.run_dir / "fold0"


def test_two_processes_train_the_fold_one_process_trains(tmp_path, tiny_backbone):
    """2 processes x 8 rows of each batch of 16 = 1 process x 16 rows (dropout 0, fp32): the same weights and
    validation predictions, each of the 83 validation rows once, and only the main process writes files."""
    path, cfg = config_file(tmp_path, tiny_backbone, "ddp", [])
    done = launch(path, tmp_path / "oof", 2)  # records every write under oof/, the folds file included
    assert done.stdout.count("ddp fold 0: rmse") == 1, done.stdout  # one process reports
    metrics = json.loads((fold0(cfg) / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["valid_rows"] == 83 and metrics["steps"] == 12

    single = tiny_config(tmp_path, tiny_backbone, n=166, extra=EXACT + ["experiment=single"])
    one = T.run(single, folds=[0], progress=False)[0]
    assert one["processes"] == 1

    two = pd.read_csv(fold0(cfg) / "valid_predictions.csv")
    ref = pd.read_csv(fold0(single) / "valid_predictions.csv")
    assert len(two) == 83 and two["id"].is_unique and two["id"].tolist() == ref["id"].tolist()
    np.testing.assert_allclose(two["target"], ref["target"], rtol=1e-5, atol=1e-5)
    assert metrics["best_step"] == one["best_step"]
    np.testing.assert_allclose(metrics["score"], one["score"], rtol=1e-5)
    state_two, state_one = torch.load(fold0(cfg) / "model.pt"), torch.load(fold0(single) / "model.pt")
    for key in state_one:
        torch.testing.assert_close(state_two[key], state_one[key], rtol=1e-5, atol=1e-5, msg=key)
    log_two, log_one = pd.read_csv(fold0(cfg) / "log.csv"), pd.read_csv(fold0(single) / "log.csv")
    np.testing.assert_allclose(log_two["lr"], log_one["lr"])  # the schedule counts optimizer steps
    np.testing.assert_allclose(log_two["train_loss"], log_one["train_loss"], rtol=1e-5)

    writes = {r: (tmp_path / f"rank{r}.writes") for r in (0, 1)}
    assert writes[0].exists() and "metrics.json" in writes[0].read_text()
    assert not writes[1].exists(), writes[1].read_text()  # rank 1 wrote nothing: not even the folds file


def test_two_processes_share_each_token_budgeted_batch_as_one_process_trains_it(tmp_path, tiny_backbone):
    """train.max_tokens budgets the global batch, as batch_size counts its rows: both processes cut the same
    budgeted batches (4, 6 or 12 rows at widths 24, 16 and 8) and each takes its share, so two train what one does."""
    budget = ["train.max_tokens=96"]
    path, cfg = config_file(tmp_path, tiny_backbone, "ddp_tokens", budget)
    launch(path, tmp_path / "oof", 2)
    metrics = json.loads((fold0(cfg) / "metrics.json").read_text())
    single = tiny_config(tmp_path, tiny_backbone, n=166, extra=EXACT + budget + ["experiment=single_tokens"])
    one = T.run(single, folds=[0], progress=False)[0]
    assert metrics["processes"] == 2 and metrics["steps"] == one["steps"] > 12  # more batches than 83 rows / 16
    two, ref = pd.read_csv(fold0(cfg) / "valid_predictions.csv"), pd.read_csv(fold0(single) / "valid_predictions.csv")
    assert two["id"].tolist() == ref["id"].tolist()
    np.testing.assert_allclose(two["target"], ref["target"], rtol=1e-5, atol=1e-5)
    log_two, log_one = pd.read_csv(fold0(cfg) / "log.csv"), pd.read_csv(fold0(single) / "log.csv")
    np.testing.assert_allclose(log_two["train_loss"], log_one["train_loss"], rtol=1e-5)


def test_two_processes_train_a_staged_fold_as_one_process(tmp_path, tiny_backbone):
    """Pseudo-label stage mode: the second stage's optimizer and schedule, prepared on the running accelerator
    beside the DDP model, step as on one process."""
    from pipeline import bow
    from pipeline import pseudo as P
    from tests.test_pseudo import teacher_config

    config_file(tmp_path, tiny_backbone, "data", [])  # writes the dataset
    teacher = teacher_config(tmp_path, tmp_path / "data", "regression")
    bow.run(teacher)
    staged = [f"train.pseudo={P.write(teacher, teacher.data.train_path)}", "train.pseudo_epochs=1",
              "train.pseudo_lr=1e-3", "train.epochs=1"]
    path, cfg = config_file(tmp_path, tiny_backbone, "ddp", staged)
    launch(path, tmp_path / "oof", 2)
    single = tiny_config(tmp_path, tiny_backbone, n=166, extra=EXACT + staged + ["experiment=single"])
    one = T.run(single, folds=[0], progress=False)[0]
    two = json.loads((fold0(cfg) / "metrics.json").read_text())
    assert two["processes"] == 2 and two["pseudo_steps"] == one["pseudo_steps"] == 6 and two["steps"] == 12
    assert two["best_step"] == one["best_step"] > 6
    np.testing.assert_allclose(two["score"], one["score"], rtol=1e-5)
    log_two, log_one = pd.read_csv(fold0(cfg) / "log.csv"), pd.read_csv(fold0(single) / "log.csv")
    assert log_two["stage"].tolist() == log_one["stage"].tolist() == ["pseudo"] * 3 + ["true"] * 3
    np.testing.assert_allclose(log_two["lr"], log_one["lr"])
    np.testing.assert_allclose(log_two[["train_loss", "rmse"]], log_one[["train_loss", "rmse"]], rtol=1e-5)


def test_a_two_process_run_killed_by_a_signal_resumes_to_the_same_predictions(tmp_path, tiny_backbone):
    """With dropout on (each process's own masks, saved per process), SIGKILL mid-fold then --resume ends where
    an uninterrupted two-process run ends."""
    extra = ["model.dropout=0.1", "model.head_dropout=0.1", "train.eval_every=1"]
    whole_path, whole = config_file(tmp_path, tiny_backbone, "whole", extra)
    launch(whole_path, whole.run_dir, 2)

    path, cfg = config_file(tmp_path, tiny_backbone, "killed", extra)
    proc = launch(path, cfg.run_dir, 2, sleep=0.3, wait=False)
    state = fold0(cfg) / "state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["step"] >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(state, weights_only=False)
    assert not (fold0(cfg) / "metrics.json").exists() and 3 <= saved["step"] < 12
    assert isinstance(saved["rng"], list) and len(saved["rng"]) == 2  # each process's generator

    launch(path, cfg.run_dir, 2, "--resume")
    resumed = pd.read_csv(fold0(cfg) / "valid_predictions.csv")
    reference = pd.read_csv(fold0(whole) / "valid_predictions.csv")
    assert resumed["id"].tolist() == reference["id"].tolist()
    np.testing.assert_array_equal(resumed["target"].to_numpy(), reference["target"].to_numpy())
    log, ref_log = pd.read_csv(fold0(cfg) / "log.csv"), pd.read_csv(fold0(whole) / "log.csv")
    np.testing.assert_array_equal(log["rmse"], ref_log["rmse"])
    assert not state.exists()


@pytest.mark.parametrize("world", [2, 3])
def test_the_shares_of_any_batch_weight_to_the_batch_mean(world):
    """DDP averages the processes' gradients: weighted shares must average to the whole batch's mean loss, each
    row counted once, for batches that do not divide and batches smaller than the process count."""
    from pipeline.distributed import shard

    values = np.random.default_rng(0).normal(size=20)
    for n in range(1, 12):
        batch = list(range(100, 100 + n))
        shares = [shard(batch, rank, world) for rank in range(world)]
        counted = [p for rows, weight in shares if weight > 0 for p in rows]
        assert sorted(counted) == batch  # every row once; a process left without rows runs one at weight 0
        mean = sum(weight * values[np.array(rows) - 100].mean() for rows, weight in shares) / world
        np.testing.assert_allclose(mean, values[:n].mean(), rtol=1e-12)
    assert shard([5, 6, 7], 0, 1) == ([5, 6, 7], 1.0)
