"""The technique report on fabricated run directories (no training): every number is recomputed here.

Each run directory is written by hand the way `pipeline train` and `pipeline oof` write it: config.yaml,
fold<k>/metrics.json, fold<k>/log.csv and oof.csv, with predictions = truth + noise of a chosen size.
metrics.json carries a deliberately wrong score, so a report that copied scores from it would fail here.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from pipeline import report as R
from pipeline.cli import app
from pipeline.config import save_config
from pipeline.errors import PipelineError
from tests.conftest import tiny_config

FOLDS = 3
WRONG_SCORE = 123.0  # what every fabricated metrics.json claims; the report must never show it
# The pipeline scores against float32 targets (data.target_array); this test uses the CSV's float64 values.
TOL, ABS = 1e-6, 1e-7


def assign_folds(y: np.ndarray) -> np.ndarray:
    """Round robin over the sorted target: every fold gets low and high values (both classes)."""
    fold = np.empty(len(y), dtype=int)
    fold[np.argsort(y, kind="stable")] = np.arange(len(y)) % FOLDS
    return fold


def fabricate(cfg, name: str, seed: int, preds: np.ndarray, fold: np.ndarray, ids: list[str], columns: list[str],
              finished=range(FOLDS), oof: bool = True, mixout: float = 0.0) -> Path:
    """One run directory as training leaves it; `finished` folds get metrics.json, `oof` writes oof.csv."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.experiment, run_cfg.train.seed, run_cfg.model.mixout = name, seed, mixout
    run = Path(cfg.output_dir) / name
    save_config(run_cfg, run / "config.yaml")
    for k in range(FOLDS):
        (run / f"fold{k}").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": [5, 10], "epoch": [0.5, 1.0], "lr": [1e-3, 0.0], "train_loss": [0.5, 0.4],
                      cfg.metric: [WRONG_SCORE, WRONG_SCORE], "elapsed_s": [1.0, 2.0]}
                     ).to_csv(run / f"fold{k}" / "log.csv", index=False)
        if k in finished:
            (run / f"fold{k}" / "metrics.json").write_text(json.dumps(
                {"fold": k, "metric": cfg.metric, "score": WRONG_SCORE, "best_step": 10, "steps": 10,
                 "train_rows": int((fold != k).sum()), "valid_rows": int((fold == k).sum()), "precision": "fp32",
                 "device": "cpu", "train_seconds": 10.0 * (k + 1) + seed, "peak_memory_mb": 100.0 + seed + k,
                 "skipped_steps": 0}))
    if oof:
        df = pd.DataFrame({"id": ids, "fold": fold})
        for j, col in enumerate(columns):
            df[col] = preds[:, j]
        # Rows shuffled: the report must join the truth by id, not by position.
        df.sample(frac=1.0, random_state=seed).to_csv(run / "oof.csv", index=False)
    return run


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)))


def recompute_regression(run: Path, truth: pd.DataFrame) -> dict:
    """CV, per-fold RMSE and per-fold RMSE of predicting the other folds' mean, straight from oof.csv."""
    oof = pd.read_csv(run / "oof.csv").merge(truth, on="id", suffixes=("_pred", ""))
    y, p, fold = oof["target"].to_numpy(), oof["target_pred"].to_numpy(), oof["fold"].to_numpy()
    folds = {k: rmse(y[fold == k], p[fold == k]) for k in range(FOLDS)}
    floors = {k: rmse(y[fold == k], np.full((fold == k).sum(), y[fold != k].mean())) for k in range(FOLDS)}
    return {"cv": rmse(y, p), "folds": folds, "floors": floors}


