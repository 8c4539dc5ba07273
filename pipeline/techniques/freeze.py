"""Freezing the embeddings and the bottom encoder layers (Feedback Prize - English Language Learning, 1st place;
Howard & Ruder's ULMFiT on why lower layers need the least change). A frozen parameter gets no gradient and,
since `build_optimizer` skips it, no optimizer state: memory and time saved, not only updates."""

from __future__ import annotations

from torch import nn

from pipeline.errors import PipelineError


def freeze_bottom(embeddings: list[nn.Parameter], layers: nn.ModuleList, k: int, reinit_layers: int = 0) -> int:
    """Freeze the embeddings (`model.input_side`: every parameter below the layers, GPT-2's position embeddings
    too) and the bottom `k` layers; the number of parameters frozen."""
    n = len(layers)
    if k >= n:
        raise PipelineError(f"config key 'model.freeze_layers': {k} would freeze all {n} encoder layers; "
                            f"at most {n - 1}")
    if k + reinit_layers > n:
        raise PipelineError(f"config keys 'model.freeze_layers' ({k}) and 'model.reinit_layers' ({reinit_layers}) "
                            f"overlap: a re-initialized layer would stay frozen at random weights ({n} layers)")
    frozen = 0
    for p in [*embeddings, *(p for layer in layers[:k] for p in layer.parameters())]:
        if p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
