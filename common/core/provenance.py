"""Which real cases trained a generator, and a guard against testing on them.

A generator training records its cases in every checkpoint it writes (``TrainingCases``); the
writers of synthetic datalists copy the records of the weights they used into the datalist
(``generator_training_cases``: ``{generator: record}``); a segmentation test refuses a test
case that any of those generators saw (``require_unseen``). A record::

    {"hashed": HASHED, "datalists": ["/data/train.json"], "unknown": [],
     "cases": [{"id": "thorax_003", "role": "train", "image": SHA256, "label": SHA256}, ...]}

``role`` is ``train`` or ``val`` (validation picks the best checkpoint, so it counts as seen);
``unknown`` lists checkpoints the training started from whose cases nobody recorded.

In a plain state dict (the final and best files) the record sits in the dict's ``_metadata``
under ``provenance``, where torch keeps per-module versions: the tensors stay under their own
keys, so ``load_state_dict(strict=True)``, MONAI's ``CheckpointLoader`` and ``ckpt_export``
read the file as before. A nested checkpoint (a resume file) holds it under ``provenance``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from common.core.errors import DataError
from common.core.io import atomic_path, load_volume, read_json, write_json

RECORD_KEY = "provenance"
DATALIST_KEY = "generator_training_cases"
HASHED = "sha256 of the decoded voxels, their dtype and shape, and the affine (float32)"


def content_hash(path: str | Path) -> str:
    """SHA-256 of a volume's decoded content, not of its file: the voxel values as stored after
    scaling (bytes, little-endian), their dtype and shape, and the affine rounded to float32.
    The same volume rewritten (another gzip level, file name, header extension or format)
    gives the same hash; other voxel values, type, shape or geometry give another."""
    img = load_volume(path)
    voxels = np.asanyarray(img.dataobj)
    voxels = np.ascontiguousarray(voxels, dtype=voxels.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{voxels.dtype.name}:{voxels.shape}".encode())
    digest.update(voxels.tobytes())
    digest.update(np.asarray(img.affine, dtype="<f4").tobytes())
    return digest.hexdigest()


def case_id(case: Mapping) -> str:
    """A case's name: its ``case`` entry, else its image file name without the extension."""
    name = Path(case.get("image") or case["label"]).name
    return str(case.get("case") or name.split(".")[0])


def _case(case: Mapping, role: str) -> dict:
    image = content_hash(case["image"]) if case.get("image") else None
    return {"id": case_id(case), "role": role, "image": image, "label": content_hash(case["label"])}


def merge(a: Mapping, b: Mapping) -> dict:
    """The record of weights that saw the cases of both ``a`` and ``b`` (a case seen in
    training by either keeps ``role: train``)."""
    cases = {}
    for case in [*a["cases"], *b["cases"]]:
        key = (case["image"], case["label"])
        if key not in cases or case["role"] == "train":
            cases[key] = dict(case)
    return {
        "hashed": HASHED,
        "datalists": list(dict.fromkeys([*a["datalists"], *b["datalists"]])),
        "unknown": list(dict.fromkeys([*a["unknown"], *b["unknown"]])),
        "cases": list(cases.values()),
    }


def training_record(
    split: Mapping[str, Sequence[Mapping]], datalist: str | Path = "", start_from: str = ""
) -> dict:
    """The record of a training on ``split`` (``{"train": [...], "val": [...]}`` cases with
    absolute paths, as ``common.data.splits.load_split`` gives) read from ``datalist``; a
    training that started from checkpoint ``start_from`` also saw that checkpoint's cases."""
    record = {
        "hashed": HASHED,
        "datalists": [str(datalist)] if datalist else [],
        "unknown": [],
        "cases": [_case(c, role) for role in ("train", "val") for c in split.get(role, [])],
    }
    if start_from:
        earlier = checkpoint_record(start_from)
        unknown = {"hashed": HASHED, "datalists": [], "unknown": [str(start_from)], "cases": []}
        record = merge(record, earlier or unknown)
    return record


class TrainingCases:
    """A training's record (``training_record``) as a checkpointable object: the savers write
    ``state_dict()`` into every checkpoint; a resumed run adds the cases of the run it resumes
    (``load_state_dict``), so its weights' record lists every case they saw. A resume file from
    before records existed lacks it (``optional_in_resume``): this run's record stands."""

    optional_in_resume = True

    def __init__(
        self, split: Mapping[str, Sequence[Mapping]], datalist: str | Path = "", start_from=""
    ):
        self.record = training_record(split, datalist, start_from)

    def state_dict(self) -> dict:
        return self.record

    def load_state_dict(self, state: Mapping) -> None:
        self.record = merge(self.record, state)


def attach_record(state: Mapping, record: Mapping) -> Mapping:
    """``state`` with ``record``: in a plain state dict's ``_metadata`` (strict loaders see the
    same tensors), in a nested checkpoint under ``provenance``."""
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return {**state, RECORD_KEY: dict(record)}
    out = OrderedDict(state)
    out._metadata = OrderedDict(getattr(state, "_metadata", {}))
    out._metadata[RECORD_KEY] = dict(record)
    return out


