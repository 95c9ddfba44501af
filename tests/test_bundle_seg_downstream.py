"""The seg_downstream bundle: training through `python -m monai.bundle`, MONAI's checks, the
MONAI Label infer path, and a tiny downstream study (every run through the bundle's configs)."""

import json
import shutil

import nibabel as nib
import numpy as np
import torch
from bundle_helpers import REPO, monai_bundle, overrides
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from monai.bundle import run as bundle_run
from monai.transforms import Compose, SaveImaged

from common.io import save_nifti
from common.seg_study import seg_study

BUNDLE = REPO / "bundles" / "seg_downstream"
TINY_NET = {"channels": [4, 8], "strides": [2], "num_res_units": 0}
TINY = {"pixdim": [6.0, 6.0, 5.0], "spatial_size": [16, 16, 16], "network_sizes#unet3d": TINY_NET}


def test_train_two_iterations_verify_and_export(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    tiny = overrides(
        {**TINY, "bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)}
    )
    configs = "['configs/train.yaml','configs/demo.yaml']"
    # 3 training cases in one batch, 2 epochs: 2 iterations, validation on the 4th case
    args = ["--val_cases", "1", "--batch_size", "3", "--max_epochs", "2", "--val_interval", "1"]
    out = monai_bundle("run", "training", "--config_file", configs, *tiny, *args, cwd=BUNDLE)
    assert "val_mean_dice" in out
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    assert (root / "runs").is_dir()  # TensorBoard events
    # MONAI's checks (the functions behind `python -m monai.bundle ...`, run in this process)
    meta = str(BUNDLE / "configs" / "metadata.json")
    verify_net_in_out(
        "network_def", meta_file=meta, config_file=str(BUNDLE / "configs" / "inference.yaml")
    )
    config_files = [str(BUNDLE / "configs" / f"{c}.yaml") for c in ("train", "demo")]
    ts = tmp_path / "model.ts"
    ckpt_export(
        "network_def",
        filepath=str(ts),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=meta,
        config_file=config_files,
        **TINY,
    )
    scripted = torch.jit.load(str(ts))
    assert scripted(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 5, 16, 16, 16)


def test_metadata_names_every_label():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    pred = fmt["outputs"]["pred"]
    assert pred["channel_def"] == {
        "0": "background",
        "1": "esophagus",
        "2": "heart",
        "3": "trachea",
        "4": "aorta",
    }
    assert pred["num_channels"] == len(pred["channel_def"])


def test_inference_builds_the_network_training_saves():
    """MONAI Label reads inference.yaml alone: its network must be train.yaml's (demo) one."""
    nets = {}
    for name in ("inference", "train"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / f"{name}.yaml"))
        nets[name] = parser.get_parsed_content("network_def").state_dict()
    assert {k: v.shape for k, v in nets["inference"].items()} == {
        k: v.shape for k, v in nets["train"].items()
    }


def write_input_image(folder):
    """A 40x36x20 CT-like image on an oblique-free but flipped, anisotropic (LPS-like) grid."""
    affine = np.diag([-2.5, -3.0, 4.0, 1.0])
    affine[:3, 3] = [40.0, 60.0, -30.0]
    rng = np.random.default_rng(0)
    image = rng.normal(0, 300, (40, 36, 20)).astype(np.float32)
    return save_nifti(image, affine, folder / "case_a.nii.gz"), affine


def test_monai_label_style_inference(tmp_path):
    """What MONAI Label's BundleInferTask does with configs/inference.yaml, without a server."""
    bundle = tmp_path / "seg_downstream"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    image_path, affine = write_input_image(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser.config.update({"bundle_root": str(bundle), "output_dir": str(tmp_path / "labels")})
    network = parser.get_parsed_content("network_def", instantiate=True)
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    checkpoint = torch.load(bundle / "models" / "model.pt", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint), strict=True)
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    assert isinstance(pre, Compose) and isinstance(post, Compose)
    assert any(isinstance(t, SaveImaged) for t in post.transforms)  # MONAI Label drops it
    data = Compose(list(pre.transforms))({"image": str(image_path)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    data = Compose(list(post.transforms))(data)
    assert tuple(data["pred"].shape) == (1, 40, 36, 20)
    saved = nib.load(tmp_path / "labels" / "case_a_seg.nii.gz")
    labels = np.asarray(saved.dataobj)
    assert labels.shape == (40, 36, 20)
    assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() <= 4
    assert np.allclose(saved.affine, affine, atol=1e-4)
    # the bundle's own `inference` run key writes the same labels
    bundle_run(
        "inference",
        config_file=str(bundle / "configs" / "inference.yaml"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        dataset_dir=str(tmp_path / "case_a.nii.gz"),
        output_dir=str(tmp_path / "run_labels"),
    )
    again = nib.load(tmp_path / "run_labels" / "case_a_seg.nii.gz")
    assert np.array_equal(np.asarray(again.dataobj), labels)


def test_tiny_study_writes_the_paper_table(tiny_segthor_datalist, tmp_path, capsys):
    """E2-1 and E2-4 (synthetic -> real fine-tune); the tiny datalist stands in for synthetic."""
    out = tmp_path / "study"
    study = {
        "real": str(tiny_segthor_datalist),
        "synthetic": str(tiny_segthor_datalist),
        "regimes": "E2-1,E2-4",
        "out": str(out),
        "test_cases": 1,
        "val_cases": 1,
        "max_epochs": 1,
        "finetune_epochs": 1,
        "overrides": {**TINY, "val_interval": 1, "batch_size": 2},
    }
    table = seg_study(**study)
    assert "| E2-1 |" in table and "| E2-4 |" in table and "unet3d" in table
    stages = sorted(p.name for p in (out / "unet3d").iterdir())
    assert stages == ["E2-1", "E2-2", "E2-4"]
    e24 = json.loads((out / "unet3d" / "E2-4" / "stage.json").read_text())
    assert e24["init"] == json.loads((out / "unet3d" / "E2-2" / "stage.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["real_test"]) & set(splits["real_train"] + splits["real_val"])
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "network,regime,label,dice,hd95_mm" and len(rows) == 1 + 2 * 5
    metrics = json.loads((out / "unet3d" / "E2-4" / "eval" / "metrics.json").read_text())
    assert metrics["n_cases"] == 1 and 0.0 <= metrics["dice"]["mean"] <= 1.0
    # a rerun keeps every finished stage
    capsys.readouterr()
    seg_study(**study)
    assert capsys.readouterr().out.count("finished before, kept") == 3
