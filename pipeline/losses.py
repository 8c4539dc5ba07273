"""Task losses, turning logits into predictions, and R-Drop's consistency term.

R-Drop: Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021 (arXiv:2106.14448).
Each batch runs through the model twice with independent dropout; the loss adds alpha times the
disagreement of the two sub-models: symmetric KL for classification, mean squared difference for
regression (per target, then averaged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(task: str, logits: torch.Tensor, targets: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the batch. `logits` is (..., batch, outputs): leading dropout samples are averaged.

    Classification `targets` are class indices, or (batch, classes) probabilities: soft targets, a teacher's
    pseudo-labels (cross-entropy with soft targets is the KL divergence to them plus the constant entropy of the
    targets). With `weights` (batch,) the loss is the mean of weight x row loss: a row of weight 0.5 counts half.
    Hard targets without weights take the plain formulas, so a run without pseudo-labels computes what it did.
    """
    soft = task != "regression" and targets.is_floating_point()
    if weights is None and not soft:
        if task == "regression":
            return F.mse_loss(logits, targets.to(logits.dtype).expand_as(logits))
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, targets.expand(*logits.shape[:-1]).reshape(-1))
    per_row = row_losses(task, logits, targets)
    return per_row.mean() if weights is None else (per_row * weights.to(per_row.dtype)).mean()


def row_losses(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., batch): each row's squared error averaged over its targets, or its cross-entropy (hard or soft)."""
    if task == "regression":
        return (logits - targets.to(logits.dtype)).pow(2).mean(dim=-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if targets.is_floating_point():
        wide = targets.to(logits.dtype).expand(*logits.shape).reshape(flat.shape)
    else:
        wide = targets.expand(*logits.shape[:-1]).reshape(-1)
    return F.cross_entropy(flat, wide, reduction="none").reshape(logits.shape[:-1])


def predictions(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Regression: the outputs. Classification: class probabilities."""
    return logits if task == "regression" else torch.softmax(logits, dim=-1)


def rdrop_consistency(task: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Disagreement between two dropout passes over the same batch; zero exactly when they agree."""
    if task == "regression":
        return F.mse_loss(a, b)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    log_p, log_q = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p || q)
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")  # KL(q || p)
    return 0.5 * (kl_pq + kl_qp)
