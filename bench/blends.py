"""Every blend method of `pipeline ensemble` over the same members, in one table: what each gains on OOF.

    python bench/blends.py commonlit tfidf_commonlit --out reports/commonlit_blends.md

The members must be finished experiments (oof.csv) on the same folds under --output-dir. Each method writes its
blend as `blend_<method>` there, so `pipeline submit` / `pipeline package` can take the one chosen. The nnls,
hill and mean weights are fit on the same OOF rows they are scored on (slightly optimistic: the `nested` column
scores each fold with weights fit without it); the stacks' OOF comes from nested folds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import ensemble as E  # noqa: E402
from pipeline.io import write_text_atomic  # noqa: E402

METHODS = [("nnls", {}), ("hill", {}), ("hill_negative", {"method": "hill", "negative": True}),
           ("stack", {}), ("stack_lgbm", {"method": "stack", "stacker": "lgbm"}), ("mean", {})]


def blend_table(experiments: list[str], output_dir: str) -> tuple[list[str], dict[str, float], str]:
    """Every method over the same members: the table's lines, the members' own CV and the metric."""
    rows, result = [], {}
    for name, options in METHODS:
        options = {"method": name, **options}
        start = time.perf_counter()
        result = E.run(experiments, f"blend_{name}", output_dir, **options)
        seconds = time.perf_counter() - start
        weights = ", ".join(f"{m} {w:.3f}" for m, w in result["weights"].items() if w) if "weights" in result \
            else f"{result['blend']['model']} second stage"
        rows.append(f"| `--method {options['method']}`"
                    + (" `--negative`" if options.get("negative") else "")
                    + (f" `--stacker {options['stacker']}`" if options.get("stacker") else "")
                    + f" | {result['cv']:.4f} | {result['cv_nested']:.4f} | {weights} | {seconds:.1f} |")
        print(rows[-1], flush=True)
    metric = result["metric"]
    header = [f"| method | OOF CV ({metric}) | nested | weights (members not listed: 0) | seconds |",
              "| --- | ---: | ---: | --- | ---: |"]
    return header + rows, result["members"], metric


NESTED_NOTE = ("- OOF CV: nnls, hill and mean weights are fit on the OOF rows they are scored on (what `pipeline "
               "submit` uses); nested: fold k blended by weights fit without fold k's rows, the honest estimate. The "
               "stacks' OOF comes from nested folds (fold k's from a stacker fit without fold k's rows) in both "
               "columns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--output-dir", default="oof")
    parser.add_argument("--out", type=Path, default=Path("reports/blends.md"))
    args = parser.parse_args()
    table, members, metric = blend_table(args.experiments, args.output_dir)
    lines = [f"# Blends of {', '.join(args.experiments)}", "",
             f"- command: `python bench/blends.py {' '.join(args.experiments)} --output-dir {args.output_dir} "
             f"--out {args.out}`",
             f"- metric: {metric}; members' OOF CV: " + ", ".join(f"{m} {v:.4f}" for m, v in members.items()),
             NESTED_NOTE, "", *table, ""]
    write_text_atomic(args.out, "\n".join(lines))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
