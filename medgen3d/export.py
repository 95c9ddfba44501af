"""``medgen3d export``: a bundle folder and zip that run without this repository.

An exported bundle carries the part of ``common`` its configs import, and what that imports
in turn, at the bundle root: ``python -m monai.bundle run`` puts the bundle root on
``sys.path``, so that copy is what the configs use. The application (``medgen3d``) is
never carried.
"""

from __future__ import annotations

import ast
import re
import shutil
import tempfile
from pathlib import Path

from common.core.errors import DataError
from medgen3d.bundles import BUNDLES, NAMES, REPO

COMMON = REPO / "common"
SKIP = ("outputs", "runs", "eval", "__pycache__", "*_best.pt", "resume*.pt", "*.tmp*")
MODULE_NAME = re.compile(r"\bcommon(?:\.\w+)+")


def _module_file(name: str) -> Path | None:
    """The file of module ``common.a.b`` (or of the module holding attribute ``b``)."""
    parts = name.split(".")
    while len(parts) > 1:
        path = REPO.joinpath(*parts)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
        parts = parts[:-1]
    return None


def _imports(path: Path) -> set[str]:
    """Names of the ``common`` modules that a Python file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common"):
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("common")}
    return names


def carried_modules(bundle: str) -> set[Path]:
    """Files of ``common`` the bundle's configs need: what they name, closed over imports,
    with the packages' ``__init__.py`` files."""
    todo = set()
    for config in (BUNDLES / bundle / "configs").glob("*.*"):
        todo |= set(MODULE_NAME.findall(config.read_text()))
    files: set[Path] = set()
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in files:
            continue
        files.add(path)
        todo |= _imports(path)
        for parent in path.relative_to(REPO).parents:
            if parent != Path("."):
                files.add(REPO / parent / "__init__.py")
    return files


def _copy_common(bundle: str, dest: Path) -> None:
    """Copy the carried modules (and the label sets beside ``common.data.labels``)."""
    for path in carried_modules(bundle):
        target = dest / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    labels = COMMON / "data" / "label_sets"
    if (dest / "common" / "data" / "labels.py").is_file():
        shutil.copytree(labels, dest / labels.relative_to(REPO))


def export_bundle(bundle: str, out: str | Path) -> tuple[Path, Path]:
    """Write ``OUT/<bundle>/`` and ``OUT/<bundle>.zip``: configs, models, docs, LICENSE, the
    repository's requirements.txt and the part of ``common/`` the configs need.

    Both outputs appear only when complete; an existing folder or zip is never overwritten.
    """
    if bundle not in NAMES:
        raise DataError(bundle, "unknown bundle", f"use one of {', '.join(NAMES)}")
    out = Path(out)
    folder, archive = out / bundle, out / f"{bundle}.zip"
    for path in (folder, archive):
        if path.exists():
            raise DataError(str(path), "already exists", "choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{bundle}.") as tmp:
        staged = Path(tmp) / bundle
        shutil.copytree(BUNDLES / bundle, staged, ignore=shutil.ignore_patterns(*SKIP))
        _copy_common(bundle, staged)
        shutil.copy2(REPO / "requirements.txt", staged / "requirements.txt")
        zipped = shutil.make_archive(str(Path(tmp) / bundle), "zip", tmp, bundle)
        Path(zipped).replace(archive)
        staged.replace(folder)
    return folder, archive
