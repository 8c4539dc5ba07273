"""Fine-tune one fold: the training loop, evaluation on the held-out fold, the best checkpoint.

Outputs in oof/<experiment>/fold<k>/: valid_predictions.csv (joined by id), log.csv (one row per
evaluation; a stage column in pseudo-label stage mode), model.pt (best weights, a plain state dict: under LoRA the
adapters, head and target scale alone), state.pt (everything `--resume` needs) and metrics.json, written last: a
fold is complete when metrics.json exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import random
import time
import warnings
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler

from pipeline import data as D
from pipeline import pseudo as P
from pipeline import quantization as Q
from pipeline.config import Config, TrainConfig
from pipeline.decoder import record_pad_token
from pipeline.distributed import eval_share, gather_list, gather_rows, make_accelerator, process_state, release, shard
from pipeline.errors import PipelineError
from pipeline.folds import load_folds
from pipeline.inference import autocast, predict, resolve_device, resolve_precision  # noqa: F401 (T.predict)
from pipeline.io import read_json, save_torch_atomic, write_csv_atomic, write_json_atomic
from pipeline.losses import rdrop_consistency, task_loss
from pipeline.metrics import is_better, score
from pipeline.model import (
    TextModel,
    build_model,
    checkpoint_state,
    encoder_layers,
    fit_target_scaling,
    input_side,
    load_checkpoint_state,
    load_tokenizer,
    resolve_backbone,
)
from pipeline.regularization import active_dropout
from pipeline.runs import check_same_config, record_run
from pipeline.techniques import Techniques
from pipeline.techniques import build as build_techniques
from pipeline.techniques.lora import has_base_weights, require_peft, save_base_weights


@dataclass
class Prepared:
    """What every fold of a run shares: the table, its tokens (tokenized once) and the folds."""

    cfg: Config
    train_df: pd.DataFrame
    enc: D.Encoded
    fold: np.ndarray
    classes: list[str] | None
    tokenizer: object
    pseudo: P.PseudoLabels | None = None  # train.pseudo's rows, tokenized once

    @property
    def outputs(self) -> int:
        return len(self.cfg.data.target_columns) if self.classes is None else len(self.classes)


def prepare(cfg: Config) -> Prepared:
    df = D.load_train(cfg)
    with process_state(resolve_device(cfg.train.device)).main_process_first():  # one process writes the folds
        fold = load_folds(cfg, df)
    classes = None if cfg.data.task == "regression" else D.class_names(cfg, df[cfg.data.target_columns[0]])
    tokenizer = load_tokenizer(resolve_backbone(cfg.model.backbone))
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 100_000 and cfg.data.max_length > limit:
        raise PipelineError(f"config key 'data.max_length': {cfg.data.max_length} is beyond the model's "
                            f"maximum of {limit} tokens")
    enc = D.encode(tokenizer, df, cfg.data.text_columns, cfg.data.max_length, D.target_array(cfg, df))
    return Prepared(cfg, df, enc, fold, classes, tokenizer, P.load(cfg, df, fold, classes, tokenizer))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay applies to weight matrices, not to biases or LayerNorm weights (BERT's rule)."""
    return p.ndim >= 2 and "norm" not in name.lower()


