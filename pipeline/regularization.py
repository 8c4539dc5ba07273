"""Regularizers that change the backbone's layers: Mixout and setting dropout.

Mixout: Lee, Cho and Kang, "Mixout: Effective Regularization to Finetune Large-scale Pretrained Language
Models", ICLR 2020 (arXiv:1909.11299). Each weight is mixed back to its pretrained value u with
probability p: w~ = u + m * (w - u) / (1 - p), m ~ Bernoulli(1 - p), an adaptive L2 pull toward u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_probability(p: float) -> float:
    if not 0.0 <= p < 1.0:  # p = 1 divides by zero: every weight would be NaN
        raise ValueError(f"mixout probability must be in [0, 1), got {p}")
    return p


class MixLinear(nn.Linear):
    """nn.Linear with mixout toward a frozen pretrained copy of its weight.

    The mask is drawn per input unit (a column of the weight), fresh at every training forward pass, so
    gradients reach only the kept columns. The pretrained copy is a non-persistent buffer: it moves with
    the model, is never in the optimizer or in a saved state dict (which stays that of a plain Linear),
    and evaluation is the plain layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.p = _check_probability(p)
        self.register_buffer("pretrained", self.weight.detach().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> MixLinear:
        mix = cls.__new__(cls)
        nn.Module.__init__(mix)
        mix.in_features, mix.out_features, mix.p = linear.in_features, linear.out_features, _check_probability(p)
        mix.weight, mix.bias = linear.weight, linear.bias  # the same Parameters: nothing is copied
        mix.register_buffer("pretrained", linear.weight.detach().clone(), persistent=False)
        return mix

    def mixed_weight(self) -> torch.Tensor:
        keep = torch.empty(self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        keep.bernoulli_(1.0 - self.p)
        return self.pretrained + (self.weight - self.pretrained) * (keep / (1.0 - self.p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.mixed_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mixout={self.p}"


def apply_mixout(module: nn.Module, p: float) -> int:
    """Swap every nn.Linear below `module` for a MixLinear in place; returns how many were swapped.

    Call it on the pretrained backbone only: a new, randomly initialized head has no pretrained weight
    to be pulled toward.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, MixLinear.from_linear(child, p))
                count += 1
    return count


def set_dropout(module: nn.Module, p: float) -> int:
    """Set every dropout probability below `module`, whatever the layer class is called; returns the count."""
    count = 0
    for child in module.modules():
        if isinstance(child, nn.modules.dropout._DropoutNd):
            child.p = p
            count += 1
        elif hasattr(child, "drop_prob") and isinstance(child.drop_prob, float):  # DeBERTa's StableDropout
            child.drop_prob = p
            count += 1
    return count


def active_dropout(module: nn.Module) -> list[str]:
    """Names of dropout layers that would drop something in training mode."""
    found = []
    for name, child in module.named_modules():
        p = child.p if isinstance(child, nn.modules.dropout._DropoutNd) else getattr(child, "drop_prob", 0.0)
        if isinstance(p, float) and p > 0:
            found.append(name)
    return found
