"""Seconds per training step on texts that fill the max length, per attention implementation.

    python bench/long_inputs.py --data ../shared/data/commonlit --label after

CommonLit excerpts average ~217 tokens, so a max length of 512 on them barely changes a batch (the scaling
table in docs/speed.md). Here every row is several consecutive excerpts joined, tokenized and truncated at
exactly the max length: a batch of 16 is 16 x max_length real tokens, no padding. Each (length, attention)
setting runs in its own process (a clean allocator and oneDNN cache) with the recipe's settings
(configs/commonlit.yaml: bf16 autocast on CPUs that have it, batch 16, dropout 0, AdamW with clipping): 2 warm-up
steps, then `--steps` timed steps of forward, backward, clipping and the optimizer step; the median is kept.

The embedded MiniLM-L6 allows 512 positions. For 1024 the bench builds a randomly initialized BERT with
MiniLM's sizes (6 layers, hidden 384, 12 heads, FFN 1536) and `max_position_embeddings` 1024: the same cost per
token, not a trained model (timing only). `recipe` rows time the recipe's own batches (CommonLit fold 0 at max
length 256, real texts, padded to multiples of 8) to show the change does not slow the recipe.
`--profile` prints where a step's CPU time goes for one setting.

The FLOPs ratio is counted for MiniLM's shapes: per token and layer, 2 x (4 h^2 + 2 h f) multiply-adds for the
projections and FFN, and 2 x 2 T h for the scores and the weighted sum; x3 for forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTENTIONS = ["pipeline", "sdpa", "eager"]
LENGTHS = [256, 512, 1024]
LONG_BACKBONE = 1024  # lengths above MiniLM's 512 positions use the random 1024-position BERT


def step_flops(length: int, hidden: int = 384, ffn: int = 1536, layers: int = 6, batch: int = 16) -> float:
    """Training FLOPs of one step of the encoder (forward x3), embeddings and head left out."""
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * length * hidden
    return 3 * per_token * length * layers * batch


def long_backbone(directory: Path) -> str:
    """A random BERT with MiniLM's sizes and 1024 positions, saved with MiniLM's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from pipeline.model import EMBEDDED_BACKBONE, resolve_backbone

    source = resolve_backbone(EMBEDDED_BACKBONE)
    config = AutoConfig.from_pretrained(source)
    config.max_position_embeddings = LONG_BACKBONE
    BertModel(config).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.model_max_length = LONG_BACKBONE
    tokenizer.save_pretrained(directory)
    return str(directory)


def filled_batches(cfg, tokenizer, steps: int):
    """`steps` batches of rows that each join consecutive excerpts until they pass max_length, truncated there."""
    import pandas as pd
    import torch

    from pipeline import data as D

    length, size = cfg.data.max_length, cfg.train.batch_size
    df = pd.read_csv(Path(cfg.data.dir) / "train.csv")
    texts, column = df[cfg.data.text_columns[0]].astype(str).tolist(), cfg.data.text_columns[0]
    per_row = length // 100 + 2  # excerpts are 140-330 tokens: this many always pass the length
    rows = [" ".join(texts[(i * per_row + j) % len(texts)] for j in range(per_row)) for i in range(steps * size)]
    targets = df[cfg.data.target_columns].to_numpy("float32")[: steps * size]
    enc = D.encode(tokenizer, pd.DataFrame({column: rows}), [column], length, targets)
    assert set(enc.lengths.tolist()) == {length}, "every row must fill the max length"
    torch.manual_seed(0)
    return [D.collate(enc, list(range(i * size, (i + 1) * size)), tokenizer.pad_token_id, 8) for i in range(steps)]