def checkpoint_record(path: str | Path) -> dict | None:
    """The record in checkpoint ``path`` (plain or nested); None if it holds none or is
    missing."""
    if not Path(path).is_file():  # the loader of the weights names a missing file
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fix = "re-train or re-download it"
        raise DataError(str(path), f"cannot be read as a checkpoint ({e})", fix) from e
    if not isinstance(state, Mapping):
        return None
    record = state.get(RECORD_KEY) or getattr(state, "_metadata", {}).get(RECORD_KEY)
    return dict(record) if isinstance(record, Mapping) else None


def checkpoint_records(paths: Mapping[str, str | Path]) -> dict[str, dict | None]:
    """``{generator: record or None}`` of the checkpoints ``{generator: path}`` (for the
    synthetic datalist's ``generator_training_cases``)."""
    return {name: checkpoint_record(path) for name, path in paths.items()}


def record_checkpoint(path: str | Path, datalist: str | Path, val_cases: int = 1) -> dict:
    """Write the record of a training on ``datalist`` (its last ``val_cases`` cases validating,
    or its ``validation`` section) into checkpoint ``path`` made before records existed; the
    tensors are kept as they are. Returns the record."""
    from common.data.datalists import datalist_label_set, read_datalist
    from common.data.splits import load_split

    classes = datalist_label_set(read_datalist(datalist), datalist).num_classes
    split = load_split(datalist, classes, val_cases, validate=False)
    record = training_record(split, datalist)
    state = torch.load(path, map_location="cpu", weights_only=True)
    with atomic_path(path) as tmp:
        torch.save(attach_record(state, record), tmp)
    return record


def _seen(case: Mapping, generators: Mapping[str, dict]) -> str:
    """Who saw ``case`` (by its image's or label's content): ``"train case of every
    generator"``, ``"val case thorax_015 of refiner_axial"`` (another name); ``""``: none."""
    hashes = {content_hash(case[k]) for k in ("image", "label") if case.get(k)}
    seen: dict[str, list[str]] = {}
    for name, record in generators.items():
        for other in record["cases"]:
            if hashes & {other["image"], other["label"]}:
                named = "" if other["id"] == case_id(case) else " " + other["id"]
                seen.setdefault(f"{other['role']} case{named}", []).append(name)
    every = len(generators) > 1
    names = {
        w: "every generator" if every and n == list(generators) else ", ".join(n)
        for w, n in seen.items()
    }
    return "; ".join(f"{what} of {who}" for what, who in names.items())


def require_unseen(
    synthetic_datalist: str | Path,
    test_cases: Sequence[Mapping],
    allow_overlap: bool | str = False,
    source: str | Path = "test cases",
    record_to: str | Path | None = None,
) -> dict:
    """Refuse test cases that a generator of ``synthetic_datalist`` saw in training.

    Test cases (image and label paths) are matched to the generators' records
    (``generator_training_cases``) by content hash; names only help the message. An overlap
    raises DataError naming ``source`` and each case with who saw it, unless
    ``allow_overlap`` (``True`` or ``"true"``). ``""`` checks nothing. Returns what the
    results record, and writes it to ``record_to`` (JSON) when given: ``{"synthetic",
    "checked", "generators", "unrecorded", "overlap", "allow_overlap"}``.
    """
    if isinstance(allow_overlap, str):  # a command-line "false" is a non-empty string
        allow_overlap = allow_overlap.strip().lower() in ("1", "true", "yes")
    summary = {"synthetic": str(synthetic_datalist), "checked": 0, "generators": []}
    summary |= {"unrecorded": [], "overlap": [], "allow_overlap": bool(allow_overlap)}
    if synthetic_datalist:
        _check(synthetic_datalist, test_cases, summary, source)
    if record_to:
        write_json(summary, record_to)
    return summary


def _check(synthetic_datalist: str | Path, test_cases, summary: dict, source) -> None:
    """``require_unseen``'s work: fills ``summary``, raises on an overlap not allowed."""
    generators = read_json(synthetic_datalist).get(DATALIST_KEY)
    if not isinstance(generators, Mapping) or not generators:
        generators = {"its generators": None}
    known = {k: v for k, v in generators.items() if v}
    summary["generators"] = sorted(known)
    summary["unrecorded"] = sorted(set(generators) - set(known))
    if summary["unrecorded"]:
        print(
            f"warning: {synthetic_datalist}: no record of the cases that trained "
            f"{', '.join(summary['unrecorded'])}, so a test case they saw cannot be found. "
            "Regenerate with weights that record them (common.core.provenance)"
        )
    for case in test_cases:
        seen = _seen(case, known)
        summary["checked"] += 1
        if seen:
            summary["overlap"].append(f"{case_id(case)} ({seen})")
    if summary["overlap"] and not summary["allow_overlap"]:
        raise DataError(
            str(source),
            f"{len(summary['overlap'])} of {len(test_cases)} test cases were seen in training "
            f"by the generators of {synthetic_datalist}: " + ", ".join(summary["overlap"]),
            "test on cases no generator saw (e.g. the held-out cases), or pass "
            "--allow_overlap True to go on knowingly (the results record it)",
        )
    if summary["overlap"]:
        print(f"warning: allow_overlap: testing on cases the generators saw: {summary['overlap']}")
