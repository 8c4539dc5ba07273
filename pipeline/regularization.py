"""Regularizers that change the backbone's layers: Mixout, setting dropout, a cheaper dropout mask.

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


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask, True with probability 1 - p (to 1/65536), from a quarter as many random draws.

    The CPU generator is slow per draw (nn.Dropout's bernoulli_ draws once per element); one 64-bit draw
    gives four 16-bit uniforms. Its effect on a step: `python bench/compare_trainer.py --levers`.
    """
    n = shape.numel()
    # random_() alone leaves the sign bit 0: the full 64-bit range needs from=-2**63, to=None.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(shape) >= -32768 + round(p * 65536)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout like F.dropout (kept entries scaled by 1 / (1 - p)), with the cheaper CPU mask.

    On other devices it is F.dropout, whose fused kernels are already cheap.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return x * (keep_mask(x.shape, p, x.device).to(x.dtype) * (1.0 / (1.0 - p)))


class FastDropout(nn.Dropout):
    """nn.Dropout with the cheaper mask of `fast_dropout`; the same p, the same train/eval behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> int:
    """Swap every nn.Dropout below `module` for a FastDropout of the same p; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p))
                count += 1
    return count


# Where a module keeps a dropout probability that is not an nn.Dropout's `p`: DeBERTa's StableDropout (drop_prob), and
# the attention of decoders and ModernBERT (Llama, Qwen, Mistral, Gemma), which hands a float to its attention kernel.
RATE_ATTRIBUTES = ("drop_prob", "attention_dropout")


def _rates(module: nn.Module):
    """(name, module, attribute) of every dropout probability below `module`."""
    for name, child in module.named_modules():
        if isinstance(child, nn.modules.dropout._DropoutNd):
            yield name, child, "p"
        for attribute in RATE_ATTRIBUTES:
            if isinstance(getattr(child, attribute, None), float):
                yield name, child, attribute


def set_dropout(module: nn.Module, p: float) -> int:
    """Set every dropout probability below `module`, whatever the layer class is called; returns the count."""
    count = 0
    for _, child, attribute in _rates(module):
        setattr(child, attribute, p)
        count += 1
    return count


def active_dropout(module: nn.Module) -> list[str]:
    """Names of modules that would drop something in training mode."""
    return list(dict.fromkeys(name for name, child, attribute in _rates(module) if getattr(child, attribute) > 0))