def run_one(data: str, length: int, attention: str, steps: int, profile: bool) -> dict:
    import numpy as np
    import torch

    from bench.compare_trainer import timed_steps, train_step
    from pipeline import train as T
    from pipeline.config import load_config
    from pipeline.model import load_tokenizer, resolve_backbone

    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"data.dir={data}", f"output_dir={tmp}", f"model.attention={attention}"]
        recipe = length == 0
        if not recipe:
            sets.append(f"data.max_length={length}")
            if length > 512:
                sets.append(f"model.backbone={long_backbone(Path(tmp) / 'long')}")
        cfg = load_config(ROOT / "configs/commonlit.yaml", sets)
        device = T.resolve_device("auto")
        precision = T.resolve_precision(cfg.train.precision, device)
        if recipe:  # the recipe's own fold-0 batches at its max length, as they come in an epoch

            times, _, prep, _ = timed_steps(cfg, steps)
            mean_tokens = float(prep.enc.lengths.mean())
            return {"length": cfg.data.max_length, "texts": "recipe (CommonLit fold 0)", "attention": attention,
                    "s_per_step": float(np.median(times)), "times": times, "mean_tokens": mean_tokens,
                    "precision": precision}
        tokenizer = load_tokenizer(resolve_backbone(cfg.model.backbone))
        batches = filled_batches(cfg, tokenizer, steps + 2)
        torch.manual_seed(0)
        model, _ = T.build_model(cfg.model, len(cfg.data.target_columns))
        model.to(device).train()
        optimizer = T.build_optimizer(model, cfg)
        times = []
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity, schedule

            prof = torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                          schedule=schedule(wait=1, warmup=1, active=steps))
            prof.start()
        for i, batch in enumerate(batches):
            seconds = train_step(model, optimizer, batch, cfg, device, precision)
            if i >= 2:
                times.append(seconds)
            if prof:
                prof.step()
        if prof:
            prof.stop()
            events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            for e in events[:25]:
                print(f"{e.key:38s} {str(e.input_shapes)[:70]:70s} {e.self_cpu_time_total / total:6.1%} "
                      f"{e.self_cpu_time_total / steps / 1000:8.1f} ms/step", file=sys.stderr)
        return {"length": length, "texts": "filled", "attention": attention, "s_per_step": float(np.median(times)),
                "times": times, "backbone": "MiniLM-L6" if length <= 512 else "random BERT, MiniLM sizes, 1024 pos",
                "precision": precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/commonlit")
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="0: the recipe's own batches")
    ap.add_argument("--attentions", nargs="+", default=ATTENTIONS, choices=ATTENTIONS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--recipe", action="store_true", help="also time the recipe's CommonLit batches (length 256)")
    ap.add_argument("--label", default="now", help="the name of this measurement in the JSON (before/after)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/long_inputs.json"))
    ap.add_argument("--one", nargs=2, metavar=("LENGTH", "ATTENTION"), help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="with --one: where the step's time goes")
    args = ap.parse_args()
    if args.one:
        r = run_one(args.data, int(args.one[0]), args.one[1], args.steps, args.profile)
        print("RESULT " + json.dumps(r))
        return
    from bench.compare_trainer import result_of

    settings = [(n, a) for n in args.lengths for a in args.attentions]
    if args.recipe:
        settings += [(0, a) for a in args.attentions]
    rows = []
    for length, attention in settings:
        cmd = [sys.executable, __file__, "--one", str(length), attention, "--data", args.data,
               "--steps", str(args.steps)]
        rows.append(result_of(cmd, f"{length} {attention}", cwd=ROOT))
        r = rows[-1]
        print(f"{r['texts']:26s} {r['length']:5d} {attention:9s} {r['s_per_step']:.3f} s/step  "
              f"({' '.join(f'{t:.2f}' for t in r['times'])})", flush=True)
    for r in rows:
        base = next((b for b in rows if b["texts"] == "filled" and b["length"] == 256
                     and b["attention"] == r["attention"]), None)
        if base and r["texts"] == "filled":
            r["ratio_vs_256"] = r["s_per_step"] / base["s_per_step"]
            r["flops_ratio_vs_256"] = step_flops(r["length"]) / step_flops(256)
            print(f"{r['length']:5d} {r['attention']:9s} {r['ratio_vs_256']:.2f}x the 256 step "
                  f"(FLOPs {r['flops_ratio_vs_256']:.2f}x)")
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    import torch

    saved[args.label] = {"rows": rows, "steps": args.steps, "torch": torch.__version__, "cpu": platform.processor(),
                         "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
