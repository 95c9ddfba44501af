"""Check a datalist and its volumes before training; report every problem, change nothing.

Problems are ``DataError``s (``FILE: PROBLEM. FIX``). Those found in a datalist entry carry a
``case`` attribute (``"training[3] (Patient_04)"``) so ``format_report`` can count cases.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from common.core.errors import DataError
from common.core.io import check_file, load_volume, read_json
from common.data.datalists import SECTIONS, datalist_label_set, datalist_modality
from common.data.labels import LabelSet

MAX_VOXELS = 512**3
MAX_SHOWN = 20  # values listed in one message
# plausible voxel size (mm) per axis: clinical CT/MRI lie within 0.2-10 mm; a model-grid
# volume of the tiny test preset has 27 mm slices. Outside: a header error (e.g. cm for mm).
SPACING_MM = (0.2, 30.0)


def _shape3(img: nib.spatialimages.SpatialImage) -> tuple[int, ...]:
    """The volume's shape with a trailing single frame dropped (``(H, W, D, 1)`` -> 3D)."""
    shape = tuple(img.shape)
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def _show(values) -> str:
    """``[1, 2, 3]``, or the first ``MAX_SHOWN`` values and a count of the rest."""
    values = [int(v) if float(v).is_integer() else float(v) for v in values]
    more = f" ... +{len(values) - MAX_SHOWN} more" if len(values) > MAX_SHOWN else ""
    return f"{values[:MAX_SHOWN]}{more}"


