"""The pipeline against transformers.Trainer on the same CommonLit fold, same model and hyperparameters.

    python bench/compare_trainer.py --data ../shared/data/commonlit --repeats 2 --out bench/results

Each contender runs in its own subprocess (a clean memory peak), alternating A B C C B A ... so machine noise
shows. Both fine-tune the embedded MiniLM on fold 0 of the pipeline's folds with the same epochs, batch
size, learning rate, linear schedule with 10% warmup, max length and precision, and evaluate the held-out rows
after the same steps (the pipeline's schedule; a callback makes the Trainer follow it). Each result has the fold
RMSE at the last step, averaged over the evaluations (steadier: the last step alone moves by up to 0.04) and
the best, and samples/s with and without the evaluations. The Trainer uses dynamic padding and length-grouped
sampling; its predictions are aligned by id, since its length-grouped predict returns a permuted order.

`--scaling` measures seconds per optimizer step of the pipeline at 1x, 2x, 4x the fold's rows and max
length 128, 256, 512, and prints the time per epoch beside what a linear cost predicts. `--levers` times a
step with transformers' attention and dropout against the pipeline's, one lever at a time. `--padding`
prints the share of padding tokens in an epoch of fold-0 batches, length-grouped and random (what a token
budget per batch could save at most). `--shapes` times a whole epoch of fold-0 steps (every batch width a real
run meets) as the batches come, padded to fewer widths, and with a larger and a smaller oneDNN primitive cache.
`--profile` shows where a training step's CPU time goes. `--summary` lists every saved comparison's runs by
contender and seed (runs with other overrides left out), each contender's mean, and each pipeline contender
against the Trainer seed by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# The pipeline's baseline (attention dropout 0), the same with the checkpoint's dropout, the pipeline's best CommonLit
# recipe, and the Trainer.
CONTENDERS = ["pipeline", "pipeline-stock-dropout", "pipeline-best", "trainer"]
sys.path.insert(0, str(ROOT))


def config(data: str, epochs: float, out: str, extra: list[str] = (), name: str = "commonlit_baseline"):
    from pipeline.config import load_config

    return load_config(ROOT / f"configs/{name}.yaml",
                       [f"data.dir={data}", f"train.epochs={epochs}", f"output_dir={out}", *extra])


def fold_rows(cfg):
    import numpy as np

    from pipeline import data as D
    from pipeline.folds import load_folds

    df = D.load_train(cfg)
    fold = load_folds(cfg, df)
    return df, np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def curve_summary(curve: dict[int, float]) -> dict:
    """The fold RMSE read three ways from the evaluations both contenders make at the same steps.

    The last step alone moves by up to 0.04 between evaluations; the mean over the scheduled evaluations is the
    steadier comparison, the best is what a run that keeps its best checkpoint scores.
    """
    values = [curve[k] for k in sorted(curve)]
    return {"rmse": values[-1], "rmse_mean": sum(values) / len(values), "rmse_best": min(values),
            "curve": {str(k): curve[k] for k in sorted(curve)}}


def run_pipeline(data: str, epochs: float, sets: list[str], variant: str = "pipeline") -> dict:
    """A CommonLit config trained on fold 0 with its own evaluation schedule, no checkpoint files.

    pipeline: the baseline config. pipeline-stock-dropout: the same with the checkpoint's attention dropout, as the
    Trainer's model has. pipeline-best: configs/commonlit_best.yaml (dropout 0, top layer re-initialized).
    """
    import pandas as pd

    from pipeline import train as T

    extra = ["train.save_checkpoint=false"] + ["model.attention_dropout=null"] * (variant == "pipeline-stock-dropout")
    name = "commonlit_best" if variant == "pipeline-best" else "commonlit_baseline"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(data, epochs, tmp, extra + sets, name)
        prep = T.prepare(cfg)
        start = time.perf_counter()
        metrics = T.train_fold(prep, 0, progress=False)
        wall = time.perf_counter() - start
        log = pd.read_csv(T.fold_dir(cfg, 0) / "log.csv")
        curve = {int(k): float(v) for k, v in zip(log["step"], log["rmse"])}
        train_pos = (prep.fold != 0).nonzero()[0]
        tokens = int(prep.enc.lengths[train_pos].sum())
    return {"contender": variant, "wall_s": wall, "eval_s": float(log["eval_s"].sum()), **curve_summary(curve),
            "train_rows": len(train_pos), "train_tokens": tokens, "precision": metrics["precision"]}


def run_trainer(data: str, epochs: float, sets: list[str]) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from pipeline.metrics import rmse
    from pipeline.model import resolve_backbone
    from pipeline.train import resolve_precision, step_plan

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(data, epochs, tmp, sets)  # e.g. train.seed=7: the Trainer reads lr, batch, seed... from it
        df, train_idx, valid_idx = fold_rows(cfg)
        t = cfg.train
        source = resolve_backbone(cfg.model.backbone)
        tokenizer = AutoTokenizer.from_pretrained(source)
        enc = tokenizer(df["excerpt"].tolist(), truncation=True, max_length=cfg.data.max_length)

        class Rows(torch.utils.data.Dataset):
            def __init__(self, idx):
                self.idx = idx

            def __len__(self):
                return len(self.idx)

            def __getitem__(self, i):
                j = int(self.idx[i])
                item = {k: enc[k][j] for k in enc.keys()}
                item["labels"] = float(df["target"].iloc[j])
                item["row"] = j
                return item

        precision = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        start = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, problem_type="regression")
        plan = step_plan(t, math.ceil(len(train_idx) / t.batch_size))  # the pipeline's eval steps, for the Trainer too
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.eval_batch_size, learning_rate=t.lr, weight_decay=t.weight_decay,
            lr_scheduler_type="linear", warmup_steps=round(t.warmup_ratio * plan.total_steps),
            max_grad_norm=t.max_grad_norm, train_sampling_strategy="group_by_length", bf16=precision == "bf16",
            fp16=precision == "fp16", eval_strategy="no", save_strategy="no", report_to="none",
            logging_strategy="no", seed=t.seed, remove_unused_columns=False, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available())

        def collate(items):
            rows = [it.pop("row") for it in items]
            batch = DataCollatorWithPadding(tokenizer)(items)
            batch["row"] = torch.tensor(rows)
            return batch

        class RowTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
                inputs = {k: v for k, v in inputs.items() if k != "row"}
                return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

            def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
                rows = inputs.pop("row")
                loss, logits, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
                return loss, logits, rows

        eval_seconds = []

        class Schedule(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_evaluate = state.global_step in plan.eval_steps

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                eval_seconds.append(metrics["eval_runtime"])

        y = df["target"].to_numpy()
        curve = {}

        def compute_metrics(out):  # label_ids are the row ids: the predictions' order is the Trainer's own
            curve[trainer.state.global_step] = rmse(y[np.asarray(out.label_ids).reshape(-1)],
                                                    np.asarray(out.predictions).reshape(-1))
            return {"rmse": curve[trainer.state.global_step]}

        trainer = RowTrainer(model=model, args=args, train_dataset=Rows(train_idx), eval_dataset=Rows(valid_idx),
                             data_collator=collate, compute_metrics=compute_metrics, callbacks=[Schedule()])
        trainer.train()
        wall = time.perf_counter() - start
        out = trainer.predict(Rows(valid_idx))  # after the clock: it only shows the permuted order
        preds = np.asarray(out.predictions).reshape(-1)
        rows = np.asarray(out.label_ids).reshape(-1)  # the row ids, in the order Trainer returned them
        positional = rmse(y[valid_idx], preds)  # what reading the predictions in dataset order would give
        tokens = int(sum(len(enc["input_ids"][int(i)]) for i in train_idx))
    return {"contender": "trainer", "wall_s": wall, "eval_s": sum(eval_seconds), **curve_summary(curve),
            "rmse_predict": rmse(y[rows], preds),
            "rmse_if_read_by_position": positional, "train_rows": len(train_idx), "train_tokens": tokens,
            "precision": precision}


def train_step(model, optimizer, batch, cfg, device, precision: str, techniques=()) -> float:
    """Seconds of one optimizer step of the pipeline's loop: loss under autocast, backward, the techniques'
    adversarial passes, clip, step, the techniques' weight averages (as train_fold calls them, every
    technique active)."""
    import torch

    from pipeline import train as T

    start = time.perf_counter()
    batch = batch.to(device)

    def forward_backward():
        with T.autocast(device, precision):
            loss = T.training_loss(model, batch, cfg.data.task, cfg.train.rdrop)
        loss.backward()
        return loss

    forward_backward()
    for technique in techniques:
        technique.after_backward(model, forward_backward, 10**9)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for technique in techniques:
        technique.after_step(model, 10**9)
    return time.perf_counter() - start


def timed_steps(cfg, steps: int | None = None, after_step=None) -> tuple[list[float], set[int], object, str]:
    """Seconds of each of the pipeline's training steps on fold-0 batches, after two warm-up steps.

    `steps` batches (None: a whole epoch's), padded as the config says (train.pad_to_multiple_of); `after_step`
    is called after each step, warm-up included (a profiler's `step`).
    Returns the times, the batch widths met, the prepared data and the precision.
    """
    import numpy as np
    import torch

    from pipeline import data as D
    from pipeline import train as T

    prep = T.prepare(cfg)
    train_pos = np.flatnonzero(prep.fold != 0)
    device = T.resolve_device("auto")
    precision = T.resolve_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    model, _ = T.build_model(cfg.model, prep.outputs, precision=precision)
    model.to(device).train()
    optimizer = T.build_optimizer(model, cfg)
    techniques = T.build_techniques(cfg.train, model, total_steps=10**9, steps_per_epoch=0)
    batches = D.train_batches(prep.enc.lengths[train_pos], cfg.train.batch_size, 0)
    batches = batches[: steps + 2] if steps else batches[:2] + batches
    times, widths = [], set()
    for i, b in enumerate(batches):
        batch = D.collate(prep.enc, train_pos[b].tolist(), prep.tokenizer.pad_token_id, cfg.train.pad_to_multiple_of)
        widths.add(batch.inputs["input_ids"].shape[1])
        seconds = train_step(model, optimizer, batch, cfg, device, precision, techniques)
        if i >= 2:
            times.append(seconds)
        if after_step:
            after_step()
    return times, widths, prep, precision


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_steps(data: str, steps: int = 4) -> dict:
    """Where a training step's CPU time goes: torch's profiler over `steps` fold-0 steps after the warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU], with_flops=True,
                                                       schedule=schedule(wait=2, warmup=1, active=steps)) as prof:
        timed_steps(config(data, 1, tmp), steps + 1, prof.step)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = [e for e in events if e.key in MATMULS]
    matmul_us = sum(e.self_cpu_time_total for e in matmul)
    print(f"{'op':40s} {'share':>6s} {'ms / step':>9s}")
    for e in events[:15]:
        print(f"{e.key:40s} {e.self_cpu_time_total / total:6.1%} {e.self_cpu_time_total / steps / 1000:9.1f}")
    gflops = sum(e.flops for e in matmul) / matmul_us / 1e3
    print(f"matrix multiplies: {matmul_us / total:.1%} of the step's CPU time, at {gflops:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    return {"steps": steps, "matmul_share": matmul_us / total, "matmul_gflops": gflops,
            "ops": [{"op": e.key, "share": e.self_cpu_time_total / total,
                     "ms_per_step": e.self_cpu_time_total / steps / 1000} for e in events[:15]]}