def expected_row(runs: dict[int, dict], base_runs: dict[int, dict], lower: bool = True) -> dict:
    """The report's row for an experiment with runs {seed: recomputed}, against the baseline's runs."""
    scores = [v for r in runs.values() for v in r["folds"].values()]
    cv = float(np.mean([r["cv"] for r in runs.values()]))
    keys = [(s, k) for s in sorted(runs) if s in base_runs for k in range(FOLDS)]
    a = [runs[s]["folds"][k] for s, k in keys]
    b = [base_runs[s]["folds"][k] for s, k in keys]
    failed = sum((v >= r["floors"][k]) if lower else (v <= r["floors"][k])
                 for r in runs.values() for k, v in r["folds"].items())
    return {"seeds": len(runs), "cv": cv, "fold_mean": float(np.mean(scores)),
            "fold_std": float(np.std(scores, ddof=1)),
            "delta": float(np.mean([runs[s]["cv"] - base_runs[s]["cv"] for s in sorted(runs) if s in base_runs])),
            "failed": failed,
            "pairs": len(keys), "wins": sum((x < y) if lower else (x > y) for x, y in zip(a, b, strict=True)),
            "wilcoxon_p": float(stats.wilcoxon(a, b).pvalue), "ttest_p": float(stats.ttest_rel(a, b).pvalue)}


# name -> seed, noise scale (times the target's std), per-fold extra offset (in stds)
REGRESSION_RUNS = {
    "base": (42, 0.30, {}), "base-seed1": (1, 0.30, {}),
    "better": (42, 0.15, {}), "better-seed1": (1, 0.15, {}),
    "close": (42, 0.30, {}),  # one seed: paired with the baseline's seed 42 only
    "broken": (42, 0.15, {1: 3.0}),  # fold 1 far off: worse than predicting the training mean
}


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """Finished runs of four experiments (two with two seeds), plus unfinished ones, and one report."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = tiny_config(tmp, Path("unused-backbone"))
    truth = pd.read_csv(Path(cfg.data.dir) / "train.csv")[["id", "target"]]
    assert len(truth) == 60
    y, ids = truth["target"].to_numpy(), truth["id"].tolist()
    fold, std = assign_folds(y), float(y.std())
    rng = np.random.default_rng(0)

    def preds(noise, offsets):
        p = y + rng.normal(0, noise * std, len(y))
        for k, off in offsets.items():
            p[fold == k] += off * std
        return p[:, None]

    for name, (seed, noise, offsets) in REGRESSION_RUNS.items():
        fabricate(cfg, name, seed, preds(noise, offsets), fold, ids, ["target"],
                  mixout=0.1 if name.startswith("better") else 0.0)
    # Unfinished: a fold without metrics.json; all folds done but no oof.csv; an unfinished third seed.
    fabricate(cfg, "half", 42, preds(0.1, {}), fold, ids, ["target"], finished=[0, 1], oof=False)
    fabricate(cfg, "nooof", 42, preds(0.1, {}), fold, ids, ["target"], oof=False)
    fabricate(cfg, "better-seed7", 7, preds(0.1, {}), fold, ids, ["target"], finished=[0])
    output_dir = Path(cfg.output_dir)
    out = R.write(["base", "better", "close", "broken", "half", "nooof"], "base", tmp / "reports" / "tech.md",
                  output_dir, command="pipeline report test")
    recomputed = {name: recompute_regression(output_dir / name, truth) for name in REGRESSION_RUNS}
    return {"out": out, "output_dir": output_dir, "truth": truth, "recomputed": recomputed, "tmp": tmp}


def grouped(recomputed: dict, experiment: str) -> dict[int, dict]:
    return {REGRESSION_RUNS[n][0]: r for n, r in recomputed.items() if R.SEED_SUFFIX.sub(r"\g<base>", n) == experiment}


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The first table in `markdown`, keyed by its first cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    rows = [line.strip("|").split("|") for line in lines[start:end]]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}  # header, then | --- |


def test_report_renders(regression):
    out = regression["out"]
    text = out.read_text()
    assert out == regression["tmp"] / "reports" / "tech.md"
    for name in ("base", "better", "close", "broken", "half", "nooof"):
        assert name in text
    for png in ("tech_scores.png", "tech_curves.png"):
        assert (out.parent / png).stat().st_size > 1000 and f"]({png})" in text
    table = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(table["experiment"]) == ["base", "better", "broken", "close"]
    assert set(table_rows(text)) == {"base", "better", "broken", "close"}
    assert "pipeline report test" in text and "metric rmse, lower is better" in text
    # The baseline's dropout is in the header: reports of the same configs may differ only there.
    assert "dropout (baseline): the checkpoint's, attention probabilities the checkpoint's" in text
    assert str(WRONG_SCORE) not in text and not np.isclose(table[["cv", "fold_mean"]], WRONG_SCORE).any()


def test_reading_warns_when_too_few_pairs_for_wilcoxon(regression):
    """3 paired folds: the exact two-sided Wilcoxon p cannot go below 2 / 2**3, whatever the difference."""
    reading = regression["out"].read_text().split("## Reading", 1)[1]
    assert "With 3 paired folds the smallest possible two-sided Wilcoxon p is 0.250" in reading


def test_reading_measures_differences_against_the_baseline_seed_spread(regression):
    """The baseline ran seeds 42 and 1: the reading states the std of its two CVs and compares each Δ to it."""
    text = regression["out"].read_text()
    base_cvs = [r["cv"] for r in grouped(regression["recomputed"], "base").values()]
    spread = float(np.std(base_cvs, ddof=1))
    reading = text.split("## Reading", 1)[1]
    assert f"The baseline's CV moves by {spread:.4f} (std) between its 2 seeds — a rough estimate from two" in reading
    assert f"seed-to-seed spread ({spread:.4f})" in reading
    assert "seeds: 42 (base: 1, 42; better: 1, 42)" in text  # the header names who ran extra seeds


def test_reading_states_how_far_a_single_fold_moves_between_seeds(regression):
    """The CV's seed spread averages the folds' noise out; the reading also gives one fold's: the std of each fold's
    score over the baseline's seeds, averaged over the folds (in the CSV for every experiment with two seeds)."""
    table = pd.read_csv(regression["out"].with_suffix(".csv")).set_index("experiment")
    for name in ("base", "better"):
        runs = grouped(regression["recomputed"], name)
        expected = np.mean([np.std([r["folds"][k] for r in runs.values()], ddof=1) for k in range(FOLDS)])
        assert table.loc[name, "fold_seed_std"] == pytest.approx(expected, rel=TOL, abs=ABS)
    assert np.isnan(table.loc["close", "fold_seed_std"])  # one seed
    reading = regression["out"].read_text().split("## Reading", 1)[1]
    assert (f"A single fold's score moves by {table.loc['base', 'fold_seed_std']:.4f} between its seeds (std, the "
            "mean over folds)") in reading


