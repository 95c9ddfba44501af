"""The mask_diffusion bundle through `python -m monai.bundle`, at a tiny size."""

import json

import nibabel as nib
from bundle_helpers import REPO, monai_bundle, overrides

from common.validate import validate_datalist

BUNDLE = REPO / "bundles" / "mask_diffusion"
TINY = {
    "pixdim": [6.0, 6.0, 5.0],
    "spatial_size": [16, 16, 12],
    "output_pixdim": [6.0, 6.0, 5.0],
    "m": 4,
    "n": 2,
    "unet_channels": [8, 8],
    "unet_attention": [False, False],
    "unet_norm_groups": 4,
    "unet_head_channels": 8,
}


def test_train_generate_evaluate(tiny_segthor_datalist, tmp_path):
    data_dir = str(tiny_segthor_datalist.parent)
    root = str(tmp_path / "bundle")
    tiny = overrides({**TINY, "bundle_root": root, "dataset_dir": data_dir})
    # training from inside the bundle folder: 2 iterations (2 epochs of one batch)
    monai_bundle(
        "run",
        "training",
        "--config_file",
        "['configs/train.yaml','configs/demo.yaml']",
        *tiny,
        "--max_epochs",
        "2",
        "--val_interval",
        "1",
        "--batch_size",
        "4",
        cwd=BUNDLE,
    )
    assert (tmp_path / "bundle" / "models" / "model.pt").exists()
    assert (tmp_path / "bundle" / "models" / "model_best.pt").exists()
    # inference from the repo root: one volume with 2 DDIM steps
    configs = str([f"bundles/mask_diffusion/configs/{c}.yaml" for c in ("inference", "demo")])
    monai_bundle(
        "run", "inference", "--config_file", configs, *tiny, "--num_cases", "1", "--steps", "2"
    )
    datalist = tmp_path / "bundle" / "outputs" / "datalist.json"
    doc = json.loads(datalist.read_text())
    assert doc["masks_only"] and len(doc["training"]) == 1 and "seed" in doc["training"][0]
    img = nib.load(datalist.parent / doc["training"][0]["label"])
    assert img.shape == (16, 16, 12)
    assert abs(img.header.get_zooms()[0] - 6.0) < 1e-6
    assert validate_datalist(datalist) == []
    # evaluation writes the table
    configs = str([f"bundles/mask_diffusion/configs/{c}.yaml" for c in ("evaluate", "demo")])
    out = monai_bundle("run", "evaluating", "--config_file", configs, *tiny)
    assert "| heart |" in out
    metrics = json.loads((tmp_path / "bundle" / "outputs" / "mask_metrics.json").read_text())
    assert metrics["n_generated"] == 1 and metrics["n_real"] == 4


def test_verify_net_in_out():
    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "['configs/train.yaml','configs/demo.yaml']",
        "--extra_forward_args",
        "{'timesteps': 1, 'class_labels': 0}",
        cwd=BUNDLE,
    )
