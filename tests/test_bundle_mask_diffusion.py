"""The mask_diffusion bundle through `python -m monai.bundle`: the tiny preset, and the base
config alone with the shipped weights."""

import json

import nibabel as nib
import pytest
import torch
from bundle_helpers import REPO, monai_bundle
from monai.bundle import ConfigParser

from common.core.bundle_configs import config_files
from common.core.errors import find_data_error
from common.data.validate import validate_datalist

BUNDLE = REPO / "bundles" / "mask_diffusion"


def _configs(*stage_files: str) -> str:
    """``--config_file`` value: the stage files, then the tiny and thorax presets."""
    return str([str(f) for f in config_files(BUNDLE, stage_files, "tiny", "thorax")])


@pytest.mark.slow
def test_train_generate_evaluate(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    where = ["--bundle_root", str(root), "--dataset_dir", str(tiny_segthor_datalist.parent)]
    # training from inside the bundle folder: 2 epochs of 2 iterations, validated after each
    configs = _configs("inference.yaml", "train.yaml")
    monai_bundle("run", "training", "--config_file", configs, *where, cwd=BUNDLE)
    assert (root / "models" / "model.pt").exists()
    assert (root / "models" / "model_best.pt").exists()
    # inference from the repo root: one volume with the tiny preset's 2 DDIM steps
    configs = _configs("inference.yaml")
    monai_bundle("run", "inference", "--config_file", configs, *where, "--num_cases", "1")
    datalist = root / "outputs" / "datalist.json"
    doc = json.loads(datalist.read_text())
    assert doc["masks_only"] and len(doc["training"]) == 1 and "seed" in doc["training"][0]
    assert doc["steps"] == 2 and doc["seed"] == 0
    img = nib.load(datalist.parent / doc["training"][0]["label"])
    assert img.shape == (16, 16, 12)
    # thorax field of view 320 mm over the tiny grid
    assert img.header.get_zooms() == pytest.approx((20.0, 20.0, 320.0 / 12))
    assert validate_datalist(datalist) == []
    # evaluation writes the table
    configs = _configs("inference.yaml", "evaluate.yaml")
    out = monai_bundle("run", "evaluating", "--config_file", configs, *where)
    assert "| heart |" in out
    metrics = json.loads((root / "outputs" / "mask_metrics.json").read_text())
    assert metrics["n_generated"] == 1 and metrics["n_real"] == 4


@pytest.mark.parametrize(
    "preset, weights, output_pixdim, pixdim",
    [
        ([], "models/model.pt", [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]),  # the base: standard thorax
        (["demo.yaml"], "models/demo/model.pt", [10.0, 10.0, 10.0], [10.0, 10.0, 5.0]),
    ],
)
def test_inference_yaml_fits_the_shipped_weights(preset, weights, output_pixdim, pixdim):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ["inference.yaml", *preset]])
    parser["bundle_root"] = str(BUNDLE)
    assert parser.get_parsed_content("ckpt_path") == str(BUNDLE / weights)
    network = parser.get_parsed_content("network_def")
    state = torch.load(BUNDLE / weights, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    assert parser.get_parsed_content("output_pixdim") == output_pixdim
    assert parser.get_parsed_content("pixdim") == pixdim


@pytest.mark.parametrize(
    "preset, wrong, right",
    [([], "ddim", "rflow"), (["demo.yaml"], "rflow", "ddpm")],  # flow- / noise-trained weights
)
def test_a_sampler_of_the_other_objective_is_refused(preset, wrong, right):
    """ddim on the flow-trained standard weights (or rflow on the noise-trained demo ones)
    drew noise without a word; now the config refuses it, naming the sampler to use."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ["inference.yaml", *preset]])
    parser["sampler"] = wrong
    with pytest.raises(Exception) as refused:
        parser.get_parsed_content("scheduler")
    assert f"use sampler {right if right == 'rflow' else 'ddpm or ddim'}" in str(
        find_data_error(refused.value)
    )
    parser["sampler"] = right
    parser.get_parsed_content("scheduler")


@pytest.mark.slow
def test_inference_yaml_alone_runs(tmp_path):
    out = tmp_path / "masks"
    args = ["--num_cases", "1", "--steps", "2", "--output_dir", str(out)]
    monai_bundle("run", "inference", "--config_file", "configs/inference.yaml", *args, cwd=BUNDLE)
    doc = json.loads((out / "datalist.json").read_text())
    assert nib.load(out / doc["training"][0]["label"]).shape == (64, 64, 64)


@pytest.mark.slow
def test_verify_net_in_out():
    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
        "--extra_forward_args",
        "{'timesteps': 1, 'class_labels': 0}",
        cwd=BUNDLE,
    )
