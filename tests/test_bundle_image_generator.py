"""The image_synthesis sequence generator through `python -m monai.bundle`, tiny preset."""

import json

import pytest
import torch
from bundle_helpers import REPO, monai_bundle, overrides
from monai.bundle import verify_net_in_out

from common.core.bundle_configs import bundle_parser, config_files
from common.core.io import load_weights

BUNDLE = REPO / "bundles" / "image_synthesis"
STAGE = ("inference.yaml", "train.yaml", "train_generator.yaml")


@pytest.mark.slow
def test_train_two_iterations_saves_plain_generator(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {"bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)}
    configs = str([str(f) for f in config_files(BUNDLE, STAGE, "tiny", "thorax")])
    # 3 training cases, one window each, batch 3: one iteration per epoch, validation each epoch
    out = monai_bundle(
        *("run", "training", "--config_file", configs, *overrides(values)),
        *("--gen_batch_size", "3", "--gen_max_epochs", "2"),
        cwd=BUNDLE,
    )
    assert "Iter: 1/1" in out and "val_psnr" in out and "val_ssim" in out
    network = bundle_parser(BUNDLE, STAGE, "tiny", "thorax").get_parsed_content("network_def")
    for name in ("model.pt", "model_best.pt"):
        state = torch.load(root / "models" / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())  # plain state dict
        load_weights(network, root / "models" / name)
    assert list((root / "runs" / "generator").glob("events.out.tfevents.*"))


def test_verify_net_in_out(tmp_path):
    num_classes = 4  # brain_tissue
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
    verify_net_in_out(  # MONAI's own check, in-process to save an interpreter start
        net_id="network_def",
        meta_file=str(meta_file),
        config_file=[str(f) for f in config_files(BUNDLE, STAGE, "tiny", "brain")],
    )
