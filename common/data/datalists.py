"""Decathlon-style datalists (``datalist.json``) that also carry their label set and modality.

Layout (MONAI/MSD compatible)::

    {"name": "segthor", "modality": {"0": "CT"}, "labels": {"0": "background", ...},
     "label_set": "segthor", "single_component": [...], "source_map": {...},   # optional
     "training": [{"image": "imgs/a.nii.gz", "label": "labels/a.nii.gz"}, ...]}

Paths are stored relative to the datalist's folder and returned absolute.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.core.errors import DataError
from common.core.io import read_json, write_json
from common.data.labels import LabelSet

MODALITIES = ("CT", "MRI")
PATH_KEYS = ("image", "label", "image_sequence")  # entry keys that hold file paths
SECTIONS = ("training", "validation", "test")


def write_datalist(
    path: str | Path,
    cases: list[dict],
    label_set: LabelSet,
    modality: str,
    name: str,
    section: str = "training",
    **extra,
) -> Path:
    """Write ``cases`` (dicts with absolute or relative ``image``/``label`` paths) atomically."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    path = Path(path).absolute()
    base = path.parent

    def rel(p):
        return os.path.relpath(Path(p).absolute(), base) if isinstance(p, (str, Path)) else p

    entries = [{k: rel(v) if k in PATH_KEYS else v for k, v in c.items()} for c in cases]
    doc = {"name": name, "modality": {"0": modality}, **label_set.to_dict(), **extra}
    doc[section] = entries
    doc[f"num{section.capitalize()}"] = len(entries)
    return write_json(doc, path)


def read_datalist(path: str | Path) -> dict:
    """Read a datalist; every ``image``/``label`` path in each section becomes absolute."""
    path = Path(path).absolute()
    doc = read_json(path)
    if not isinstance(doc, dict) or not any(s in doc for s in SECTIONS):
        raise DataError(
            str(path), f"no {'/'.join(SECTIONS)} section", "write it with medgen3d import-dataset"
        )
    for section in SECTIONS:
        cases = doc.get(section, [])
        if not isinstance(cases, list):
            raise DataError(str(path), f"{section!r} is not a list", "make it a list of cases")
        for i, case in enumerate(cases):
            if not isinstance(case, dict):
                raise DataError(
                    str(path),
                    f"{section}[{i}] is not an object",
                    'use {"image": ..., "label": ...}',
                )
            for key in PATH_KEYS:
                if case.get(key) and not isinstance(case[key], str):
                    raise DataError(
                        str(path),
                        f"{section}[{i}]'s {key!r} is not a path",
                        f'give it "{key}": "path/to/file"',
                    )
                if case.get(key):
                    case[key] = os.path.normpath(path.parent / case[key])
    return doc


def datalist_label_set(doc: dict, path: str | Path = "datalist") -> LabelSet:
    """The label set a datalist declares (its ``labels`` block)."""
    example = '{"labels": {"0": "background", "1": "heart", ...}}'
    if "labels" not in doc:
        raise DataError(str(path), "declares no 'labels'", f"add {example}")
    labels = doc["labels"]
    if not isinstance(labels, dict):
        raise DataError(
            str(path),
            f"'labels' is a {type(labels).__name__}, not an object of value: name",
            f"write it as {example}",
        )
    try:
        return LabelSet.from_dict(doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            str(path), f"invalid 'labels' block ({e})", "see common/data/label_sets/"
        ) from e


def datalist_modality(doc: dict, path: str | Path = "datalist") -> str:
    """``CT`` or ``MRI`` from the datalist's ``modality`` block."""
    modality = doc.get("modality", {}).get("0") if isinstance(doc.get("modality"), dict) else None
    if modality not in MODALITIES:
        raise DataError(
            str(path),
            f"modality {modality!r} unknown",
            'set "modality": ' + " or ".join(f'{{"0": "{m}"}}' for m in MODALITIES),
        )
    return modality
