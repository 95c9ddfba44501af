"""The standard scale preset: a 64-cubed grid over the dataset's field of view (thorax 5 mm
isotropic, brain 3.5 x 3.5 x 2.5 mm) in the field_of_view framing, for every bundle stage;
volumes brought to it keep their physical size, centred on the labels."""

import nibabel as nib
import numpy as np
import pytest
import torch

from common.core.bundle_configs import SCALES, bundle_parser
from common.core.io import save_nifti
from common.data.datalists import read_datalist, write_datalist
from common.data.labels import load_label_set
from common.images.generation import export_model_space
from medgen3d.bundles import BUNDLES, EVALUATE_STAGES, NAMES, TRAIN_STAGES

SPACING = {"thorax": [5.0, 5.0, 5.0], "brain": [3.5, 3.5, 2.5]}
STAGES = [
    *[(b, ("inference.yaml",)) for b in NAMES],
    *[(s.bundle, s.configs) for s in (*TRAIN_STAGES.values(), *EVALUATE_STAGES.values())],
]


@pytest.mark.parametrize("dataset", ["thorax", "brain"])
@pytest.mark.parametrize("bundle, files", STAGES)
def test_every_stage_parses_the_standard_grid(bundle, files, dataset):
    parser = bundle_parser(BUNDLES / bundle, files, "standard", dataset)
    assert parser.get_parsed_content("spatial_size") == [64, 64, 64]
    assert parser["z_framing"] == "field_of_view"
    assert parser.get_parsed_content("pixdim") == SPACING[dataset]
    if bundle == "mask_diffusion":  # generated masks carry the grid's own spacing
        assert parser.get_parsed_content("output_pixdim") == SPACING[dataset]
        assert (parser["m"], parser["n"]) == (16, 4)


@pytest.mark.parametrize("bundle", NAMES)
def test_the_standard_networks_build_and_the_small_scales_keep_their_framing(bundle):
    assert "standard" in SCALES
    parser = bundle_parser(BUNDLES / bundle, ["inference.yaml"], "standard", "thorax")
    net = parser.get_parsed_content("network_def")
    assert sum(p.numel() for p in net.parameters()) > 0
    if bundle == "image_synthesis":
        parser.get_parsed_content("refiner_def")
    if bundle == "seg_downstream":  # every network the study may train fits the 64^3 grid
        for name in ("unet2d", "unetr", "swinunetr"):
            parser["network_name"] = name
            parser.get_parsed_content("network_def", lazy=False)
    for scale in ("tiny", "demo"):  # the demo weights: labelled_range
        framing = bundle_parser(BUNDLES / bundle, ["inference.yaml"], scale, None)["z_framing"]
        assert framing == "labelled_range", scale
    base = bundle_parser(BUNDLES / bundle, ["inference.yaml"], None, None)  # standard
    assert (base["z_framing"], base["spatial_size"]) == ("field_of_view", [64, 64, 64])


def thorax_like_case(folder, name="case"):
    """A 400 mm long CT at 2 x 2 x 2.5 mm (100 x 100 x 160) whose labels (a heart-like blob and
    a tube) span 200 mm: slices 70..149, off the scan's middle."""
    shape = (100, 100, 160)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    label[((x - 50) ** 2 + (y - 50) ** 2 < 15**2) & (z >= 70) & (z < 110)] = 2
    label[((x - 45) ** 2 + (y - 70) ** 2 < 3**2) & (z >= 100) & (z < 150)] = 1
    image = np.where(label > 0, 40.0, -900.0).astype(np.float32) + z.astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-100.0, -100.0, -200.0]
    return {
        "image": save_nifti(image, affine, folder / "imagesTr" / f"{name}.nii.gz"),
        "label": save_nifti(label, affine, folder / "labelsTr" / f"{name}.nii.gz"),
    }


def test_standard_preprocessing_keeps_millimetres_and_centres_the_labels(tmp_path):
    """200 mm of labels in a 400 mm scan: 40 labelled slices of 5 mm, in the grid's middle;
    the same case exported to the model grid (as image_synthesis does for real masks) is
    written with that 5 mm affine."""
    case = thorax_like_case(tmp_path)
    parser = bundle_parser(BUNDLES / "mask_diffusion", ["inference.yaml"], "standard", "thorax")
    out = parser.get_parsed_content("preprocessing")(dict(case))
    label = out["label"][0]
    assert label.shape == (64, 64, 64)
    zs = np.flatnonzero(label.reshape(-1, 64).amax(0).numpy() > 0)
    assert len(zs) == 40 and zs[0] == 12 and zs[-1] == 51
    np.testing.assert_allclose(np.diag(out["label"].affine)[:3], [5.0, 5.0, 5.0])
    datalist = write_datalist(
        tmp_path / "datalist.json", [case], load_label_set("segthor"), "CT", "t"
    )
    image_cfg = bundle_parser(BUNDLES / "image_synthesis", ["inference.yaml"], "standard", "thorax")
    exported = export_model_space(
        datalist, image_cfg.get_parsed_content("preprocessing"), tmp_path / "grid"
    )
    written = nib.load(read_datalist(exported)["training"][0]["label"])
    assert written.shape == (64, 64, 64)
    np.testing.assert_allclose(written.header.get_zooms(), [5.0, 5.0, 5.0])
    assert np.array_equal(np.asarray(written.dataobj), label.numpy().astype(np.uint8))


def test_standard_seg_inference_matches_training_on_a_grid_sized_scan(tmp_path):
    """A 320 mm scan whose labels span it: inference (no label) sees the voxels and affine that
    training and evaluation see, one 64-slice window."""
    shape = (128, 128, 64)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = (((x - 64) ** 2 + (y - 60) ** 2) < 20**2).astype(np.uint8)
    image = np.where(label > 0, 40.0, -900.0).astype(np.float32) + 3 * z
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    case = {
        "image": save_nifti(image, affine, tmp_path / "img.nii.gz"),
        "label": save_nifti(label, affine, tmp_path / "lab.nii.gz"),
    }
    seg = BUNDLES / "seg_downstream"
    trained = bundle_parser(seg, ["train.yaml"], "standard", "thorax").get_parsed_content(
        "volume_transforms"
    )(dict(case))["image"]
    inferred = bundle_parser(seg, ["inference.yaml"], "standard", "thorax").get_parsed_content(
        "preprocessing"
    )({"image": case["image"]})["image"]
    assert inferred.shape == trained.shape == (1, 64, 64, 64)
    assert torch.allclose(inferred.affine, trained.affine)
    assert torch.allclose(inferred.as_tensor(), trained.as_tensor(), atol=1e-5)
