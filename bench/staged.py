"""Staged training and blending against the recipe, in one report: each staged run (an MLM pre-trained backbone,
a pseudo-label stage, ...) paired fold by fold with the recipe, then every blend method over the finished runs.

    python bench/staged.py --baseline commonlit --staged mlm_commonlit --members commonlit mlm_commonlit \\
        tfidf_commonlit --members commonlit mlm_commonlit tfidf_commonlit 'report/commonlit_*' \\
        --out reports/commonlit_staged.md

Runs are finished experiments (oof.csv) on the same folds under --output-dir; each --members is one blend (every
method over it; `blend_<method>` keeps the last), a member may be a glob, and only its finished runs are blended.
Nothing here trains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from blends import NESTED_NOTE, blend_table  # noqa: E402

from pipeline import report as R  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.io import read_json, write_text_atomic  # noqa: E402


def expand(patterns: list[str], output_dir: Path) -> list[str]:
    """Members as named, a glob expanded to its finished runs (sorted); a name or glob with none is an error."""
    found: list[str] = []
    for pattern in patterns:
        hits = sorted(str(p.relative_to(output_dir)) for p in output_dir.glob(pattern) if (p / "oof.csv").exists())
        if not hits:
            raise PipelineError(f"staged: no finished run (oof.csv) matches '{pattern}' in {output_dir}")
        found += [h for h in hits if h not in found]
    return found


def pretrain_line(run: R.Run) -> str | None:
    """How the run's backbone was pre-trained, from the pretrain.json `pipeline pretrain` wrote beside it."""
    record = Path(run.config.model.backbone) / "pretrain.json"
    if not record.is_file():
        return None
    p = read_json(record)
    return (f"- `{run.name}`'s backbone `{run.config.model.backbone}`: MLM on {p['train_texts']} texts "
            f"(and {p['eval_texts']} held out for its loss) from {', '.join(p['rows_per_file'])}, "
            f"{p['masking']} masking at {p['mask_rate']:.0%}, {p['epochs']:g} epochs = {p['steps']} steps at lr "
            f"{p['pretrain']['lr']:g}"
            f"{', fresh MLM head' if p.get('fresh_head') else ''}; held-out MLM loss {p['loss_before']:.2f} → "
            f"{p['loss_after']:.2f}; {p['seconds']:.0f} s wall ({p['precision']}, {p['device']})")


def threads(run: R.Run) -> str:
    n = run.config.train.num_threads
    return "all threads" if not n else f"{n} thread{'s' if n > 1 else ''}"


def single_models(baseline: str, staged: list[str], output_dir: Path) -> list[str]:
    experiments = R.collect([baseline, *staged], output_dir)
    incomplete = [m for e in experiments.values() for m in e.incomplete]
    if incomplete:
        raise PipelineError("staged: " + "; ".join(incomplete))
    table = R.summary(experiments, baseline)
    metric = experiments[baseline].runs[0].config.metric
    folds = sorted(experiments[baseline].runs[0].fold_scores)
    lines = [f"| run | changes | OOF CV ({metric}) | " + " | ".join(f"fold {k}" for k in folds)
             + " | Δ vs baseline | folds better | paired t p | train s (all folds) |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in folds) + " | ---: | ---: | ---: | ---: |"]
    for _, row in table.iterrows():
        run = experiments[row["experiment"]].runs[0]
        first = row["experiment"] == baseline
        lines.append(f"| {row['experiment']} | {row['changes']} | {row['cv']:.4f} | "
                     + " | ".join(f"{run.fold_scores[k]:.4f}" for k in folds)
                     + (" | — | — | — |" if first else
                        f" | {row['delta']:+.4f} | {row['wins']}/{row['pairs']} | {R.fmt(row['ttest_p'], 3)} |")
                     + f" {sum(run.train_seconds):.0f} ({threads(run)}) |")
    pretrained = [line for name in staged for run in experiments[name].runs if (line := pretrain_line(run))]
    note = ("Train s: the folds' wall time as they ran, at the run's `train.num_threads`; runs that shared the CPU "
            "with other work take longer than their cost alone.")
    return lines + ["", note] + ([""] + pretrained if pretrained else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--staged", nargs="+", required=True)
    parser.add_argument("--members", nargs="+", action="append", required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("oof"))
    parser.add_argument("--out", type=Path, default=Path("reports/staged.md"))
    args = parser.parse_args()
    singles = single_models(args.baseline, args.staged, args.output_dir)
    command = (f"python bench/staged.py --baseline {args.baseline} --staged {' '.join(args.staged)} "
               + " ".join("--members " + " ".join(repr(m) if "*" in m else m for m in group) for group in args.members)
               + f" --output-dir {args.output_dir} --out {args.out}")
    lines = [f"# Staged training and blends against {args.baseline}", "", f"- command: `{command}`",
             f"- hardware: {R.hardware()}", "", "## Single models", "",
             "Each run paired fold by fold with the baseline (same folds, same seed).", "", *singles, "",
             "## Blends", "", NESTED_NOTE]
    for group in args.members:
        members = expand(group, args.output_dir)
        table, cvs, _ = blend_table(members, str(args.output_dir))
        lines += ["", f"### {len(cvs)} members", "", "OOF CV: " + ", ".join(f"{m} {v:.4f}" for m, v in cvs.items()),
                  "", *table]
    lines.append("")
    write_text_atomic(args.out, "\n".join(lines))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
