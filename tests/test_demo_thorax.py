"""Synthetic thorax phantoms: grid, determinism, labels, HU plausibility, anatomy, cohort files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.core.seeds import case_seed
from common.data.datalists import read_datalist
from common.data.labels import load_label_set
from medgen3d.demo_data.thorax import make_thorax_case, make_thorax_cohort

SHAPE = (48, 48, 24)  # small and coarse: same 384 x 384 x 320 mm field of view as the default
SPACING = (8.0, 8.0, 40 / 3)
CONVENTIONS = ("segthor", "structseg")


def _case(seed: int, convention: str = "segthor"):
    return make_thorax_case(seed, convention, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def cases() -> dict[str, list]:
    return {c: [_case(seed, c) for seed in range(4)] for c in CONVENTIONS}


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_shapes_dtypes_and_ras_affine(cases):
    image, labels, affine = cases["segthor"][0]
    assert image.shape == labels.shape == SHAPE
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_allclose(np.diag(affine)[:3], SPACING)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert -1024 <= image.min() and image.max() <= 2000
    assert image[:3, :3].mean() < -900  # air around the body
    assert image.max() > 300  # bone


def test_same_seed_same_case_other_seed_differs():
    a, b = _case(7), _case(7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = _case(8)
    assert not np.array_equal(a[0], other[0])
    assert not np.array_equal(a[1], other[1])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_label_present_and_single_components_connected(cases, convention):
    label_set = load_label_set(convention)
    for _, labels, _ in cases[convention]:
        assert set(np.unique(labels)) == set(range(label_set.num_classes))
        for name in label_set.single_component:
            _, n = ndimage.label(labels == label_set.names.index(name))
            assert n == 1, f"{convention} {name} has {n} components"


def _mean_hu(image, labels, *organs) -> float:
    names = load_label_set("structseg").names
    return float(image[np.isin(labels, [names.index(o) for o in organs])].mean())


def test_hu_plausible_per_organ(cases):
    for image, labels, _ in cases["structseg"]:
        assert _mean_hu(image, labels, "left_lung", "right_lung") < -600
        assert 0 < _mean_hu(image, labels, "heart") < 100
        assert _mean_hu(image, labels, "trachea") < -400
        assert -100 < _mean_hu(image, labels, "esophagus") < 100
        assert -50 < _mean_hu(image, labels, "spinal_cord") < 250  # partial volume with bone


def test_organs_depend_on_slice_position(cases):
    names = load_label_set("structseg").names
    depth = SHAPE[2]
    for _, labels, _ in cases["structseg"]:
        heart = labels == names.index("heart")
        trachea = labels == names.index("trachea")
        lungs = np.isin(labels, [names.index("left_lung"), names.index("right_lung")])
        assert not heart[..., -depth // 4 :].any()  # no heart near the shoulders
        assert not trachea[..., : depth // 3].any()  # trachea only above the carina
        assert _centroid(heart)[2] < _centroid(trachea)[2]
        area = lungs.sum(axis=(0, 1))
        assert area[0] < 0.5 * area.max() and area[-1] < 0.5 * area.max()  # bases, apices


def test_left_right_anterior_posterior(cases):
    names = load_label_set("structseg").names
    for _, labels, _ in cases["structseg"]:
        left, right, heart, cord = (
            _centroid(labels == names.index(n))
            for n in ("left_lung", "right_lung", "heart", "spinal_cord")
        )
        assert left[0] < right[0]  # RAS+: the patient's left has the smaller x index
        assert heart[0] < (SHAPE[0] - 1) / 2  # heart left of the midline
        assert heart[1] > cord[1]  # heart anterior to the spinal cord


def test_bad_arguments():
    with pytest.raises(ValueError, match="convention"):
        make_thorax_case(0, "brats")
    with pytest.raises(ValueError, match="field of view"):
        make_thorax_case(0, shape=SHAPE)  # 3 mm voxels: 144 mm is too small


def test_cohort_files_and_datalist(tmp_path):
    datalist = make_thorax_cohort(tmp_path, 2, seed=3, shape=SHAPE, spacing=SPACING)
    assert datalist == tmp_path / "datalist.json"
    doc = read_datalist(datalist)
    assert doc["modality"] == {"0": "CT"} and doc["name"] == "thorax_demo"
    assert doc["seed"] == 3 and doc["convention"] == "segthor"
    assert doc["labels"] == load_label_set("segthor").channel_def
    assert len(doc["training"]) == doc["numTraining"] == 2
    assert json.loads((tmp_path / "labels.json").read_text()) == doc["labels"]
    image, labels, affine = _case(case_seed(3, 1))
    case = doc["training"][1]
    assert case["image"].endswith("imagesTr/thorax_001.nii.gz")
    img, lab = nib.load(case["image"]), nib.load(case["label"])
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), image)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), labels)
    np.testing.assert_allclose(img.affine, affine)
    assert lab.header["descrip"].tobytes().startswith(b"labels: 1 esophagus,2 heart")


def test_case_k_independent_of_cohort_size(tmp_path):
    make_thorax_cohort(tmp_path / "two", 2, seed=5, shape=SHAPE, spacing=SPACING)
    make_thorax_cohort(tmp_path / "three", 3, seed=5, shape=SHAPE, spacing=SPACING)
    for sub in ("imagesTr", "labelsTr"):
        a = nib.load(tmp_path / "two" / sub / "thorax_001.nii.gz").get_fdata()
        b = nib.load(tmp_path / "three" / sub / "thorax_001.nii.gz").get_fdata()
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "three" / "imagesTr" / "thorax_002.nii.gz").exists()
