"""Blend several experiments, fit on their OOF predictions by one of pipeline/blend.py's methods (nnls, hill,
stack, mean), and apply the fitted blend to their test predictions.

A member may itself be a weighted blend (the seeds of one config averaged, say): the blend records each member
as a weighted sum of trained experiments (`leaves`), which is what the Kaggle kit predicts with. A stacked
blend cannot be a member (it is not a weighted sum). Member names are paths under the output directory the blend
was built in, which ensemble.json records (`root`, relative to the blend's folder): read from another output
directory (`report/blend` from oof/), they are rebased onto it (`rebase`).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import blend as B
from pipeline import data as D
from pipeline import decision
from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_csv_atomic, write_json_atomic
from pipeline.metrics import score
from pipeline.runs import check_same_inputs, load_run_config, read_predictions, seed_runs


def run(experiments: list[str], name: str, output_dir: str = "oof", method: str = "nnls", negative: bool = False,
        seeds: bool = False, stacker: str = "linear") -> dict:
    """Fit the blend on OOF, write oof.csv, cv.json, ensemble.json (and test_predictions.csv when every member
    has them) under output_dir/name. `seeds`: each experiment also brings its other seeds' runs (NAME-seedN)."""
    if len(experiments) < 1:
        raise PipelineError("ensemble: name at least one experiment")
    if method not in B.METHODS:
        raise PipelineError(f"ensemble: --method {method}; choose one of {', '.join(B.METHODS)}")
    if negative and method != "hill":
        raise PipelineError("ensemble: --negative is an option of --method hill")
    if stacker not in B.STACKERS:
        raise PipelineError(f"ensemble: --stacker {stacker}; choose one of {', '.join(B.STACKERS)}")
    if stacker != "linear" and method != "stack":
        raise PipelineError("ensemble: --stacker is an option of --method stack")
    if seeds:
        experiments = [run for e in experiments for run in [e, *seed_runs(e, Path(output_dir))]]
    if name in experiments:
        raise PipelineError(f"ensemble: the name '{name}' would overwrite a member; choose another --name")
    out = Path(output_dir) / name
    if (out / "config.yaml").exists() and not (out / "ensemble.json").exists():
        raise PipelineError(f"ensemble: {out} holds a trained experiment, not a blend; choose another --name")
    dirs = [Path(output_dir) / e for e in experiments]
    cfgs = [load_run_config(d) for d in dirs]
    for d, c in zip(dirs, cfgs):
        check_same_inputs(c, d)  # the blend is fit on the targets its members learned
    first = cfgs[0]
    for e, c in zip(experiments, cfgs):
        if (c.data.train_path, c.data.target_columns, c.data.task) != \
                (first.data.train_path, first.data.target_columns, first.data.task):
            raise PipelineError(f"ensemble: '{e}' was trained on other data or targets than '{experiments[0]}' "
                                f"({c.data.train_path} {c.data.target_columns} vs {first.data.train_path} "
                                f"{first.data.target_columns})")
    classification = first.data.task != "regression"
    if negative and classification:
        raise PipelineError("ensemble: --negative weights would make class probabilities negative; it is for "
                            "regression")
    leaves = {e: leaves_of(Path(output_dir), e) for e in experiments}
    id_col = first.data.id_column
    oofs = [read_predictions(d, "oof.csv", f"pipeline oof {d.name}", id_col) for d in dirs]
    columns = [c for c in oofs[0].columns if c not in (id_col, "fold")]
    for e, oof in zip(experiments, oofs):
        if [c for c in oof.columns if c not in (id_col, "fold")] != columns:
            raise PipelineError(f"ensemble: '{e}' predicts columns {list(oof.columns)}, not {columns}")
        if not oof[id_col].equals(oofs[0][id_col]) or not oof["fold"].equals(oofs[0]["fold"]):
            raise PipelineError(f"ensemble: '{e}' was trained on other folds than '{experiments[0]}'; "
                                f"a blend fit on OOFs from different folds leaks validation data")
    train = D.load_train(first)
    train = train.set_index(id_col).loc[oofs[0][id_col]].reset_index()  # truth joined by id
    y = D.target_array(first, train)
    preds = [o[columns].to_numpy(float) for o in oofs]
    fold = oofs[0]["fold"].to_numpy()
    if method == "stack":
        spec, blend = B.fit_stack(y, preds, fold, classification, stacker)
        nested = blend  # already nested: fold k's predictions from a stacker fit without fold k
    else:
        fit = {"nnls": lambda y, p: B.fit_weights(y, p, first.metric),
               "hill": lambda y, p: B.hill_climb(y, p, first.metric, negative),
               "mean": lambda y, p: np.full(len(p), 1.0 / len(p))}[method]
        spec = B.linear(fit(y, preds))
        blend = B.apply(spec, preds)
        nested, fold_weights = B.nested_linear(y, preds, fold, fit)
    members = {e: score(first.metric, y, p) for e, p in zip(experiments, preds)}
    # cv: the fitted blend on the OOF it was fit on (what submit uses); cv_nested: each fold blended by weights
    # fit without it, the honest estimate of a blend's gain over its best member
    result = {"metric": first.metric, "method": method, "members": members, "cv": score(first.metric, y, blend),
              "cv_nested": score(first.metric, y, nested), "blend": spec, "leaves": leaves,
              "root": Path(os.path.relpath(output_dir, out)).as_posix()}
    if spec["kind"] == "linear":
        result["weights"] = dict(zip(experiments, spec["weights"]))
        # fold k's weights fit without fold k's labels: a blend teaching fold k's student uses these (pseudo.py)
        result["fold_weights"] = {str(k): dict(zip(experiments, w)) for k, w in fold_weights.items()}
    oof = oofs[0][[id_col, "fold"]].copy()
    oof[columns] = blend
    test = blend_test(dirs, experiments, spec, id_col, columns)  # checked before anything is written

    write_csv_atomic(out / "oof.csv", oof)
    if test is not None:
        write_csv_atomic(out / "test_predictions.csv", test)
        result["test_predictions"] = str(out / "test_predictions.csv")
    else:  # a test file of an earlier blend under this name would be submitted with the wrong members
        (out / "test_predictions.csv").unlink(missing_ok=True)
        result["without_test_predictions"] = [e for e, d in zip(experiments, dirs)
                                              if not (d / "test_predictions.csv").exists()]
    blended = first
    blended.experiment, blended.output_dir = name, output_dir
    save_config(blended, out / "config.yaml")
    write_json_atomic(out / "ensemble.json", result)
    write_json_atomic(out / "cv.json", {"experiment": name, "metric": first.metric, "cv": result["cv"],
                                        "cv_nested": result["cv_nested"],
                                        **decision.fields(first.metric, first.data.task, y, blend)})
    return result


