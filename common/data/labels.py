"""Label sets: the names of a dataset's label values and how source files map onto them.

A label set is part of a dataset's description. Built-in sets live in ``label_sets/*.yaml``;
users pass a name (``segthor``) or the path of their own YAML/JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from common.core.errors import DataError

BUILTIN_DIR = Path(__file__).parent / "label_sets"


@dataclass(frozen=True)
class LabelSet:
    """Label values ``0..K-1`` with names; ``names[v]`` names value ``v`` (0 is background).

    ``source_map`` maps the values found in source label files (e.g. FreeSurfer aseg codes)
    to label values; without it the source values are the label values themselves.
    ``single_component`` names the organs that are one connected piece.
    """

    name: str
    names: tuple[str, ...]
    single_component: tuple[str, ...] = ()
    source_map: dict[int, int] | None = field(default=None, compare=False)

    def __post_init__(self):
        if len(self.names) < 2 or self.names[0] != "background":
            raise ValueError(
                f"label set {self.name!r}: value 0 must be 'background' plus >=1 label"
            )
        unknown = set(self.single_component) - set(self.names)
        if unknown:
            raise ValueError(f"label set {self.name!r}: single_component names {sorted(unknown)}")
        if self.source_map is not None:
            bad = {v for v in self.source_map.values() if not 0 <= v < len(self.names)}
            if bad:
                raise ValueError(f"label set {self.name!r}: source_map targets {sorted(bad)}")

    @property
    def num_classes(self) -> int:
        """Number of classes including background (channels of a one-hot mask)."""
        return len(self.names)

    @property
    def source_values(self) -> set[int]:
        """Values allowed in a source label file."""
        return set(self.source_map) if self.source_map is not None else set(range(len(self.names)))

    @property
    def channel_def(self) -> dict[str, str]:
        """Bundle-metadata style ``{"0": "background", "1": ...}``."""
        return {str(v): n for v, n in enumerate(self.names)}

    def remap(self, labels: np.ndarray) -> np.ndarray:
        """Source label values -> label values (uint8). Unknown source values raise ValueError."""
        labels = np.asarray(labels)
        if self.source_map is None:
            return labels.astype(np.uint8)
        values = np.unique(labels)
        unknown = sorted(set(values.tolist()) - self.source_map.keys())
        if unknown:
            raise ValueError(f"values {unknown} are not in label set {self.name!r}")
        lut_src = np.array(sorted(self.source_map), dtype=np.int64)
        lut_dst = np.array([self.source_map[k] for k in lut_src], dtype=np.uint8)
        return lut_dst[np.searchsorted(lut_src, labels.astype(np.int64))]

    def to_dict(self) -> dict:
        """MSD dataset.json style keys (``labels``) plus ``single_component``/``source_map``."""
        out = {"labels": self.channel_def, "label_set": self.name}
        out["single_component"] = list(self.single_component)
        if self.source_map is not None:
            out["source_map"] = {str(k): v for k, v in sorted(self.source_map.items())}
        return out

    @classmethod
    def from_dict(cls, d: dict, name: str | None = None) -> LabelSet:
        """Inverse of ``to_dict``; also reads the built-in YAML layout (int keys)."""
        labels = {int(k): str(v) for k, v in d["labels"].items()}
        if sorted(labels) != list(range(len(labels))):
            raise ValueError(f"label values must be 0..K-1 without gaps, got {sorted(labels)}")
        source_map = d.get("source_map")
        return cls(
            name=str(name or d.get("label_set") or d.get("name") or "custom"),
            names=tuple(labels[v] for v in range(len(labels))),
            single_component=tuple(d.get("single_component", ())),
            source_map=None
            if source_map is None
            else {int(k): int(v) for k, v in source_map.items()},
        )


def builtin_label_sets() -> list[str]:
    """Names of the label sets shipped in ``common/data/label_sets``."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_label_set(name_or_path: str | Path) -> LabelSet:
    """A built-in label set by name, or one from a YAML/JSON file."""
    path = Path(name_or_path)
    if not path.exists():
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise DataError(
                str(name_or_path),
                "no such label set file or built-in label set",
                f"use one of {builtin_label_sets()} or the path of a YAML file",
            )
    try:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return LabelSet.from_dict(d, name=d.get("name") or path.stem)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise DataError(
            str(path),
            f"not a valid label set ({e})",
            "see common/data/label_sets/*.yaml for the layout",
        ) from e
