"""`pipeline` as one process of a torchrun launch, for tests/test_distributed.py.

It records every file this process opens for writing or renames into place under PIPELINE_TEST_ROOT (to
rank<k>.writes beside it), and with PIPELINE_TEST_STEP_SLEEP sleeps that long per training micro-batch, so that
a test can kill a run between two saved states. Otherwise it is `python -m pipeline`.
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from pathlib import Path

root = Path(os.environ["PIPELINE_TEST_ROOT"]).resolve()
record = root.parent / f"rank{os.environ.get('RANK', '0')}.writes"
_open, _replace = builtins.open, os.replace


def note(path) -> None:
    try:
        path = Path(path).resolve()
    except TypeError:
        return
    if path.is_relative_to(root):
        with _open(record, "a") as f:
            f.write(f"{path}\n")


def recording_open(file, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax+"):
        note(file)
    return _open(file, mode, *args, **kwargs)


def recording_replace(src, dst, *args, **kwargs):
    note(dst)
    return _replace(src, dst, *args, **kwargs)


builtins.open, os.replace = recording_open, recording_replace

from pipeline import train as T  # noqa: E402
from pipeline.cli import main  # noqa: E402

if os.environ.get("PIPELINE_TEST_STEP_SLEEP"):
    pause, loss = float(os.environ["PIPELINE_TEST_STEP_SLEEP"]), T.training_loss

    def slow_loss(*args, **kwargs):
        time.sleep(pause)
        return loss(*args, **kwargs)

    T.training_loss = slow_loss

sys.argv = ["pipeline", *sys.argv[1:]]
main()
