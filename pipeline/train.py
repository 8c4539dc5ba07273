"""Fine-tune one fold: the training loop, evaluation on the held-out fold, the best checkpoint.

Outputs in oof/<experiment>/fold<k>/: valid_predictions.csv (joined by id), log.csv (one row per
evaluation), model.pt (best weights, a plain state dict), state.pt (everything `--resume` needs) and
metrics.json, written last: a fold is complete when metrics.json exists.
"""

from __future__ import annotations

import ctypes
import gc
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler

from pipeline import data as D
from pipeline.config import Config, TrainConfig, save_config
from pipeline.errors import PipelineError
from pipeline.folds import load_folds
from pipeline.inference import autocast, predict, resolve_device, resolve_precision  # noqa: F401 (T.predict)
from pipeline.io import read_json, save_torch_atomic, write_csv_atomic, write_json_atomic
from pipeline.losses import rdrop_consistency, task_loss
from pipeline.metrics import is_better, score
from pipeline.model import TextModel, build_model, encoder_layers, fit_target_scaling, load_tokenizer, resolve_backbone
from pipeline.regularization import active_dropout
from pipeline.runs import check_same_config


@dataclass
class Prepared:
    """What every fold of a run shares: the table, its tokens (tokenized once) and the folds."""

    cfg: Config
    train_df: pd.DataFrame
    enc: D.Encoded
    fold: np.ndarray
    classes: list[str] | None
    tokenizer: object

    @property
    def outputs(self) -> int:
        return len(self.cfg.data.target_columns) if self.classes is None else len(self.classes)


