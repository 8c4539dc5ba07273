"""Pseudo-labels and distillation, fold-safe: a teacher's fold-k model labels texts for the student's fold k only.

Kaggle winners train students on a teacher's soft labels of unlabelled or external text (CommonLit 1st, NBME 1st)
or distill a teacher into a student. The trap is leakage: a label made by a teacher model that saw fold k's
validation rows, learnt by fold k's student, carries those rows' answers into fold k's score. So `write` keeps the
teacher's folds apart (`<column>@fold<k>`), and fold k of a student reads only the `@fold<k>` columns: teacher fold
k's model never trained on fold k's validation rows. This holds when the student's folds are the teacher's, which
`load` checks (the JSON beside the CSV records the fold assignment), and for texts that are copies of training rows
under other ids too. A pseudo row whose id is one of fold k's validation ids is dropped as well. A pseudo row whose
id is a training id of the fold is kept (distillation on the training texts): its soft target is teacher fold k's,
which trained on that row (an in-sample, confident label), never an OOF prediction (OOF of a row of fold m came from
teacher m, which trained on fold k). A blend teaches too (distilling an ensemble): fold k's labels are its members'
fold-k predictions weighted by the blend's weights fit without fold k's labels.

Evaluation, checkpoint selection and the metric read the true validation rows only, as without pseudo-labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import data as D
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.folds import folds_path, load_folds
from pipeline.io import read_json, write_csv_atomic, write_json_atomic

FORMAT = 1


def fold_column(column: str, fold: int) -> str:
    return f"{column}@fold{fold}"


def meta_path(csv: Path) -> Path:
    return Path(csv).with_suffix(".json")


def folds_fingerprint(ids: pd.Series, fold: np.ndarray) -> str:
    """sha256 of the (id, fold) pairs in id order: equal exactly when two runs split the same rows the same way."""
    pairs = sorted(zip(ids.astype(str), np.asarray(fold).tolist()))
    return hashlib.sha256("".join(f"{i}\t{k}\n" for i, k in pairs).encode()).hexdigest()


# ------------------------------------------------------------------ the teacher: `pipeline pseudo`


def write(teacher: Config, texts: Path, out: Path | None = None) -> Path:
    """Write fold k's predictions of the teacher on `texts` as columns `<prediction column>@fold<k>`, and the JSON.

    Default path: oof/<teacher>/pseudo/<texts stem>.csv. `texts` needs the teacher's id and text columns.
    """
    data = teacher.data
    table = D.read_table(Path(texts), "texts", [data.id_column, *data.text_columns], data.id_column,
                         data.text_columns)
    D.check_ids_and_texts(table, data, Path(texts), training=False)
    train = D.load_train(teacher)
    classes = None if data.task == "regression" else D.class_names(teacher, train[data.target_columns[0]])
    columns = D.prediction_columns(teacher, classes)
    fold = load_folds(teacher, train)
    frame = table[[data.id_column, *data.text_columns]].reset_index(drop=True)
    for k, preds in enumerate(teacher_predictions(teacher, frame, columns)):
        for j, column in enumerate(columns):
            frame[fold_column(column, k)] = preds[:, j]
    out = Path(out) if out else teacher.run_dir / "pseudo" / f"{Path(texts).stem}.csv"
    write_csv_atomic(out, frame)
    write_json_atomic(meta_path(out), {
        "format": FORMAT, "teacher": teacher.experiment, "teacher_run": str(teacher.run_dir),
        "teacher_kind": "blend" if is_blend(teacher.run_dir) else teacher.model.kind, "texts": str(texts),
        "rows": len(frame), "task": data.task,
        "id_column": data.id_column, "text_columns": list(data.text_columns), "columns": columns,
        "n_folds": data.n_folds, "fold_seed": data.fold_seed, "folds_file": str(folds_path(teacher)),
        "folds_sha256": folds_fingerprint(train[data.id_column], fold)})
    return out


def is_blend(run_dir: Path) -> bool:
    return (Path(run_dir) / "ensemble.json").exists()


def teacher_predictions(teacher: Config, frame: pd.DataFrame, columns: list[str]) -> list[np.ndarray]:
    """Per fold k, the teacher's predictions of `frame` that fold k's student may learn from: its fold-k model's,
    or for a blend (distilling an ensemble), its members' fold-k models weighted by the blend's weights fit
    without fold k's labels (ensemble.json `fold_weights`)."""
    from pipeline.ensemble import fold_leaves
    from pipeline.predict import check_complete, fold_predictions
    from pipeline.runs import load_run_config

    if not is_blend(teacher.run_dir):
        check_complete(teacher, teacher.run_dir)
        return list(fold_predictions(teacher, teacher.run_dir, frame, columns))
    weights = [fold_leaves(teacher.output_dir, teacher.experiment, k) for k in range(teacher.data.n_folds)]
    total = [np.zeros((len(frame), len(columns))) for _ in weights]
    for leaf in sorted({leaf for w in weights for leaf in w}):
        member = load_run_config(Path(teacher.output_dir) / leaf)
        member.output_dir, member.experiment = teacher.output_dir, leaf
        check_complete(member, member.run_dir)
        for k, preds in enumerate(fold_predictions(member, member.run_dir, frame, columns)):
            total[k] += weights[k].get(leaf, 0.0) * preds
    return total


