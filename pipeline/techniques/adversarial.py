"""Adversarial training on the weights (AWP) and on the word embeddings (FGM): perturb, rerun, restore.

Both add the gradient at the perturbed point to the clean one (the step minimizes clean + adversarial loss),
the form FGM is used in and that several AWP codes share; Wu et al. step on the adversarial gradient alone.
The direction comes from the gradient in `.grad` when the micro-batch's clean pass is done: with gradient
accumulation it includes the group's earlier micro-batches, and on the last micro-batch of a DDP run it is the
gradient averaged over the processes. Weights are restored bit for bit from a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.techniques.base import Technique


class AWP(Technique):
    """Adversarial Weight Perturbation (Wu, Xia & Wang, 2020, "Adversarial Weight Perturbation Helps Robust
    Generalization"), as Kaggle NLP winners run it (NBME 1st, Feedback Prize ELL 1st, Patent Phrase 1st).

    From optimizer step `start_step` on, every trainable weight matrix ("weight" in its name) moves along its
    gradient by `strength` x its own norm (w += strength * g / |g| * |w|), clamped element-wise to within
    `eps` x |w| of where it was, then the micro-batch runs again at the perturbed weights.
    """

    def __init__(self, strength: float, eps: float, start_step: int):
        self.strength, self.eps, self.start_step = strength, eps, start_step

    def after_backward(self, model: nn.Module, rerun: Callable[[], float], step: int) -> None:
        if step < self.start_step:
            return
        saved = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad or p.grad is None or "weight" not in name:
                    continue
                grad_norm = torch.linalg.vector_norm(p.grad)
                if grad_norm == 0 or not torch.isfinite(grad_norm):
                    continue
                saved[name] = original = p.detach().clone()
                limit = self.eps * original.abs()
                p.add_(p.grad, alpha=self.strength / (float(grad_norm) + 1e-6)
                       * (float(torch.linalg.vector_norm(original)) + 1e-6))
                p.copy_(torch.clamp(p, original - limit, original + limit))
        try:
            rerun()
        finally:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, original in saved.items():
                    params[name].copy_(original)


class FGM(Technique):
    """Fast Gradient Method on the word embeddings (Miyato, Dai & Goodfellow, 2017, "Adversarial Training
    Methods for Semi-Supervised Text Classification"; U.S. Patent Phrase Matching 2nd place).

    The embedding matrix moves by `epsilon` along its gradient's direction (e = epsilon * g / |g|), the
    micro-batch runs again, and the matrix is put back.
    """

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def after_backward(self, model: nn.Module, rerun: Callable[[], float], step: int) -> None:
        weight = model.backbone.get_input_embeddings().weight
        if weight.grad is None:
            return
        grad_norm = torch.linalg.vector_norm(weight.grad)
        if grad_norm == 0 or not torch.isfinite(grad_norm):
            return
        original = weight.detach().clone()
        with torch.no_grad():
            weight.add_(weight.grad, alpha=self.epsilon / float(grad_norm))
        try:
            rerun()
        finally:
            with torch.no_grad():
                weight.copy_(original)
