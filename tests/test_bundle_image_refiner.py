"""The image_synthesis bundle's semantic diffusion refiner through `python -m monai.bundle`."""

import json

import pytest
import torch
from bundle_helpers import REPO, monai_bundle, overrides
from monai.bundle import verify_net_in_out

from common.core.bundle_configs import bundle_parser, config_files
from common.diffusion.schedulers import make_scheduler
from common.images.refiner import load_view_models, refine_volume

BUNDLE = REPO / "bundles" / "image_synthesis"
STAGE = ("inference.yaml", "train.yaml", "train_refiner.yaml")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny tensors, here and in the subprocesses: one thread is as fast, and immune to thread
    contention on a busy machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_train_two_views(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {"bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)}
    configs = str([str(f) for f in config_files(BUNDLE, STAGE, "tiny", "thorax")])
    run = ("run", "training", "--config_file", configs, *overrides(values))
    # axial: 2 epochs of one batch (3 training cases), validating each epoch
    monai_bundle(*run, "--sdm_max_epochs", "2", cwd=BUNDLE)
    # coronal (16 x 12 slices): one iteration, no validation
    monai_bundle(*run, "--view", "coronal", "--sdm_val_interval", "2", cwd=BUNDLE)
    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "refiner_axial.pt",
        "refiner_axial_best.pt",
        "refiner_coronal.pt",
        "resume_refiner_axial.pt",
        "resume_refiner_coronal.pt",
    ]
    assert (root / "runs" / "refiner_axial").is_dir()
    for name in ("refiner_axial.pt", "refiner_coronal.pt"):
        state = torch.load(models / name, map_location="cpu", weights_only=True)
        assert "conv_in.conv.weight" in state  # a plain state dict, not {"model": ...}
    network = bundle_parser(BUNDLE, STAGE, "tiny", "thorax").get_parsed_content("refiner_def")
    views = load_view_models(network, models, ["axial", "coronal"])
    mask = torch.nn.functional.one_hot(torch.randint(0, 5, (1, 16, 16, 12)), 5).movedim(-1, 1)
    out = refine_volume(views, make_scheduler("ddpm"), torch.zeros(1, 1, 16, 16, 12), mask, t0=2)
    assert out.shape == (1, 1, 16, 16, 12) and out.isfinite().all()


def test_verify_net_in_out(tmp_path):
    meta = {
        "network_data_format": {
            "inputs": {
                "image": {"num_channels": 1, "spatial_shape": ["16*n", "16*n"], "dtype": "float32"}
            },
            "outputs": {"pred": {"num_channels": 1, "dtype": "float32"}},
        }
    }
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    verify_net_in_out(  # MONAI's own check, in-process to save an interpreter start
        net_id="refiner_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file=[str(f) for f in config_files(BUNDLE, STAGE, "tiny", "thorax")],
        n=2,
        extra_forward_args={"timesteps": 1},
    )
