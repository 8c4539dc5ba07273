"""`pipeline grid --backend ray` (or `processes`): every unfinished fold of every (config, seed) run trained side by
side, one `pipeline train --fold K --resume` process per fold, inside a Ray task that holds the fold's GPUs, or
(`processes`, no Ray) a pool of processes on this machine that share its CPU cores.

A process, not a model inside the Ray worker: Ray pins a task to its GPUs through CUDA_VISIBLE_DEVICES, which must
be set before torch starts, and a fold that crashes (out of memory, a bad value) takes only itself down. What is
finished is read from the run directories, as the local backend reads it, so the same command resumes an interrupted
grid. On a cluster, every machine must see the driver's working directory at the same path (jobs start there) and
the run directories on a shared filesystem (the driver gathers the OOF from them).
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from pipeline import oof
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.folds import make_folds
from pipeline.grid import seed_overrides
from pipeline.grid_job import run_job
from pipeline.runs import check_same_config, missing_folds

console = Console()
STDERR_LINES = 6  # of a failed job's stderr, shown in its report: enough for the error and where it came from


@dataclass(frozen=True)
class Job:
    """One fold of one run: what one Ray task trains."""

    config: Path  # absolute, since the process may start on another machine
    overrides: tuple[str, ...]
    experiment: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.experiment} fold {self.fold}"


def train_args(job: Job) -> list[str]:
    """`pipeline train` arguments for the job: the local backend's overrides, so both train the same run."""
    sets = [part for o in job.overrides for part in ("--set", o)]
    return ["train", str(job.config), "--fold", str(job.fold), "--resume", *sets]


def train_command(job: Job, gpus: int) -> list[str]:
    """The job's command line; with several GPUs, one process per GPU under `accelerate launch`."""
    module = ["-m", "pipeline.cli", *train_args(job)]
    if gpus > 1:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        # Port 0: accelerate picks a free one, so two jobs on one machine do not both take the default 29500.
        return [accelerate, "launch", "--multi_gpu", "--num_processes", str(gpus), "--main_process_port", "0",
                *module]
    return [sys.executable, *module]


def import_ray():
    try:
        import ray
    except ImportError:
        raise PipelineError("--backend ray needs Ray, an optional dependency: pip install 'pipeline[ray]' "
                            "(or pip install 'ray>=2.9')") from None
    return ray


def plan(configs: list[Path], seeds: list[int] | None, overrides: list[str]) -> dict[str, tuple[Config, Path, tuple]]:
    """Each run's config, YAML and overrides, by experiment name. Refused before anything trains: a run directory
    that holds other settings, and two configs that would write one run directory at the same time."""
    runs: dict[str, tuple[Config, Path, tuple]] = {}
    for path in configs:
        for seed in seeds or [None]:
            extra = seed_overrides(path, seed, overrides)
            cfg = load_config(path, extra)
            check_same_config(cfg, cfg.run_dir)  # an edited YAML must not be reported with its old results
            if cfg.experiment not in runs:
                runs[cfg.experiment] = cfg, Path(path).resolve(), tuple(extra)
            elif runs[cfg.experiment][0].to_dict() != cfg.to_dict():
                raise PipelineError(f"{runs[cfg.experiment][1]} and {path} both name the run {cfg.experiment}, "
                                    f"with other settings; rename one")
    return runs


