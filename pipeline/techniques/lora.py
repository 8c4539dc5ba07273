"""LoRA: low-rank adapters on a frozen backbone (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685), through Hugging Face peft.

An adapted Linear layer W computes W x + (alpha / r) B A dropout(x), with A (r x inputs) random and B (outputs x r)
zero at the start, so training starts from the pretrained function. Only A, B, the head and the attention pooling
train: the optimizer keeps state for those alone, and a fold's checkpoint is those alone (`model.checkpoint_state`).
The frozen backbone is the pretrained weights, kept once per run directory (`save_base_weights`) and loaded under
the adapters at predict time.

Which layers: by default every Linear inside the transformer layers (BERT: query, key, value, attention.output.dense,
intermediate.dense, output.dense; Llama, Qwen2, Gemma, Mistral: q/k/v/o_proj, gate/up/down_proj). QLoRA (Dettmers
et al., 2023, arXiv:2305.14314, section 4) found adapters on all of them needed to match full fine-tuning; peft's
per-architecture defaults (query and value alone, the LoRA paper's budget choice) fell short there. Linear layers
outside the transformer layers (BERT's pooler, which mean pooling never reads) get none.

peft is imported only when LoRA is on: an error naming the `llm` extra where it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError

INSTALL = "install the llm extra (pip install -e '.[llm]') or peft itself"
# Where from_pretrained finds a model's weights, in its order of preference: an index of shards, else one file.
WEIGHTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def require_peft():
    try:
        import peft
    except ImportError:
        raise PipelineError(f"config key 'model.lora_r': LoRA adapters need the peft package; {INSTALL}") from None
    return peft


def alpha(cfg: ModelConfig) -> float:
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r


def _adaptable(module: nn.Module) -> bool:
    """A layer peft's LoRA adapts: nn.Linear (bitsandbytes' quantized ones included) or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def target_names(backbone: nn.Module, layers: nn.ModuleList, wanted: list[str] | None) -> list[str]:
    """Full names of the Linear layers inside `layers` that get adapters: those named by an entry of `wanted`
    (a name such as `query`, or a dotted suffix such as `attention.output.dense`); null: all of them."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    linear = [name for name, m in backbone.named_modules() if id(m) in inside and _adaptable(m)]

    def named(name: str, entry: str) -> bool:
        return name == entry or name.endswith(f".{entry}")

    if wanted is None:
        return linear
    unmatched = [w for w in wanted if not any(named(n, w) for n in linear)]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise PipelineError(f"config key 'model.lora_target_modules': {', '.join(unmatched)} names no Linear layer "
                            f"inside the transformer layers of {type(backbone).__name__}; they have: "
                            f"{', '.join(kinds)}")
    return [n for n in linear if any(named(n, w) for w in wanted)]


def apply_lora(backbone: nn.Module, layers: nn.ModuleList, cfg: ModelConfig) -> list[str]:
    """Put adapters into `backbone` in place and freeze every one of its own weights; the adapted layers' names.

    The backbone stays the transformers model it was (peft's inject_adapter_in_model, not a PeftModel wrapper):
    its forward signature, layers and embeddings are where the rest of the pipeline looks for them.
    """
    peft = require_peft()
    targets = target_names(backbone, layers, cfg.lora_target_modules)
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=alpha(cfg), lora_dropout=cfg.lora_dropout,
                             target_modules=targets, bias="none")
    peft.inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():  # (peft freezes them; a backbone weight that trained would not
        if "lora_" not in name:                     # be in the checkpoint, so this is not left to its version)
            p.requires_grad_(False)
    checkpointing = getattr(backbone, "is_activation_checkpointing", None)  # transformers 5.0: the older name
    if checkpointing if checkpointing is not None else getattr(backbone, "is_gradient_checkpointing", False):
        # Frozen embeddings give the first checkpointed layer inputs without grad: with reentrant checkpointing
        # (transformers before 5, peft's k-bit preparation) no gradient would reach the adapters inside it.
        backbone.enable_input_require_grads()
    return targets


def store_frozen_in(backbone: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen weights of the backbone's Linear layers (adapted or not; GPT-2's Conv1D too) in `dtype`, the
    run's 16-bit compute type; returns how many tensors changed.

    Under autocast every such layer casts its fp32 weight to `dtype` at each forward, and a cast is one rounding:
    storing the rounded weight computes the same numbers, in half the memory, without the per-step cast (the
    peft/QLoRA practice of a 16-bit frozen base). Embeddings and norms stay fp32, as autocast computes with them;
    so do the adapters (call this after `apply_lora`: peft gives a new adapter its base layer's dtype).
    """
    count = 0
    for module in backbone.modules():
        if not _adaptable(module):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(dtype)
                count += 1
    return count


def weight_files(source: str | Path) -> list[Path]:
    """The files from_pretrained reads `source`'s weights from (shards then their index, or one file), locally:
    a folder, or a Hugging Face name already in the cache."""
    def local(name: str) -> Path | None:
        if Path(source).is_dir():
            path = Path(source) / name
            return path if path.is_file() else None
        from transformers.utils import cached_file

        found = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        return Path(found) if found else None

    for index, single in WEIGHTS:
        if path := local(index):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [*(local(shard) or path.parent / shard for shard in shards), path]
        if path := local(single):
            return [path]
    raise PipelineError(f"model.backbone: no weights found for '{source}' ({', '.join(n for w in WEIGHTS for n in w)})")


def save_base_weights(source: str | Path, out: Path) -> None:
    """The frozen backbone's weights into the run's `backbone/` folder, as the files training loaded (the same
    bytes: an fp16 checkpoint stays fp16), each copied whole or not at all and an index after its shards, so that
    `has_base_weights` never vouches for a half-copied set; files already there are kept."""
    for path in weight_files(source):
        dst = out / path.name
        if dst.exists():
            continue
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)


def has_base_weights(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for pair in WEIGHTS for name in pair)
