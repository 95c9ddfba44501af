"""The image_synthesis sequence generator through `python -m monai.bundle`, at a tiny size."""

import json

import torch
from bundle_helpers import REPO, monai_bundle, overrides
from monai.bundle import ConfigParser

from common.io import load_weights

BUNDLE = REPO / "bundles" / "image_synthesis"
CONFIG = "configs/train_generator.yaml"
TINY = {
    "pixdim": [6.0, 6.0, 5.0],
    "spatial_size": [16, 16, 12],
    "gen_channels": [8, 16],
    "gen_res_units": 1,
    "gen_disc_channels": 8,
    "gen_disc_layers": 1,
    "gen_sequence_length": 3,
    "gen_windows_per_volume": 1,
}


def test_train_two_iterations_saves_plain_generator(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    tiny = overrides(
        {**TINY, "bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)}
    )
    # 3 training cases, one window each, batch 3: one iteration per epoch, validation each epoch
    out = monai_bundle(
        "run",
        "training",
        "--config_file",
        CONFIG,
        *tiny,
        "--gen_batch_size",
        "3",
        "--gen_max_epochs",
        "2",
        "--gen_val_interval",
        "1",
        cwd=BUNDLE,
    )
    assert "Iter: 1/1" in out and "val_psnr" in out and "val_ssim" in out
    parser = ConfigParser()
    parser.read_config(BUNDLE / CONFIG)
    parser.update(TINY)
    for name in ("generator.pt", "generator_best.pt"):
        state = torch.load(root / "models" / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())  # plain state dict
        load_weights(parser.get_parsed_content("network_def"), root / "models" / name)
    assert list((root / "runs" / "generator").glob("events.out.tfevents.*"))


def test_verify_net_in_out(tmp_path):
    num_classes = 5
    meta = {
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "num_channels": 3 * num_classes + 2,
                    "spatial_shape": ["16*n", "16*n"],
                    "dtype": "float32",
                }
            },
            "outputs": {"pred": {"type": "image", "num_channels": 1, "dtype": "float32"}},
        }
    }
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(meta))
    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(meta_file),
        "--config_file",
        CONFIG,
        "--num_classes",
        str(num_classes),
        cwd=BUNDLE,
    )
