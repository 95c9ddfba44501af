"""The three bundles as commands: train / evaluate stages (``monai.bundle run``).

``medgen3d train`` and ``medgen3d evaluate`` only assemble and run the bundles' own
``python -m monai.bundle run`` command (printed first), so the bundles stay the source of
truth. Stopping the command (Ctrl-C, ``kill``) stops that child too; a data error in it ends
both with ``error: FILE: ...`` and status 2 (the bundle configs call
``common.core.errors.report_data_errors``).
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from monai.bundle import ConfigParser

from common.core.bundle_configs import BASE_SCALE, bundle_parser, config_files
from common.core.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
NAMES = ("mask_diffusion", "image_synthesis", "seg_downstream")


class Stage(NamedTuple):
    """A bundle run: its folder name, config files (in merge order, before the presets), run id."""

    bundle: str
    configs: tuple[str, ...]
    run_id: str


TRAIN_STAGES = {
    "masks": Stage("mask_diffusion", ("inference.yaml", "train.yaml"), "training"),
    "generator": Stage(
        "image_synthesis", ("inference.yaml", "train.yaml", "train_generator.yaml"), "training"
    ),
    "refiner": Stage(
        "image_synthesis", ("inference.yaml", "train.yaml", "train_refiner.yaml"), "training"
    ),
    "seg": Stage("seg_downstream", ("train.yaml",), "training"),
}
EVALUATE_STAGES = {
    "masks": Stage("mask_diffusion", ("inference.yaml", "evaluate.yaml"), "evaluating"),
    "images": Stage("image_synthesis", ("inference.yaml",), "evaluating"),
    "seg": Stage("seg_downstream", ("train.yaml", "evaluate.yaml"), "evaluating"),
}

TRUSTED_CONFIG_WARNING = "ignore:parsing config_file:UserWarning"


def bundle_config(
    bundle: str, scale: str | None = BASE_SCALE, dataset: str | None = "thorax", **overrides
) -> ConfigParser:
    """A bundle's ``inference.yaml`` with the scale and dataset presets and ``overrides``."""
    return bundle_parser(BUNDLES / bundle, ("inference.yaml",), scale, dataset, overrides)


def bundle_command(stage: Stage, scale: str, dataset: str, overrides: dict) -> list[str]:
    """The ``python -m monai.bundle run`` command of ``stage`` with ``--key value`` overrides."""
    root = BUNDLES / stage.bundle
    files = [str(f) for f in config_files(root, stage.configs, scale, dataset)]
    # MONAI warns on every run that a config file may run code; these are the project's own
    # bundle configs, so the CLI silences that one warning (a direct `monai.bundle run` keeps it).
    cmd = [sys.executable, "-W", TRUSTED_CONFIG_WARNING, "-m", "monai.bundle", "run", stage.run_id]
    cmd += ["--config_file", str(files), "--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_stage(
    stages: dict[str, Stage], name: str, scale: str, dataset: str, overrides: dict
) -> str:
    """Run one stage's bundle command (printed first); a failure exits with its status."""
    if name not in stages:
        raise DataError(name, "unknown stage", f"use one of {', '.join(stages)}")
    cmd = bundle_command(stages[name], scale, dataset, overrides)
    print("$ " + shlex.join(cmd), flush=True)
    status = run_child(cmd)
    if status:
        raise SystemExit(status)
    return f"{name}: done"


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_child(cmd: list[str]) -> int:
    """Run ``cmd`` and pass SIGINT, SIGTERM and SIGHUP on to it, so that stopping this process
    stops the child (no orphan trainer); its exit status, 128 + N when signal N ended it.

    The child runs in its own session (process group): a Ctrl-C reaches it once, through
    this process.
    """
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        if child is None:
            raise SystemExit(128 + signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        child = subprocess.Popen(cmd, start_new_session=True)
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - status if status < 0 else status


def train_overrides(name: str, out: str | None, overrides: dict) -> dict:
    """Default output folders of a training run: ``OUT/models`` and ``OUT/runs``.

    Without them a bundle run writes into the bundle's own ``models/``, over the shipped
    weights; ``--ckpt_dir`` / ``--output_dir`` given by the user win.
    """
    root = Path(out or f"outputs/train/{name}").absolute()
    return {"ckpt_dir": str(root / "models"), "output_dir": str(root / "runs"), **overrides}
