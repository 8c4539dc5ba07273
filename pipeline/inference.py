"""Predict-time code: the device and precision to run on, and a model's predictions for tokenized rows.

Apart from train.py so that prediction (and the Kaggle kernel) imports nothing only training needs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pipeline import data as D
from pipeline.errors import PipelineError
from pipeline.losses import predictions
from pipeline.model import TextModel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"config key 'train.device': '{name}' asked for, but no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere it is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_bf16() -> bool:
    """True on GPUs that compute bf16 natively (Ampere and later); torch's default check also counts emulation,
    which says yes on Kaggle's T4 and V100, where bf16 runs several times slower than fp16."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp16 needs CUDA; bf16 pays only where the hardware has it; `auto` picks the fastest that works."""
    cuda = device.type == "cuda"
    bf16 = cuda_has_bf16() if cuda else cpu_has_bf16()
    if precision == "auto":
        return "bf16" if bf16 else ("fp16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        fallback = "bf16" if bf16 else "fp32"
        warnings.warn(f"train.precision=fp16 needs a CUDA device; using {fallback} on {device.type}", stacklevel=2)
        return fallback
    if precision == "bf16" and not bf16:
        warnings.warn(f"train.precision=bf16: this {device.type} has no native bf16, it will be emulated and "
                      "slow; train.precision=auto picks fp32 here", stacklevel=2)
    return precision


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)



@torch.no_grad()
def predict(model: TextModel, enc: D.Encoded, positions: np.ndarray, task: str, device: torch.device,
            precision: str, batch_size: int, pad_id: int, multiple: int = 1,
            max_tokens: int | None = None) -> np.ndarray:
    """Predictions for `positions`, returned in the order of `positions` whatever order batches ran in.

    Batches hold at most `batch_size` rows and, with `max_tokens` (train.eval_max_tokens), that many padded tokens.
    """
    model.eval()
    out = np.zeros((len(positions), model.head.out.out_features), dtype=np.float64)
    where = {int(p): i for i, p in enumerate(positions)}
    batches = [[int(positions[i]) for i in b]
               for b in D.eval_batches(enc.lengths[positions], batch_size, max_tokens, multiple, enc.max_length)]
    for batch in D.iterate(enc, batches, pad_id, device, multiple):
        with autocast(device, precision):
            logits = model(**batch.inputs)
        rows = [where[int(p)] for p in batch.positions]
        out[rows] = predictions(task, logits.cpu().double()).numpy()  # float64: probabilities sum to one
    return out
