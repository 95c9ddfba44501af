"""The brain MRI demo cohort: real MNI152 anatomy, warped per case, with tissue labels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from common.core.io import read_json
from common.core.seeds import case_seed
from common.data.datalists import datalist_label_set, datalist_modality, read_datalist
from medgen3d.demo_data.brain import make_brain_case, make_brain_cohort

SEED = 7


@pytest.fixture(scope="module")
def case():
    return make_brain_case(0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_brain_cohort(tmp_path_factory.mktemp("brain2"), n_cases=2, seed=SEED)


def test_case_shape_dtype_affine(case):
    image, labels, affine = case
    assert image.ndim == 3 and image.shape == labels.shape
    assert image.size < 1_500_000
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_array_equal(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # cropped from the 2 mm MNI grid (origin -98, -134, -72): whole voxels apart
    np.testing.assert_array_equal((affine[:3, 3] - [-98, -134, -72]) % 2, 0)
    centroid = affine @ np.r_[np.argwhere(labels > 0).mean(0), 1]
    assert abs(centroid[0]) < 10  # the brain straddles the midline x = 0 mm
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() < 2
    assert (image[labels == 0] == 0).all()  # skull-stripped


def test_same_seed_same_case_other_seed_differs(case):
    image, labels, affine = make_brain_case(0)
    np.testing.assert_array_equal(image, case[0])
    np.testing.assert_array_equal(labels, case[1])
    np.testing.assert_array_equal(affine, case[2])
    other = make_brain_case(1)
    assert not np.array_equal(other[1], labels)
    assert not np.allclose(other[0], image)


def test_labels_present_and_plausible(case):
    _, labels, _ = case
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    brain = (labels > 0).sum()
    csf, gm, wm = ((labels == k).sum() / brain for k in (1, 2, 3))
    assert wm > 0.2 and gm > 0.2 and csf > 0.03
    assert ndi.label(labels == 3)[1] == 1  # white matter is declared single-component


def test_intensities_ordered_as_t1(case):
    image, labels, _ = case
    csf, gm, wm = (image[labels == k].mean() for k in (1, 2, 3))
    assert wm > gm > csf


def test_cohort_files_and_datalist(cohort):
    doc = read_datalist(cohort)
    assert datalist_modality(doc) == "MRI"
    assert datalist_label_set(doc).names == ("background", "csf", "gray_matter", "white_matter")
    assert doc["seed"] == SEED and len(doc["training"]) == 2
    assert read_json(cohort.parent / "labels.json") == {
        "0": "background",
        "1": "csf",
        "2": "gray_matter",
        "3": "white_matter",
    }
    for i, entry in enumerate(doc["training"]):
        assert entry["image"].endswith(f"imagesTr/brain_{i:03d}.nii.gz")
        image, labels = nib.load(entry["image"]), nib.load(entry["label"])
        assert image.shape == labels.shape
        assert labels.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, labels.affine)
        assert b"gray_matter" in labels.header["descrip"].tobytes()
        expected = make_brain_case(case_seed(SEED, i))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected[0])
        np.testing.assert_array_equal(np.asanyarray(labels.dataobj), expected[1])


def test_case_independent_of_cohort_size(cohort, tmp_path):
    single = read_datalist(make_brain_cohort(tmp_path, n_cases=1, seed=SEED))["training"]
    pair = read_datalist(cohort)["training"]
    assert len(single) == 1
    for key in ("image", "label"):
        a, b = nib.load(single[0][key]), nib.load(pair[0][key])
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        make_brain_case(0, resolution=3)
    with pytest.raises(ValueError, match="n_cases"):
        make_brain_cohort("/nonexistent", n_cases=0)
