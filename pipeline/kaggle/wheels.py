"""The wheelhouse: the project's own wheel and a wheel for each dependency Kaggle's image lacks.

Which dependencies those are comes from the project's installed metadata, followed through their own
requirements, minus what the image file (image.yaml, overridable) lists; optional ones (peft for LoRA members,
bitsandbytes for quantized ones) join when the kit's members need them. Each is pinned to the version
installed here, the one the kit was tested with, and fetched for Kaggle's Python and platform, not this
machine's: `pip download --platform ... --python-version ... --only-binary=:all:`. A dependency published only
as a source archive is built here, and kept only when the wheel is pure Python (it then runs anywhere).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

DEFAULT_IMAGE = Path(__file__).with_name("image.yaml")
PROJECT = "pipeline"
REQUIREMENTS = "requirements.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_image(path: Path | None = None) -> dict:
    """The image file: python (e.g. "3.12"), platform, packages it has, packages the kit never needs."""
    path = Path(path or DEFAULT_IMAGE)
    try:
        image = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise PipelineError(f"image file {path}: cannot be read ({err})") from None
    unknown = set(image) - {"python", "platform", "packages", "exclude"}
    missing = {"python", "platform", "packages"} - set(image)
    if unknown:
        raise PipelineError(f"image file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    if missing:
        raise PipelineError(f"image file {path}: missing key(s) {', '.join(sorted(missing))}")
    if not re.fullmatch(r"3\.\d+", str(image["python"])):
        raise PipelineError(f"image file {path}: python '{image['python']}' should look like 3.12")
    return {"python": str(image["python"]), "platform": str(image["platform"]),
            "packages": {canonical(p) for p in image["packages"]},
            "exclude": {canonical(p) for p in image.get("exclude") or []}}


def _marker_env(python: str) -> dict:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def needed(image: dict, project: str = PROJECT, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """{distribution: installed version} for every dependency of `project`, and of the optional distributions in
    `extra` (and for those themselves), that the image does not provide."""
    from packaging.requirements import Requirement

    env = _marker_env(image["python"])
    found: dict[str, str] = {}
    todo = [project]
    while todo:
        name = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            raise PipelineError(f"'{name}' is a dependency of {project} but is not installed here; "
                                f"install the project (make setup) before packaging") from None
        for text in requires + (list(extra) if name == project else []):
            req = Requirement(text)
            dep = canonical(req.name)
            if req.marker and not req.marker.evaluate(env):
                continue
            if dep in image["packages"] or dep in image["exclude"] or dep in found or dep == project:
                continue
            try:
                found[dep] = metadata.version(dep)
            except metadata.PackageNotFoundError:
                raise PipelineError(f"'{dep}' ({name} needs it) is not installed here; make setup") from None
            todo.append(dep)
    return dict(sorted(found.items()))


def project_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise PipelineError(f"the project's source tree (pyproject.toml) is not at {root}: package from a "
                            f"checkout installed with `make setup`")
    return root


def project_wheel(out: Path) -> None:
    """The project's wheel, built from a clean copy of its sources: setuptools' in-tree build/ folder keeps
    copies of deleted modules, which would ship."""
    root = project_root()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root / PROJECT, src / PROJECT, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        _pip(["wheel", "--no-deps", "--quiet", "-w", str(out), str(src)], "building the project's wheel")


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"{what} failed:\n{(result.stdout + result.stderr).strip()[-2000:]}")


def build(out: Path, image: dict, extra: tuple[str, ...] = ()) -> dict:
    """Fill `out` with the wheels and requirements.txt (pins of the dependencies); returns what went in."""
    out.mkdir(parents=True, exist_ok=True)
    project_wheel(out)
    deps = needed(image, extra=extra)
    for name, version in deps.items():
        pin = f"{name}=={version}"
        try:
            _pip(["download", "--no-deps", "--quiet", "--only-binary=:all:", "--platform", image["platform"],
                  "--python-version", image["python"], "--implementation", "cp", "-d", str(out), pin],
                 f"downloading {pin} for Python {image['python']} on {image['platform']}")
        except PipelineError as err:
            before = set(out.iterdir())
            _pip(["wheel", "--no-deps", "--quiet", "-w", str(out), pin], f"building a wheel of {pin}")
            made = [p for p in set(out.iterdir()) - before if p.suffix == ".whl"]
            impure = [p.name for p in made if not p.name.endswith("-none-any.whl")]
            if impure:
                for p in made:
                    p.unlink()
                raise PipelineError(f"{err}\nand the wheel built here ({', '.join(impure)}) is for this machine "
                                    f"only") from None
    (out / REQUIREMENTS).write_text("".join(f"{n}=={v}\n" for n, v in deps.items()))
    return deps
