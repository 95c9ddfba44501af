"""Mask-image agreement on constructed volumes where the answer is known: a segmenter replaced
by a function that reads the label from the intensity gives Dice 1 on faithful pairs and the
known overlap on a pair whose mask does not match its image; medians are the constructed
intensities; `medgen3d agreement` writes its files through the bundle's inference config."""

import json
import math

import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.data import MetaTensor
from torch import nn

from common.core.bundle_configs import bundle_parser
from common.core.io import save_nifti
from common.data.datalists import write_datalist
from common.data.labels import load_label_set
from common.images.qc import paired_cases
from common.seg.agreement import Segmenter, case_dice, compare, markdown_table, measure
from common.seg.networks import make_network
from medgen3d.cli import main

SEGTHOR = load_label_set("segthor")  # background, esophagus, heart, trachea, aorta
SEG_BUNDLE = REPO / "bundles" / "seg_downstream"


def _hu(label: np.ndarray) -> np.ndarray:
    """The constructed image: label k at 100 k - 500 HU (background -500)."""
    return (100.0 * label - 500.0).astype(np.float32)


def _label(shape, shrink_heart: bool = False) -> np.ndarray:
    """Blocks of esophagus (1), heart (2), trachea (3); no aorta (4)."""
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:14] = 1
    label[8:14, 4:12, 4:12] = 2 if not shrink_heart else 0
    if shrink_heart:
        label[8:14, 4:12, 4:8] = 2  # half of the heart block
    label[4:8, 10:14, 1:15] = 3
    return label


def _datalist(folder, cases, pixdim):
    """Write ``{name: (image label array, mask array)}`` as pairs on a grid of ``pixdim``."""
    affine = np.diag([*pixdim, 1.0])
    entries = []
    for name, (image_label, mask) in cases.items():
        image, label = folder / f"{name}_img.nii.gz", folder / f"{name}_lab.nii.gz"
        save_nifti(_hu(image_label), affine, image)
        save_nifti(mask, affine, label)
        entries.append({"image": image, "label": label, "case": name})
    return write_datalist(folder / "datalist.json", entries, SEGTHOR, "CT", folder.name)


class ReadsTheLabel(nn.Module):
    """A segmenter that knows the construction: class k where the intensity is 100 k - 500 HU
    (model units (100 k - 500) / 1000 in the CT window [-1000, 1000])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = (100.0 * torch.arange(SEGTHOR.num_classes) - 500.0) / 1000.0
        return -(x - levels.reshape(1, -1, 1, 1, 1)).abs()


@pytest.fixture
def tiny_grid():
    """The seg_downstream tiny preset's preprocessing and inferer, its pixdim and grid size."""
    parser = bundle_parser(SEG_BUNDLE, ["inference.yaml"], "tiny", None, {"device": "cpu"})
    segmenter = Segmenter(
        ReadsTheLabel(),
        parser.get_parsed_content("preprocessing"),
        parser.get_parsed_content("inferer"),
        torch.device("cpu"),
    )
    return segmenter, parser.get_parsed_content("pixdim"), parser.get_parsed_content("spatial_size")


