"""`medgen3d generate` with the shipped demo weights: paired, valid, resumable, seeded."""

import json

import nibabel as nib
import numpy as np

from common.data.validate import validate_datalist
from medgen3d.pairs import generate_pairs


def test_generate_one_pair_and_rerun_keeps_it(tmp_path):
    datalist = generate_pairs(1, tmp_path / "gen", seed=3, steps=2)
    assert validate_datalist(datalist) == []
    case = json.loads(datalist.read_text())["training"][0]
    image = nib.load(datalist.parent / case["image"])
    label = nib.load(datalist.parent / case["label"])
    assert image.shape == label.shape == (32, 32, 32)
    np.testing.assert_allclose(image.affine, label.affine)
    assert (datalist.parent / case["image_sequence"]).exists() and "seed" in case
    before = (datalist.parent / case["image"]).stat().st_mtime_ns
    generate_pairs(1, tmp_path / "gen", seed=3, steps=2)  # rerun: nothing is redone
    assert (datalist.parent / case["image"]).stat().st_mtime_ns == before
