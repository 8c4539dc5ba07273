"""The technique report: each experiment's CV against the baseline, with paired tests over folds and seeds.

Scores are recomputed from the OOF files, never copied from logs. Runs of one experiment with several
seeds live in `oof/<experiment>-seed<N>/` beside `oof/<experiment>/`; they are grouped under one row, and listed
seed by seed under "Per seed" (and in `<report>_seeds.csv`).
An experiment that is missing or has unfinished folds is listed as incomplete, never silently dropped.
"""

from __future__ import annotations

import fnmatch
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline import data as D
from pipeline.config import Config, applies
from pipeline.errors import PipelineError
from pipeline.io import read_csv, read_json, write_text_atomic
from pipeline.metrics import LOWER_IS_BETTER, best_constant, is_better, score
from pipeline.runs import PRETRAIN_KEYS, SEED_SUFFIX, WHERE_KEYS, differing_keys, load_run_config


@dataclass
class Run:
    name: str
    seed: int
    fold_scores: dict[int, float]
    mean_scores: dict[int, float]  # per fold: the metric's best constant prediction
    cv: float
    train_seconds: list[float]
    peak_memory_mb: list[float]
    log: pd.DataFrame
    config: object


@dataclass
class Experiment:
    name: str
    runs: list[Run] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    def paired(self) -> dict[tuple[int, int], float]:
        return {(r.seed, k): v for r in self.runs for k, v in r.fold_scores.items()}


def find_runs(patterns: list[str], output_dir: Path) -> list[str]:
    """Run directories matching names or globs; a name that matches nothing is an error."""
    existing = sorted(p.name for p in output_dir.iterdir() if p.is_dir() and (p / "config.yaml").exists()) \
        if output_dir.is_dir() else []
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in existing if fnmatch.fnmatch(n, pattern) or SEED_SUFFIX.sub(r"\g<base>", n) == pattern
                or fnmatch.fnmatch(SEED_SUFFIX.sub(r"\g<base>", n), pattern)]
        if not hits:
            raise PipelineError(f"report: no experiment matches '{pattern}' in {output_dir}")
        found += [h for h in hits if h not in found]
    return found


def load_run(run_dir: Path) -> Run | str:
    """A finished run recomputed from its files, or a sentence saying what is missing."""
    cfg = load_run_config(run_dir)
    missing = [k for k in range(cfg.data.n_folds) if not (run_dir / f"fold{k}" / "metrics.json").exists()]
    if missing:
        return f"{run_dir.name}: fold(s) {', '.join(map(str, missing))} not finished"
    if not (run_dir / "oof.csv").exists():
        return f"{run_dir.name}: no oof.csv (run `pipeline oof`)"
    id_col = cfg.data.id_column
    oof = read_csv(run_dir / "oof.csv", id_col)
    train = D.load_train(cfg)
    train = train.set_index(id_col).loc[oof[id_col]].reset_index()  # truth joined by id
    y = D.target_array(cfg, train)
    preds = oof[[c for c in oof.columns if c not in (id_col, "fold")]].to_numpy(float)
    fold = oof["fold"].to_numpy()
    metric = cfg.metric
    fold_scores, mean_scores = {}, {}
    for k in sorted(set(fold.tolist())):
        valid, rest = fold == k, fold != k
        fold_scores[k] = score(metric, y[valid], preds[valid])
        floor, _ = best_constant(metric, y[rest], int(valid.sum()), preds.shape[1])
        mean_scores[k] = score(metric, y[valid], floor)
    metrics = [read_json(run_dir / f"fold{k}" / "metrics.json") for k in range(cfg.data.n_folds)]
    logs = [pd.read_csv(run_dir / f"fold{k}" / "log.csv").assign(fold=k) for k in range(cfg.data.n_folds)]
    return Run(run_dir.name, cfg.train.seed, fold_scores, mean_scores, score(metric, y, preds),
               [m["train_seconds"] for m in metrics], [m["peak_memory_mb"] for m in metrics],
               pd.concat(logs, ignore_index=True), cfg)


