"""The pipeline's attention kernel for training on CPU, registered with transformers as "pipeline".

Measured on CommonLit with MiniLM, bf16, batch 16 on the 2-core CPU (`bench/compare_trainer.py --levers`):
PyTorch's fused SDPA kernel is quick forward but its CPU backward is slow, and attention-probability
dropout takes the fused path away altogether. Written in plain ops (two matmuls and a softmax) with the
cheap dropout mask of `regularization.fast_dropout`, a training step is faster in both cases. Inference
(no autograd) and every non-CPU device keep transformers' SDPA, which is the fastest there.

Architectures that do not dispatch attention through transformers' AttentionInterface (e.g. DeBERTa) keep
their own attention, and so do decoders (Qwen2, Llama, Gemma-2...): the kernel is an encoder's, bidirectional,
without sliding windows or Gemma-2's softcapping, which SDPA lacks too (Gemma-2 loads with eager attention).
`use_pipeline_attention` says which happened.

Long inputs: a (batch, heads, T, T) score tensor larger than the CPU's caches makes every pass over it (the
matmul that writes it, the scaling, the softmax, their backward) run at memory speed, so a step grew ~3x from
256 to 512 tokens where the FLOPs grow 2.2x, and ~10x at 1024 (`bench/long_inputs.py`). Above SCORES_BUDGET
score elements per call the batch is cut into groups of sequences that fit it, each group the same ops as
before: the same numbers, and at the recipe's shapes (batch 16, 256 tokens, 12 heads: exactly the budget) one
group, the unchanged path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, sdpa_mask

from pipeline.decoder import is_decoder
from pipeline.regularization import fast_dropout

NAME = "pipeline"
# Score elements per attention call before the batch is split: batch 16 x 12 heads x 256 x 256, the recipe's
# largest batch, whose step the split would not make slower (measured: bench/long_inputs.py, docs/speed.md).
SCORES_BUDGET = 16 * 12 * 256 * 256


def pipeline_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs):
    """Same signature and result as transformers' attention functions: (B, T, H, D) output, no weights."""
    causal = kwargs.get("is_causal") or getattr(module, "is_causal", False)
    if query.device.type != "cpu" or not torch.is_grad_enabled() or causal or key.shape[1] != query.shape[1]:
        # CUDA, inference, causal masks and grouped key/value heads: transformers' own SDPA path
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    batch, heads, length = query.shape[0], query.shape[1], query.shape[2]
    group = max(1, SCORES_BUDGET // (heads * length * key.shape[2]))
    if group < batch:  # long inputs: groups of sequences whose scores stay within the budget
        if attention_mask is not None and attention_mask.shape[0] != batch:
            attention_mask = attention_mask.expand(batch, *attention_mask.shape[1:])
        return torch.cat([_attention(module, query[i:i + group], key[i:i + group], value[i:i + group],
                                     None if attention_mask is None else attention_mask[i:i + group],
                                     scaling, dropout) for i in range(0, batch, group)]), None
    return _attention(module, query, key, value, attention_mask, scaling, dropout), None


def _attention(module, query, key, value, attention_mask, scaling, dropout) -> torch.Tensor:
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True: attend. An additive bias broadcasts faster than masked_fill.
            attention_mask = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device) \
                .masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores + attention_mask
    weights = fast_dropout(torch.softmax(scores, dim=-1), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def padding_mask(batch_size: int, kv_length: int, mask_function=bidirectional_mask_function,
                 attention_mask: torch.Tensor | None = None, **kwargs):
    """An encoder's padding mask as (batch, 1, 1, keys) booleans (True: attend), None when nothing is padded.

    On CPU, broadcasting one row per sequence costs less than transformers' (batch, 1, queries, keys) mask;
    any other mask (CUDA, causal, custom mask functions, offsets) is transformers' SDPA mask. Every argument is
    passed on by name: transformers 5.0 (Kaggle's image) gives `cache_position` where later releases give
    `q_length` and `q_offset`.
    """
    start = kwargs.get("cache_position")
    no_offset = kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0 and \
        (start is None or len(start) == 0 or int(start[0]) == 0)
    plain = mask_function is bidirectional_mask_function and no_offset
    if plain and attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] == kv_length \
            and attention_mask.device.type == "cpu":
        mask = attention_mask.to(torch.bool)
        return None if bool(mask.all()) else mask[:, None, None, :]
    return sdpa_mask(batch_size=batch_size, kv_length=kv_length, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, pipeline_attention)
AttentionMaskInterface.register(NAME, padding_mask)


def use_pipeline_attention(backbone: PreTrainedModel) -> bool:
    """Switch a loaded backbone to the pipeline's attention where its architecture allows; True if it did."""
    if is_decoder(backbone.config) or not backbone._can_set_attn_implementation():
        return False
    backbone.set_attn_implementation(NAME)
    return backbone.config._attn_implementation == NAME
