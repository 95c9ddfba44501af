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
from monai.transforms import Compose, LoadImaged, SaveImaged

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
    "weights_scale",
    "weights_dataset",
    "output_dir",
    "device",
    "dataset_dir",
    "num_classes",
    "modality",
    "field_of_view",
    "ct_window",
    "mri_percentiles",
    "num_workers",
    "spatial_size",
    "z_framing",
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


def test_the_shipped_bundle_follows_the_model_zoo_rules(tmp_path):
    """What the MONAI model zoo's ci/verify_bundle.py checks, with no exemption: models/model.pt,
    LICENSE, a version with its changelog entry, verify_net_in_out on network_def and a
    TorchScript export of the shipped weights (inference.yaml alone) that computes the same."""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert (BUNDLE / "models" / "model.pt").is_file() and (BUNDLE / "LICENSE").is_file()
    assert meta["version"] in meta["changelog"]
    infer = str(CONFIGS / "inference.yaml")
    checks = {"meta_file": str(CONFIGS / "metadata.json"), "config_file": infer}
    verify_net_in_out("network_def", bundle_root=str(BUNDLE), **checks)
    ts = tmp_path / "model.ts"
    ckpt_export(
        "network_def", filepath=str(ts), ckpt_file=str(BUNDLE / "models" / "model.pt"), **checks
    )
    net = bundle_parser(BUNDLE, ["inference.yaml"], None, None).get_parsed_content("network_def")
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x), net.eval()(x), atol=1e-4)


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
    network; the keys they repeat are the listed ones, and each has one value (training may
    import more)."""
    train, infer = (
        ConfigParser.load_config_file(CONFIGS / f"{n}.yaml") for n in ("train", "inference")
    )
    assert set(train) & set(infer) == SHARED_KEYS
    assert set(infer["imports"]) <= set(train["imports"])
    assert [k for k in sorted(SHARED_KEYS - {"imports"}) if train[k] != infer[k]] == []


def test_the_base_configs_are_the_standard_scale_thorax_model():
    """standard.yaml and thorax.yaml restate the base: merging them changes no base value."""
    train = set(ConfigParser.load_config_file(CONFIGS / "train.yaml"))
    for stage in ("train.yaml", "inference.yaml"):
        base = bundle_parser(BUNDLE, [stage], None, None).config
        merged = bundle_parser(BUNDLE, [stage], "standard", "thorax").config
        assert {k: merged[k] for k in base} == base, stage
        assert merged.keys() - base.keys() <= train, stage  # training keys inference ignores


@pytest.mark.parametrize(
    "scale, dataset, pixdim, num_classes",
    [
        (None, None, [5.0, 5.0, 5.0], 5),  # the base configs: standard scale, thorax
        ("standard", "brain", [3.5, 3.5, 2.5], 4),
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
    for t in pre.transforms:  # as BundleInferTask does
        if isinstance(t, LoadImaged):
            t._loader.image_only = False
    # MONAI Label's request data: MONAI 1.6's Spacingd would call .update on image_path
    request = {"image": str(image_path), "image_path": str(image_path), "device": "cpu"}
    data = Compose(list(pre.transforms))(request)
    assert data["image_path"] == str(image_path)
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


def demo_heldout(folder, indices=(16, 17, 18)):
    """Cases ``indices`` of the thorax demo cohort (``medgen3d demo-data``, seed 0; the
    shipped weights saw cases 0-15) as a datalist; labels cover every axial slice."""
    from common.core.seeds import case_seed
    from common.data.datalists import write_datalist
    from common.data.labels import load_label_set
    from medgen3d.demo_data.thorax import make_thorax_case

    cases = []
    for k in indices:
        image, labels, affine = make_thorax_case(case_seed(0, k))
        name = f"thorax_{k:03d}.nii.gz"
        cases.append(
            {
                "image": save_nifti(image, affine, folder / "imagesTr" / name),
                "label": save_nifti(labels, affine, folder / "labelsTr" / name),
            }
        )
    return write_datalist(folder / "heldout.json", cases, load_label_set("segthor"), "CT", "h")


def test_inference_sees_the_grid_evaluation_sees(tmp_path):
    """Under labelled_range framing (the demo scale), inference (no label) brings a demo image
    onto the model grid and field of view that training and evaluation use: the same voxels and
    affine, not the whole image (training never sees shifted windows, so a network segments
    those badly)."""
    case = read_datalist(demo_heldout(tmp_path, [16]))["training"][0]
    evaluated = bundle_parser(BUNDLE, ["train.yaml"], "demo", None).get_parsed_content(
        "volume_transforms"
    )(dict(case))["image"]
    inferred = bundle_parser(BUNDLE, ["inference.yaml"], "demo", None).get_parsed_content(
        "preprocessing"
    )({"image": case["image"], "image_path": case["image"]})["image"]
    assert inferred.shape == evaluated.shape == (1, 32, 32, 32)
    assert torch.allclose(inferred.affine, evaluated.affine)
    assert torch.allclose(inferred.as_tensor(), evaluated.as_tensor(), atol=1e-5)


def per_label_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of labels 1..K-1 between two label volumes of one grid."""
    return [
        2.0 * np.sum((pred == k) & (truth == k)) / max(1, np.sum(pred == k) + np.sum(truth == k))
        for k in range(1, num_classes)
    ]