def test_per_seed_table_pairs_each_run_with_the_baseline_run_at_its_seed(regression):
    """A two-seed row's Δ is a mean: the per-seed table gives each seed's own Δ against the baseline's run at the
    same seed (never the other seed's), its fold wins and paired t p; one-seed experiments are not listed."""
    rec = regression["recomputed"]
    seeds = pd.read_csv(regression["out"].with_name("tech_seeds.csv"))
    assert set(seeds["experiment"]) == {"base", "better"}
    rows = seeds.set_index(["experiment", "seed"])
    for seed, suffix in ((42, ""), (1, "-seed1")):
        mine, theirs = rec[f"better{suffix}"], rec[f"base{suffix}"]
        row = rows.loc[("better", seed)]
        assert row["cv"] == pytest.approx(mine["cv"], rel=TOL, abs=ABS)
        assert row["delta"] == pytest.approx(mine["cv"] - theirs["cv"], rel=TOL, abs=ABS)
        a, b = [mine["folds"][k] for k in range(FOLDS)], [theirs["folds"][k] for k in range(FOLDS)]
        assert (row["pairs"], row["wins"]) == (FOLDS, sum(x < y for x, y in zip(a, b, strict=True)))
        assert row["ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-4)  # scores from float32 targets
        assert rows.loc[("base", seed), "cv"] == pytest.approx(theirs["cv"], rel=TOL, abs=ABS)
    section = regression["out"].read_text().split("## Per seed", 1)[1]
    better = table_rows(section)  # keyed by experiment: the last row of each, seed 42 (sorted: 1, 42)
    delta = rec["better"]["cv"] - rec["base"]["cv"]
    assert better["better"][:3] == ["42", f"{rec['better']['cv']:.4f}", f"{delta:+.4f}"]


def reading_row(name: str, delta: float, wins: int, pairs: int, ttest_p: float, wilcoxon_p: float) -> dict:
    return {"experiment": name, "seeds": 1, "cv_seed_std": float("nan"), "delta": delta, "wins": wins,
            "pairs": pairs, "wilcoxon_p": wilcoxon_p, "ttest_p": ttest_p}


@pytest.mark.parametrize(("delta", "wins", "pairs", "ttest_p", "wilcoxon_p", "base_spread", "verdict"), [
    (-0.02, 5, 5, 0.01, 0.0625, 0.005, "better by 0.0200 — a clear difference"),
    (-0.02, 5, 5, 0.01, 0.0625, float("nan"), "better by 0.0200 — a clear difference"),  # one baseline seed
    (-0.02, 4, 5, 0.01, 0.125, 0.005, "no reliable"),  # one fold went the other way: Wilcoxon cannot confirm it
    (-0.02, 5, 5, 0.20, 0.0625, 0.005, "no reliable"),  # the t-test does not
    (-0.02, 5, 5, 0.01, 0.0625, 0.030, "no reliable"),  # smaller than what a new seed of the baseline does
    (+0.02, 0, 5, 0.01, 0.0625, 0.005, "worse by 0.0200 — a clear difference"),
    (-0.02, 9, 10, 0.01, 0.01, 0.005, "better by 0.0200 — a clear difference"),  # enough pairs for Wilcoxon
    (-0.02, 2, 10, 0.01, 0.01, 0.005, "no reliable"),  # Wilcoxon p < 0.05, but most folds went the other way
])
def test_reading_calls_a_difference_clear_only_when_every_test_agrees(delta, wins, pairs, ttest_p, wilcoxon_p,
                                                                      base_spread, verdict):
    base = reading_row("base", 0.0, 0, pairs, float("nan"), float("nan")) | {"seeds": 2, "cv_seed_std": base_spread}
    table = pd.DataFrame([base, reading_row("tech", delta, wins, pairs, ttest_p, wilcoxon_p)])
    line = [x for x in R.reading(table, "base", "rmse") if "**tech**" in x][0]
    assert verdict in line


def test_numbers_match_recomputation(regression):
    table = pd.read_csv(regression["out"].with_suffix(".csv")).set_index("experiment")
    rows = table_rows(regression["out"].read_text())
    rec = regression["recomputed"]
    base = grouped(rec, "base")
    for experiment in ("better", "close", "broken"):
        want = expected_row(grouped(rec, experiment), base)
        got = table.loc[experiment]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=TOL, abs=ABS), (experiment, key)
        # The Markdown shows the same numbers, rounded.
        md = rows[experiment]
        assert md[1] == str(want["seeds"]) and md[2] == f"{want['cv']:.4f}"
        assert md[3] == f"{want['fold_mean']:.4f} ± {want['fold_std']:.4f}" and md[4] == f"{want['delta']:+.4f}"
        assert md[5] == f"{want['wins']}/{want['pairs']}" and md[8] == str(want["failed"])
        assert md[6] == f"{want['wilcoxon_p']:.3f}" and md[7] == f"{want['ttest_p']:.3f}"
    # What each experiment changes from the baseline (the seed is not a change).
    assert rows["better"][0] == "model.mixout=0.1" and rows["close"][0] == "—" and rows["base"][0] == "—"
    # The baseline's own row: its CV, no delta, and both seeds.
    want_cv = np.mean([r["cv"] for r in base.values()])
    assert table.loc["base", "cv"] == pytest.approx(want_cv) and table.loc["base", "seeds"] == 2
    assert table.loc["base", "delta"] == pytest.approx(0.0, abs=1e-12) and rows["base"][4] == "—"
    # Cost columns: mean seconds per fold, peak memory over every fold and seed.
    assert table.loc["better", "fold_seconds"] == pytest.approx(np.mean([10, 20, 30]) + (42 + 1) / 2)
    assert table.loc["better", "peak_memory_mb"] == pytest.approx(100 + 42 + 2)


