"""One fold on one or several processes, through HF accelerate: the Accelerator, each process's rows, the gather.

One process (`pipeline train`) and several (`accelerate launch --multi_gpu --num_processes N -m pipeline train`,
or `torchrun --nproc_per_node N -m pipeline train` on CPUs, gloo) run the same loop. `train.batch_size` is the
global batch: every process cuts the same seeded batch list, takes its contiguous share of each batch and
weights its loss by its share of the rows, so that DDP's mean of the processes' gradients is the gradient of
the whole batch's mean loss, whatever the batch's size. accelerate's own batch sharding (`split_batches`) is
not used for the training rows: it needs every batch full, skips a short batch met before the last one (the
length-grouped list shuffles the short batch anywhere) and pads the last with repeated rows, which would
train twice on them.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object

from pipeline.errors import PipelineError

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def process_state(device: torch.device) -> PartialState:
    """The launch's processes (one unless started by `accelerate launch` or `torchrun`); CPUs talk over gloo."""
    return PartialState(cpu=device.type == "cpu")


def make_accelerator(device: torch.device, precision: str) -> Accelerator:
    """An Accelerator for one fold: device placement, mixed precision (fp16 with its GradScaler), DDP.

    accelerate keeps its settings in process-wide singletons that refuse a second precision: a grid trains
    configs with different precisions in one process, so each fold starts them afresh (the process group, in
    PartialState, is kept when there is one). Gradient accumulation is the loop's (see `train_fold`).
    """
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    GradientState._reset_state()
    # find_unused_parameters: a backbone's pooler (BERT's) and unused heads get no gradient, which DDP's
    # reducer otherwise reports as an error on the second step.
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=MIXED_PRECISION[precision],
                              # split_batches: the prepared scheduler steps once per optimizer step, not once
                              # per process (accelerate 1.x ignores the Accelerator argument of that name)
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if device.type == "cuda" and device.index is not None and accelerator.device != device:
        raise PipelineError(f"config key 'train.device': '{device}' asked for, but this process runs on "
                            f"{accelerator.device}; choose the GPU with CUDA_VISIBLE_DEVICES and set "
                            "train.device=cuda")
    return accelerator


def shard(positions: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This process's contiguous share of one global batch, and the weight of its mean loss.

    The weight (share of the rows x processes) makes DDP's mean over processes equal the batch's mean loss
    when the batch does not divide evenly. A process left without rows (a batch smaller than the process
    count) runs the batch's first row at weight 0: every process must take part in each gradient exchange.
    """
    if world == 1:
        return positions, 1.0
    mine = np.array_split(np.asarray(positions), world)[rank].tolist()
    if not mine:
        return positions[:1], 0.0
    return mine, len(mine) * world / len(positions)


def eval_share(positions: np.ndarray, lengths: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The validation rows this process predicts: every world-th row by length, so each gets long and short."""
    if world == 1:
        return positions
    return positions[np.argsort(-lengths, kind="stable")][rank::world]


def gather_rows(positions: np.ndarray, share: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Every process's predictions for its share, in the order of `positions`; each row exactly once.

    The shares are disjoint (no sampler repeats rows to even out batches), so nothing needs dropping; a row
    missing or twice is an error rather than a silently wrong score.
    """
    if PartialState().num_processes == 1:
        return preds
    parts = gather_object([(share, preds)])
    rows = np.concatenate([p for p, _ in parts])
    values = np.concatenate([v for _, v in parts])
    where = {int(p): i for i, p in enumerate(rows)}
    if len(where) != len(rows) or sorted(where) != sorted(int(p) for p in positions):
        raise PipelineError(f"gathered {len(rows)} predictions for {len(positions)} validation rows "
                            f"({len(where)} distinct): each row must come from exactly one process")
    return values[[where[int(p)] for p in positions]]


def gather_list(item) -> list:
    """One item from each process, in rank order (a one-item list in a single process)."""
    return gather_object([item]) if PartialState().num_processes > 1 else [item]


def is_main_process() -> bool:
    """True in a single process and in the main process of a launch: where the CLI prints results."""
    return PartialState().is_main_process


def release(accelerator: Accelerator, *objects) -> None:
    """Forget prepared optimizers and schedulers that training no longer uses (a finished stage's).

    accelerate keeps every object it prepared, and with fp16 `clip_grad_norm_` unscales the gradients through each
    optimizer it keeps: a finished stage's optimizer over the same parameters would unscale them a second time.
    """
    accelerator._optimizers = [o for o in accelerator._optimizers if all(o is not x for x in objects)]
    accelerator._schedulers = [s for s in accelerator._schedulers if all(s is not x for x in objects)]
