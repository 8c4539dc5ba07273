"""dataset-metadata.json and kernel-metadata.json, checked against the rules kaggle-api applies on upload.

From kaggle-api's `dataset_create_new` and `kernels_push` (Kaggle/kaggle-cli, src/kaggle/api/kaggle_api_extended.py):
a dataset needs `id` ("owner/slug", slug 6-50 characters: the code checks 6, its docs say 3), `title` (6-50
characters) and exactly one license; a kernel needs `id` (slug at least 5 characters), a `title` that slugifies
to the id's slug (python-slugify: lower case, runs of anything but letters and digits become one dash),
`code_file`, `language` and `kernel_type`. `enable_internet` is written explicitly: the push code reads a
missing key as true, whatever the docs say, and a code competition refuses a kernel with internet on.
Booleans are written as `kaggle kernels init` writes them, the strings "true" and "false" (the push code's
`get_bool` takes those or JSON booleans).
"""

from __future__ import annotations

import re

from pipeline.errors import PipelineError

LICENSE = "CC0-1.0"
LICENSES = {"CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
            "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0",
            "CC-BY-3.0-IGO", "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0",
            "CDLA-Sharing-1.0", "CC-BY-ND-4.0", "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0",
            "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0", "GPL-3.0"}
SLUG_MAX = 50


def slugify(text: str) -> str:
    """python-slugify's result for ASCII text: lower case, non-alphanumeric runs to one dash, no edge dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def split_ref(ref: str, what: str) -> tuple[str, str]:
    """'owner/slug' into its parts, or an error naming the option."""
    parts = ref.split("/")
    if len(parts) != 2 or not all(parts):
        raise PipelineError(f"{what} '{ref}': expected owner/slug (your Kaggle username, a slash, a name)")
    return parts[0], parts[1]


def check_slug(slug: str, what: str, shortest: int) -> None:
    if slug != slugify(slug):
        raise PipelineError(f"{what} slug '{slug}': use lower-case letters, digits and single dashes "
                            f"(e.g. '{slugify(slug)}')")
    if not shortest <= len(slug) <= SLUG_MAX:
        raise PipelineError(f"{what} slug '{slug}' has {len(slug)} characters; Kaggle takes {shortest} to "
                            f"{SLUG_MAX}")


def title_for(slug: str, suffix: str = "") -> str:
    """A title that slugifies back to `slug` (+ suffix), within Kaggle's 6-50 characters."""
    title = " ".join(part.capitalize() for part in f"{slug}-{suffix}".strip("-").split("-"))
    return title if len(title) >= 6 else f"{title} kit"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def dataset_metadata(ref: str, title: str, license_name: str = LICENSE) -> dict:
    _, slug = split_ref(ref, "dataset")
    check_slug(slug, "dataset", 6)
    if not 6 <= len(title) <= 50:
        raise PipelineError(f"dataset title '{title}' has {len(title)} characters; Kaggle takes 6 to 50")
    if license_name not in LICENSES:
        raise PipelineError(f"dataset license '{license_name}' is not one Kaggle knows; e.g. {LICENSE}")
    return {"title": title, "id": ref, "licenses": [{"name": license_name}]}


def kernel_metadata(ref: str, title: str, code_file: str, datasets: list[str], competition: str | None,
                    gpu: bool = False, private: bool = True) -> dict:
    _, slug = split_ref(ref, "kernel")
    check_slug(slug, "kernel", 5)
    if slugify(title) != slug:
        raise PipelineError(f"kernel title '{title}' slugifies to '{slugify(title)}', not the id's '{slug}'; "
                            f"Kaggle would not match them")
    for source in datasets:
        split_ref(source, "dataset source")
    return {"id": ref, "title": title, "code_file": code_file, "language": "python", "kernel_type": "script",
            "is_private": _flag(private), "enable_gpu": _flag(gpu), "enable_tpu": "false", "enable_internet": "false",
            "dataset_sources": list(datasets), "competition_sources": [competition] if competition else [],
            "kernel_sources": [], "model_sources": []}
