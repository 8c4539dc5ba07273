"""Freezing the embeddings and the bottom encoder layers (Feedback Prize - English Language Learning, 1st place;
Howard & Ruder's ULMFiT on why lower layers need the least change). A frozen parameter gets no gradient and,
since `build_optimizer` skips it, no optimizer state: memory and time saved, not only updates."""

from __future__ import annotations

from torch import nn

from pipeline.errors import PipelineError


def freeze_bottom(backbone: nn.Module, layers: nn.ModuleList, k: int, reinit_layers: int = 0) -> int:
    """Freeze the backbone's embeddings and its bottom `k` layers; the number of parameters frozen."""
    n = len(layers)
    if k >= n:
        raise PipelineError(f"config key 'model.freeze_layers': {k} would freeze all {n} encoder layers; "
                            f"at most {n - 1}")
    if k + reinit_layers > n:
        raise PipelineError(f"config keys 'model.freeze_layers' ({k}) and 'model.reinit_layers' ({reinit_layers}) "
                            f"overlap: a re-initialized layer would stay frozen at random weights ({n} layers)")
    embeddings = getattr(backbone, "embeddings", None) or backbone.get_input_embeddings()
    frozen = 0
    for module in [embeddings, *layers[:k]]:
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen
