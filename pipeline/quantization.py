"""bitsandbytes: a backbone loaded in 8 or 4 bits (`model.load_in`) and 8-bit optimizer states (`train.optimizer`).

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314): the frozen
backbone is stored in 4-bit NormalFloat with its quantization constants quantized again ("double quantization") and
computes in 16 bits, LoRA adapters train on top in full precision, and the optimizer's states can live in 8 bits
(Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861), paged to CPU memory when
the GPU runs short: the paper fine-tuned a 65B model on one 48 GB GPU.

bitsandbytes computes on CUDA only (here), so every path through it is checked before any work starts: where no
CUDA device or no bitsandbytes is found, an error names the config key that asked for it. The package is imported
only when a key asks for it.
"""

from __future__ import annotations

import torch

from pipeline.config import Config, ModelConfig
from pipeline.errors import PipelineError

OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}  # bitsandbytes.optim's class names
INSTALL = "install the llm extra (pip install -e '.[llm]') or bitsandbytes itself"


def asked_for(cfg: Config, predicting: bool = False) -> list[tuple[str, str]]:
    """(config key, value) of every setting that runs through bitsandbytes; predicting needs only the loading."""
    keys = [("model.load_in", cfg.model.load_in)] if cfg.model.load_in else []
    if cfg.train.optimizer != "adamw" and not predicting:
        keys.append(("train.optimizer", cfg.train.optimizer))
    return keys


def check(cfg: Config, device: torch.device, predicting: bool = False) -> None:
    """Refuse, naming the key, a bitsandbytes setting where it cannot run: no CUDA device, or no bitsandbytes."""
    keys = asked_for(cfg, predicting)
    if not keys:
        return
    key, value = keys[0]
    if device.type != "cuda":
        raise PipelineError(f"config key '{key}': {value} runs through bitsandbytes, which needs a CUDA device; this "
                            f"run is on {device.type} (train.device={cfg.train.device}). Remove the key to run "
                            f"here (model.load_in: null, train.optimizer: adamw)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PipelineError(f"config key '{key}': {value} needs the bitsandbytes package; {INSTALL}") from None


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a quantized layer computes in: the run's mixed precision (bf16 on Ampere and later, fp16 on a T4)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def loading_arguments(cfg: ModelConfig, precision: str) -> dict:
    """from_pretrained's arguments for `model.load_in`: the quantization and the GPU to load onto ({} when off).

    4-bit is QLoRA's NF4 with double quantization. The weights go straight to this process's GPU (under
    `accelerate launch`, each process's own): a quantized model cannot be moved afterwards.
    """
    if cfg.load_in is None:
        return {}
    from transformers import BitsAndBytesConfig

    if cfg.load_in == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute_dtype(precision))
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def prepare_for_training(backbone: torch.nn.Module) -> None:
    """peft's preparation of a quantized backbone: every weight frozen, the ones left in 16 bits (norms,
    embeddings) cast to fp32 for stable training. Gradient checkpointing is the model's own key (build_model)."""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)


def optimizer(name: str, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (or its paged form) over the same groups as torch's: the same rule for learning
    rates and weight decay, betas (0.9, 0.999) and eps 1e-8 alike."""
    import bitsandbytes as bnb

    return getattr(bnb.optim, OPTIMIZERS[name])(param_groups, lr=lr)