# ------------------------------------------------------------------ the student: `train.pseudo`


@dataclass
class PseudoLabels:
    """A pseudo CSV read for a student: its rows tokenized once, and each fold's targets for them."""

    ids: np.ndarray
    enc: D.Encoded
    targets: list[np.ndarray]  # per fold k: (rows, outputs) values in target units, or class probabilities
    path: Path


def load(cfg: Config, train: pd.DataFrame, fold: np.ndarray, classes: list[str] | None,
         tokenizer) -> PseudoLabels | None:
    """The student's `train.pseudo` file checked against its config and folds, or None when train.pseudo is null."""
    if cfg.train.pseudo is None:
        return None
    path, data = Path(cfg.train.pseudo), cfg.data
    meta = check_meta(cfg, path, train, fold, classes)
    columns = [fold_column(c, k) for k in range(data.n_folds) for c in meta["columns"]]
    table = D.read_table(path, "pseudo", [data.id_column, *data.text_columns, *columns], data.id_column,
                         data.text_columns)
    D.check_ids_and_texts(table, data, path, training=False)
    targets = []
    for k in range(data.n_folds):
        values = table[[fold_column(c, k) for c in meta["columns"]]].apply(pd.to_numeric, errors="coerce")
        if values.isna().to_numpy().any():
            bad = values.columns[values.isna().any()][0]
            raise PipelineError(f"{path}: column '{bad}' has missing or non-numeric values")
        targets.append(soften(values.to_numpy(np.float64), data.task, cfg.train.distill_temperature))
    enc = D.encode(tokenizer, table, data.text_columns, data.max_length)
    return PseudoLabels(table[data.id_column].to_numpy(), enc, targets, path)


def check_meta(cfg: Config, path: Path, train: pd.DataFrame, fold: np.ndarray, classes: list[str] | None) -> dict:
    """The JSON beside the CSV, refused unless it was made by a teacher on the student's folds, task and columns."""
    where = meta_path(path)
    if not where.is_file():
        raise PipelineError(f"{where} not found: train.pseudo takes a CSV written by `pipeline pseudo`, with its JSON "
                            f"(it records the teacher's folds)")
    meta, data = read_json(where), cfg.data
    expected = {"task": data.task, "columns": D.prediction_columns(cfg, classes), "n_folds": data.n_folds,
                "fold_seed": data.fold_seed}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise PipelineError(f"{path}: made by teacher '{meta.get('teacher')}' with {key} {meta.get(key)!r}, and "
                                f"this experiment has {value!r}; a student must train on its teacher's folds (or its "
                                f"pseudo-labels leak validation rows), task and columns")
    if meta.get("folds_sha256") != folds_fingerprint(train[data.id_column], fold):
        raise PipelineError(f"{path}: teacher '{meta.get('teacher')}' was trained on other folds "
                            f"({meta.get('folds_file')}) than this experiment's ({folds_path(cfg)}); its fold-k models "
                            f"saw rows that are validation rows of this experiment's fold k")
    return meta