def prepare(cfg: Config) -> Prepared:
    df = D.load_train(cfg)
    fold = load_folds(cfg, df)
    classes = None if cfg.data.task == "regression" else D.class_names(cfg, df[cfg.data.target_columns[0]])
    tokenizer = load_tokenizer(resolve_backbone(cfg.model.backbone))
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 100_000 and cfg.data.max_length > limit:
        raise PipelineError(f"config key 'data.max_length': {cfg.data.max_length} is beyond the model's "
                            f"maximum of {limit} tokens")
    enc = D.encode(tokenizer, df, cfg.data.text_columns, cfg.data.max_length, D.target_array(cfg, df))
    return Prepared(cfg, df, enc, fold, classes, tokenizer)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: TextModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW (bias-corrected) with no weight decay on biases and LayerNorm; layer-wise LR decay by depth.

    With decay factor d, the head and the top layer train at the base rate, layer i from the top at
    lr * d**i, and the embeddings lowest, at lr * d**n_layers.
    """
    t = cfg.train
    layers = encoder_layers(model.backbone)
    n = len(layers)
    depth_of = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            depth_of[p] = n - 1 - i  # top layer: 0
    head = set(model.head_parameters())
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p in head:
            lr = t.head_lr or t.lr
        elif p in depth_of:
            lr = t.lr * t.llrd ** depth_of[p]
        elif "embed" in name:
            lr = t.lr * t.llrd ** n
        else:  # e.g. a final LayerNorm or pooler above the layers
            lr = t.lr
        no_decay = p.ndim < 2 or "norm" in name.lower()
        groups.setdefault((lr, 0.0 if no_decay else t.weight_decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=t.lr, foreach=True)


def training_loss(model: TextModel, batch: D.Batch, task: str, rdrop: float) -> torch.Tensor:
    """The task loss averaged over dropout samples; with R-Drop, a doubled batch and the consistency term."""
    targets = model.target_scale.normalize(batch.targets) if task == "regression" else batch.targets
    if rdrop <= 0:
        return task_loss(task, model.sample_logits(**batch.inputs), targets)
    doubled = {k: torch.cat([v, v]) for k, v in batch.inputs.items()}
    a, b = model.sample_logits(**doubled).chunk(2, dim=1)
    return 0.5 * (task_loss(task, a, targets) + task_loss(task, b, targets)) \
        + rdrop * rdrop_consistency(task, a, b)


def optimizer_step(model: TextModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   max_grad_norm: float) -> bool:
    """Clip, step and clear the gradients; False when the GradScaler skipped the step.

    Under fp16 the scaler skips every step whose gradients hold an inf or NaN, finite loss or not, and halves
    its scale: a lower scale after `update` is how a skipped step shows.
    """
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale is None or scaler.get_scale() >= scale


def metric_target(prep: Prepared, positions: np.ndarray) -> np.ndarray:
    return prep.enc.targets[positions]


def fold_dir(cfg: Config, fold: int) -> Path:
    return cfg.run_dir / f"fold{fold}"


def prediction_frame(prep: Prepared, positions: np.ndarray, preds: np.ndarray) -> pd.DataFrame:
    cfg = prep.cfg
    frame = pd.DataFrame(preds, columns=D.prediction_columns(cfg, prep.classes))
    frame.insert(0, cfg.data.id_column, prep.train_df[cfg.data.id_column].to_numpy()[positions])
    return frame


def save_backbone_files(prep: Prepared, model_config) -> None:
    """Tokenizer and backbone config beside the checkpoints, so `predict` needs no pretrained weights."""
    out = prep.cfg.run_dir / "backbone"
    if not (out / "config.json").exists():
        prep.tokenizer.save_pretrained(out)
        model_config.save_pretrained(out)


@dataclass
class StepPlan:
    batches_per_epoch: int  # micro-batches
    total_micro: int
    total_steps: int  # optimizer steps: the schedule counts these
    eval_steps: frozenset[int]


def step_plan(t: TrainConfig, train_rows: int) -> StepPlan:
    """How many steps a fold trains and after which optimizer steps it evaluates (always after the last).

    Evaluations come every `eval_every` steps (0: twice per epoch) from `eval_start` of the way through: each one
    costs as much as several training steps.
    """
    batches_per_epoch = math.ceil(train_rows / t.batch_size)
    total_micro = max(1, round(batches_per_epoch * t.epochs))
    total_steps = math.ceil(total_micro / t.grad_accum)
    every = t.eval_every or max(1, math.ceil(batches_per_epoch / t.grad_accum / 2))
    evals = {s for s in range(every, total_steps + 1, every) if s >= t.eval_start * total_steps}
    return StepPlan(batches_per_epoch, total_micro, total_steps, frozenset(evals | {total_steps}))


def train_fold(prep: Prepared, fold: int, resume: bool = False, progress: bool = True) -> dict:
    cfg, t, task = prep.cfg, prep.cfg.train, prep.cfg.data.task
    if fold not in set(prep.fold.tolist()):
        raise PipelineError(f"fold {fold} does not exist: data.n_folds is {cfg.data.n_folds}")
    out = fold_dir(cfg, fold)
    check_same_config(cfg, cfg.run_dir)
    if resume and (out / "metrics.json").exists():
        return read_json(out / "metrics.json")  # this fold finished before the interruption
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # starting over: until it finishes, this fold is unfinished, and no older state may resume it
        for stale in ("metrics.json", "valid_predictions.csv", "state.pt"):
            (out / stale).unlink(missing_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    reset_peak_memory(device)
    set_seed(t.seed + fold)

    train_pos = np.flatnonzero(prep.fold != fold)
    valid_pos = np.flatnonzero(prep.fold == fold)
    model, model_config = build_model(cfg.model, prep.outputs)
    if task == "regression":
        fit_target_scaling(model, cfg.model.target_scaling, prep.enc.targets[train_pos])
    save_backbone_files(prep, model_config)
    if (t.rdrop > 0 or cfg.model.head == "msd") and not active_dropout(model):
        warnings.warn("R-Drop and Multi-Sample Dropout need dropout, but every dropout in this model is 0: "
                      "their extra terms are identically zero", stacklevel=2)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    plan = step_plan(t, len(train_pos))
    batches_per_epoch, total_micro, total_steps = plan.batches_per_epoch, plan.total_micro, plan.total_steps
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    pad_id = prep.tokenizer.pad_token_id or 0
    y_valid = metric_target(prep, valid_pos)

    step, micro, best, best_step, log, skipped = 0, 0, None, -1, [], 0
    best_preds: np.ndarray | None = None
    elapsed, running_loss, running_n = 0.0, 0.0, 0
    state_path = out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, micro, best, best_step = state["step"], state["micro"], state["best"], state["best_step"]
        log, skipped, best_preds = state["log"], state["skipped"], state["best_preds"]
        set_rng_state(state["rng"], device)
        # (states saved before these keys existed resume from the last evaluation's time and a fresh loss average)
        elapsed = state.get("elapsed_s", log[-1]["elapsed_s"] if log else 0.0)
        running_loss, running_n = state.get("running_loss", 0.0), state.get("running_n", 0)

    started = time.time() - elapsed
    saved_at = step

    def save_state() -> None:
        """Everything `--resume` needs to continue exactly from this optimizer step."""
        nonlocal saved_at
        if t.save_checkpoint and saved_at < step < total_steps:
            save_torch_atomic(state_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "micro": micro, "best": best, "best_step": best_step, "log": log,
                "skipped": skipped, "best_preds": best_preds, "rng": rng_state(device),
                "elapsed_s": time.time() - started, "running_loss": running_loss, "running_n": running_n})
            saved_at = step

    bar = Progress(TextColumn(f"[bold]{cfg.experiment} fold {fold}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=False)
    with bar:
        task_id = bar.add_task("train", total=total_steps, completed=step, status="")
        epoch = micro // batches_per_epoch
        while micro < total_micro:
            batches = D.train_batches(prep.enc.lengths[train_pos], t.batch_size, t.seed + 1000 * fold + epoch,
                                      t.length_grouping)
            start = micro - epoch * batches_per_epoch
            for positions in batches[start:]:
                if micro >= total_micro:
                    break
                model.train()
                batch = D.collate(prep.enc, train_pos[positions].tolist(), pad_id, t.pad_to_multiple_of).to(device)
                group = min(t.grad_accum, total_micro - (micro // t.grad_accum) * t.grad_accum)
                with autocast(device, precision):
                    loss = training_loss(model, batch, task, t.rdrop)
                if not torch.isfinite(loss) and not scaler.is_enabled():  # fp16: the GradScaler skips the step
                    raise PipelineError(
                        f"{cfg.experiment} fold {fold}: loss is {loss.item()} at optimizer step {step} "
                        f"(lr {max(scheduler.get_last_lr()):.2e}); lower train.lr or check the targets")
                scaler.scale(loss / group).backward()
                running_loss += loss.item()
                running_n += 1
                micro += 1
                if micro % t.grad_accum and micro < total_micro:
                    continue
                if not optimizer_step(model, optimizer, scaler, t.max_grad_norm):
                    skipped += 1  # fp16 gradients overflowed: the GradScaler lowered its scale instead
                scheduler.step()
                step += 1
                bar.update(task_id, completed=step)
                if step not in plan.eval_steps:
                    continue

                eval_started = time.time()
                preds = predict(model, prep.enc, valid_pos, task, device, precision, t.eval_batch_size, pad_id,
                                t.pad_to_multiple_of)
                if not np.isfinite(preds).all():
                    raise PipelineError(f"{cfg.experiment} fold {fold}: non-finite predictions at step {step}")
                value = score(cfg.metric, y_valid, preds)
                if is_better(cfg.metric, value, best):
                    best, best_step, best_preds = value, step, preds
                    if t.save_checkpoint:
                        save_torch_atomic(out / "model.pt", model.state_dict())
                log.append({"step": step, "epoch": round(micro / batches_per_epoch, 3),
                            "lr": max(scheduler.get_last_lr()), "train_loss": running_loss / max(running_n, 1),
                            cfg.metric: value, "eval_s": round(time.time() - eval_started, 2),
                            "elapsed_s": round(time.time() - started, 2)})
                running_loss, running_n = 0.0, 0
                write_csv_atomic(out / "log.csv", pd.DataFrame(log))
                status = f"loss {log[-1]['train_loss']:.4f}  {cfg.metric} {value:.4f} (best {best:.4f})"
                bar.update(task_id, status=status)
                if progress and not bar.console.is_terminal:  # logs get a line per evaluation
                    bar.console.print(f"{cfg.experiment} fold {fold} step {step}/{total_steps}: {status}")
                save_state()
            epoch += 1
            if micro % t.grad_accum == 0:
                save_state()  # at each epoch's end too: evaluations may begin late in the schedule

    write_csv_atomic(out / "valid_predictions.csv", prediction_frame(prep, valid_pos, best_preds))
    metrics = {"fold": fold, "metric": cfg.metric, "score": best, "best_step": best_step, "steps": total_steps,
               "train_rows": len(train_pos), "valid_rows": len(valid_pos), "precision": precision,
               "device": str(device), "train_seconds": round(time.time() - started, 1),
               "peak_memory_mb": peak_memory_mb(device), "skipped_steps": skipped}
    write_json_atomic(out / "metrics.json", metrics)
    state_path.unlink(missing_ok=True)
    return metrics


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":  # dropout and mixout masks on a GPU come from its own generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fold's peak-memory count afresh: a grid trains many folds in one process.

    On CPU the count is the process's resident memory, so memory that earlier folds freed but the C
    allocator kept is handed back to the system first (glibc's malloc_trim) and not charged to this fold.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the count includes what the allocator kept
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the resident high-water mark
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory (since `reset_peak_memory` on Linux)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(cfg: Config, folds: list[int] | None = None, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train the given folds (default: all) of one experiment."""
    prep = prepare(cfg)
    return [train_fold(prep, k, resume=resume, progress=progress)
            for k in (folds if folds is not None else range(cfg.data.n_folds))]