def rebase(name: str, saved: dict) -> Callable[[str], str]:
    """A member name from blend `name`'s ensemble.json `saved` (a path under the output directory the blend was built
    in) as a path under the output directory `name` is read from. Blends saved before `root` was: names as written."""
    if "root" not in saved:
        return lambda member: member
    base = posixpath.join(Path(name).as_posix(), saved["root"])
    return lambda member: posixpath.normpath(posixpath.join(base, member))


def leaves_of(output_dir: Path, name: str) -> dict[str, float]:
    """Member `name` (a path under `output_dir`) as a weighted sum of trained experiments, named by their paths under
    `output_dir`: itself, or a weighted blend's flattened weights (as the blend saved them, `leaves`).

    `report/commonlit_ema` stays that, so the kit finds that run and not a `commonlit_ema` beside the blend.
    """
    path = Path(output_dir) / name / "ensemble.json"
    if not path.exists():
        return {name: 1.0}
    saved = read_json(path)
    if saved.get("blend", {"kind": "linear"})["kind"] != "linear":
        raise PipelineError(f"ensemble: '{name}' is a stacked blend, which is no weighted sum of "
                            f"experiments; blend its members instead")
    inner = saved.get("leaves") or {m: {m: 1.0} for m in saved["weights"]}  # blends written before nesting
    at = rebase(name, saved)
    flat: dict[str, float] = {}
    for member, w in saved["weights"].items():
        for leaf, v in inner[member].items():
            flat[at(leaf)] = flat.get(at(leaf), 0.0) + w * v
    return flat


def fold_leaves(output_dir: Path, name: str, fold: int) -> dict[str, float]:
    """Member `name` (a path under `output_dir`) as the weighted sum of trained experiments that fold `fold` may learn
    from: a blend's weights fit without that fold's labels (`fold_weights`), flattened through blends of blends."""
    path = Path(output_dir) / name / "ensemble.json"
    if not path.exists():
        return {name: 1.0}
    saved = read_json(path)
    if "fold_weights" not in saved:
        raise PipelineError(f"{path}: this blend has no weights fit without each fold (a stacked blend, or one written "
                            f"before they were saved); a fold-safe teacher needs them: blend again with --method "
                            f"nnls, hill or mean")
    at = rebase(name, saved)
    flat: dict[str, float] = {}
    for member, w in saved["fold_weights"][str(fold)].items():
        for leaf, v in fold_leaves(output_dir, at(member), fold).items():
            flat[leaf] = flat.get(leaf, 0.0) + w * v
    return flat


def blend_test(dirs: list[Path], experiments: list[str], spec: dict, id_col: str,
               columns: list[str]) -> pd.DataFrame | None:
    """The members' test predictions through the fitted blend; None unless every member has them."""
    if not all((d / "test_predictions.csv").exists() for d in dirs):
        return None
    frames = [read_predictions(d, "test_predictions.csv", "", id_col) for d in dirs]
    for e, f in zip(experiments, frames):
        if not f[id_col].equals(frames[0][id_col]):
            raise PipelineError(f"ensemble: test predictions of '{e}' have other ids than '{experiments[0]}'")
    out = frames[0][[id_col]].copy()
    out[columns] = B.apply(spec, [f[columns].to_numpy(float) for f in frames])
    return out