def collect(names: list[str], output_dir: Path) -> dict[str, Experiment]:
    experiments: dict[str, Experiment] = {}
    for name in names:
        base = SEED_SUFFIX.sub(r"\g<base>", name)
        exp = experiments.setdefault(base, Experiment(base))
        run = load_run(output_dir / name)
        if isinstance(run, str):
            exp.incomplete.append(run)
            continue
        if exp.runs:
            check_same_experiment(exp.runs[0], run)
        exp.runs.append(run)
    return experiments


def check_same_experiment(first: Run, other: Run) -> None:
    """Seed runs grouped under one row must differ in their seed only."""
    if other.seed == first.seed:
        raise PipelineError(f"report: runs '{first.name}' and '{other.name}' are one experiment with the same seed "
                            f"{other.seed}; one row would count its folds twice")
    diff = differing_keys(other.config.to_dict(), first.config.to_dict(), NOT_A_CHANGE | WHERE_KEYS)
    if diff:
        listed = "; ".join(f"{k}: {b!r} vs {a!r}" for k, a, b in diff)
        raise PipelineError(f"report: '{other.name}' is grouped with '{first.name}' as another seed of one "
                            f"experiment, but its settings differ ({listed}); rename one of them")


def compare(exp: Experiment, base: Experiment, metric: str) -> dict:
    """Paired comparison over the (seed, fold) pairs both experiments have."""
    a, b = exp.paired(), base.paired()
    keys = sorted(set(a) & set(b))
    diffs = np.array([a[k] - b[k] for k in keys])
    sign = -1.0 if LOWER_IS_BETTER[metric] else 1.0
    out = {"pairs": len(keys), "wins": int((sign * diffs > 0).sum()), "wilcoxon_p": float("nan"),
           "ttest_p": float("nan")}
    if len(keys) >= 2 and np.any(diffs != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon([a[k] for k in keys], [b[k] for k in keys]).pvalue)
        out["ttest_p"] = float(stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue)
    return out


def delta(exp: Experiment, base: Experiment) -> float:
    """CV minus the baseline's, over the seeds both ran (so Δ and the paired tests see the same runs)."""
    mine, theirs = {r.seed: r.cv for r in exp.runs}, {r.seed: r.cv for r in base.runs}
    shared = sorted(set(mine) & set(theirs))
    if shared:
        return float(np.mean([mine[s] - theirs[s] for s in shared]))
    return float(np.mean(list(mine.values())) - np.mean(list(theirs.values())))


def fold_seed_std(exp: Experiment) -> float:
    """How far one fold's score moves between seeds: the std over seeds of each fold's score, averaged over the
    folds every seed ran (NaN with one seed). The CV averages this noise out; a count of fold wins does not."""
    if len(exp.runs) < 2:
        return float("nan")
    folds = set.intersection(*(set(r.fold_scores) for r in exp.runs))
    return float(np.mean([np.std([r.fold_scores[k] for r in exp.runs], ddof=1) for k in sorted(folds)]))


def summary(experiments: dict[str, Experiment], baseline: str) -> pd.DataFrame:
    if baseline not in experiments or not experiments[baseline].runs:
        raise PipelineError(f"report: the baseline '{baseline}' has no finished run; train it first or pass "
                            f"--baseline with one of {', '.join(experiments)}")
    base = experiments[baseline]
    metric = base.runs[0].config.metric
    data = base.runs[0].config.data
    for exp in experiments.values():
        for r in exp.runs:
            if (r.config.metric, r.config.data.train_path, r.config.data.target_columns) != \
                    (metric, data.train_path, data.target_columns):
                raise PipelineError(f"report: run '{r.name}' is scored by {r.config.metric} on "
                                    f"{r.config.data.train_path}, the baseline by {metric} on {data.train_path}; "
                                    f"report experiments of one dataset and metric together")
    rows = []
    for name, exp in sorted(experiments.items(), key=lambda item: item[0] != baseline):  # the baseline first
        if not exp.runs:
            continue
        scores = np.array([v for r in exp.runs for v in r.fold_scores.values()])
        cv = float(np.mean([r.cv for r in exp.runs]))
        failed = sum(not is_better(metric, r.fold_scores[k], r.mean_scores[k])
                     for r in exp.runs for k in r.fold_scores)
        row = {"experiment": name, "seeds": len(exp.runs), "cv": cv,
               "fold_mean": float(scores.mean()), "fold_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
               "cv_seed_std": float(np.std([r.cv for r in exp.runs], ddof=1)) if len(exp.runs) > 1 else float("nan"),
               "fold_seed_std": fold_seed_std(exp), "delta": delta(exp, base), "failed": failed,
               "fold_seconds": float(np.mean([s for r in exp.runs for s in r.train_seconds])),
               "peak_memory_mb": float(np.max([m for r in exp.runs for m in r.peak_memory_mb]))}
        row["changes"] = changes(exp, base)
        row.update(compare(exp, base, metric) if name != baseline else
                   {"pairs": len(scores), "wins": 0, "wilcoxon_p": float("nan"), "ttest_p": float("nan")})
        rows.append(row)
    return pd.DataFrame(rows)


