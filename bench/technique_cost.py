"""Cost of each technique per training step relative to the baseline: time and peak memory.

    python bench/technique_cost.py --data ../shared/data/commonlit --steps 8 --out bench/results
    python bench/technique_cost.py --set model.attention_dropout=null   # every config with this override too

Every configs/commonlit_*.yaml runs the same fold-0 batches (batch 16, CommonLit excerpts, max length 256)
in its own subprocess, so each peak resident memory is its own. The time is the median over `--steps`
optimizer steps after two warm-up steps. With `--set` overrides the results go to technique_cost_<overrides>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def measure(config_path: Path, data: str, steps: int, sets: list[str]) -> dict:
    from compare_trainer import seconds_per_step

    from pipeline.config import load_config

    cfg = load_config(config_path, [f"data.dir={data}", "output_dir=/tmp/technique_cost", *sets])
    row = seconds_per_step(cfg, steps)
    return {"experiment": cfg.experiment, "s_per_step": row["s_per_step"], "precision": row["precision"],
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/commonlit"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("configs", nargs="*", type=Path)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.data, args.steps, args.set)), flush=True)
        return
    from compare_trainer import result_of

    configs = args.configs or sorted((ROOT / "configs").glob("commonlit_*.yaml"))
    configs.sort(key=lambda p: p.stem != "commonlit_baseline")  # baseline first
    rows = []
    for path in configs:
        rows.append(result_of([sys.executable, __file__, "--one", str(path), "--data", args.data,
                               "--steps", str(args.steps), *(f"--set={s}" for s in args.set)], path.stem))
        base = rows[0]
        r = rows[-1]
        print(f"{r['experiment']:28s} {r['s_per_step']:.3f} s/step ({r['s_per_step'] / base['s_per_step']:.2f}x)  "
              f"peak {r['peak_memory_mb']:.0f} MB ({r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x)  "
              f"{r['precision']}", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "_".join(["technique_cost", *(re.sub(r"[^\w.=-]", "-", s) for s in args.set)])
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine, "steps": args.steps, "set": args.set,
                                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
