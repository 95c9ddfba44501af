"""Datalists for the dataset layouts users already have; source files are never touched.

Layouts (``SRC`` is the folder passed in)::

    segthor     SRC/[train/]Patient_XX/Patient_XX.nii.gz + GT.nii.gz
    structseg   SRC/N/data.nii.gz + SRC/N/label.nii.gz
    freesurfer  SRC/<subject>/[mri/]aseg.mgz + norm.mgz | brain.mgz | T1.mgz (or .nii.gz)
    folders     SRC/imagesTr/<case>[_0000].nii.gz + SRC/labelsTr/<case>.nii.gz

A new layout is a function ``SRC -> {case: {"image": Path | None, "label": Path | None}}``
(``None`` where the file is missing) plus a row in ``LAYOUTS``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.core.errors import DataError
from common.data.datalists import MODALITIES, write_datalist
from common.data.labels import LabelSet, builtin_label_sets, load_label_set

Found = dict[str, dict[str, Path | None]]

FS_IMAGES = ("norm", "brain", "T1")  # FreeSurfer images, preferred first
FS_EXTS = (".mgz", ".nii.gz")
MAX_LISTED = 20  # incomplete cases named in one error


def _first(*paths: Path) -> Path | None:
    """The first of ``paths`` that is a file, or None."""
    return next((p for p in paths if p.is_file()), None)


def _subdirs(root: Path, pattern: str = "*") -> list[Path]:
    """Non-hidden folders in ``root`` matching ``pattern``."""
    return [d for d in root.glob(pattern) if d.is_dir() and not d.name.startswith(".")]


def _find_segthor(src: Path) -> Found:
    root = src / "train" if (src / "train").is_dir() else src
    return {
        d.name: {"image": _first(d / f"{d.name}.nii.gz"), "label": _first(d / "GT.nii.gz")}
        for d in _subdirs(root, "Patient_*")
    }


def _find_structseg(src: Path) -> Found:
    return {
        d.name: {"image": _first(d / "data.nii.gz"), "label": _first(d / "label.nii.gz")}
        for d in _subdirs(src)
        if d.name.isdigit()
    }


def _find_freesurfer(src: Path) -> Found:
    found = {}
    for d in _subdirs(src):
        if d.name.startswith("fsaverage"):  # FreeSurfer's template subject, not data
            continue
        dirs = (d / "mri", d)
        found[d.name] = {
            "image": _first(*(x / f"{n}{e}" for x in dirs for n in FS_IMAGES for e in FS_EXTS)),
            "label": _first(*(x / f"aseg{e}" for x in dirs for e in FS_EXTS)),
        }
    return found


def _case_files(folder: Path, channel_suffix: str = "") -> dict[str, Path]:
    """``.nii.gz``/``.nii`` files in ``folder`` by case id (name less extension and suffix)."""
    files: dict[str, Path] = {}
    for p in sorted(folder.glob("*.nii*")):
        if p.name.startswith(".") or not p.name.endswith((".nii.gz", ".nii")):
            continue
        case = p.name.removesuffix(".gz").removesuffix(".nii").removesuffix(channel_suffix)
        if case in files:
            raise DataError(
                str(p), f"same case id {case!r} as {files[case].name}", "keep one file per case"
            )
        files[case] = p
    return files


def _find_folders(src: Path) -> Found:
    images = _case_files(src / "imagesTr", channel_suffix="_0000")  # nnU-Net channel 0
    labels = _case_files(src / "labelsTr")
    return {c: {"image": images.get(c), "label": labels.get(c)} for c in images.keys() | labels}


@dataclass(frozen=True)
class Layout:
    """How to find cases in ``SRC``, and the defaults for such a dataset."""

    find: Callable[[Path], Found]
    pattern: str  # shown to the user when cases are missing
    label_set: str | None  # None: the user must pass one
    modality: str


LAYOUTS = {
    "segthor": Layout(
        _find_segthor, "[train/]Patient_*/Patient_*.nii.gz + GT.nii.gz", "segthor", "CT"
    ),
    "structseg": Layout(_find_structseg, "<N>/data.nii.gz + <N>/label.nii.gz", "structseg", "CT"),
    "freesurfer": Layout(
        _find_freesurfer,
        "<subject>/[mri/]aseg.mgz + norm.mgz|brain.mgz|T1.mgz (or .nii.gz)",
        "freesurfer",
        "MRI",
    ),
    "folders": Layout(
        _find_folders, "imagesTr/<case>[_0000].nii.gz + labelsTr/<case>.nii.gz", None, "CT"
    ),
}


def _natural_key(text: str) -> list:
    """Sort key that orders ``2`` before ``10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _incomplete(case: str, files: dict[str, Path | None], src: Path) -> str:
    """``'7: no label (image 7/data.nii.gz)'`` for a case missing one of its files."""
    missing, present = ("label", "image") if files["image"] else ("image", "label")
    return f"{case}: no {missing} ({present} {os.path.relpath(files[present], src)})"


def _pair(found: Found, src: Path, layout: Layout) -> list[dict]:
    """Complete cases in natural order; DataError if none, or if any lacks a partner."""
    found = {c: f for c, f in found.items() if f["image"] or f["label"]}
    if not found:
        raise DataError(
            str(src),
            f"no cases found (looked for {layout.pattern})",
            f"point SRC at the dataset folder or choose another layout ({', '.join(LAYOUTS)})",
        )
    order = sorted(found, key=_natural_key)
    bad = [_incomplete(c, found[c], src) for c in order if not all(found[c].values())]
    if bad:
        more = f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(
            str(src),
            f"{len(bad)} case(s) lack an image or a label: {'; '.join(bad[:MAX_LISTED])}{more}",
            f"add the missing files (expected {layout.pattern}) or move those cases out of SRC",
        )
    return [{"image": found[c]["image"], "label": found[c]["label"], "case": c} for c in order]


def _label_set(name: str | None, src: Path, layout_name: str) -> LabelSet:
    if name is None:
        raise DataError(
            str(src),
            f"layout {layout_name!r} needs a label set to name its label values",
            f"pass --label_set with a built-in name ({', '.join(builtin_label_sets())}) "
            "or the path of a YAML file",
        )
    return load_label_set(name)


def _modality(modality: str, src: Path) -> str:
    if modality.upper() not in MODALITIES:
        raise DataError(
            str(src), f"modality {modality!r} unknown", f"pass --modality {' or '.join(MODALITIES)}"
        )
    return modality.upper()


def import_dataset(
    layout: str,
    src: str | Path,
    out: str | Path,
    label_set: str | None = None,
    modality: str | None = None,
) -> Path:
    """Write a datalist at ``out`` (a ``.json`` path, or a folder to hold ``datalist.json``)
    listing every case of the dataset in ``src``; returns the datalist's path.

    ``label_set`` is a built-in name or a YAML path; it and ``modality`` default to the
    layout's. Paths in the datalist are relative to its folder.
    """
    if layout not in LAYOUTS:
        raise DataError(str(layout), "unknown layout", f"use one of {', '.join(LAYOUTS)}")
    spec, src = LAYOUTS[layout], Path(src).absolute()
    if not src.is_dir():
        raise DataError(str(src), "source folder not found", "check the path")
    labels = _label_set(label_set or spec.label_set, src, layout)
    modality = _modality(modality or spec.modality, src)
    cases = _pair(spec.find(src), src, spec)
    out = Path(out)
    if out.is_dir():
        out = out / "datalist.json"
    name = src.name if spec.label_set is None else layout  # generic layouts: the folder's name
    return write_datalist(out, cases, labels, modality, name=name)
