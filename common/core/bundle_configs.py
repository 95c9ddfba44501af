"""A bundle's configs as one parser: stage files, then a scale and a dataset preset.

Presets sit on two axes, merged in this order after a stage's own files: the scale
(``configs/<scale>.yaml``: grid size and z framing, network widths, batch sizes, sampler)
and the dataset (``configs/<dataset>.yaml``: label set, modality, field of view, data folder).
Either may also be the path of a YAML file of the user's. The base configs alone describe
the weights a bundle ships, so a stage also runs with no preset at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common.core.errors import DataError

if TYPE_CHECKING:  # monai loads when a parser is built, not with the names (a light CLI start)
    from monai.bundle import ConfigParser

SCALES = ("tiny", "demo", "standard", "paper")
DATASETS = ("thorax", "brain")
BASE_SCALE = "standard"  # the scale the base configs describe, every default


def preset_file(bundle_dir: str | Path, name: str, known: Sequence[str]) -> Path:
    """``configs/<name>.yaml`` of the bundle, or ``name`` itself when it is a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path.resolve()
    path = Path(bundle_dir) / "configs" / f"{name}.yaml"
    if not path.is_file():
        fix = f"use one of {list(known)} or a YAML file"
        raise DataError(str(path), f"no preset {name!r}", fix)
    return path


def preset_files(
    bundle_dir: str | Path, scale: str | None = BASE_SCALE, dataset: str | None = "thorax"
) -> list[Path]:
    """The scale preset, then the dataset preset (``None`` skips an axis)."""
    axes = ((scale, SCALES), (dataset, DATASETS))
    return [preset_file(bundle_dir, name, known) for name, known in axes if name]


def config_files(
    bundle_dir: str | Path,
    stage_files: Sequence[str],
    scale: str | None = BASE_SCALE,
    dataset: str | None = "thorax",
) -> list[Path]:
    """``configs/<stage file>`` for each stage file, then the presets, in merge order."""
    own = [Path(bundle_dir) / "configs" / name for name in stage_files]
    return own + preset_files(bundle_dir, scale, dataset)


def bundle_parser(
    bundle_dir: str | Path,
    stage_files: Sequence[str],
    scale: str | None = BASE_SCALE,
    dataset: str | None = "thorax",
    overrides: Mapping | None = None,
) -> ConfigParser:
    """A parser over :func:`config_files` with ``bundle_root`` and ``overrides`` set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(bundle_dir, stage_files, scale, dataset)])
    parser.update({"bundle_root": str(Path(bundle_dir).resolve()), **(overrides or {})})
    return parser