@pytest.mark.slow
def test_whole_image_inference_scores_what_evaluation_reports(tmp_path):
    """The shipped weights on three held-out demo cases: the label files that `run inference`
    writes (on each image's own grid and affine) score the Dice that `run evaluating` reports
    on that grid, within 0.02. Evaluation's Dice on the 5 mm model grid is a little higher: a
    coarser grid draws the thin organs worse (see docs/README.md, Geometry and metrics)."""
    datalist = demo_heldout(tmp_path / "data")
    files = {
        "meta_file": str(CONFIGS / "metadata.json"),
        "logging_file": str(CONFIGS / "logging.conf"),
        "ckpt_path": str(BUNDLE / "models" / "model.pt"),
    }
    bundle_run(
        "evaluating",
        config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
        datalist=str(datalist),
        eval_section="training",
        eval_dir=str(tmp_path / "eval"),
        **files,
    )
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    bundle_run(
        "inference",
        config_file=str(CONFIGS / "inference.yaml"),
        dataset_dir=str(datalist),
        output_dir=str(tmp_path / "labels"),
        **files,
    )
    scores = []
    for case in read_datalist(datalist)["training"]:
        truth = nib.load(case["label"])
        name = case["image"].rsplit("/", 1)[1].replace(".nii.gz", "_seg.nii.gz")
        pred = nib.load(tmp_path / "labels" / name)
        assert pred.shape == truth.shape and np.allclose(pred.affine, truth.affine, atol=1e-4)
        scores.append(per_label_dice(np.asarray(pred.dataobj), np.asarray(truth.dataobj), 5))
    inferred = float(np.mean(scores))
    own_grid, model_grid = evaluated["dice_own_grid"]["mean"], evaluated["dice"]["mean"]
    numbers = f"inference {inferred:.3f}, evaluating {own_grid:.3f} (model grid {model_grid:.3f})"
    assert abs(inferred - own_grid) <= 0.02, numbers
    assert inferred > 0.6, numbers  # whole images segmented (before the fix: 0.19)


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
    # MONAI Label 0.8.5 looks for a CheckpointLoader among the handlers exactly so: every
    # handler must be a dict (a bare "@train#steps" reference failed its /train/)
    assert not [t for t in handlers if t.get("_target_") == "CheckpointLoader"]
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
        "run",  # MONAI Label's default run id, without initialize or finalize
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
        val_interval=2,  # nor this: an "epoch" of 2 optimiser steps instead of 40, for speed
    )
    trained = torch.load(bundle / "models" / "resume.pt", weights_only=True)["model"]
    assert trained.keys() == pretrained.keys()
    assert all(torch.equal(trained[k], pretrained[k]) for k in pretrained)


def test_tiny_study_writes_the_paper_table(tiny_segthor_datalist, tmp_path, capsys):
    """E2-1 and E2-4 (synthetic -> real fine-tune), and E2-1 as long as E2-4 (the control);
    the tiny datalist stands in for synthetic."""
    out = tmp_path / "study"
    study = {
        "real": str(tiny_segthor_datalist),
        "synthetic": str(tiny_segthor_datalist),
        "regimes": "E2-1,E2-4",
        "out": str(out),
        "scale": "tiny",
        "max_iterations": 20,  # enough to learn the heart and the aorta
    }
    table = seg_study(**study)
    assert "| E2-1 |" in table and "| E2-4 |" in table and "unet3d" in table
    runs = out / "unet3d" / "seed0"
    stages = sorted(p.name for p in runs.iterdir())
    assert stages == ["E2-1", "E2-1-control", "E2-2", "E2-4"]
    e24 = json.loads((runs / "E2-4" / "stage.json").read_text())
    e22 = json.loads((runs / "E2-2" / "stage.json").read_text())
    assert e24["init"] == {k: v for k, v in e22.items() if k != "steps"}
    assert (e24["steps"], e22["steps"]) == (1, 20)  # finetune_iterations, max_iterations
    assert "| E2-1-control | 21 |" in table and "| E2-4 | 21 (20 + 1) |" in table
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["real_test"]) & set(splits["real_train"] + splits["real_val"])
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "network,regime,seed,steps,label,dice,hd95_mm" and len(rows) == 1 + 3 * 5
    # the E2-1 model segments its held-out case better than the network it started as
    configs = [str(CONFIGS / f"{c}.yaml") for c in ("train", "evaluate", "tiny")]
    untrained = tmp_path / "untrained"
    parser = bundle_parser(BUNDLE, ["train.yaml"], "tiny", None)
    torch.manual_seed(0)
    (untrained / "models").mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), untrained / "models/model.pt")
    test = {
        "bundle_root": str(untrained),
        "ckpt_dir": str(untrained / "models"),
        "datalist": str(out / "real_test.json"),
    }
    bundle_run("evaluating", config_file=configs, **test)
    before = json.loads((untrained / "eval" / "metrics.json").read_text())
    after = json.loads((runs / "E2-1" / "eval" / "metrics.json").read_text())
    assert after["n_cases"] == before["n_cases"] == 1
    assert after["dice"]["mean"] > before["dice"]["mean"] + 0.1, (before, after)
    # a rerun keeps every finished stage
    capsys.readouterr()
    seg_study(**study)
    assert capsys.readouterr().out.count("finished before, kept") == 4