def test_single_seed_cv_is_rmse_over_all_rows(regression):
    table = pd.read_csv(regression["out"].with_suffix(".csv")).set_index("experiment")
    oof = pd.read_csv(regression["output_dir"] / "close" / "oof.csv").merge(regression["truth"], on="id")
    assert table.loc["close", "cv"] == pytest.approx(rmse(oof["target_x"], oof["target_y"]), rel=TOL)
    assert table.loc["close", "seeds"] == 1 and table.loc["close", "pairs"] == FOLDS
    assert np.isnan(table.loc["close", "cv_seed_std"])


def test_failed_runs_counts_folds_worse_than_the_mean(regression):
    rec, table = regression["recomputed"], pd.read_csv(regression["out"].with_suffix(".csv")).set_index("experiment")
    broken = rec["broken"]
    # The fabricated data does what the test intends: fold 1 alone is worse than predicting the mean.
    assert [broken["folds"][k] > broken["floors"][k] for k in range(FOLDS)] == [False, True, False]
    assert all(v < r["floors"][k] for n in ("better", "better-seed1") for r in [rec[n]] for k, v in r["folds"].items())
    assert table.loc["broken", "failed"] == 1 and table.loc["better", "failed"] == 0
    # The floor is each fold's score when predicting the mean of the other folds' targets.
    run = R.load_run(regression["output_dir"] / "broken")
    assert run.mean_scores == pytest.approx(broken["floors"], rel=TOL)
    assert run.fold_scores == pytest.approx(broken["folds"], rel=TOL)


