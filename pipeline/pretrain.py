"""Domain pre-training: more masked-language-model (MLM) training of the backbone on the competition's own texts.

Kaggle NLP winners continue a backbone's MLM pre-training on the competition's texts before fine-tuning
(CommonLit Readability 2nd and 6th place, NBME 1st place). `pipeline pretrain CONFIG` does it for model.backbone.
The corpus is the text columns (data.text_columns) of train.csv, test.csv and pretrain.extra_files, never a target
or any other column; each distinct text once, made into model input exactly as training makes it
(`data.tokenize`: truncated at pretrain.max_length, two columns as a text pair). A share of the texts
(pretrain.eval_fraction) is held out: their MLM loss, under masks drawn once, is measured before pre-training,
after every epoch and at the end.

The backbone keeps its own dropout: model.dropout and the other fine-tuning keys shape `pipeline train` only.
Writes <output>/ (pretrain.output, default backbones/<experiment>) whole or not at all: the encoder without the
MLM head (`AutoModel` loads it, so `model.backbone: <output>` trains from it), the tokenizer, pretrain_log.csv
(one row per evaluation) and pretrain.json (losses before and after, steps, seconds, texts, masking).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoModel, AutoModelForMaskedLM, get_scheduler
from transformers.utils import logging as hf_logging

from pipeline import data as D
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.inference import autocast, resolve_device, resolve_precision
from pipeline.io import folder_atomic, write_csv_atomic, write_json_atomic
from pipeline.model import load_tokenizer, resolve_backbone, use_speed_settings
from pipeline.train import decays, set_seed

MAX_GRAD_NORM = 1.0  # as in BERT's and RoBERTa's pre-training
IGNORE = -100  # the label of a token the loss does not predict (transformers' convention)


def output_dir(cfg: Config) -> Path:
    return Path(cfg.pretrain.output or Path("backbones") / cfg.experiment)


# ---- the corpus: text columns only ----

def _read_texts(path: Path, key: str, columns: list[str]) -> list[tuple[str, ...]]:
    """One tuple per row with a text: the row's text columns and nothing else (missing cells become "")."""
    if not path.is_file():
        hint = "; set data.test_file: null to pre-train without a test set" if key == "data.test_file" else ""
        raise PipelineError(f"{key}: {path} not found{hint}")
    table = D.read_table(path, key, columns)
    rows = table[columns].fillna("").astype(str).itertuples(index=False, name=None)
    return [row for row in rows if any(text.strip() for text in row)]


def corpus(cfg: Config) -> tuple[list[tuple[str, ...]], dict[str, int]]:
    """Each distinct text once, in first-seen order (a tuple of its data.text_columns), and the rows each file gave.

    Only data.text_columns are read on from each table, so no target or other column can reach pre-training.
    """
    d = cfg.data
    files = [(d.train_path, "data.train_file")] + ([(d.test_path, "data.test_file")] if d.test_path else [])
    files += [(Path(d.dir) / name, "pretrain.extra_files") for name in cfg.pretrain.extra_files]
    texts: dict[tuple[str, ...], None] = {}
    rows = {}
    for path, key in files:
        found = _read_texts(path, key, d.text_columns)
        rows[str(path)] = len(found)
        texts.update(dict.fromkeys(found))
    if not texts:
        raise PipelineError(f"no text to pre-train on: column(s) {', '.join(d.text_columns)} are empty in "
                            f"{', '.join(rows)}")
    return list(texts), rows


# ---- tokens and masks ----

@dataclass
class Tokens:
    """The corpus as model input; `words[i]` gives each token of text i its word's index (-1: never masked)."""

    enc: D.Encoded
    words: list[np.ndarray]
    whole_word: bool


def word_index(enc, i: int, special: set[int], whole_word: bool) -> np.ndarray:
    """Per token of text i: its word's index, or its own index at token level; -1 for special tokens."""
    ids = enc["input_ids"][i]
    # a text pair numbers the words of each of its two texts from 0: a word is (text, word)
    keys = list(zip(enc.sequence_ids(i), enc.word_ids(i))) if whole_word else [(0, t) for t in range(len(ids))]
    index: dict[tuple, int] = {}
    out = np.full(len(ids), -1, dtype=np.int64)
    for t, (token, key) in enumerate(zip(ids, keys)):
        if token not in special and key[1] is not None:
            out[t] = index.setdefault(key, len(index))
    return out


def tokenize(tokenizer, texts: list[tuple[str, ...]], max_length: int, whole_word: bool) -> Tokens:
    """Tokens as training makes them; word boundaries from a fast tokenizer's `word_ids()`, else token level."""
    enc = D.tokenize(tokenizer, [list(column) for column in zip(*texts)], max_length)
    whole_word = whole_word and enc.is_fast
    special = set(tokenizer.all_special_ids)
    words = [word_index(enc, i, special, whole_word) for i in range(len(texts))]
    return Tokens(D.Encoded(enc["input_ids"], enc.get("token_type_ids"), None, max_length), words, whole_word)


