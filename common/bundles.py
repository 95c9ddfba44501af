"""The three bundles as commands: train / evaluate stages (``monai.bundle run``) and export.

``medgen3d train`` and ``medgen3d evaluate`` only assemble and run the bundles' own
``python -m monai.bundle run`` command (printed first), so the bundles stay the source of
truth. ``export_bundle`` writes a bundle folder and zip that run without this repository.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from common.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
COMMON = REPO / "common"
NAMES = ("mask_diffusion", "image_synthesis", "seg_downstream")
EXPORT_SKIP = ("outputs", "runs", "eval", "__pycache__", "*_best.pt", "resume*.pt", "*.tmp*")


class Stage(NamedTuple):
    """A bundle run: its folder name, config files (before the preset) and run id."""

    bundle: str
    configs: tuple[str, ...]
    run_id: str


TRAIN_STAGES = {
    "masks": Stage("mask_diffusion", ("train.yaml",), "training"),
    "generator": Stage("image_synthesis", ("train_generator.yaml",), "training"),
    "refiner": Stage("image_synthesis", ("train_refiner.yaml",), "training"),
    "seg": Stage("seg_downstream", ("train.yaml",), "training"),
}
EVALUATE_STAGES = {
    "masks": Stage("mask_diffusion", ("evaluate.yaml",), "evaluating"),
    "images": Stage("image_synthesis", ("inference.yaml",), "evaluating"),
    "seg": Stage("seg_downstream", ("train.yaml", "evaluate.yaml"), "evaluating"),
}


def preset_file(bundle: str, preset: str) -> Path:
    """``configs/<preset>.yaml`` of a bundle, or ``preset`` itself when it is a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path.resolve()
    path = BUNDLES / bundle / "configs" / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(
            p.stem
            for p in (BUNDLES / bundle / "configs").glob("*.yaml")
            if p.stem in ("demo", "paper") or p.stem.startswith("demo_")
        )
        raise DataError(str(path), f"no preset {preset!r}", f"use one of {known} or a YAML file")
    return path


def bundle_command(stage: Stage, preset: str, overrides: dict) -> list[str]:
    """The ``python -m monai.bundle run`` command of ``stage`` with ``--key value`` overrides."""
    root = BUNDLES / stage.bundle
    files = [str(root / "configs" / c) for c in stage.configs] + [
        str(preset_file(stage.bundle, preset))
    ]
    cmd = [sys.executable, "-m", "monai.bundle", "run", stage.run_id]
    cmd += ["--config_file", str(files), "--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_stage(stages: dict[str, Stage], name: str, preset: str, overrides: dict) -> str:
    """Run one stage's bundle command (printed first); a failure exits with its status."""
    if name not in stages:
        raise DataError(name, "unknown stage", f"use one of {', '.join(stages)}")
    cmd = bundle_command(stages[name], preset, overrides)
    print("$ " + shlex.join(cmd), flush=True)
    result = subprocess.run(cmd, check=False)
    if result.returncode:
        raise SystemExit(result.returncode)
    return f"{name}: done"


def train_overrides(name: str, out: str | None, overrides: dict) -> dict:
    """Default output folders of a training run: ``OUT/models`` and ``OUT/runs``.

    Without them a bundle run writes into the bundle's own ``models/``, over the shipped
    weights; ``--ckpt_dir`` / ``--output_dir`` given by the user win.
    """
    root = Path(out or f"outputs/train/{name}").absolute()
    return {"ckpt_dir": str(root / "models"), "output_dir": str(root / "runs"), **overrides}


def export_bundle(bundle: str, out: str | Path) -> tuple[Path, Path]:
    """Write ``OUT/<bundle>/`` and ``OUT/<bundle>.zip``: configs, models, docs, LICENSE, the
    repository's requirements.txt and a copy of ``common/`` at the bundle root.

    ``python -m monai.bundle run`` puts the bundle root on ``sys.path``, so the copy of
    ``common`` is what the configs import. Both outputs appear only when complete; an
    existing folder or zip is never overwritten.
    """
    if bundle not in NAMES:
        raise DataError(bundle, "unknown bundle", f"use one of {', '.join(NAMES)}")
    out = Path(out)
    folder, archive = out / bundle, out / f"{bundle}.zip"
    for path in (folder, archive):
        if path.exists():
            raise DataError(str(path), "already exists", "choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns(*EXPORT_SKIP)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{bundle}.") as tmp:
        staged = Path(tmp) / bundle
        shutil.copytree(BUNDLES / bundle, staged, ignore=skip)
        shutil.copytree(COMMON, staged / "common", ignore=skip)
        shutil.copy2(REPO / "requirements.txt", staged / "requirements.txt")
        zipped = shutil.make_archive(str(Path(tmp) / bundle), "zip", tmp, bundle)
        Path(zipped).replace(archive)
        staged.replace(folder)
    return folder, archive
