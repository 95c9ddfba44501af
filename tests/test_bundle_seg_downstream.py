"""The seg_downstream bundle: training through `python -m monai.bundle`, MONAI's checks, what
MONAI Label does with train.yaml and inference.yaml (each read alone), the presets' geometry
and a tiny downstream study (every run through the bundle's configs, tiny preset)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO, monai_bundle, overrides
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from monai.bundle import run as bundle_run
from monai.transforms import Compose, SaveImaged

from common.core.bundle_configs import bundle_parser
from common.core.io import save_nifti
from common.data.datalists import read_datalist
from common.seg.study import seg_study

BUNDLE = REPO / "bundles" / "seg_downstream"
CONFIGS = BUNDLE / "configs"
# what train.yaml and inference.yaml both need, since MONAI Label reads each alone
SHARED_KEYS = {
    "imports",
    "bundle_root",
    "output_dir",
    "device",
    "dataset_dir",
    "num_classes",
    "modality",
    "field_of_view",
    "num_workers",
    "spatial_size",
    "z_resample_mm",
    "roi_size",
    "pixdim",
    "network_name",
    "network_sizes",
    "network_def",
    "network",
    "inferer",
}


@pytest.mark.slow
def test_train_verify_and_export(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {"bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)}
    configs = "['configs/train.yaml','configs/tiny.yaml']"
    # 3 training cases in batches of 2, 2 epochs, validation on the 4th case after each
    out = monai_bundle("run", "training", "--config_file", configs, *overrides(values), cwd=BUNDLE)
    assert out.count("val_mean_dice") >= 2
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    assert any((root / "outputs").glob("events.out.tfevents.*"))  # TensorBoard
    # MONAI's checks (the functions behind `python -m monai.bundle ...`, run in this process)
    meta = str(CONFIGS / "metadata.json")
    verify_net_in_out("network_def", meta_file=meta, config_file=str(CONFIGS / "inference.yaml"))
    config_files = [str(CONFIGS / f"{c}.yaml") for c in ("train", "tiny")]
    ts = tmp_path / "model.ts"
    ckpt_export(
        "network_def",
        filepath=str(ts),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=meta,
        config_file=config_files,
    )
    net = bundle_parser(BUNDLE, ["train.yaml"], "tiny", None).get_parsed_content("network_def")
    net.load_state_dict(state)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        scripted, eager = torch.jit.load(str(ts))(x), net.eval()(x)
    assert scripted.shape == (1, 5, 16, 16, 16) and torch.allclose(scripted, eager, atol=1e-5)


def test_metadata_names_every_label():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
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


def test_train_and_inference_configs_repeat_few_keys_with_the_same_values():
    """MONAI Label reads train.yaml and inference.yaml each alone, so both describe the
    network; the keys they repeat are the listed ones, and each has one value."""
    train, infer = (
        ConfigParser.load_config_file(CONFIGS / f"{n}.yaml") for n in ("train", "inference")
    )
    assert set(train) & set(infer) == SHARED_KEYS
    assert [k for k in sorted(SHARED_KEYS) if train[k] != infer[k]] == []


def test_the_base_configs_are_the_demo_scale_thorax_model():
    """demo.yaml and thorax.yaml restate the base: merging them changes no base value."""
    train = set(ConfigParser.load_config_file(CONFIGS / "train.yaml"))
    for stage in ("train.yaml", "inference.yaml"):
        base = bundle_parser(BUNDLE, [stage], None, None).config
        merged = bundle_parser(BUNDLE, [stage], "demo", "thorax").config
        assert {k: merged[k] for k in base} == base, stage
        assert merged.keys() - base.keys() <= train, stage  # training keys inference ignores


@pytest.mark.parametrize(
    "scale, dataset, pixdim, num_classes",
    [
        (None, None, [10.0, 10.0, 10.0], 5),  # the base configs: demo scale, thorax
        ("demo", "thorax", [10.0, 10.0, 10.0], 5),
        ("demo", "brain", [7.0, 7.0, 5.0], 4),
        ("paper", "thorax", [2.5, 2.5, 2.5], 5),
        ("tiny", None, [6.0, 6.0, 5.0], 5),
    ],
)
def test_presets_give_the_model_geometry(scale, dataset, pixdim, num_classes):
    for stage in ("train.yaml", "inference.yaml"):
        parser = bundle_parser(BUNDLE, [stage], scale, dataset)
        assert parser.get_parsed_content("pixdim") == pixdim, stage
        assert parser.get_parsed_content("num_classes") == num_classes, stage


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
    shutil.copytree(CONFIGS, bundle / "configs")
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


def test_monai_label_style_training_loads_weights_into_network(tiny_segthor_datalist, tmp_path):
    """What MONAI Label's BundleTrainTask does with configs/train.yaml (read alone): it inserts
    CheckpointLoader(load_dict={"model": "$@network"}) and overrides the data and epochs."""
    bundle = tmp_path / "seg_downstream"
    shutil.copytree(CONFIGS, bundle / "configs")
    config = bundle / "configs" / "train.yaml"
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.config.update({"bundle_root": str(bundle)})
    torch.manual_seed(123)  # weights that training's own seeded start does not have
    pretrained = parser.get_parsed_content("network_def").state_dict()
    (bundle / "models").mkdir()
    torch.save(pretrained, bundle / "models" / "model.pt")
    handlers = parser.get("train#handlers", [])
    loader = {
        "_target_": "CheckpointLoader",
        "load_path": str(bundle / "models" / "model.pt"),
        "load_dict": {"model": "$@network"},
        "strict": False,
    }
    cases = [
        {"image": c["image"], "label": c["label"]}
        for c in read_datalist(tiny_segthor_datalist)["training"]
    ]
    bundle_run(
        "training",
        init_id=None,
        final_id=None,
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(config),
        bundle_root=str(bundle),
        **{
            "train#trainer#max_epochs": 1,
            "train#dataset#data": cases[:3],
            "device": torch.device("cpu"),
            "train#handlers": [loader, *handlers],
            "validate#dataset#data": cases[3:],
        },
        lr=0.0,  # not MONAI Label's: so the weights after one epoch are the loaded ones
    )
    trained = torch.load(bundle / "models" / "resume.pt", weights_only=True)["model"]
    assert trained.keys() == pretrained.keys()
    assert all(torch.equal(trained[k], pretrained[k]) for k in pretrained)


def test_tiny_study_writes_the_paper_table(tiny_segthor_datalist, tmp_path, capsys):
    """E2-1 and E2-4 (synthetic -> real fine-tune); the tiny datalist stands in for synthetic."""
    out = tmp_path / "study"
    study = {
        "real": str(tiny_segthor_datalist),
        "synthetic": str(tiny_segthor_datalist),
        "regimes": "E2-1,E2-4",
        "out": str(out),
        "scale": "tiny",
        "max_epochs": 20,  # 1 iteration each: enough to learn the heart and the aorta
    }
    table = seg_study(**study)
    assert "| E2-1 |" in table and "| E2-4 |" in table and "unet3d" in table
    stages = sorted(p.name for p in (out / "unet3d").iterdir())
    assert stages == ["E2-1", "E2-2", "E2-4"]
    e24 = json.loads((out / "unet3d" / "E2-4" / "stage.json").read_text())
    assert e24["init"] == json.loads((out / "unet3d" / "E2-2" / "stage.json").read_text())
    assert e24["epochs"] == 1 and e24["init"]["epochs"] == 20  # finetune_epochs, max_epochs
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["real_test"]) & set(splits["real_train"] + splits["real_val"])
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "network,regime,label,dice,hd95_mm" and len(rows) == 1 + 2 * 5
    # the E2-1 model segments its held-out case better than the network it started as
    configs = [str(CONFIGS / f"{c}.yaml") for c in ("train", "evaluate", "tiny")]
    untrained = tmp_path / "untrained"
    parser = bundle_parser(BUNDLE, ["train.yaml"], "tiny", None)
    torch.manual_seed(0)
    (untrained / "models").mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), untrained / "models/model.pt")
    test = {"bundle_root": str(untrained), "datalist": str(out / "real_test.json")}
    bundle_run("evaluating", config_file=configs, **test)
    before = json.loads((untrained / "eval" / "metrics.json").read_text())
    after = json.loads((out / "unet3d" / "E2-1" / "eval" / "metrics.json").read_text())
    assert after["n_cases"] == before["n_cases"] == 1
    assert after["dice"]["mean"] > before["dice"]["mean"] + 0.1, (before, after)
    # a rerun keeps every finished stage
    capsys.readouterr()
    seg_study(**study)
    assert capsys.readouterr().out.count("finished before, kept") == 3
