"""Where a training technique enters the loop: the named points of `train_fold`, each a no-op by default."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


class Technique:
    """One technique's entry points into `train_fold`.

    - `after_backward`: the micro-batch's gradients are in `.grad`; `rerun()` runs the micro-batch's forward and
      backward again (its gradients are added, scaled as the clean pass's) and returns the loss. Adversarial
      techniques perturb, rerun and restore here.
    - `after_step`: the optimizer has just taken optimizer step `step` (running averages update here).
    - `at_evaluation`: an evaluation after optimizer step `step` is about to run (snapshot averages collect here).
    - `evaluation_weights`: a context in which the model holds the weights to evaluate and to save as the fold's
      checkpoint; training continues on the live weights after it.
    - `state_dict` / `load_state_dict`: what `--resume` must restore.
    `model` is always the bare TextModel (inside any DDP wrapper).
    """

    def after_backward(self, model: nn.Module, rerun: Callable[[], float], step: int) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def at_evaluation(self, model: nn.Module, step: int) -> None:
        pass

    @contextlib.contextmanager
    def evaluation_weights(self, model: nn.Module) -> Iterator[None]:
        yield

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Techniques(list):
    """The run's techniques, called in order at each point."""

    def after_backward(self, model: nn.Module, rerun: Callable[[], float], step: int) -> None:
        for t in self:
            t.after_backward(model, rerun, step)

    def after_step(self, model: nn.Module, step: int) -> None:
        for t in self:
            t.after_step(model, step)

    def at_evaluation(self, model: nn.Module, step: int) -> None:
        for t in self:
            t.at_evaluation(model, step)

    @contextlib.contextmanager
    def evaluation_weights(self, model: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for t in self:
                stack.enter_context(t.evaluation_weights(model))
            yield

    def state_dict(self) -> list[dict]:
        return [t.state_dict() for t in self]

    def load_state_dict(self, states: list[dict]) -> None:
        for t, state in zip(self, states, strict=True):
            t.load_state_dict(state)