def test_seeds_grouped_and_paired(regression):
    table = pd.read_csv(regression["out"].with_suffix(".csv")).set_index("experiment")
    assert "better-seed1" not in table.index and "base-seed1" not in table.index
    assert table.loc["better", "seeds"] == 2 and table.loc["better", "pairs"] == FOLDS * 2
    rec = regression["recomputed"]
    cvs = [rec["better"]["cv"], rec["better-seed1"]["cv"]]
    assert table.loc["better", "cv_seed_std"] == pytest.approx(np.std(cvs, ddof=1), rel=TOL, abs=ABS)
    # Less noise wins most pairs; the exact count is the recomputed one (checked above), not all-or-nothing.
    assert table.loc["better", "wins"] >= 4 and table.loc["better", "delta"] < 0


def test_incomplete_listed_not_dropped(regression):
    text = regression["out"].read_text()
    assert "## Incomplete" in text
    incomplete = text.split("## Incomplete", 1)[1]
    assert re.search(r"- half: fold\(s\) 2 not finished", incomplete)
    assert re.search(r"- nooof: no oof\.csv", incomplete)
    assert re.search(r"- better-seed7: fold\(s\) 1, 2 not finished", incomplete)
    rows = table_rows(text)
    assert "half" not in rows and "nooof" not in rows and rows["better"][1] == "2"


def test_pattern_matching_nothing_is_an_error(regression):
    with pytest.raises(PipelineError, match=re.escape("'nothing*'")):
        R.write(["base", "nothing*"], "base", regression["tmp"] / "x.md", regression["output_dir"])
    with pytest.raises(PipelineError, match="'missing'"):
        R.find_runs(["missing"], regression["tmp"] / "no-such-dir")
    assert not (regression["tmp"] / "x.md").exists()


