"""`medgen3d export`: exported bundles run with `python -m monai.bundle run` from another
folder, in a Python that cannot import this repository's `common` package."""

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
from bundle_helpers import overrides

from common.core.errors import DataError
from medgen3d.export import export_bundle

# Drops the editable install of this repository (its meta path finder) and the repository
# folder from sys.path, checks that `common` cannot be imported, then runs monai.bundle.
LAUNCHER = """
import importlib.util, os, runpy, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p and os.path.realpath(p) != {repo!r}]
assert importlib.util.find_spec("common") is None, "the repository is still importable"
sys.argv = ["monai.bundle", *sys.argv[1:]]
try:
    runpy.run_module("monai.bundle", run_name="__main__")
finally:
    import common
    print("common imported from", common.__file__)
"""


def run_outside(tmp_path, *args: str) -> str:
    """``python -m monai.bundle ARGS`` from ``tmp_path`` without the repository."""
    from bundle_helpers import REPO

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(launcher), *args],
        cwd=tmp_path,
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_exported_bundles_generate_outside_the_repository(tmp_path):
    exported = tmp_path / "export"
    masks, masks_zip = export_bundle("mask_diffusion", exported)
    images, _ = export_bundle("image_synthesis", exported)
    assert (masks / "common" / "data" / "label_sets" / "segthor.yaml").is_file()
    assert (masks / "models" / "model.pt").is_file() and (masks / "LICENSE").is_file()
    assert (masks / "models" / "demo" / "model.pt").is_file()  # every preset's shipped weights
    with zipfile.ZipFile(masks_zip) as z:
        names = z.namelist()
    assert "mask_diffusion/configs/inference.yaml" in names
    assert "mask_diffusion/common/masks/mcdpm.py" in names
    # only what the configs import: no application, no other bundle's modules
    assert not [n for n in names if "/medgen3d/" in n or "/common/seg/" in n], names
    assert not (images / "common" / "seg").exists() and (images / "common" / "images").is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    configs = str([str(masks / "configs" / "inference.yaml")])  # the shipped weights' config
    tiny = {"bundle_root": str(masks), "num_cases": 1, "steps": 2, "output_dir": "masks"}
    out = run_outside(elsewhere, "run", "inference", "--config_file", configs, *overrides(tiny))
    assert f"common imported from {masks / 'common'}" in out
    mask = nib.load(elsewhere / "masks" / "labels" / "synthetic_0000.nii.gz")
    assert mask.shape == (64, 64, 64)
    configs = str([str(images / "configs" / "inference.yaml")])
    tiny = {
        "bundle_root": str(images),
        "mask_datalist": str(elsewhere / "masks" / "datalist.json"),
        "output_dir": "images",
        "sdm_views": ["axial"],
    }
    out = run_outside(elsewhere, "run", "inference", "--config_file", configs, *overrides(tiny))
    assert f"common imported from {images / 'common'}" in out
    case = json.loads((elsewhere / "images" / "datalist.json").read_text())["training"][0]
    assert nib.load(elsewhere / "images" / case["image"]).shape == (64, 64, 64)


@pytest.mark.slow
def test_exported_seg_bundle_trains_outside_the_repository(tiny_segthor_datalist, tmp_path):
    seg, _ = export_bundle("seg_downstream", tmp_path / "export")
    configs = str([str(seg / "configs" / f) for f in ("train.yaml", "tiny.yaml")])
    tiny = {
        "bundle_root": str(seg),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs"),
        "dataset_dir": str(tiny_segthor_datalist.parent),
        "max_epochs": 1,
    }
    run_outside(tmp_path, "run", "training", "--config_file", configs, *overrides(tiny))
    assert (tmp_path / "models" / "model.pt").is_file()


def test_export_never_overwrites(tmp_path):
    (tmp_path / "seg_downstream").mkdir()
    with pytest.raises(DataError, match="already exists"):
        export_bundle("seg_downstream", tmp_path)
    with pytest.raises(DataError, match="unknown bundle"):
        export_bundle("nope", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg_downstream"]


def test_train_and_evaluate_wrap_the_bundle_commands(capsys):
    from medgen3d.bundles import EVALUATE_STAGES, TRAIN_STAGES, bundle_command, train_overrides
    from medgen3d.cli import main

    overrides = train_overrides("refiner", None, {})
    cmd = bundle_command(TRAIN_STAGES["refiner"], "demo", "thorax", overrides)
    assert cmd[3:7] == ["-m", "monai.bundle", "run", "training"]
    files = [Path(f).name for f in ast.literal_eval(cmd[cmd.index("--config_file") + 1])]
    assert files == [
        "inference.yaml",
        "train.yaml",
        "train_refiner.yaml",
        "demo.yaml",
        "thorax.yaml",
    ]
    assert cmd[cmd.index("--ckpt_dir") + 1].endswith("outputs/train/refiner/models")
    cmd = bundle_command(EVALUATE_STAGES["seg"], "paper", "brain", {"datalist": "d.json"})
    files = [Path(f).name for f in ast.literal_eval(cmd[cmd.index("--config_file") + 1])]
    assert files == ["train.yaml", "evaluate.yaml", "paper.yaml", "brain.yaml"]
    assert cmd[-2:] == ["--datalist", "d.json"]
    for argv in (["train", "nope"], ["evaluate", "masks", "--scale", "nope"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown stage" in err and "no preset 'nope'" in err


def test_the_bundle_commands_silence_only_monai_config_trust_warning():
    from medgen3d.bundles import TRAIN_STAGES, bundle_command

    cmd = bundle_command(TRAIN_STAGES["masks"], "demo", "thorax", {})
    assert cmd[1:3] == ["-W", "ignore:parsing config_file:UserWarning"]
    warn = (
        "import warnings; "
        "warnings.warn('parsing config_file [a.yaml]: any value ... trust', UserWarning); "
        "warnings.warn('another warning', UserWarning)"
    )
    run = subprocess.run([sys.executable, *cmd[1:3], "-c", warn], capture_output=True, text=True)
    assert "another warning" in run.stderr and "parsing config_file" not in run.stderr
