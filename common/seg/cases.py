"""Case lists of the seg_downstream bundle and its study: read from and written to datalists.

The configs call ``image_cases`` (images to segment), ``datalist_cases`` (a section to
evaluate) and ``label_names``; the study reads paired datalists with ``paired_dataset`` and
writes each run's cases with ``write_cases``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from common.core.errors import DataError
from common.core.io import write_json
from common.data.datalists import SECTIONS, datalist_label_set, datalist_modality, read_datalist
from common.data.validate import require_valid, validate_image

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz")


def image_cases(path: str | Path) -> list[dict]:
    """``[{"image": file}, ...]`` to segment: a folder of NIfTI/MGZ images, one image, or a
    datalist JSON (every image of every section)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(  # hidden files are not images (e.g. a killed writer's temporaries)
            str(p)
            for p in path.iterdir()
            if p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
        )
    elif path.name.endswith(".json"):
        doc = read_datalist(path)
        files = [c["image"] for s in SECTIONS for c in doc.get(s, []) if c.get("image")]
    else:
        files = [str(path)] if path.name.endswith(IMAGE_SUFFIXES) and path.exists() else []
    if not files:
        raise DataError(
            str(path),
            f"holds no images ({', '.join(IMAGE_SUFFIXES)}) and is no datalist",
            "set dataset_dir to a folder of images, an image or a datalist.json",
        )
    problems = [str(p) for f in files for p in validate_image(f)]
    if problems:
        report = "\n".join([f"{len(problems)} problems:", *problems])
        raise DataError(str(path), report, "fix or remove the images listed above")
    return [{"image": f} for f in files]


def datalist_cases(datalist: str | Path, section: str) -> list[dict]:
    """The ``section`` cases (absolute paths) of a datalist; none raises DataError."""
    cases = read_datalist(datalist).get(section, [])
    if not cases:
        raise DataError(
            str(datalist), f"has no {section!r} cases", f"add a {section!r} section or set it"
        )
    return cases


def label_names(datalist: str | Path) -> list[str]:
    """The K label names (background first) a datalist declares."""
    return list(datalist_label_set(read_datalist(datalist), datalist).names)


def paired_dataset(path: str | Path) -> dict:
    """Validate a datalist of paired cases: ``{"cases", "label_set", "modality"}``.

    ``cases`` are its training and validation cases (absolute paths), each with an image
    and a label.
    """
    require_valid(path)
    doc = read_datalist(path)
    cases = [c for s in ("training", "validation") for c in doc.get(s, [])]
    if not cases or not all(c.get("image") and c.get("label") for c in cases):
        raise DataError(
            str(path),
            "has cases without an image or a label (a masks-only datalist?)",
            "use paired cases (synthetic masks get their images from image_synthesis)",
        )
    return {
        "cases": cases,
        "label_set": datalist_label_set(doc, path),
        "modality": datalist_modality(doc, path),
    }


def write_cases(path: Path, dataset: Mapping, sections: Mapping[str, list[dict]]) -> Path:
    """A datalist at ``path`` with ``dataset``'s label set and modality and the given sections
    (``{"training": cases, ...}``, image and label paths as given)."""
    doc = {
        "name": path.parent.name,
        "modality": {"0": dataset["modality"]},
        **dataset["label_set"].to_dict(),
        **{s: [{"image": c["image"], "label": c["label"]} for c in v] for s, v in sections.items()},
    }
    return write_json(doc, path)