def per_seed(experiments: dict[str, Experiment], baseline: str) -> pd.DataFrame:
    """Every experiment that ran at several seeds, one run at a time against the baseline's run at the same seed:
    whether a row's Δ holds at each seed or comes from one of them. The baseline's own runs give its CVs."""
    base = {r.seed: r for r in experiments[baseline].runs}
    metric = experiments[baseline].runs[0].config.metric
    rows = []
    for name, exp in sorted(experiments.items(), key=lambda item: item[0] != baseline):
        if len(exp.runs) < 2:
            continue
        for run in sorted(exp.runs, key=lambda r: r.seed):
            row = {"experiment": name, "seed": run.seed, "cv": run.cv, "delta": float("nan"), "pairs": 0,
                   "wins": 0, "ttest_p": float("nan")}
            if name != baseline and run.seed in base:
                one, theirs = Experiment(name, [run]), Experiment(baseline, [base[run.seed]])
                row.update(delta=run.cv - base[run.seed].cv,
                           **{k: v for k, v in compare(one, theirs, metric).items() if k in row})
            rows.append(row)
    return pd.DataFrame(rows, columns=["experiment", "seed", "cv", "delta", "pairs", "wins", "ttest_p"])


def per_seed_lines(by_seed: pd.DataFrame, baseline: str) -> list[str]:
    if by_seed.empty:
        return []
    lines = ["", "## Per seed", "", "Each experiment that ran at several seeds, one seed at a time against the "
             "baseline's run at that seed: a Δ that holds at every seed, or one seed's doing.", "",
             "| experiment | seed | OOF CV | Δ vs baseline, same seed | wins | paired t p |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in by_seed.iterrows():
        paired = r["experiment"] != baseline and not np.isnan(r["delta"])
        delta, wins = (f"{r['delta']:+.4f}", f"{r['wins']}/{r['pairs']}") if paired else ("—", "—")
        lines.append(f"| {r['experiment']} | {r['seed']} | {fmt(r['cv'])} | {delta} | {wins} | "
                     f"{fmt(r['ttest_p'], 3) if paired else '—'} |")
    return lines


# Keys that name or place a run rather than change what it trains (a pre-trained backbone shows as model.backbone).
NOT_A_CHANGE = {"experiment", "output_dir", "data.dir", "train.seed", "train.num_threads",
                "train.save_checkpoint"} | PRETRAIN_KEYS


def changes(exp: Experiment, base: Experiment) -> str:
    """The config keys in which an experiment differs from the baseline, e.g. `model.mixout=0.1`.

    Only keys that act on the experiment's `model.kind` count: a key both kinds use is compared with the baseline,
    a key of this kind alone with its default. Against a fine-tuned baseline a tfidf row so lists `model.kind=tfidf`
    and the `tfidf.` keys it set, not the fine-tuning keys it ignores.
    """
    mine, theirs = exp.runs[0].config, base.runs[0].config
    kind, base_kind = mine.model.kind, theirs.model.kind
    with_base = differing_keys(mine.to_dict(), theirs.to_dict(), NOT_A_CHANGE)
    with_defaults = differing_keys(mine.to_dict(), Config().to_dict(), NOT_A_CHANGE)
    listed = [(k, v) for k, v, _ in with_base if applies(k, kind) and applies(k, base_kind)]
    listed += [(k, v) for k, v, _ in with_defaults if applies(k, kind) and not applies(k, base_kind)]
    return ", ".join(f"{k}={value}" for k, value in listed) or "—"


def _plots(experiments: dict[str, Experiment], table: pd.DataFrame, baseline: str, metric: str, out_dir: Path,
           stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = table["experiment"].tolist()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    for i, name in enumerate(names):
        points = [v for r in experiments[name].runs for v in r.fold_scores.values()]
        ax.scatter(points, [i] * len(points), color="0.6", s=14, zorder=2)
        row = table.iloc[i]
        ax.errorbar(row["cv"], i, xerr=row["fold_std"], fmt="o", color="C0", capsize=4, zorder=3)
    ax.axvline(table.loc[table["experiment"] == baseline, "cv"].iloc[0], color="C3", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (dot: CV, bar: ± fold std, grey: each fold and seed)")
    fig.tight_layout()
    scores_png = f"{stem}_scores.png"
    fig.savefig(out_dir / scores_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, name in enumerate(names):
        log = pd.concat([r.log for r in experiments[name].runs])
        curve = log.groupby("step")[metric].mean()
        ax.plot(curve.index, curve.values, label=name, color=f"C{i % 10}", marker="o", markersize=4)  # evaluations
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric} (mean over folds and seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves_png = f"{stem}_curves.png"
    fig.savefig(out_dir / curves_png, dpi=110)
    plt.close(fig)
    return [scores_png, curves_png]


def _rate(dropout: float | None) -> str:
    return "the checkpoint's" if dropout is None else f"{dropout:g}"


def dropouts(model) -> str:
    """The dropout a run's backbone trained with, as the model applies the config (dropout 0 covers attention)."""
    from pipeline.model import effective_dropout

    hidden = effective_dropout(model)
    attention = hidden if model.attention_dropout is None else model.attention_dropout
    return f"dropout (baseline): {_rate(hidden)}, attention probabilities {_rate(attention)}"


def model_line(cfg) -> str:
    """The baseline's model for the report's header: the backbone and its dropout, or the TF-IDF features."""
    if cfg.model.kind == "transformer":
        return f"{cfg.model.backbone}; {dropouts(cfg.model)}"
    t = cfg.tfidf
    grams = [f"{name} {span[0]}-{span[1]}-grams" for name, span in (("word", t.word_ngrams),
                                                                    (t.char_analyzer, t.char_ngrams)) if span]
    linear = f"Ridge alpha {t.alpha:g}" if cfg.data.task == "regression" else f"LogisticRegression C {t.C:g}"
    return f"TF-IDF ({', '.join(grams)}) + {linear} (model.kind tfidf)"


def fmt(x: float, digits: int = 4) -> str:
    """A score or p-value for a table: fixed digits, and an en dash where there is none (NaN, None)."""
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def reading(table: pd.DataFrame, baseline: str, metric: str) -> list[str]:
    """Plain sentences from the table: which differences stand out from the fold-to-fold and seed-to-seed noise.

    A difference is called clear when the paired t-test gives p < 0.05, the folds agree on its direction
    (Wilcoxon p < 0.05, or every pair moved the same way where too few pairs let Wilcoxon get there) and it is
    larger than the baseline's seed-to-seed spread of the CV, when the baseline ran with several seeds.
    """
    lower = LOWER_IS_BETTER[metric]
    base = table[table["experiment"] == baseline].iloc[0]
    spread = base["cv_seed_std"] if not np.isnan(base["cv_seed_std"]) else None
    lines = []
    if spread is not None:
        lines.append(f"- The baseline's CV moves by {fmt(spread)} (std) between its {int(base['seeds'])} seeds"
                     + (" — a rough estimate from two" if int(base["seeds"]) == 2 else "")
                     + "; a technique's Δ smaller than that is within what a new seed alone can do."
                     + (f" A single fold's score moves by {fmt(base['fold_seed_std'])} between its seeds (std, the "
                        "mean over folds): a fold won or lost by less than that may be the seed's doing."
                        if "fold_seed_std" in base and not np.isnan(base["fold_seed_std"]) else ""))
    pairs = int(table["pairs"].min()) if len(table) else 0
    if 0 < pairs < 6:  # the exact two-sided test's smallest p-value is 2 / 2**n
        lines.append(f"- With {pairs} paired folds the smallest possible two-sided Wilcoxon p is "
                     f"{2 / 2 ** pairs:.3f}: no difference can reach p < 0.05 this way, so a difference counts as "
                     "clear when the paired t-test gives p < 0.05 and every fold moved the same way; more seeds "
                     "(`SEEDS=\"42 43 44\"`) give Wilcoxon enough pairs.")
    lines.append("- Folds share most of their training rows, so the paired tests treat them as more independent "
                 "than they are (Nadeau & Bengio, 2003): read the p-values as a ranking of evidence, not as exact "
                 "error rates.")
    for _, row in table[table["experiment"] != baseline].iterrows():
        better = row["delta"] < 0 if lower else row["delta"] > 0
        verdict = "better" if better else "worse"
        same_way = row["pairs"] >= 2 and row["wins"] == (row["pairs"] if better else 0)
        majority = row["wins"] > row["pairs"] / 2 if better else row["wins"] < row["pairs"] / 2
        consistent = (not np.isnan(row["wilcoxon_p"]) and row["wilcoxon_p"] < 0.05 and majority) or same_way
        significant = not np.isnan(row["ttest_p"]) and row["ttest_p"] < 0.05 and consistent
        beyond = spread is not None and abs(row["delta"]) > spread
        evidence = (f"beat the baseline on {row['wins']}/{row['pairs']} paired folds, paired t p="
                    f"{fmt(row['ttest_p'], 3)}, Wilcoxon p={fmt(row['wilcoxon_p'], 3)}"
                    + (f"; |Δ| is {'above' if beyond else 'within'} the baseline's seed-to-seed spread "
                       f"({fmt(spread)})" if spread is not None else "; one seed, so seed-to-seed spread is unknown"))
        strength = "a clear" if significant and (beyond or spread is None) else "no reliable"
        lines.append(f"- **{row['experiment']}**: {verdict} by {fmt(abs(row['delta']))} — {strength} "
                     f"difference ({evidence}).")
    return lines


def interactions(experiments: dict[str, Experiment]) -> list[str]:
    """Notes on techniques that cancel each other, read from each run's config."""
    notes, need, remove = [], [], []
    for name, exp in experiments.items():
        if not exp.runs:
            continue
        m, t = exp.runs[0].config.model, exp.runs[0].config.train
        no_dropout = m.dropout == 0.0 or (m.mixout > 0 and m.dropout is None)
        if t.rdrop > 0 or m.head == "msd":
            need.append(name)
        if no_dropout:
            remove.append(name)
        if (t.rdrop > 0 or m.head == "msd") and no_dropout:
            notes.append(f"- {name}: R-Drop / Multi-Sample Dropout with the backbone's dropout at 0 — their extra "
                         "terms only see head dropout (or none), so they cannot help here.")
        if m.mixout > 0:
            notes.append(f"- {name}: mixout turns the backbone's dropout off (the paper's recipe), so compare it "
                         "with dropout=0 as well as with the baseline.")
    if need and remove:
        needs = "needs" if len(need) == 1 else "need"
        turns = "turns" if len(remove) == 1 else "turn"
        notes.append(f"- {', '.join(need)} {needs} dropout and {', '.join(remove)} {turns} the backbone's off: they "
                     "do not stack. With every dropout at 0, R-Drop's consistency term and MSD's extra samples are "
                     "identically zero (training warns), so a combination pays their cost for nothing; choose one "
                     "side from the rows above.")
    return notes


def hardware() -> str:
    """CPU model (and GPU, where training ran on one) for the report's header."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPU cores{gpu}"


def describe_seeds(experiments: dict[str, Experiment], baseline: str) -> str:
    """`42` when every experiment ran the same seeds, else the common ones and the exceptions by name."""
    by_name = {n: sorted(r.seed for r in e.runs) for n, e in experiments.items() if e.runs}
    common = sorted(set.intersection(*(set(v) for v in by_name.values())))
    others = [f"{n}: {', '.join(map(str, v))}" for n, v in by_name.items() if v != common]
    return ", ".join(map(str, common)) + (f" ({'; '.join(others)})" if others else "")


def write(patterns: list[str], baseline: str, out: Path, output_dir: Path = Path("oof"),
          command: str = "pipeline report") -> Path:
    names = find_runs([*patterns, baseline], output_dir)  # the baseline is in the report even if not listed
    experiments = collect(names, output_dir)
    table = summary(experiments, baseline)
    first = experiments[baseline].runs[0].config
    metric = first.metric
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = _plots(experiments, table, baseline, metric, out.parent, out.stem)
    import torch

    precisions = sorted({read_json(output_dir / r.name / "fold0" / "metrics.json")["precision"]
                         for e in experiments.values() for r in e.runs})
    seeds = describe_seeds(experiments, baseline)
    lines = [f"# Technique report: {first.data.name}", "",
             f"- command: `{command}`",
             f"- dataset: {first.data.train_path} ({first.data.task}, target {', '.join(first.data.target_columns)}, "
             f"metric {metric}, {'lower' if LOWER_IS_BETTER[metric] else 'higher'} is better)",
             f"- model: {model_line(first)}; folds: {first.data.n_folds}; seeds: {seeds}; "
             f"precision: {', '.join(precisions)}",
             *([] if first.model.kind == "tfidf" else [
                 f"- training (baseline): {first.train.epochs:g} epoch(s), batch {first.train.batch_size}, lr "
                 f"{first.train.lr:g}, max length {first.data.max_length}, evaluation every "
                 f"{first.train.eval_every or 'half epoch'} steps from {first.train.eval_start:.0%} of training, "
                 "best evaluation kept"]),
             f"- hardware: {hardware()}, torch {torch.__version__}", "",
             "| experiment | changes | seeds | OOF CV | fold mean ± std | Δ vs baseline | wins | Wilcoxon p | "
             "paired t p | failed runs | s / fold | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in table.iterrows():
        delta = "—" if r["experiment"] == baseline else f"{r['delta']:+.4f}"
        wins = "—" if r["experiment"] == baseline else f"{r['wins']}/{r['pairs']}"
        lines.append(f"| {r['experiment']} | {r['changes']} | {r['seeds']} | {fmt(r['cv'])} | "
                     f"{fmt(r['fold_mean'])} ± {fmt(r['fold_std'])} | {delta} | {wins} | "
                     f"{fmt(r['wilcoxon_p'], 3)} | {fmt(r['ttest_p'], 3)} | {r['failed']} | "
                     f"{r['fold_seconds']:.0f} | {r['peak_memory_mb']:.0f} |")
    incomplete = [m for e in experiments.values() for m in e.incomplete]
    lines += ["", "Δ: the experiment's CV minus the baseline's, over the seeds both ran. Wins and both p-values: "
              "paired (seed, fold) comparisons with the baseline. Failed runs: folds no better than the metric's "
              "best constant prediction (for RMSE, the training mean). s / fold: wall-clock training and evaluation "
              "time, which counts every other process sharing the machine and every pause: a cost only for grids "
              "run alone (`make bench-cost` measures the cost per step). "
              "Peak MB: peak GPU memory allocated, or on CPU the process's resident peak during the fold, which "
              "includes what the CPU kernels (oneDNN) cache "
              "from earlier folds of the same grid process.", "",
              f"![scores]({figures[0]})", "", f"![validation curves]({figures[1]})", "", "## Reading", ""]
    lines += reading(table, baseline, metric) or ["- Only the baseline is in this report."]
    by_seed = per_seed(experiments, baseline)
    lines += per_seed_lines(by_seed, baseline)
    notes = interactions(experiments)
    if notes:
        lines += ["", "## Interactions", ""] + notes
    if incomplete:
        lines += ["", "## Incomplete (not in the table)", ""] + [f"- {m}" for m in incomplete]
    write_text_atomic(out, "\n".join(lines) + "\n")
    table.to_csv(out.with_suffix(".csv"), index=False)
    seeds_csv = out.with_name(f"{out.stem}_seeds.csv")
    if by_seed.empty:
        seeds_csv.unlink(missing_ok=True)  # an earlier report's, of runs this one no longer has
    else:
        by_seed.to_csv(seeds_csv, index=False)
    return out