def test_baseline_without_a_finished_run_is_an_error(regression):
    for names in (["half", "better"], ["better"]):  # listed or not, the baseline's only run is unfinished
        with pytest.raises(PipelineError, match="baseline 'half' has no finished run"):
            R.write(names, "half", regression["tmp"] / "y.md", regression["output_dir"])
    with pytest.raises(PipelineError, match="'nobody'"):  # no run directory at all
        R.write(["better"], "nobody", regression["tmp"] / "y.md", regression["output_dir"])
    assert not (regression["tmp"] / "y.md").exists()


def test_find_runs_groups_seed_directories(regression):
    assert R.find_runs(["better"], regression["output_dir"]) == ["better", "better-seed1", "better-seed7"]
    assert R.find_runs(["b*", "base"], regression["output_dir"]) == [
        "base", "base-seed1", "better", "better-seed1", "better-seed7", "broken"]


def test_cli_report(regression):
    runner = CliRunner()
    out = regression["tmp"] / "cli" / "r.md"
    common = ["--baseline", "base", "--out", str(out), "--output-dir", str(regression["output_dir"])]
    result = runner.invoke(app, ["report", "close", *common])  # the baseline need not be listed
    assert result.exit_code == 0, result.output
    assert out.exists() and (out.parent / "r_scores.png").exists() and "close" in out.read_text()
    assert len(pd.read_csv(out.with_suffix(".csv"))) == 2
    result = runner.invoke(app, ["report", "base", "absent", *common])
    assert result.exit_code == 1
    assert re.search(r"^error: .*'absent'", result.output, re.M), result.output