def test_case_dice_is_one_for_the_label_itself_and_the_overlap_otherwise(tmp_path):
    shape = (16, 16, 16)
    label = _label(shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_nifti(label, affine, tmp_path / "lab.nii.gz")
    same = MetaTensor(torch.as_tensor(label[None].astype(np.int64)), affine=affine)
    dice = case_dice(same, str(tmp_path / "lab.nii.gz"), SEGTHOR)
    assert dice[:3] == [1.0, 1.0, 1.0] and math.isnan(dice[3])  # no aorta: left out
    half = MetaTensor(torch.as_tensor(_label(shape, True)[None].astype(np.int64)), affine=affine)
    assert case_dice(half, str(tmp_path / "lab.nii.gz"), SEGTHOR)[1] == pytest.approx(2 / 3)


def test_case_dice_brings_a_finer_label_file_to_the_prediction_grid(tmp_path):
    fine = np.zeros((16, 16, 16), np.uint8)
    fine[4:12, 2:10, 6:14] = 2
    save_nifti(fine, np.eye(4), tmp_path / "fine.nii.gz")  # 1 mm voxels
    coarse = np.zeros((1, 8, 8, 8), np.int64)
    coarse[0, 2:6, 1:5, 3:7] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 0.5  # the centre of coarse voxel 0 between fine voxels 0 and 1
    prediction = MetaTensor(torch.as_tensor(coarse), affine=affine)
    assert case_dice(prediction, str(tmp_path / "fine.nii.gz"), SEGTHOR)[1] == 1.0


def test_agreement_of_faithful_and_unfaithful_pairs_on_known_volumes(tmp_path, tiny_grid):
    segmenter, pixdim, size = tiny_grid
    shape = tuple(int(s) for s in size)
    label, half = _label(shape), _label(shape, shrink_heart=True)
    (tmp_path / "real").mkdir()
    (tmp_path / "syn").mkdir()
    real = _datalist(tmp_path / "real", {"r0": (label, label), "r1": (label, label)}, pixdim)
    # s0 is faithful; s1's image shows the whole heart block, its mask only half of it
    syn = _datalist(tmp_path / "syn", {"s0": (label, label), "s1": (label, half)}, pixdim)
    measured = [measure(segmenter.predict, paired_cases(d)[0], SEGTHOR) for d in (syn, real)]
    table = compare(*measured, unit="HU")["labels"]
    assert table["heart"]["dice_real"] == 1.0 and table["esophagus"]["dice_synthetic"] == 1.0
    assert table["heart"]["dice_synthetic"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert table["heart"]["ratio"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert table["aorta"]["dice_real"] is None and table["aorta"]["ratio"] is None
    for k, name in enumerate(("esophagus", "heart", "trachea"), 1):  # 100 k - 500 HU inside
        assert table[name]["median_synthetic"] == table[name]["median_real"] == 100 * k - 500
        assert table[name]["median_difference"] == 0.0


def test_agreement_command_writes_json_and_markdown(tmp_path, tiny_grid, capsys):
    _, pixdim, size = tiny_grid
    shape = tuple(int(s) for s in size)
    label = _label(shape)
    for folder in ("real", "syn"):
        (tmp_path / folder).mkdir()
    real = _datalist(tmp_path / "real", {"r0": (label, label)}, pixdim)
    syn = _datalist(tmp_path / "syn", {"s0": (label, label), "s1": (label, label)}, pixdim)
    sizes = bundle_parser(SEG_BUNDLE, ["inference.yaml"], "tiny", None)["network_sizes"]
    torch.manual_seed(0)
    network = make_network("unet3d", SEGTHOR.num_classes, shape, sizes)
    torch.save(network.state_dict(), tmp_path / "seg.pt")
    argv = ["agreement", "--segmenter", str(tmp_path / "seg.pt"), "--synthetic", str(syn)]
    main([*argv, "--real", str(real), "--out", str(tmp_path / "out"), "--scale", "tiny"])
    assert "| heart |" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert result["n_cases"] == {"synthetic": 2, "real": 1}
    assert result["labels"]["trachea"]["median_real"] == -200.0
    assert 0.0 <= result["labels"]["heart"]["dice_synthetic"] <= 1.0
    assert len(result["cases"]["synthetic"]) == 2
    assert "| trachea |" in (tmp_path / "out" / "agreement.md").read_text()


def test_medians_are_shown_in_hu_or_to_three_figures_of_image_units():
    measured = {"dice": {"gm": 0.8}, "median": {"gm": 0.6753}}
    real = {"dice": {"gm": 0.9}, "median": {"gm": 0.6489}}
    mri = markdown_table(compare(measured, real, unit="image units")).splitlines()[-1]
    assert mri.endswith("| 0.675 | 0.649 | +0.0264 |")
    measured["median"]["gm"], real["median"]["gm"] = 36.4, -756.2
    ct = markdown_table(compare(measured, real, unit="HU")).splitlines()[-1]
    assert ct.endswith("| 36 | -756 | +793 |")
