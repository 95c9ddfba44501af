"""Cases for training: read a datalist, validate it up front, split off validation cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.core.errors import DataError
from common.data.datalists import datalist_label_set, read_datalist
from common.data.validate import MAX_VOXELS, require_valid


def load_split(
    datalist: str | Path,
    num_classes: int,
    val_cases: int = 1,
    validate: bool = True,
    max_voxels: int = MAX_VOXELS,
    pixdim: Sequence[float] | None = None,
) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...]}`` cases (absolute paths) of a datalist.

    Validation cases come from the datalist's ``validation`` section, else the last
    ``val_cases`` training cases. With ``validate`` every case is checked first (the same
    checks as ``medgen3d validate``) so a bad case stops training at once, not after an hour;
    a volume over ``max_voxels`` (the memory budget), as stored or once resampled to
    ``pixdim`` (mm), is refused from its header alone.
    """
    if validate:
        require_valid(datalist, max_voxels, pixdim)
    doc = read_datalist(datalist)
    label_set = datalist_label_set(doc, datalist)
    if label_set.num_classes != num_classes:
        raise DataError(
            str(datalist),
            f"label set {label_set.name!r} has {label_set.num_classes} classes "
            f"({', '.join(label_set.names)}) but the config says num_classes={num_classes}",
            "set num_classes in the config to match the datalist (or use the matching preset)",
        )
    train = list(doc.get("training", []))
    val = list(doc.get("validation", []))
    if not val and val_cases:
        if len(train) <= val_cases:
            raise DataError(
                str(datalist),
                f"{len(train)} training cases cannot spare {val_cases} for validation",
                "add cases, or set val_cases to 0",
            )
        train, val = train[:-val_cases], train[-val_cases:]
    return {"train": train, "val": val}


def split_datalist(
    datalist: str | Path, n_first: int, first_out: str | Path, rest_out: str | Path
) -> tuple[Path, Path]:
    """Write the first ``n_first`` training cases and the rest as two datalists (same folder
    conventions and label set); e.g. generator-training cases vs held-out real cases."""
    from common.data.datalists import datalist_modality, write_datalist

    doc = read_datalist(datalist)
    cases = doc.get("training", [])
    if not 0 < n_first < len(cases):
        raise DataError(str(datalist), f"cannot split {len(cases)} cases at {n_first}", "")
    label_set, modality = datalist_label_set(doc, datalist), datalist_modality(doc, datalist)
    name = doc.get("name", "dataset")
    first = write_datalist(first_out, cases[:n_first], label_set, modality, f"{name}_first")
    rest = write_datalist(rest_out, cases[n_first:], label_set, modality, f"{name}_rest")
    return first, rest