def mask_tokens(input_ids: torch.Tensor, words: torch.Tensor, rate: float, mask_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al., 2019): (inputs, labels) for a batch of token ids.

    Each word of a row is chosen with probability `rate`, every token of a chosen word with it: with whole-word
    indices `rate` counts words, at token level tokens. Of the chosen tokens 80 % become the mask token, 10 % a
    random token and 10 % stay; the labels are their ids, IGNORE elsewhere. `words` is -1 where nothing may be
    masked (special tokens, padding).
    """
    chosen = torch.rand((words.shape[0], max(int(words.max()) + 1, 1)), generator=generator) < rate
    selected = (words >= 0) & torch.gather(chosen, 1, words.clamp(min=0))
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[selected & (roll < 0.8)] = mask_id
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(vocab_size, (int(swap.sum()),), generator=generator)
    return inputs, labels


@dataclass
class Masker:
    """Masked batches of the corpus, padded as training pads them."""

    tokens: Tokens
    rate: float
    mask_id: int
    vocab_size: int
    pad_id: int
    multiple: int
    takes_token_types: bool

    def batch(self, positions: list[int], generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = D.collate(self.tokens.enc, positions, self.pad_id, self.multiple).inputs
        words = torch.full(inputs["input_ids"].shape, -1, dtype=torch.long)
        for row, i in enumerate(positions):
            words[row, :len(self.tokens.words[i])] = torch.from_numpy(self.tokens.words[i])
        inputs["input_ids"], labels = mask_tokens(inputs["input_ids"], words, self.rate, self.mask_id,
                                                  self.vocab_size, generator)
        if not self.takes_token_types:  # DistilBERT-like models take no segment ids
            inputs.pop("token_type_ids", None)
        return inputs, labels


# ---- the model ----

@contextlib.contextmanager
def _quiet_transformers():
    """Without transformers' table of missing and unexpected keys: `load_masked_lm` says what matters in words."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_masked_lm(name: str, source: str) -> tuple[torch.nn.Module, bool]:
    """The backbone with an MLM head, in float32, and whether the head starts fresh (no weights for it)."""
    try:
        with _quiet_transformers():
            model, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise PipelineError(f"model.backbone: cannot load '{name}' as a masked-language model ({err})") from None
    fresh = [k for k in info["missing_keys"] if not k.startswith(f"{model.base_model_prefix}.")]
    if fresh:
        warnings.warn(f"model.backbone '{name}' has no masked-LM head weights ({len(fresh)} tensors, e.g. {fresh[0]}): "
                      "the head starts fresh, so the loss before pre-training is a random head's and the first steps "
                      "mostly train the head", stacklevel=2)
    return model, bool(fresh)


def save_encoder(model: torch.nn.Module, source: str, tokenizer, out: Path) -> None:
    """The MLM model's encoder, saved in the backbone's own AutoModel class with the tokenizer.

    Parts the MLM form lacks (BERT's pooler, which the pipeline's pooling does not use) keep the original's
    weights, so `AutoModel.from_pretrained(out)` finds every weight it expects.
    """
    with _quiet_transformers():
        encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
    result = encoder.load_state_dict(model.base_model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise PipelineError(f"model.backbone: the masked-LM model's encoder has weights {type(encoder).__name__} "
                            f"does not, e.g. {result.unexpected_keys[0]}; cannot save it as a backbone")
    encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights (`train.decays`, as in fine-tuning)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, foreach=True)


