"""image_synthesis end to end at a tiny size: train both stages, synthesise, evaluate."""

import json

import nibabel as nib
import numpy as np
from bundle_helpers import REPO, monai_bundle, overrides

from common.validate import validate_datalist

BUNDLE = REPO / "bundles" / "image_synthesis"
TINY = {
    "pixdim": [6.0, 6.0, 5.0],
    "spatial_size": [16, 16, 12],
    "gen_channels": [8, 16],
    "gen_disc_channels": 8,
    "gen_disc_layers": 1,
    "gen_sequence_length": 3,
    "gen_windows_per_volume": 1,
    "sdm_channels": [8, 8],
    "sdm_attention": [False, False],
    "sdm_norm_groups": 4,
    "sdm_head_channels": 8,
    "sdm_spade_channels": 8,
    "sdm_views": ["axial", "coronal"],
}
CONFIGS = "['configs/{}.yaml','configs/demo.yaml']"


def test_train_synthesise_evaluate(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    tiny = overrides(
        {**TINY, "bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)}
    )
    monai_bundle(
        "run",
        "training",
        "--config_file",
        CONFIGS.format("train_generator"),
        *tiny,
        "--gen_max_epochs",
        "1",
        "--gen_val_interval",
        "1",
        cwd=BUNDLE,
    )
    for view in ("axial", "coronal"):
        monai_bundle(
            "run",
            "training",
            "--config_file",
            CONFIGS.format("train_refiner"),
            *tiny,
            "--view",
            view,
            "--sdm_max_epochs",
            "1",
            "--sdm_val_interval",
            "1",
            cwd=BUNDLE,
        )
    monai_bundle(
        "run", "export_real", "--config_file", CONFIGS.format("inference"), *tiny, cwd=BUNDLE
    )
    real = root / "outputs" / "real_model_space" / "datalist.json"
    monai_bundle(
        "run",
        "inference",
        "--config_file",
        CONFIGS.format("inference"),
        *tiny,
        "--mask_datalist",
        str(real),
        "--batch_size",
        "2",
        cwd=BUNDLE,
    )
    paired = root / "outputs" / "datalist.json"
    doc = json.loads(paired.read_text())
    assert len(doc["training"]) == 4 and validate_datalist(paired) == []
    first = doc["training"][0]
    image = nib.load(paired.parent / first["image"])
    label = nib.load(paired.parent / first["label"])
    assert image.shape == label.shape == (16, 16, 12)
    np.testing.assert_allclose(image.affine, label.affine)
    hu = np.asarray(image.dataobj)
    assert -1000.0 <= hu.min() and hu.max() <= 1000.0  # back in HU
    out = monai_bundle(
        "run",
        "evaluating",
        "--config_file",
        CONFIGS.format("inference"),
        *tiny,
        "--mask_datalist",
        str(real),
        cwd=BUNDLE,
    )
    assert "sequence generator only" in out and "refined" in out
    metrics = json.loads((root / "outputs" / "image_metrics.json").read_text())
    assert metrics["refined"]["paired_metrics"]["psnr_mean"] > 0


def test_verify_net_in_out():
    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        CONFIGS.format("inference"),
        cwd=BUNDLE,
    )