def seconds_per_step(cfg, steps: int = 10, factor: int = 1) -> dict:
    """Median seconds per optimizer step of the pipeline's training step on fold 0, after two warm-up steps."""
    import numpy as np

    times, _, prep, precision = timed_steps(cfg, steps)
    train_pos = np.flatnonzero(prep.fold != 0)
    per_step = float(np.median(times))
    epoch_steps = math.ceil(len(train_pos) * factor / cfg.train.batch_size)
    return {"rows": len(train_pos) * factor, "max_length": cfg.data.max_length, "s_per_step": per_step,
            "epoch_s": per_step * epoch_steps, "mean_tokens": float(prep.enc.lengths[train_pos].mean()),
            "precision": precision}


def epoch_seconds(data: str, pad_multiple: int) -> dict:
    """Seconds for one whole epoch of fold-0 training steps (every batch width of a real run)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        times, widths, _, _ = timed_steps(config(data, 1, tmp, [f"train.pad_to_multiple_of={pad_multiple}"]))
    return {"steps": len(times), "epoch_s": float(sum(times)), "mean_s_per_step": float(np.mean(times)),
            "median_s_per_step": float(np.median(times)), "widths": len(widths), "peak_memory_mb": peak_mb()}


SHAPES = [  # (name, pad multiple, environment): every batch width, fewer widths, a larger oneDNN primitive cache
    ("widths as they come", 1, {}),
    ("widths padded to a multiple of 8 (the default)", 8, {}),
    ("widths padded to a multiple of 32", 32, {}),
    ("ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384", 1, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"}),
    ("ONEDNN_PRIMITIVE_CACHE_CAPACITY=64", 1, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}),
]


def result_of(cmd: list[str], name: str, **run) -> dict:
    """Run one measurement in its own process and return the JSON it printed after `RESULT `; exit naming it
    if it failed."""
    out = subprocess.run(cmd, capture_output=True, text=True, **run)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def run_shapes(data: str) -> list[dict]:
    """One epoch per variant, each in its own process (the cache size is read when oneDNN starts)."""
    rows = []
    for name, multiple, env in SHAPES:
        cmd = [sys.executable, __file__, "--one-epoch", str(multiple), "--data", data]
        rows.append({"variant": name, **result_of(cmd, name, env={**os.environ, **env})})
        r = rows[-1]
        print(f"{name:40s} {r['epoch_s']:6.1f} s/epoch  mean {r['mean_s_per_step']:.3f}  median "
              f"{r['median_s_per_step']:.3f} s/step  {r['widths']:3d} widths  peak {r['peak_memory_mb']:.0f} MB",
              flush=True)
    return rows


def run_scaling(data: str) -> list[dict]:
    """Time per epoch at 1x, 2x, 4x the fold's rows and max length 128, 256, 512 (median step x steps)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor, max_length in [(1, 256), (2, 256), (4, 256), (1, 128), (1, 512)]:
            rows.append(seconds_per_step(config(data, 1, tmp, [f"data.max_length={max_length}"]), factor=factor))
    base = rows[0]
    for r in rows:
        r["linear_epoch_s"] = base["epoch_s"] * r["rows"] / base["rows"] * r["mean_tokens"] / base["mean_tokens"]
    return rows