def soften(probs: np.ndarray, task: str, temperature: float) -> np.ndarray:
    """Classification: p**(1/T) renormalized (T > 1 flatter, T < 1 sharper); regression values as they are."""
    if task == "regression":
        return probs.astype(np.float32)
    p = np.clip(probs, 0.0, None) ** (1.0 / temperature)
    total = p.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise PipelineError("pseudo-labels: a row's class probabilities sum to 0")
    return (p / total).astype(np.float32)


@dataclass
class FoldRows:
    """What a fold trains on: rows of `enc` at `positions`. Without pseudo-labels, the training table's own."""

    enc: D.Encoded
    positions: np.ndarray
    pseudo_rows: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return self.enc.lengths[self.positions]


def fold_rows(enc: D.Encoded, pseudo: PseudoLabels | None, fold: int, train_pos: np.ndarray,
              valid_ids: np.ndarray, task: str, classes: int, weight: float) -> FoldRows:
    """The fold's true training rows, then the pseudo rows it may learn from, with teacher fold `fold`'s targets.

    Without pseudo-labels: the training table's encoding and `train_pos` as they are (nothing copied, no random
    draw), so training computes exactly what it did before pseudo-labels existed. With them: one table whose
    targets are all soft (one-hot for true labels; soft and hard cross-entropy agree on one-hot targets) and
    whose rows carry their loss weights (1, and `weight` for pseudo rows); pseudo rows with a validation id of the
    fold are dropped.
    """
    if pseudo is None:
        return FoldRows(enc, train_pos)
    keep = usable(pseudo, valid_ids)
    true = enc.targets if task == "regression" else np.eye(classes, dtype=np.float32)[enc.targets]
    both = D.Encoded(
        enc.input_ids + pseudo.enc.input_ids,
        None if enc.token_type_ids is None else enc.token_type_ids + pseudo.enc.token_type_ids,
        np.concatenate([true.astype(np.float32), pseudo.targets[fold]]), enc.max_length,
        np.concatenate([np.ones(len(enc), np.float32), np.full(len(pseudo.enc), weight, np.float32)]),
        enc.padding_side)
    return FoldRows(both, np.concatenate([train_pos, len(enc) + keep]), len(keep))


def pseudo_rows(pseudo: PseudoLabels, fold: int, valid_ids: np.ndarray) -> FoldRows:
    """Stage mode's first stage: the pseudo rows fold `fold` may learn from, alone, with teacher fold `fold`'s targets.

    The same rows and targets as `fold_rows` mixes in, without loss weights: alone in their stage, one weight on every
    row would only rescale the loss.
    """
    keep = usable(pseudo, valid_ids)
    if len(keep) == 0:
        raise PipelineError(f"{pseudo.path}: no pseudo-labelled row is left for fold {fold} (every id is one of its "
                            f"validation ids); train.pseudo_epochs needs rows to train on")
    enc = D.Encoded(pseudo.enc.input_ids, pseudo.enc.token_type_ids, pseudo.targets[fold], pseudo.enc.max_length,
                    padding_side=pseudo.enc.padding_side)
    return FoldRows(enc, keep, len(keep))


def usable(pseudo: PseudoLabels, valid_ids: np.ndarray) -> np.ndarray:
    """Positions of the pseudo rows a fold may learn from: those whose id is none of its validation ids."""
    return np.flatnonzero(~np.isin(pseudo.ids, valid_ids))
