"""A kit folder's MANIFEST.json: what the kit is, and a sha256 for every file in it.

Written last, so a folder without it is not a kit; checked file by file before anything is predicted, so an
upload that lost or changed a file fails with that file's name instead of scoring with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import sha256, write_json_atomic

NAME = "MANIFEST.json"
FORMAT = 1


def file_hashes(folder: Path, skip: tuple[str, ...] = (NAME,)) -> dict[str, str]:
    """{path relative to `folder` (with /): sha256} for every file below it."""
    return {p.relative_to(folder).as_posix(): sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def write(folder: Path, fields: dict, skip: tuple[str, ...] = (NAME,)) -> Path:
    path = folder / NAME
    write_json_atomic(path, {"format": FORMAT, **fields, "files": file_hashes(folder, skip)})
    return path


def read(folder: Path) -> dict:
    path = Path(folder) / NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: cannot be read ({err})") from None
    if manifest.get("format") != FORMAT:
        raise PipelineError(f"{path}: format {manifest.get('format')!r}; this pipeline reads format {FORMAT}")
    return manifest


def verify(folder: Path, manifest: dict) -> None:
    """Every listed file is present with its hash; an error names the first few that are not."""
    bad = []
    for rel, digest in manifest["files"].items():
        path = Path(folder) / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256(path) != digest:
            bad.append(f"{rel} (sha256 differs)")
    if bad:
        raise PipelineError(f"{Path(folder) / NAME}: {len(bad)} file(s) do not match: {', '.join(bad[:5])}; "
                            f"upload the kit again")