LEVERS = [  # (name, overrides): transformers' kernels first, then the pipeline's, one lever at a time
    ("sdpa + nn.Dropout", ["model.attention=sdpa", "model.fast_dropout=false"]),
    ("pipeline attention + nn.Dropout", ["model.attention=pipeline", "model.fast_dropout=false"]),
    ("pipeline attention + fast dropout", ["model.attention=pipeline", "model.fast_dropout=true"]),
]


def run_levers(data: str) -> list[dict]:
    """Seconds per step with and without each speed lever, at the baseline's attention dropout 0 and stock 0.1."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for attention_dropout in ("0.0", "null"):
            for name, overrides in LEVERS:
                cfg = config(data, 1, tmp, [f"model.attention_dropout={attention_dropout}", *overrides])
                row = seconds_per_step(cfg, steps=10)
                row.update(lever=name, attention_dropout=attention_dropout)
                rows.append(row)
                print(f"attention dropout {attention_dropout:4s} {name:34s} {row['s_per_step']:.3f} s/step", flush=True)
    return rows


def padding_share(data: str) -> dict:
    """Padded tokens over real tokens, minus 1, for one epoch of fold-0 training batches."""
    from pipeline import data as D
    from pipeline.model import load_tokenizer, resolve_backbone

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(data, 1, tmp)
        df, train_idx, _ = fold_rows(cfg)
        enc = D.encode(load_tokenizer(resolve_backbone(cfg.model.backbone)), df.iloc[train_idx],
                       cfg.data.text_columns, cfg.data.max_length)
    lengths = enc.lengths
    out = {}
    for grouped in (True, False):
        batches = D.train_batches(lengths, cfg.train.batch_size, cfg.train.seed, grouped)
        padded = sum(int(lengths[b].max()) * len(b) for b in batches)
        out["length_grouped" if grouped else "random"] = padded / int(lengths.sum()) - 1
    return out


RMSES = ("rmse", "rmse_mean", "rmse_best")  # fold-0 RMSE at the last step, over the scheduled evaluations, best


def saved_runs(out: Path) -> list[dict]:
    """Every contender's runs over every saved comparison (seeds and repeats), their means, and each pipeline
    contender against the Trainer seed by seed."""
    from pipeline.config import load_config

    default_seed = str(load_config(ROOT / "configs/commonlit_baseline.yaml").train.seed)  # runs without --set
    rows = []
    for path in sorted(out.glob("compare_trainer*.json")):
        saved = json.loads(path.read_text())
        sets = saved.get("sets", [])
        seed = next((x.split("=", 1)[1] for x in sets if x.startswith("train.seed=")), default_seed)
        rows += [{"file": path.name, "seed": seed, **r} for r in saved["runs"]
                 if all(x.startswith("train.seed=") for x in sets)]
    def line(name: str, seed: str, r: dict, note: str = "") -> str:
        return (f"{name:24s} {seed:>5s} {r['samples_per_s']:9.2f} {r['train_samples_per_s']:10.2f} "
                + " ".join(f"{r[k]:7.4f}" for k in RMSES) + note)

    print(f"{'contender':24s} {'seed':>5s} {'samples/s':>9s} {'train only':>10s}    last    mean    best")
    for name in CONTENDERS:
        runs = [r for r in rows if r["contender"] == name]
        for r in runs:
            print(line(name, r["seed"], r, f"  ({r['file']})"))
        if runs:
            keys = ("samples_per_s", "train_samples_per_s", *RMSES)
            print(line(name, "mean", {k: sum(r[k] for r in runs) / len(runs) for k in keys}))
    trainer = {r["seed"]: r for r in rows if r["contender"] == "trainer"}
    for name in CONTENDERS[:-1]:
        pairs = [(r, trainer[r["seed"]]) for r in rows if r["contender"] == name and r["seed"] in trainer]
        if pairs:
            diffs = " ".join(f"{k} {sum(a[k] - b[k] for a, b in pairs) / len(pairs):+.4f} "
                             f"(better at {sum(a[k] <= b[k] for a, b in pairs)})" for k in RMSES)
            speed = sum(a["samples_per_s"] / b["samples_per_s"] for a, b in pairs) / len(pairs)
            print(f"{name} - trainer over {len(pairs)} seeds: {speed:.2f}x samples/s; RMSE {diffs}")
    return rows


def child(args) -> None:
    if args.one == "trainer":
        result = run_trainer(args.data, args.epochs, args.set)
    else:
        result = run_pipeline(args.data, args.epochs, args.set, args.one)
    result["peak_memory_mb"] = peak_mb()
    result["samples_per_s"] = result["train_rows"] * args.epochs / result["wall_s"]
    result["tokens_per_s"] = result["train_tokens"] * args.epochs / result["wall_s"]
    # Both evaluate the same rows at the same steps, each its own way; training alone, without them:
    result["train_samples_per_s"] = result["train_rows"] * args.epochs / (result["wall_s"] - result["eval_s"])
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/commonlit"))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=CONTENDERS, help="contenders to run")
    parser.add_argument("--set", action="append", default=[], help="config override for every contender, e.g. "
                        "train.seed=7 (repeat)")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--levers", action="store_true", help="seconds per step with and without each speed lever")
    parser.add_argument("--padding", action="store_true", help="padding share of length-grouped and random batches")
    parser.add_argument("--summary", action="store_true", help="every saved comparison's runs, by contender and seed")
    parser.add_argument("--shapes", action="store_true", help="one epoch's steps: batch widths and oneDNN's cache")
    parser.add_argument("--profile", action="store_true", help="where a training step's CPU time goes")
    parser.add_argument("--one-epoch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return child(args)
    if args.one_epoch:
        print("RESULT " + json.dumps(epoch_seconds(args.data, args.one_epoch)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.padding:
        share = padding_share(args.data)
        print("padding tokens per real token, fold-0 training batches: "
              + ", ".join(f"{k} {v:.2%}" for k, v in share.items()))
        return
    if args.summary:
        saved_runs(args.out)
        return

    def save(name: str, result: dict) -> None:
        (args.out / name).write_text(json.dumps({"machine": machine, **result}, indent=2))

    if args.shapes:
        return save("shapes.json", {"rows": run_shapes(args.data)})
    if args.profile:
        return save("profile.json", profile_steps(args.data))
    if args.levers:
        return save("levers.json", {"rows": run_levers(args.data)})
    if args.scaling:
        rows = run_scaling(args.data)
        print(f"scaling ({machine}): rows, max_length, s/step, epoch s, linear-cost epoch s")
        for r in rows:
            print(f"{r['rows']:6d} {r['max_length']:4d} {r['s_per_step']:.3f} {r['epoch_s']:.0f} "
                  f"{r['linear_epoch_s']:.0f}")
        return save("scaling.json", {"rows": rows})
    order = []
    for i in range(args.repeats):
        order += args.only if i % 2 == 0 else args.only[::-1]
    results = []
    for contender in order:
        cmd = [sys.executable, __file__, "--one", contender, "--data", args.data, "--epochs", str(args.epochs),
               *[f"--set={x}" for x in args.set]]
        results.append(result_of(cmd, contender))
        r = results[-1]
        print(f"{contender:8s} {r['wall_s']:7.1f} s  {r['samples_per_s']:6.2f} samples/s  "
              f"{r['tokens_per_s']:7.0f} tokens/s  peak {r['peak_memory_mb']:.0f} MB  rmse last {r['rmse']:.4f} "
              f"mean {r['rmse_mean']:.4f} best {r['rmse_best']:.4f}", flush=True)
    summary = {}
    for name in args.only:
        runs = [r for r in results if r["contender"] == name]
        summary[name] = {k: float(sum(r[k] for r in runs) / len(runs))
                         for k in ("wall_s", "samples_per_s", "train_samples_per_s", "tokens_per_s", "peak_memory_mb",
                                   *RMSES)}
    ratio = {name: summary[name]["samples_per_s"] / summary["trainer"]["samples_per_s"]
             for name in args.only if name != "trainer" and "trainer" in summary}
    for name, r in ratio.items():
        print(f"throughput ratio {name}/trainer: {r:.2f}x  ({machine}, epochs {args.epochs}, repeats {args.repeats})")
    name = ("compare_trainer" + "".join(f"_{x}".replace("=", "-") for x in args.set)
            + ("" if args.only == CONTENDERS else "_" + "_".join(args.only)) + ".json")
    (args.out / name).write_text(json.dumps({"machine": machine, "epochs": args.epochs, "sets": args.set,
                                             "runs": results, "mean": summary, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
