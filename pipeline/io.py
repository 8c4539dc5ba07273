"""Writes that are whole or absent (a killed run never leaves a truncated file a later stage would trust), and
CSV reads that keep ids as written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: Path, df: pd.DataFrame) -> None:
    tmp = _tmp(path)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def save_torch_atomic(path: Path, obj: Any) -> None:
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def folder_atomic(path: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; on success it replaces `path`, on an error it is removed.

    A folder that is the model another stage loads (a pre-trained backbone) is either the whole new one or the
    earlier one, never half of each: the earlier one is set aside only once the new one is complete.
    """
    path = Path(path)
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_joblib_atomic(path: Path, obj: Any) -> None:
    """A scikit-learn model (joblib, which ships with scikit-learn: imported only where one is saved)."""
    import joblib

    tmp = _tmp(path)
    joblib.dump(obj, tmp)
    os.replace(tmp, path)


def read_csv(path: Path, id_column: str | None = None, text_columns: tuple[str, ...] = (),
             label_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV whose id, text and class-label columns stay text as written: `0007` is not the number 7, and `NA`,
    `None` or `null` are not missing. Only a truly empty cell is: a missing id or label (None), an empty text ("")."""
    as_text = [c for c in dict.fromkeys([id_column, *text_columns, *label_columns]) if c is not None]
    if not as_text:
        return pd.read_csv(path)
    df = pd.read_csv(path, dtype=dict.fromkeys(as_text, str))
    reread = [c for c in as_text if c in df.columns and df[c].isna().any()]
    if reread:
        raw = pd.read_csv(path, usecols=reread, dtype=str, keep_default_na=False)
        for c in reread:
            df[c] = raw[c] if c in text_columns else raw[c].where(raw[c] != "", None)
    return df


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