def masked_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
                ) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the masked tokens (in float32), and how many there were."""
    logits = model(**inputs).logits
    chosen = labels != IGNORE
    return F.cross_entropy(logits[chosen].float(), labels[chosen], reduction="sum"), int(chosen.sum())


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list, device: torch.device, precision: str) -> float:
    """Mean MLM loss per masked token of the held-out texts, under the masks drawn once at the start."""
    model.eval()
    total, count = 0.0, 0
    for inputs, labels in batches:
        with autocast(device, precision):
            loss, n = masked_loss(model, {k: v.to(device) for k, v in inputs.items()}, labels.to(device))
        total, count = total + loss.item(), count + n
    return total / count


def split_texts(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) text positions: a seeded draw of round(n * fraction) texts, at least one each."""
    if n < 2:
        raise PipelineError(f"the corpus has {n} distinct text; pre-training needs at least 2 (one is held out)")
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def _check_output(out: Path) -> None:
    """Refuse to replace a folder that `pretrain` did not write (a typo in pretrain.output must not delete data)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "pretrain.json").exists())):
        raise PipelineError(f"pretrain.output: {out} exists and is not a backbone `pipeline pretrain` wrote; "
                            "choose another pretrain.output or delete it")


def run(cfg: Config, progress: bool = True) -> dict:
    """Pre-train model.backbone on the corpus and write the encoder to `output_dir(cfg)`; returns pretrain.json."""
    p = cfg.pretrain
    out = output_dir(cfg)
    _check_output(out)
    texts, rows = corpus(cfg)
    train_pos, eval_pos = split_texts(len(texts), p.eval_fraction, p.seed)
    source = resolve_backbone(cfg.model.backbone)
    tokenizer = load_tokenizer(source)
    if tokenizer.mask_token_id is None:
        raise PipelineError(f"model.backbone '{cfg.model.backbone}': its tokenizer has no mask token, which "
                            "masked-LM pre-training needs")
    max_length = p.max_length or cfg.data.max_length
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 100_000 and max_length > limit:
        key = "pretrain.max_length" if p.max_length else "data.max_length"
        raise PipelineError(f"config key '{key}': {max_length} is beyond the model's maximum of {limit} tokens")
    tokens = tokenize(tokenizer, texts, max_length, p.whole_word)
    if p.whole_word and not tokens.whole_word:
        warnings.warn("pretrain.whole_word: this tokenizer gives no word boundaries (it is not a fast tokenizer); "
                      "masking single tokens", stacklevel=2)

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    set_seed(p.seed)
    model, fresh_head = load_masked_lm(cfg.model.backbone, source)
    use_speed_settings(cfg.model, model, model)
    model.to(device)
    masker = Masker(tokens, p.mask_rate, tokenizer.mask_token_id, min(len(tokenizer), model.config.vocab_size),
                    tokenizer.pad_token_id or 0, cfg.train.pad_to_multiple_of,
                    "token_type_ids" in inspect.signature(model.forward).parameters)

    lengths = tokens.enc.lengths
    eval_masks = torch.Generator().manual_seed(p.seed + 1)  # the held-out texts' masks: drawn once, then fixed
    eval_set = [masker.batch([int(eval_pos[i]) for i in b], eval_masks)
                for b in D.eval_batches(lengths[eval_pos], p.batch_size)]
    if not any(bool((labels != IGNORE).any()) for _, labels in eval_set):
        raise PipelineError(f"pretrain.eval_fraction: the {len(eval_pos)} held-out text(s) drew no masked token; "
                            "raise pretrain.eval_fraction or pretrain.mask_rate")

    optimizer = build_optimizer(model, p.lr, p.weight_decay)
    per_epoch = math.ceil(len(train_pos) / p.batch_size)
    total = max(1, round(per_epoch * p.epochs))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=round(p.warmup_ratio * total),
                              num_training_steps=total)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    masks = torch.Generator().manual_seed(p.seed)
    started = time.time()
    before = held_out_loss(model, eval_set, device, precision)
    log = [{"step": 0, "epoch": 0.0, "lr": 0.0, "train_loss": float("nan"), "eval_loss": before, "elapsed_s": 0.0}]
    step, running, running_n = 0, 0.0, 0
    bar = Progress(TextColumn(f"[bold]{cfg.experiment} pretrain"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not progress)
    with folder_atomic(out) as tmp, bar:
        task = bar.add_task("pretrain", total=total, status=f"held-out loss {before:.4f}")
        for epoch in range(math.ceil(total / per_epoch)):
            for b in D.train_batches(lengths[train_pos], p.batch_size, p.seed + epoch):
                if step == total:
                    break
                model.train()
                inputs, labels = masker.batch([int(train_pos[i]) for i in b], masks)
                with autocast(device, precision):
                    loss, n = masked_loss(model, {k: v.to(device) for k, v in inputs.items()}, labels.to(device))
                if n:  # a batch of short texts may draw no mask at all: nothing to learn from it
                    scaler.scale(loss / n).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                    scaler.step(optimizer)
                    scaler.update()
                    running, running_n = running + loss.item() / n, running_n + 1
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                bar.update(task, completed=step)
                if step % per_epoch and step != total:
                    continue
                loss_now = held_out_loss(model, eval_set, device, precision)
                log.append({"step": step, "epoch": round(step / per_epoch, 3), "lr": lr,
                            "train_loss": running / max(running_n, 1), "eval_loss": loss_now,
                            "elapsed_s": round(time.time() - started, 2)})
                running, running_n = 0.0, 0
                write_csv_atomic(tmp / "pretrain_log.csv", pd.DataFrame(log))
                status = f"held-out loss {before:.4f} -> {loss_now:.4f}"
                bar.update(task, status=status)
                if progress and not bar.console.is_terminal:  # logs get a line per evaluation
                    bar.console.print(f"{cfg.experiment} pretrain step {step}/{total}: {status}")
        summary = {"backbone": cfg.model.backbone, "output": str(out), "loss_before": before,
                   "loss_after": log[-1]["eval_loss"], "steps": total, "epochs": p.epochs,
                   "seconds": round(time.time() - started, 1), "texts": len(texts), "train_texts": len(train_pos),
                   "eval_texts": len(eval_pos), "rows_per_file": rows,
                   "masking": "whole-word" if tokens.whole_word else "token", "mask_rate": p.mask_rate,
                   "max_length": max_length, "fresh_head": fresh_head, "precision": precision,
                   "device": str(device), "pretrain": asdict(p)}
        save_encoder(model.cpu(), source, tokenizer, tmp)
        write_json_atomic(tmp / "pretrain.json", summary)
    return summary
