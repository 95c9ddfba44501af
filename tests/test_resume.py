"""Each bundle's training, stopped after an epoch and rerun, ends with the same weights as an
uninterrupted run (CPU): model, optimizer, scheduler, iteration and every RNG are restored."""

import pytest
import torch
from bundle_helpers import REPO
from monai.bundle import ConfigParser

BUNDLES = REPO / "bundles"
SMALL = {"pixdim": [6.0, 6.0, 5.0], "spatial_size": [16, 16, 12], "val_cases": 1}
CASES = {
    "generator": (
        "image_synthesis/configs/train_generator.yaml",
        "generator",
        {
            "gen_channels": [8, 16],
            "gen_disc_channels": 8,
            "gen_disc_layers": 1,
            "gen_sequence_length": 3,
            "gen_windows_per_volume": 2,
            "gen_max_epochs": 3,
            "gen_val_interval": 100,
            "gen_teacher_forcing_epochs": 2,
            "train#handlers#0#exec_at_start": False,
        },
    ),
    "refiner": (
        "image_synthesis/configs/train_refiner.yaml",
        "network",
        {
            "sdm_channels": [8, 8],
            "sdm_attention": [False, False],
            "sdm_norm_groups": 4,
            "sdm_head_channels": 8,
            "sdm_spade_channels": 8,
            "sdm_slices_per_volume": 2,
            "sdm_batch_size": 2,
            "sdm_max_epochs": 3,
            "sdm_val_interval": 100,
        },
    ),
    "seg": (
        "seg_downstream/configs/train.yaml",
        "model",
        {
            "network_sizes#unet3d": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
            "roi_size": [8, 8, 8],
            "batch_size": 1,
            "max_epochs": 3,
            "val_interval": 1,
        },
    ),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(config: str, network: str, values: dict, stop_after: int = 0) -> dict:
    """Run a bundle's ``training`` in this process; ``stop_after`` ends it after that epoch."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / config))
    parser.update(values)
    if stop_after:  # the training steps, with a stop just before the run
        parser["imports"] = [*parser["imports"], "$import ignite"]
        event = f"ignite.engine.Events.EPOCH_COMPLETED(once={stop_after})"
        stop = f"$@train#trainer.add_event_handler({event}, @train#trainer.terminate)"
        parser["training"] = [*parser["training"][:-1], stop, parser["training"][-1]]
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("training")
    return {k: v.clone() for k, v in parser.get_parsed_content(network).state_dict().items()}


@pytest.mark.parametrize("name", CASES)
def test_stopped_training_resumes_to_the_same_weights(name, tiny_segthor_datalist, tmp_path):
    config, network, values = CASES[name]
    values = {**SMALL, **values, "dataset_dir": str(tiny_segthor_datalist.parent)}
    straight = _train(config, network, {**values, "bundle_root": str(tmp_path / "a")})
    stopped = _train(config, network, {**values, "bundle_root": str(tmp_path / "b")}, 1)
    resumed = _train(config, network, {**values, "bundle_root": str(tmp_path / "b")})
    assert any(not torch.equal(stopped[k], resumed[k]) for k in straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