def _spacing(path: Path, img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Voxel size (mm) along the file's axes, from the affine; DataError if the affine is not
    finite, degenerate or the spacing outside ``SPACING_MM``."""
    affine = np.asarray(img.affine, dtype=np.float64)
    fix = "fix the voxel size in the header (pixdim, qform/sform), e.g. re-export the scan"
    if not np.isfinite(affine).all():
        raise DataError(str(path), "affine (voxel-to-world matrix) is not finite (NaN/inf)", fix)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shown = "(" + ", ".join(f"{v:g}" for v in spacing) + ") mm"
    if (spacing == 0).any() or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * spacing.prod():
        raise DataError(
            str(path), f"voxel spacing {shown} is zero or the affine is degenerate", fix
        )
    lo, hi = SPACING_MM
    if not ((lo <= spacing) & (spacing <= hi)).all():
        raise DataError(
            str(path), f"voxel spacing {shown} is implausible (expected {lo:g} to {hi:g} mm)", fix
        )
    return spacing


def _resampled_shape(
    shape: Sequence[int], affine: np.ndarray, spacing: np.ndarray, pixdim: Sequence[float]
) -> tuple[int, int, int]:
    """Shape ``(H, W, D)`` of a volume after orienting to RAS and resampling to ``pixdim``
    (mm, RAS order), as MONAI's ``Spacing`` computes it."""
    axes = nib.io_orientation(affine)[:, 0].astype(int)  # file axis i -> RAS axis axes[i]
    out = [1, 1, 1]
    for i, (n, s) in enumerate(zip(shape, spacing)):
        out[axes[i]] = int(np.round((n - 1) * s / float(pixdim[axes[i]]) + 1.0))
    return tuple(out)


def _open(
    path: Path, max_voxels: int, pixdim: Sequence[float] | None = None
) -> nib.spatialimages.SpatialImage:
    """Open ``path`` and check its header only: readable, 3D, a plausible voxel size, at most
    ``max_voxels`` as stored and, given the resampling voxel size ``pixdim``, after resampling."""
    img = load_volume(path)
    shape = _shape3(img)
    if len(shape) != 3:
        raise DataError(
            str(path),
            f"is {len(shape)}D with shape {shape}, not a 3D volume",
            "export one 3D volume per file (a single channel and time point)",
        )
    spacing = _spacing(path, img)
    if math.prod(shape) > max_voxels:
        raise DataError(
            str(path),
            f"has {math.prod(shape)} voxels (shape {shape}), more than max_voxels={max_voxels}",
            "crop or resample it, or raise max_voxels",
        )
    if pixdim is not None:
        grid = _resampled_shape(shape, img.affine, spacing, pixdim)
        if math.prod(grid) > max_voxels:
            target = "(" + ", ".join(f"{float(v):g}" for v in pixdim) + ") mm"
            raise DataError(
                str(path),
                f"would have {math.prod(grid)} voxels (shape {grid}) after resampling to "
                f"{target}, more than max_voxels={max_voxels}",
                "check its voxel size, crop it, or raise max_voxels",
            )
    return img


def _read(path: Path, img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The voxel data as a 3D array; a truncated or corrupt file raises DataError."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # gzip, zlib and numpy raise different types
        raise DataError(
            str(path),
            f"data cannot be read, the file is truncated or corrupt ({type(e).__name__}: "
            f"{' '.join(str(e).split())})",
            "re-export or re-download the file",
        ) from e
    return data.reshape(_shape3(img))


def _geometry(image_path, label_path, image, label, affine_tol: float) -> list[DataError]:
    """The label must share the image's grid: same shape, affines within ``affine_tol``."""
    problems = []
    if _shape3(image) != _shape3(label):
        problems.append(
            DataError(
                str(label_path),
                f"shape {_shape3(label)} differs from the image's {_shape3(image)} ({image_path})",
                "resample the label onto the image grid",
            )
        )
    diff = float(np.abs(image.affine - label.affine).max())
    if not diff <= affine_tol:
        problems.append(
            DataError(
                str(label_path),
                f"affine differs from the image's by up to {diff:.4g} "
                f"(tolerance {affine_tol:g}; image {image_path})",
                "resample the label onto the image grid or copy the image's affine",
            )
        )
    return problems


def _check_image(path: Path, data: np.ndarray) -> list[DataError]:
    if not np.issubdtype(data.dtype, np.floating):
        return []
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if not bad:
        return []
    fix = "replace them (e.g. with the minimum intensity) before training"
    return [DataError(str(path), f"contains {bad} NaN/inf voxels", fix)]


def _unique(data: np.ndarray) -> np.ndarray:
    """Distinct values; a counting pass for small non-negative integers, else sorting."""
    if (
        np.issubdtype(data.dtype, np.integer)
        and data.size
        and 0 <= data.min()
        and data.max() < 2**16
    ):
        return np.flatnonzero(np.bincount(data.ravel().astype(np.intp)))
    return np.unique(data)


def _background(label_set: LabelSet | None) -> set[int]:
    """Source values that mean background."""
    if label_set is None or label_set.source_map is None:
        return {0}
    return {k for k, v in label_set.source_map.items() if v == 0}


def _check_label(path: Path, data: np.ndarray, label_set: LabelSet | None) -> list[DataError]:
    values = _unique(data).tolist()
    if label_set is not None:
        bad = [v for v in values if v not in label_set.source_values]
        if bad:
            return [
                DataError(
                    str(path),
                    f"label values {_show(bad)} are not in label set {label_set.name!r} "
                    f"(allowed: {_show(sorted(label_set.source_values))})",
                    "fix the labels, or add the values to the label set's source_map",
                )
            ]
    if set(values) <= _background(label_set):
        return [
            DataError(
                str(path),
                "label is empty: every voxel is background",
                "fix the label or remove the case from the datalist",
            )
        ]
    return []


def _collect(problems: list[DataError], fn: Callable, *args):
    """``fn(*args)``, or None after appending the DataError it raised to ``problems``."""
    try:
        return fn(*args)
    except DataError as e:
        problems.append(e)
        return None


def validate_case(
    image_path: str | Path | None,
    label_path: str | Path,
    label_set: LabelSet | None,
    affine_tol: float = 1e-3,
    max_voxels: int = MAX_VOXELS,
    pixdim: Sequence[float] | None = None,
) -> list[DataError]:
    """Every problem of one image/label pair; each volume is read once, headers first.

    ``label_set`` None skips the label-value check (only all-zero labels are reported);
    ``image_path`` None checks a mask alone (a mask-only datalist). ``pixdim``: the voxel
    size (mm) the volumes are resampled to, so ``max_voxels`` applies after resampling too.
    """
    label_path = Path(label_path)
    problems: list[DataError] = []
    image = None
    if image_path is not None:
        image_path = Path(image_path)
        image = _collect(problems, _open, image_path, max_voxels, pixdim)
    label = _collect(problems, _open, label_path, max_voxels, pixdim)
    if image is not None and label is not None:
        problems += _geometry(image_path, label_path, image, label, affine_tol)
    if image is not None:
        data = _collect(problems, _read, image_path, image)
        problems += [] if data is None else _check_image(image_path, data)
    if label is not None:
        data = _collect(problems, _read, label_path, label)
        problems += [] if data is None else _check_label(label_path, data, label_set)
    return problems


def validate_image(path: str | Path, max_voxels: int = MAX_VOXELS) -> list[DataError]:
    """Every problem of an image alone (to segment): readable, 3D, within budget, finite."""
    path = Path(path)
    problems: list[DataError] = []
    image = _collect(problems, _open, path, max_voxels)
    data = None if image is None else _collect(problems, _read, path, image)
    return problems if data is None else problems + _check_image(path, data)


def _resolve(value, key: str, where: str, datalist: Path) -> Path:
    """The absolute path of an entry's ``image``/``label``; DataError if unset or missing."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            str(datalist), f"{where} has no {key!r} path", f'give it "{key}": "path/to/file"'
        )
    path = Path(os.path.normpath(datalist.parent / value))  # relpath-written: lexical `..`
    if path.exists():
        return path
    if not Path(value).is_absolute() and Path(value).exists():
        raise DataError(
            str(path),
            f"file not found; {value} exists relative to the current directory, "
            "but paths are relative to the datalist's folder",
            f"write the path relative to {datalist.parent} or make it absolute",
        )
    check_file(path, f"check {where}'s {key!r} path in {datalist}")  # a link loop? missing?
    return path


def _entries(doc: dict, path: Path) -> list[tuple[str, object]]:
    """``("training[0]", entry)`` for every entry of every section."""
    entries = []
    for section in SECTIONS:
        items = doc.get(section, [])
        if not isinstance(items, list):
            raise DataError(str(path), f"{section!r} is not a list", "make it a list of cases")
        entries += [(f"{section}[{i}]", e) for i, e in enumerate(items)]
    if not entries:
        raise DataError(
            str(path),
            f"lists no cases (no entries in {'/'.join(SECTIONS)})",
            "add cases, e.g. with medgen3d import-dataset",
        )
    return entries


def _validate_entry(
    where: str,
    entry,
    path: Path,
    label_set: LabelSet | None,
    affine_tol: float,
    max_voxels: int,
    pixdim: Sequence[float] | None,
    masks_only: bool = False,
) -> list[DataError]:
    if not isinstance(entry, dict):
        return [
            DataError(str(path), f"{where} is not an object", 'use {"image": ..., "label": ...}')
        ]
    problems: list[DataError] = []
    image = None
    if not masks_only:
        image = _collect(problems, _resolve, entry.get("image"), "image", where, path)
    label = _collect(problems, _resolve, entry.get("label"), "label", where, path)
    if (image is not None or masks_only) and label is not None:
        problems += validate_case(image, label, label_set, affine_tol, max_voxels, pixdim)
    return problems


def validate_datalist(
    path: str | Path,
    affine_tol: float = 1e-3,
    max_voxels: int = MAX_VOXELS,
    pixdim: Sequence[float] | None = None,
) -> list[DataError]:
    """Every problem of a datalist and the volumes it lists (empty: valid). Reads only.

    A datalist with ``"masks_only": true`` (generated masks) lists labels without images.
    ``pixdim``: the resampling voxel size (mm); ``max_voxels`` then applies after it too.
    """
    path = Path(path).absolute()
    try:
        doc = read_json(path)
    except DataError as e:
        return [e]
    if not isinstance(doc, dict):
        fix = 'write {"labels": {...}, "modality": {...}, "training": [...]} (README, Data)'
        return [DataError(str(path), "is not a JSON object", fix)]
    problems: list[DataError] = []
    label_set = _collect(problems, datalist_label_set, doc, path)
    _collect(problems, datalist_modality, doc, path)
    masks_only = bool(doc.get("masks_only", False))
    for where, entry in _collect(problems, _entries, doc, path) or []:
        case = (
            f"{where} ({entry['case']})" if isinstance(entry, dict) and "case" in entry else where
        )
        for problem in _validate_entry(
            where, entry, path, label_set, affine_tol, max_voxels, pixdim, masks_only
        ):
            problem.case = case
            problems.append(problem)
    return problems


def count_cases(path: str | Path) -> int:
    """Number of entries a datalist lists (0 if it cannot be read)."""
    try:
        doc = read_json(path)
        return len(_entries(doc, Path(path))) if isinstance(doc, dict) else 0
    except DataError:
        return 0


def format_report(problems: list[DataError], n_cases: int) -> str:
    """Human summary: ``all N cases valid``, or a count and one line per problem."""
    if not problems:
        return f"all {n_cases} cases valid"
    cases = {getattr(p, "case", None) for p in problems} - {None}
    head = (
        f"{len(cases)} of {n_cases} cases have problems:" if cases else "the datalist has problems:"
    )
    lines = [f"  [{p.case}] {p}" if getattr(p, "case", None) else f"  {p}" for p in problems]
    return "\n".join([head, *lines])


def require_valid(
    path: str | Path, max_voxels: int = MAX_VOXELS, pixdim: Sequence[float] | None = None
) -> None:
    """Raise one DataError listing every problem of a datalist (``medgen3d validate``'s
    checks); training and studies call it first so a bad case stops them at once.
    ``pixdim``: the voxel size (mm) training resamples to (``max_voxels`` after resampling)."""
    problems = validate_datalist(path, max_voxels=max_voxels, pixdim=pixdim)
    if problems:
        report = format_report(problems, count_cases(path))
        raise DataError(str(path), report, "fix the cases listed above")
