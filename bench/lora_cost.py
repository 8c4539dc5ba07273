"""LoRA against full fine-tuning on CommonLit fold 0 with the embedded MiniLM: time and peak memory per training
step, what a fold checkpoint weighs, and (once both folds are trained) the fold-0 score.

    python bench/lora_cost.py --data ../shared/data/commonlit --steps 10     # bench/results/lora_cost.json
    python bench/lora_cost.py --set data.max_length=32 --steps 1 --out /tmp  # a quick check that it runs

Full fine-tuning is the CommonLit recipe (configs/commonlit.yaml), LoRA is configs/lora_minilm.yaml (the recipe
with adapters). Each runs the same fold-0 batches in its own subprocess, so each peak resident memory is its own;
the time is the median over `--steps` optimizer steps after two warm-up steps (bench/technique_cost.py's
protocol). The checkpoint is what `pipeline train` saves per fold (model.pt), measured on the model as built.
The scores come from the runs' own fold 0, where they exist (`make train FOLD=0` and
`make train CONFIG=configs/lora_minilm.yaml FOLD=0`): training them is not this script's job.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
CONFIGS = {"full fine-tuning": ROOT / "configs/commonlit.yaml", "LoRA": ROOT / "configs/lora_minilm.yaml"}


def load(config_path: Path, data: str, sets: list[str]):
    from pipeline.config import load_config

    return load_config(config_path, [f"data.dir={data}", "output_dir=/tmp/lora_cost", *sets])


def measure(config_path: Path, data: str, steps: int, sets: list[str]) -> dict:
    """One config's training steps, in this process (its peak resident memory is theirs)."""
    from compare_trainer import seconds_per_step

    row = seconds_per_step(load(config_path, data, sets), steps)
    return {"s_per_step": row["s_per_step"], "precision": row["precision"],
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def checkpoint(config_path: Path, data: str, sets: list[str]) -> dict:
    """Bytes of a fold checkpoint and the numbers that train, on the model as `pipeline train` builds it."""
    import torch

    from pipeline.model import build_model, checkpoint_state

    model, _ = build_model(load(config_path, data, sets).model, 1)
    buffer = io.BytesIO()
    torch.save(checkpoint_state(model), buffer)
    return {"checkpoint_mb": buffer.tell() / 2**20,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in model.parameters())}


def fold0(config_path: Path, output_dir: Path) -> dict:
    """The fold-0 result of the config's own run, where it has been trained (score, seconds, model.pt size)."""
    fold = output_dir / config_path.stem / "fold0"
    if not (fold / "metrics.json").exists():
        return {}
    metrics = json.loads((fold / "metrics.json").read_text())
    return {"fold0_score": metrics["score"], "fold0_train_seconds": metrics["train_seconds"],
            "fold0_model_pt_mb": (fold / "model.pt").stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/commonlit"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "oof", help="where the trained runs are")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both configs")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.data, args.steps, args.set)), flush=True)
        return
    from compare_trainer import result_of

    rows = []
    for name, path in CONFIGS.items():
        step = result_of([sys.executable, __file__, "--one", str(path), "--data", args.data, "--steps",
                          str(args.steps), *(f"--set={s}" for s in args.set)], name)
        rows.append({"run": name, "config": path.name, **step, **checkpoint(path, args.data, args.set),
                     **fold0(path, args.output_dir)})
    full = rows[0]
    print(f"{'':18s} {'s/step':>7s} {'peak MB':>8s} {'checkpoint MB':>14s} {'trainable':>11s} {'fold-0 score':>12s}")
    for r in rows:
        score = f"{r['fold0_score']:.4f}" if "fold0_score" in r else "-"
        print(f"{r['run']:18s} {r['s_per_step']:7.3f} {r['peak_memory_mb']:8.0f} {r['checkpoint_mb']:14.2f} "
              f"{r['trainable']:11,d} {score:>12s}   ({r['s_per_step'] / full['s_per_step']:.2f}x time, "
              f"{r['peak_memory_mb'] / full['peak_memory_mb']:.2f}x memory, "
              f"{r['checkpoint_mb'] / full['checkpoint_mb']:.3f}x checkpoint)", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_cost.json").write_text(json.dumps({"machine": machine, "steps": args.steps, "set": args.set,
                                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