def build_optimizer(model: TextModel, cfg: Config, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW (bias-corrected) with no weight decay on biases and LayerNorm; layer-wise LR decay by depth.

    With decay factor d, the head and the top layer train at the base rate, layer i from the top at
    lr * d**i, and the embeddings lowest, at lr * d**n_layers. `lr`: another base rate than train.lr (the pseudo
    stage's); train.head_lr keeps its ratio to the base. Only trainable parameters are given to it (LoRA's
    adapters, inside a layer, take that layer's rate). train.optimizer picks torch's AdamW or bitsandbytes' 8-bit one.
    """
    t = cfg.train
    base = t.lr if lr is None else lr
    layers = encoder_layers(model.backbone)
    n = len(layers)
    depth_of = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            depth_of[p] = n - 1 - i  # top layer: 0
    below = set(input_side(model.backbone, layers))
    head = set(model.head_parameters())
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p in head:
            rate = t.head_lr * (base / t.lr) if t.head_lr else base  # (base / t.lr is exactly 1 at train.lr)
        elif p in depth_of:
            rate = base * t.llrd ** depth_of[p]
        elif p in below or "embed" in name:  # DeBERTa's rel_embeddings sit above its layers
            rate = base * t.llrd ** n
        else:  # e.g. a final LayerNorm or pooler above the layers
            rate = base
        groups.setdefault((rate, t.weight_decay if decays(name, p) else 0.0), []).append(p)
    param_groups = [{"params": ps, "lr": rate, "weight_decay": wd} for (rate, wd), ps in groups.items()]
    if t.optimizer != "adamw":
        return Q.optimizer(t.optimizer, param_groups, base)
    return torch.optim.AdamW(param_groups, lr=base, foreach=True)


def training_loss(model: TextModel, batch: D.Batch, task: str, rdrop: float) -> torch.Tensor:
    """The task loss averaged over dropout samples; with R-Drop, a doubled batch and the consistency term.

    Rows are weighted where the batch carries weights (pseudo-labelled rows, see pipeline/pseudo.py).

    The model is called (not a method of it) so that DDP, which exchanges gradients through `forward`, sees it.
    """
    targets = model_of(model).target_scale.normalize(batch.targets) if task == "regression" else batch.targets
    if rdrop <= 0:
        return task_loss(task, model(**batch.inputs, samples=True), targets, batch.weights)
    doubled = {k: torch.cat([v, v]) for k, v in batch.inputs.items()}
    a, b = model(**doubled, samples=True).chunk(2, dim=1)
    return 0.5 * (task_loss(task, a, targets, batch.weights) + task_loss(task, b, targets, batch.weights)) \
        + rdrop * rdrop_consistency(task, a, b)


def model_of(model: torch.nn.Module) -> TextModel:
    """The TextModel inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


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
    """Tokenizer and backbone config beside the checkpoints, so `predict` needs no pretrained weights; under LoRA
    also the frozen backbone's weights, once for every fold (the folds' checkpoints hold their adapters alone)."""
    out = prep.cfg.run_dir / "backbone"
    if not (out / "config.json").exists():
        record_pad_token(model_config, prep.tokenizer)
        prep.tokenizer.save_pretrained(out)
        model_config.save_pretrained(out)
    if prep.cfg.model.lora_r and not has_base_weights(out):
        save_base_weights(resolve_backbone(prep.cfg.model.backbone), out)


@dataclass
class StepPlan:
    batches_per_epoch: int  # micro-batches
    total_micro: int
    total_steps: int  # optimizer steps: the schedule counts these
    eval_steps: frozenset[int]


def step_plan(t: TrainConfig, batches_per_epoch: int, epochs: float | None = None) -> StepPlan:
    """How many steps a fold (or a stage of `epochs`) trains and after which optimizer steps it evaluates (always
    after the last).

    `batches_per_epoch`: micro-batches, ceil(rows / batch_size), or under train.max_tokens the count of
    `data.epoch_batches` (the same every epoch). Evaluations come every `eval_every` steps (0: twice per epoch) from
    `eval_start` of the way through: each one costs as much as several training steps.
    """
    total_micro = max(1, round(batches_per_epoch * (t.epochs if epochs is None else epochs)))
    total_steps = math.ceil(total_micro / t.grad_accum)
    every = t.eval_every or max(1, math.ceil(batches_per_epoch / t.grad_accum / 2))
    evals = {s for s in range(every, total_steps + 1, every) if s >= t.eval_start * total_steps}
    return StepPlan(batches_per_epoch, total_micro, total_steps, frozenset(evals | {total_steps}))


# The pseudo stage draws its batch orders apart from the true stage's (seeds t.seed + 1000 x fold + epoch): with
# pseudo rows as many as the true ones (distillation on the training texts), equal seeds would repeat the batches.
PSEUDO_STREAM = 10**6


@dataclass
class Stage:
    """One schedule of a fold: what it trains on, its steps and evaluations, its base rate and its batch order.

    A fold is one stage, "true" (its true rows, and train.pseudo's rows mixed in where it is set). In stage mode
    (train.pseudo_epochs > 0) it is two: "pseudo" (the fold's pseudo rows alone, train.pseudo_epochs at
    train.pseudo_lr), then "true" (its true rows alone, exactly as a fold without the first stage). Each stage
    has its own optimizer, warmup and schedule.
    """

    name: str  # the log's `stage` column in stage mode
    rows: P.FoldRows
    plan: StepPlan
    lr: float  # the optimizer's base rate
    seed: int  # epoch e's batches are drawn with seed + e
    first_step: int = 0  # optimizer steps of the stages before it: the log and best_step count the fold's steps
    final: bool = True  # the true labels' stage: the techniques act in it and its evaluations choose the checkpoint


def fold_stages(prep: Prepared, fold: int, train_pos: np.ndarray, valid_pos: np.ndarray) -> list[Stage]:
    """The fold's stages, planned before training starts: `--resume` finds a saved stage's plan without training."""
    cfg, t = prep.cfg, prep.cfg.train
    valid_ids = prep.train_df[cfg.data.id_column].to_numpy()[valid_pos]
    seed = t.seed + 1000 * fold
    if t.pseudo_epochs == 0:
        rows = P.fold_rows(prep.enc, prep.pseudo, fold, train_pos, valid_ids, cfg.data.task, prep.outputs,
                           t.pseudo_weight)  # + pseudo-labelled rows (train.pseudo)
        return [Stage("true", rows, step_plan(t, batch_count(t, rows, seed)), t.lr, seed)]
    pseudo = P.pseudo_rows(prep.pseudo, fold, valid_ids)
    first = Stage("pseudo", pseudo, step_plan(t, batch_count(t, pseudo, seed + PSEUDO_STREAM), t.pseudo_epochs),
                  t.pseudo_lr or t.lr, seed + PSEUDO_STREAM, final=False)
    true = P.FoldRows(prep.enc, train_pos)
    return [first, Stage("true", true, step_plan(t, batch_count(t, true, seed)), t.lr, seed,
                         first_step=first.plan.total_steps)]


def batch_count(t: TrainConfig, rows: P.FoldRows, seed: int) -> int:
    """Micro-batches per epoch: the same at every epoch's seed (under train.max_tokens it depends on the lengths)."""
    return len(D.epoch_batches(t, rows.lengths, seed, rows.enc.max_length))


def evaluate(model: torch.nn.Module, prep: Prepared, valid_pos: np.ndarray, device: torch.device,
             precision: str, rank: int, world: int) -> np.ndarray:
    """Predictions for the fold's validation rows, in their order; each process predicts its share."""
    t = prep.cfg.train
    share = eval_share(valid_pos, prep.enc.lengths[valid_pos], rank, world)
    preds = predict(model_of(model), prep.enc, share, prep.cfg.data.task, device, precision, t.eval_batch_size,
                    prep.tokenizer.pad_token_id or 0, t.pad_to_multiple_of, t.eval_max_tokens)
    return gather_rows(valid_pos, share, preds)


@dataclass
class FoldState:
    """How far a fold has trained: with the weights, optimizer, scheduler and techniques, what `--resume` restores."""

    step: int = 0  # optimizer steps taken in the stage
    micro: int = 0  # micro-batches taken in the stage
    best: float | None = None
    best_step: int = -1  # counted from the fold's start
    best_preds: np.ndarray | None = None
    log: list[dict] = field(default_factory=list)  # one row per evaluation
    skipped: int = 0  # optimizer steps the fp16 GradScaler skipped
    elapsed_s: float = 0.0
    running_loss: float = 0.0  # training loss summed since the last evaluation, for the log
    running_n: int = 0
    stage: int = 0  # the stage being trained (an index into `fold_stages`)


@dataclass
class Trainer:
    """One stage's training objects, as `accelerator.prepare` returned them (DDP-wrapped where several processes)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    techniques: Techniques

    @property
    def bare(self) -> TextModel:
        return model_of(self.model)


def start_fold_dir(cfg: Config, out: Path, resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # starting over: until it finishes, this fold is unfinished, and no older state may resume it
        for stale in ("metrics.json", "valid_predictions.csv", "state.pt"):
            (out / stale).unlink(missing_ok=True)
    record_run(cfg)


def new_model(prep: Prepared, train_pos: np.ndarray, main: bool, precision: str = "fp32") -> TextModel:
    """The fold's model: pretrained backbone and new head, regression targets scaled on the fold's rows."""
    cfg = prep.cfg
    model, model_config = build_model(cfg.model, prep.outputs, precision=precision)
    table = model.backbone.get_input_embeddings()
    D.check_vocabulary([prep.enc, *([prep.pseudo.enc] if prep.pseudo else [])], prep.tokenizer.pad_token_id or 0,
                       table.num_embeddings, cfg.model.backbone)
    if cfg.data.task == "regression":
        fit_target_scaling(model, cfg.model.target_scaling, prep.enc.targets[train_pos])
    if main:
        save_backbone_files(prep, model_config)
    if (cfg.train.rdrop > 0 or cfg.model.head == "msd") and not active_dropout(model):
        warnings.warn("R-Drop and Multi-Sample Dropout need dropout, but every dropout in this model is 0: "
                      "their extra terms are identically zero", stacklevel=3)
    return model


def stage_optimization(model: TextModel, cfg: Config, stage: Stage) -> tuple[torch.optim.AdamW, object, Techniques]:
    """A stage's fresh optimizer, its schedule (warmup and decay over the stage's steps) and its techniques.

    AWP, FGM, EMA and SWA act in the final stage only, counted on its schedule as in a fold without a pseudo stage
    (EMA starts from the weights it starts from): the pseudo stage is pre-training that hands on its live weights.
    """
    t, plan = cfg.train, stage.plan
    optimizer = build_optimizer(model, cfg, lr=stage.lr)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * plan.total_steps),
                              num_training_steps=plan.total_steps)
    techniques = (build_techniques(t, model, plan.total_steps, plan.batches_per_epoch / t.grad_accum)
                  if stage.final else Techniques())
    return optimizer, scheduler, techniques


def make_trainer(model: TextModel, cfg: Config, stage: Stage, accelerator: Accelerator) -> Trainer:
    model.to(accelerator.device)
    optimizer, scheduler, techniques = stage_optimization(model, cfg, stage)
    return Trainer(accelerator, *accelerator.prepare(model, optimizer, scheduler), techniques)


def next_stage(tr: Trainer, cfg: Config, stage: Stage) -> Trainer:
    """The trainer of the stage after `tr`'s: the same prepared model, where the last stage left it; all else new."""
    release(tr.accelerator, tr.optimizer, tr.scheduler)
    optimizer, scheduler, techniques = stage_optimization(tr.bare, cfg, stage)
    return Trainer(tr.accelerator, tr.model, *tr.accelerator.prepare(optimizer, scheduler), techniques)


def save_state(path: Path, tr: Trainer, fs: FoldState, started: float) -> None:
    """Everything `--resume` needs to continue exactly from this optimizer step (every process's RNG)."""
    rngs = gather_list(rng_state(tr.accelerator.device))
    if not tr.accelerator.is_main_process:
        return
    scaler = tr.accelerator.scaler
    save_torch_atomic(path, {
        **{f.name: getattr(fs, f.name) for f in fields(FoldState)}, "elapsed_s": time.time() - started,
        "model": checkpoint_state(tr.bare), "optimizer": tr.optimizer.state_dict(),
        "scheduler": tr.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rngs if len(rngs) > 1 else rngs[0], "techniques": tr.techniques.state_dict()})


def load_state(state: dict, path: Path, tr: Trainer) -> FoldState:
    """Restore a state `save_state` wrote to `path` into the trainer of its stage."""
    acc = tr.accelerator
    load_checkpoint_state(tr.bare, state["model"])
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    set_rng_state(rank_rng(state, path, acc.process_index, acc.num_processes), acc.device)
    tr.techniques.load_state_dict(state.get("techniques", [{} for _ in tr.techniques]))
    log = state["log"]
    # (states saved before these keys existed resume from the last evaluation's time and a fresh loss average)
    defaults = {"elapsed_s": log[-1]["elapsed_s"] if log else 0.0, "running_loss": 0.0, "running_n": 0, "stage": 0}
    return FoldState(**{f.name: state.get(f.name, defaults.get(f.name)) for f in fields(FoldState)})


@dataclass
class FoldRun:
    """What stays fixed while a fold trains, for its stages: what it scores, where it writes, how it reports."""

    prep: Prepared
    fold: int
    accelerator: Accelerator
    precision: str
    valid_pos: np.ndarray
    y_valid: np.ndarray
    out: Path
    total_steps: int  # over every stage
    staged: bool  # stage mode: the log has a stage column
    bar: Progress
    task_id: int
    started: float
    saved_at: tuple[int, int]  # (stage, step) of the state last saved

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def save_if_new(self, tr: Trainer, fs: FoldState, stage: Stage) -> None:
        """The state `--resume` continues from, after a step not saved yet (none after a stage's last step: the
        fold ends, or the next stage starts and saves its first state)."""
        if self.prep.cfg.train.save_checkpoint and self.saved_at < (fs.stage, fs.step) and \
                fs.step < stage.plan.total_steps:
            save_state(self.state_path, tr, fs, self.started)
            self.saved_at = (fs.stage, fs.step)


def train_fold(prep: Prepared, fold: int, resume: bool = False, progress: bool = True) -> dict:
    """Train one fold, on this process or on every process of an `accelerate launch` / `torchrun` launch.

    Set-up; then each stage (`fold_stages`: one, or the pseudo rows' and then the true rows') with its own
    optimizer and schedule (`train_stage`); the predictions and metrics of the best evaluation of the last stage.
    """
    cfg, t = prep.cfg, prep.cfg.train
    if fold not in set(prep.fold.tolist()):
        raise PipelineError(f"fold {fold} does not exist: data.n_folds is {cfg.data.n_folds}")
    out, state_path = fold_dir(cfg, fold), fold_dir(cfg, fold) / "state.pt"
    check_same_config(cfg, cfg.run_dir)
    if resume and (out / "metrics.json").exists():
        return read_json(out / "metrics.json")  # this fold finished before the interruption
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    accelerator = make_accelerator(device, precision)
    device, rank, world, main = (accelerator.device, accelerator.process_index, accelerator.num_processes,
                                 accelerator.is_main_process)
    if main:  # only the main process writes
        start_fold_dir(cfg, out, resume)
    accelerator.wait_for_everyone()
    reset_peak_memory(device)
    set_seed(t.seed + fold)  # the same initial model on every process

    train_pos = np.flatnonzero(prep.fold != fold)
    valid_pos = np.flatnonzero(prep.fold == fold)
    stages = fold_stages(prep, fold, train_pos, valid_pos)
    tr = make_trainer(new_model(prep, train_pos, main, precision), cfg, stages[0], accelerator)
    if rank:
        torch.manual_seed(t.seed + fold + 7919 * rank)  # other dropout masks on each process's rows
    fs = FoldState()
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("stage", 0):  # saved in a later stage: restored into that stage's optimizer and schedule
            tr = next_stage(tr, cfg, stages[state["stage"]])
        fs = load_state(state, state_path, tr)
        del state  # (a copy of the weights and the optimizer's moments)
    total_steps = stages[-1].first_step + stages[-1].plan.total_steps

    bar = Progress(TextColumn(f"[bold]{cfg.experiment} fold {fold}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not (progress and main), transient=False)
    task_id = bar.add_task("train", total=total_steps, completed=stages[fs.stage].first_step + fs.step, status="")
    run = FoldRun(prep, fold, accelerator, precision, valid_pos, metric_target(prep, valid_pos), out, total_steps,
                  len(stages) > 1, bar, task_id, time.time() - fs.elapsed_s, (fs.stage, fs.step))
    with bar:
        train_stage(run, tr, fs, stages[fs.stage])
        while fs.stage + 1 < len(stages):  # stage mode: the schedule restarts, on the true labels
            fs.stage, fs.step, fs.micro = fs.stage + 1, 0, 0
            tr = next_stage(tr, cfg, stages[fs.stage])
            run.save_if_new(tr, fs, stages[fs.stage])  # `--resume` continues from the boundary
            train_stage(run, tr, fs, stages[fs.stage])

    metrics = {"fold": fold, "metric": cfg.metric, "score": fs.best, "best_step": fs.best_step,
               "steps": total_steps, "train_rows": len(train_pos), "valid_rows": len(valid_pos),
               "precision": precision, "device": str(device), "processes": world,
               "train_seconds": round(time.time() - run.started, 1), "peak_memory_mb": peak_memory_mb(device),
               "skipped_steps": fs.skipped}
    if run.staged:  # how far the pseudo stage alone took the fold, for a comparison with the true labels' best
        metrics |= {"pseudo_rows": stages[0].rows.pseudo_rows, "pseudo_steps": stages[0].plan.total_steps,
                    "pseudo_score": [row for row in fs.log if row["stage"] == stages[0].name][-1][cfg.metric]}
    if main:
        write_csv_atomic(out / "valid_predictions.csv", prediction_frame(prep, valid_pos, fs.best_preds))
        write_json_atomic(out / "metrics.json", metrics)
        state_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return metrics


def train_stage(run: FoldRun, tr: Trainer, fs: FoldState, stage: Stage) -> None:
    """Train `stage` from where `fs` stands to its last optimizer step.

    Per micro-batch: this process's share of the global batch, forward and backward (gradients exchanged only on a
    group's last micro-batch), the techniques' adversarial passes; per optimizer step: clip, step, schedule, the
    techniques' averages; at an evaluation step: `evaluation`, then the state `--resume` continues from. Gradient
    accumulation is counted here rather than by `accelerator.accumulate`: a last group cut short by the end of the
    schedule averages over its own micro-batches, so that batch 4 x accumulation 3 takes the same steps as batch 12
    whatever the rows.
    """
    cfg, t, task = run.prep.cfg, run.prep.cfg.train, run.prep.cfg.data.task
    accelerator, plan, rows = run.accelerator, stage.plan, stage.rows
    model, optimizer, scheduler, techniques = tr.model, tr.optimizer, tr.scheduler, tr.techniques
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    pad_id = run.prep.tokenizer.pad_token_id or 0

    def forward_backward(batch: D.Batch, scale: float) -> torch.Tensor:
        """A micro-batch's loss, and its gradients scaled to its share of the optimizer step."""
        loss = training_loss(model, batch, task, t.rdrop)
        accelerator.backward(loss * scale)
        return loss

    epoch = fs.micro // plan.batches_per_epoch
    while fs.micro < plan.total_micro:
        batches = D.epoch_batches(t, rows.lengths, stage.seed + epoch, rows.enc.max_length)
        for positions in batches[fs.micro - epoch * plan.batches_per_epoch:]:
            if fs.micro >= plan.total_micro:
                break
            model.train()
            share, weight = shard(positions, rank, world)
            batch = D.collate(rows.enc, rows.positions[share].tolist(), pad_id, t.pad_to_multiple_of).to(device)
            group = min(t.grad_accum, plan.total_micro - (fs.micro // t.grad_accum) * t.grad_accum)
            last_of_group = (fs.micro + 1) % t.grad_accum == 0 or fs.micro + 1 == plan.total_micro
            with contextlib.nullcontext() if last_of_group else accelerator.no_sync(model):
                loss = forward_backward(batch, weight / group)
                if not torch.isfinite(loss) and accelerator.scaler is None:  # fp16: the scaler skips the step
                    raise PipelineError(
                        f"{cfg.experiment} fold {run.fold}: loss is {loss.item()} at optimizer step "
                        f"{stage.first_step + fs.step} (lr {max(scheduler.get_last_lr()):.2e}); lower train.lr or "
                        "check the targets")
                techniques.after_backward(tr.bare, partial(forward_backward, batch, weight / group), fs.step)
            fs.running_loss += loss.item() * weight
            fs.running_n += 1
            fs.micro += 1
            if not last_of_group:
                continue

            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()  # not after a step the fp16 GradScaler skipped
            optimizer.zero_grad(set_to_none=True)
            fs.skipped += optimizer.step_was_skipped  # fp16 gradients overflowed: the scaler lowered its scale
            fs.step += 1
            techniques.after_step(tr.bare, fs.step)
            run.bar.update(run.task_id, completed=stage.first_step + fs.step)
            if fs.step not in plan.eval_steps:
                continue
            evaluation(run, tr, fs, stage)
            run.save_if_new(tr, fs, stage)
        epoch += 1
        if fs.micro % t.grad_accum == 0:
            run.save_if_new(tr, fs, stage)  # at each epoch's end too: evaluations may begin late in the schedule


def evaluation(run: FoldRun, tr: Trainer, fs: FoldState, stage: Stage) -> None:
    """After optimizer step `fs.step` of `stage`: predict with the weights the techniques evaluate (averaged or
    live), keep the best, log.

    Only the final stage's evaluations may give the checkpoint: a fold's model is one trained on its true labels
    (the pseudo stage's are logged, to show where the true labels start from and what they add).
    """
    cfg, tech, accelerator = run.prep.cfg, tr.techniques, run.accelerator
    step, world = stage.first_step + fs.step, accelerator.num_processes
    eval_started = time.time()
    tech.at_evaluation(tr.bare, fs.step)
    with tech.evaluation_weights(tr.bare):  # the weights evaluated and saved (EMA, SWA: averaged)
        preds = evaluate(tr.model, run.prep, run.valid_pos, accelerator.device, run.precision,
                         accelerator.process_index, world)
        if not np.isfinite(preds).all():
            raise PipelineError(f"{cfg.experiment} fold {run.fold}: non-finite predictions at step {step}")
        value = score(cfg.metric, run.y_valid, preds)
        if stage.final and is_better(cfg.metric, value, fs.best):
            fs.best, fs.best_step, fs.best_preds = value, step, preds
            if cfg.train.save_checkpoint and accelerator.is_main_process:
                save_torch_atomic(run.out / "model.pt", checkpoint_state(tr.bare))
    train_loss = sum(gather_list(fs.running_loss)) / world / max(fs.running_n, 1)
    fs.log.append({**({"stage": stage.name} if run.staged else {}),
                   "step": step, "epoch": round(fs.micro / stage.plan.batches_per_epoch, 3),
                   "lr": max(tr.scheduler.get_last_lr()), "train_loss": train_loss, cfg.metric: value,
                   "eval_s": round(time.time() - eval_started, 2), "elapsed_s": round(time.time() - run.started, 2)})
    fs.running_loss, fs.running_n = 0.0, 0
    if accelerator.is_main_process:
        write_csv_atomic(run.out / "log.csv", pd.DataFrame(fs.log))
    best = "" if fs.best is None else f" (best {fs.best:.4f})"
    status = f"loss {train_loss:.4f}  {cfg.metric} {value:.4f}{best}"
    run.bar.update(run.task_id, status=status)
    if not run.bar.disable and not run.bar.console.is_terminal:  # (progress shown) logs get a line per evaluation
        where = f" ({stage.name} stage)" if run.staged else ""
        run.bar.console.print(f"{cfg.experiment} fold {run.fold} step {step}/{run.total_steps}{where}: {status}")


def rank_rng(state: dict, path: Path, rank: int, world: int) -> dict:
    """This process's RNG state from a saved state (one per process since several-process runs)."""
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) != world:
        raise PipelineError(f"{path} was saved by a run on {len(rngs)} process(es); resume it on {len(rngs)}, "
                            "or train the fold again without --resume")
    return rngs[rank]


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
    """Train the given folds (default: all) of one experiment: fine-tuned here, or by the module of its kind."""
    if cfg.model.kind == "tfidf":  # TF-IDF + a linear model: no tokenizer, no loop
        from pipeline import bow

        return bow.run(cfg, folds, resume=resume)
    if cfg.model.lora_r:
        require_peft()
    Q.check(cfg, resolve_device(cfg.train.device))  # 8-bit, 4-bit: a CUDA device and bitsandbytes, before any work
    prep = prepare(cfg)
    return [train_fold(prep, k, resume=resume, progress=progress)
            for k in (folds if folds is not None else range(cfg.data.n_folds))]
