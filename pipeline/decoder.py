"""Decoder LLM backbones (Qwen2, Llama, Mistral, Gemma-2, GPT-2...): what they need that encoders do not.

A causal model's token t has read tokens 0..t only. So the token that has read the whole text is the last real
one (`model.pooling: last`), and the first has read nothing but itself (`cls` is refused). Their tokenizers often
have no pad token, and some pad on the left, so a row's first real token may sit anywhere: positions are counted
from it, as transformers' `generate` does, and pooling finds the last real token from the attention mask.
Attention stays the architecture's own: the pipeline's CPU kernel is an encoder's (bidirectional, no sliding
window, no softcapping).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_decoder(config: PretrainedConfig) -> bool:
    """A decoder-only (causal) language model: an architecture with a causal-LM form and no masked-LM one.

    BERT and RoBERTa have both (a causal variant exists) and stay encoders; Gemma-based embedding models that
    switch to bidirectional attention are encoders too.
    """
    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES \
        and not getattr(config, "use_bidirectional_attention", False)


def use_eos_as_pad(tokenizer):
    """A tokenizer without a pad token pads with its end-of-sequence token (Llama, Mistral, GPT-2 have none).

    Rather than a new token: a new one would grow the embedding matrix by a random row and change the
    checkpoint's shape, while the pad id is only ever read under attention mask 0, where its value changes
    nothing. A tokenizer with neither token is left as it is (batches are then padded with id 0, masked).
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def record_pad_token(config: PretrainedConfig, tokenizer) -> None:
    """Write the tokenizer's pad id into a decoder's config, so the run directory's config and tokenizer agree
    (transformers' `*ForSequenceClassification` reads the config's to find the last token).

    Set on the saved config only, not before the backbone is built: there it would become the embedding's
    `padding_idx`, and the end-of-sequence row would get no gradient.
    """
    if is_decoder(config) and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (padding: 0), so a left-padded row is computed as alone.

    Without them a left-padded row's text starts at position p > 0: models with absolute position embeddings
    (GPT-2) see other numbers, and rotary ones (Qwen2, Llama, Gemma) differ by rounding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
