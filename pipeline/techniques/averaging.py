"""Averaged weights evaluated and saved in place of the live ones: EMA over steps, SWA over evaluations.

Only trainable parameters are averaged (frozen ones do not move; buffers such as the target scale stay). The
live weights are copied aside for the evaluation and put back bit for bit, so training continues on them.
There is no BatchNorm in these models, so an average needs no statistics re-estimated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pipeline.techniques.base import Technique


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swapped_in(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    if not weights:
        yield
        return
    params = trainable(model)
    live = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in live.items():
                params[n].copy_(w)


def ema_decay(decay: float, step: int) -> float:
    """The decay at optimizer step `step` (1, 2, ...): TensorFlow's ExponentialMovingAverage warm-up,
    min(decay, (1 + step) / (10 + step)), so that a fine-tuning run of a few hundred steps is not averaged
    mostly with its starting weights (a new head's random ones among them)."""
    return min(decay, (1 + step) / (10 + step))


class EMA(Technique):
    """Exponential moving average of the weights (Polyak & Juditsky, 1992; timm's ModelEmaV3; used by the
    Feedback Prize and LMSYS winners): after optimizer step k, avg = d_k * avg + (1 - d_k) * w, starting from
    the initial weights, with d_k = `ema_decay(decay, k)`. Evaluations and the saved checkpoint use `avg`."""

    def __init__(self, decay: float):
        self.decay = decay
        self.average: dict[str, torch.Tensor] | None = None

    def after_step(self, model: nn.Module, step: int) -> None:
        params, keep = trainable(model), ema_decay(self.decay, step)
        with torch.no_grad():
            for n, avg in self.average.items():
                avg.lerp_(params[n].detach(), 1.0 - keep)

    def start(self, model: nn.Module) -> None:
        """The average starts at the weights training starts from."""
        self.average = {n: p.detach().clone() for n, p in trainable(model).items()}

    def evaluation_weights(self, model: nn.Module):
        return swapped_in(model, self.average)

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        devices = {n: avg.device for n, avg in self.average.items()}
        self.average = {n: t.to(devices[n]) for n, t in state["average"].items()}


class SWA(Technique):
    """Stochastic Weight Averaging (Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and Better
    Generalization"): the equal-weight average of the weights at every evaluation from optimizer step
    `start_step` on. Those evaluations, and the checkpoint they may save, use the average so far."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.average: dict[str, torch.Tensor] | None = None
        self.count = 0

    def at_evaluation(self, model: nn.Module, step: int) -> None:
        if step < self.start_step:
            return
        params = trainable(model)
        self.count += 1
        with torch.no_grad():
            if self.average is not None:  # (a resumed average comes from the CPU)
                self.average = {n: avg.to(params[n].device) for n, avg in self.average.items()}
            if self.average is None:
                self.average = {n: p.detach().clone() for n, p in params.items()}
            else:
                for n, avg in self.average.items():
                    avg.add_(params[n].detach() - avg, alpha=1.0 / self.count)

    def evaluation_weights(self, model: nn.Module):
        return swapped_in(model, self.average)

    def state_dict(self) -> dict:
        return {"average": self.average, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.count = state["average"], state["count"]