def connect(ray, address: str | None) -> bool:
    """Reuse the Ray this process has already joined, join the one at `address`, or start one on this machine.
    Returns whether it was started here, and so must be shut down here."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False if not address else None, log_to_driver=False)
    except ConnectionError as err:
        raise PipelineError(f"no Ray cluster at --address {address}: {err} (start one with `ray start --head`)") \
            from None
    return True


def run(configs: list[Path], seeds: list[int] | None, overrides: list[str], gpus_per_job: int | None = None,
        address: str | None = None, max_parallel: int | None = None, backend: str = "ray") -> list[str]:
    """Train every unfinished fold as a Ray task (`backend` "processes": a process of a local pool), then gather
    each run whose folds all finished.

    A failed job does not stop the others; the failures are raised together at the end, after the gathering.
    `gpus_per_job` None: 1 if the Ray cluster has GPUs, else 0 (CPU jobs, with the GPUs hidden from them).
    `max_parallel` for processes: None is 2. Returns the run names, in order.
    """
    ray = import_ray() if backend == "ray" else None
    runs = plan(configs, seeds, overrides)
    jobs, to_gather = [], []
    for name, (cfg, path, extra) in runs.items():
        missing = missing_folds(cfg)
        if not missing and (cfg.run_dir / "cv.json").exists():
            console.print(f"{name}: complete, skipped")
            continue
        to_gather.append(name)
        jobs += [Job(path, extra, name, k) for k in missing]
    failed = []

    def make_all_folds():  # once, here, rather than by every job of a run at the same moment
        for name in dict.fromkeys(job.experiment for job in jobs):
            make_folds(runs[name][0])

    if jobs and ray is None:
        make_all_folds()
        failed = schedule_processes(jobs, max_parallel or 2)
    elif jobs:
        started = connect(ray, address)
        try:
            gpus = gpus_for_jobs(ray, gpus_per_job)  # refused before anything is written
            make_all_folds()
            failed = schedule(ray, jobs, gpus, max_parallel)
        finally:
            if started:
                ray.shutdown()
    for name in to_gather:
        cfg = runs[name][0]
        if not missing_folds(cfg):
            result = oof.run(cfg)
            console.print(f"{name}: CV {result['metric']} {result['cv']:.5f}")
    if failed:
        listed = "; ".join(f"{job.name} (exit {result['exit']})" for job, result in failed)
        raise PipelineError(f"{len(failed)} of {len(jobs)} job(s) failed: {listed}. Finished folds are kept: the same "
                            f"command trains only the rest")
    return list(runs)


def gpus_for_jobs(ray, gpus_per_job: int | None) -> int:
    """GPUs per job: as asked, if the cluster has that many; else 1 where there are GPUs, 0 where there are none."""
    available = ray.cluster_resources().get("GPU", 0)
    if gpus_per_job is None:
        return 1 if available else 0
    if gpus_per_job > available:
        raise PipelineError(f"each job asks for {gpus_per_job} GPU(s), but the Ray cluster has {available:g}; "
                            f"use --gpus-per-job {int(available)} or fewer (0: train on CPUs)")
    return gpus_per_job


def schedule(ray, jobs: list[Job], gpus: int, max_parallel: int | None) -> list[tuple[Job, dict]]:
    """Run the jobs, at most `max_parallel` at once (else as many as the cluster's free resources allow), printing
    each one's outcome as it ends. Returns the failed jobs with their results."""
    task = ray.remote(run_job).options(num_gpus=gpus, num_cpus=1, max_retries=0)
    at_most = f", at most {max_parallel} at once" if max_parallel else ""
    console.print(f"{len(jobs)} job(s), {gpus} GPU(s) each{at_most}")
    cwd, pending, running, failed = os.getcwd(), list(jobs), {}, []
    while pending or running:
        while pending and (not max_parallel or len(running) < max_parallel):
            job = pending.pop(0)
            running[task.remote(train_command(job, gpus), cwd, gpus == 0)] = job
        [ready], _ = ray.wait(list(running), num_returns=1)
        job = running.pop(ready)
        try:
            result = ray.get(ready)
        except ray.exceptions.RayError as err:  # the task itself died (worker killed, node lost)
            result = {"exit": "none: its Ray task died", "seconds": 0.0, "stderr": str(err)}
        outcome(job, result, failed)
    return failed


def schedule_processes(jobs: list[Job], parallel: int) -> list[tuple[Job, dict]]:
    """`--backend processes`: the jobs as processes of this machine, `parallel` at once, each on its share of the
    CPU cores (train.num_threads, unless the overrides set it), printing each one's outcome as it ends. Returns the
    failed jobs with their results."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    console.print(f"{len(jobs)} job(s), {parallel} at once, {threads} CPU thread(s) each")
    cwd, failed = os.getcwd(), []
    with ThreadPoolExecutor(parallel) as pool:
        running = {pool.submit(run_job, train_command(with_threads(job, threads), 0), cwd, False): job
                   for job in jobs}
        for done in as_completed(running):
            outcome(running[done], done.result(), failed)
    return failed


def with_threads(job: Job, threads: int) -> Job:
    """The job with train.num_threads set, where its overrides leave it to the config (a WHERE key: same run)."""
    if any(o.startswith("train.num_threads=") for o in job.overrides):
        return job
    return replace(job, overrides=(*job.overrides, f"train.num_threads={threads}"))


def outcome(job: Job, result: dict, failed: list) -> None:
    """Print how the job ended; a failure, with the last lines of its stderr, joins `failed`."""
    if result["exit"] == 0:
        console.print(f"{job.name}: done in {result['seconds']:.0f}s")
        return
    failed.append((job, result))
    tail = "\n".join("    " + line for line in result["stderr"].splitlines()[-STDERR_LINES:])
    console.print(f"{escape(job.name)}: failed (exit {result['exit']}) after {result['seconds']:.0f}s:\n"
                  f"{escape(tail)}", soft_wrap=True, highlight=False)
