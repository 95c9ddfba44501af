"""Unpack a bundle archive (zip) safely: no member may land outside the destination."""

from __future__ import annotations

import shutil
import stat
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from common.errors import DataError


def _check_member(zip_path: Path, info: zipfile.ZipInfo) -> None:
    """DataError if ``info`` is absolute, climbs with ``..``, or is a symlink."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        problem = f"member {info.filename!r} has an absolute path"
    elif ".." in path.parts:
        problem = f"member {info.filename!r} points outside the archive folder ('..')"
    elif stat.S_ISLNK(info.external_attr >> 16):
        problem = f"member {info.filename!r} is a symbolic link"
    else:
        return
    raise DataError(
        str(zip_path),
        f"unsafe archive, nothing was extracted: {problem}",
        "only unpack archives made by `medgen3d export`, or re-export the bundle",
    )


def safe_extract(zip_path: str | Path, dest: str | Path) -> Path:
    """Extract ``zip_path`` into ``dest`` (which must not exist yet) and return ``dest``.

    Every member is checked before anything is written; members go to a temporary folder
    beside ``dest`` that is renamed to ``dest`` only when all of them are out, so a failure
    or a kill never leaves a partial ``dest``.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists():
        raise DataError(str(dest), "already exists", "choose a new folder or remove this one")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(str(zip_path), f"cannot be read as a zip archive ({e})", "") from e
    with archive:
        members = archive.infolist()
        for info in members:
            _check_member(zip_path, info)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            archive.extractall(tmp, members)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