def test_higher_is_better_metric(tmp_path):
    """AUC: a higher score wins, and a fold below the class-frequency floor (AUC 0.5) is a failed run."""
    cfg = tiny_config(tmp_path, Path("unused-backbone"), task="binary", extra=["train.metric=auc"])
    train = pd.read_csv(Path(cfg.data.dir) / "train.csv")
    y, ids = (train["label"] == "pos").to_numpy(int), train["id"].tolist()
    fold = assign_folds(y)
    rng = np.random.default_rng(1)
    signal = y + rng.normal(0, 1e-3, len(y))  # perfectly ranked

    def probs(score):
        p = 1 / (1 + np.exp(-score))
        return np.stack([1 - p, p], axis=1)

    runs = {"base": signal + rng.normal(0, 0.6, len(y)), "good": signal.copy(),
            "flipped": np.where(fold == 0, -signal, signal)}  # perfect on folds 1 and 2, inverted on fold 0
    for name, s in runs.items():
        fabricate(cfg, name, 42, probs(s), fold, ids, ["neg", "pos"])
    auc = {name: [roc_auc_score(y[fold == k], s[fold == k]) for k in range(FOLDS)] for name, s in runs.items()}
    assert all(0.5 < v < 1.0 for v in auc["base"]), auc  # the fabricated baseline is imperfect on every fold

    output_dir = Path(cfg.output_dir)
    experiments = R.collect(R.find_runs(["base", "good", "flipped"], output_dir), output_dir)
    table = R.summary(experiments, "base").set_index("experiment")
    for name in ("good", "flipped"):
        a, b = auc[name], auc["base"]
        assert table.loc[name, "fold_mean"] == pytest.approx(np.mean(a))
        assert table.loc[name, "wins"] == sum(x > z for x, z in zip(a, b, strict=True))
        assert table.loc[name, "wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
        assert table.loc[name, "ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert table.loc["good", "wins"] == 3 and table.loc["flipped", "wins"] == 2
    assert table.loc["good", "delta"] > 0 and table.loc["good", "failed"] == 0
    assert table.loc["flipped", "failed"] == 1 and table.loc["base", "failed"] == 0
    assert experiments["flipped"].runs[0].mean_scores == {0: 0.5, 1: 0.5, 2: 0.5}  # constant probabilities
    reading = "\n".join(R.reading(table.reset_index(), "base", "auc"))
    assert re.search(r"\*\*good\*\*: better by", reading)


def test_interactions_name_the_techniques_that_need_dropout_and_those_that_remove_it(tmp_path):
    cfg = tiny_config(tmp_path, Path("unused-backbone"))

    def experiment(name: str, model: dict | None = None, train: dict | None = None) -> R.Experiment:
        run_cfg = copy.deepcopy(cfg)
        for section, values in ((run_cfg.model, model or {}), (run_cfg.train, train or {})):
            for key, value in values.items():
                setattr(section, key, value)
        return R.Experiment(name, runs=[SimpleNamespace(config=run_cfg)])

    exps = {e.name: e for e in [experiment("base"), experiment("rdrop", train={"rdrop": 1.0}),
                                experiment("msd", model={"head": "msd"}), experiment("no_dropout", {"dropout": 0.0}),
                                experiment("mixout", {"mixout": 0.3}),
                                experiment("rdrop_no_dropout", {"dropout": 0.0}, {"rdrop": 1.0})]}
    notes = "\n".join(R.interactions(exps))
    assert "rdrop, msd, rdrop_no_dropout need dropout and no_dropout, mixout, rdrop_no_dropout turn" in notes
    one = "\n".join(R.interactions({n: exps[n] for n in ("base", "msd", "no_dropout")}))
    assert "msd needs dropout and no_dropout turns the backbone's off" in one
    assert "- rdrop_no_dropout: R-Drop / Multi-Sample Dropout with the backbone's dropout at 0" in notes
    assert "- mixout: mixout turns the backbone's dropout off" in notes
    assert R.interactions({"base": exps["base"], "rdrop": exps["rdrop"]}) == []  # nothing to warn about


@pytest.mark.parametrize(("seeds", "expected"), [
    ({"base": [42], "a": [42]}, "42"),
    ({"base": [1, 42], "a": [1, 42]}, "1, 42"),
    ({"base": [42, 43], "a": [42], "b": [42]}, "42 (base: 42, 43)"),
])
def test_header_says_which_experiments_ran_which_seeds(seeds, expected):
    exps = {name: R.Experiment(name, runs=[SimpleNamespace(seed=s) for s in v]) for name, v in seeds.items()}
    assert R.describe_seeds(exps, "base") == expected


@pytest.mark.parametrize(("second", "seed", "mixout", "message"), [
    ("x-seed42", 42, 0.0, "runs 'x' and 'x-seed42' are one experiment with the same seed 42"),
    ("x-seed1", 1, 0.1, "'x-seed1' is grouped with 'x' as another seed of one experiment, but its settings differ "
                        "(model.mixout: 0.0 vs 0.1)"),
])
def test_seed_runs_of_one_row_must_differ_in_their_seed_only(tmp_path, second, seed, mixout, message):
    cfg = tiny_config(tmp_path, Path("unused-backbone"))
    truth = pd.read_csv(Path(cfg.data.dir) / "train.csv")
    y, ids = truth["target"].to_numpy(), truth["id"].tolist()
    fold = assign_folds(y)
    fabricate(cfg, "x", 42, y[:, None] + 0.1, fold, ids, ["target"])
    fabricate(cfg, second, seed, y[:, None] - 0.1, fold, ids, ["target"], mixout=mixout)
    with pytest.raises(PipelineError) as err:
        R.collect(R.find_runs(["x"], Path(cfg.output_dir)), Path(cfg.output_dir))
    assert message in str(err.value)


@pytest.mark.parametrize("keys, expected", [
    ({}, "dropout (baseline): the checkpoint's, attention probabilities the checkpoint's"),
    ({"attention_dropout": 0.0}, "dropout (baseline): the checkpoint's, attention probabilities 0"),
    ({"dropout": 0.0}, "dropout (baseline): 0, attention probabilities 0"),  # dropout 0 is every dropout
    ({"mixout": 0.3}, "dropout (baseline): 0, attention probabilities 0"),  # mixout turns the backbone's off
])
def test_header_states_the_dropout_the_baseline_trained_with(keys, expected):
    from pipeline.config import ModelConfig
    from pipeline.report import dropouts

    assert dropouts(ModelConfig(**keys)) == expected
