"""One job of `pipeline grid --backend ray` as a Ray worker runs it: the job's process, on the task's GPUs.

Kept apart from grid_ray.py, on the standard library alone, because every Ray worker imports it: the driver's
imports (torch, pandas, scikit-learn) would cost each worker seconds before its first job.
"""

from __future__ import annotations

import os
import subprocess
import time


def run_job(command: list[str], cwd: str, cpu_only: bool) -> dict:
    """Runs inside the Ray task: the job's process, on the GPUs Ray gave the task (CUDA_VISIBLE_DEVICES)."""
    env = dict(os.environ)
    if cpu_only:  # Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs: hide them, or it takes GPU 0
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, errors="replace")
        code, stderr = proc.returncode, proc.stderr
    except OSError as err:  # e.g. accelerate not installed on this machine
        code, stderr = 127, f"{command[0]}: {err}"
    return {"exit": code, "seconds": time.time() - start,
            "stderr": "\n".join(line for line in stderr.splitlines() if line.strip())}
