"""Shared test helpers: tiny NIfTI pairs written in tmp folders."""

from __future__ import annotations

import numpy as np
import pytest

from common.io import save_nifti


@pytest.fixture
def smooth_ct_pair(tmp_path):
    """A 40x36x20 CT-like pair with a flipped-x, anisotropic affine; labels 1 and 2."""
    shape = (40, 36, 20)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = (200 * np.sin(x / 6.0) + 100 * np.cos(y / 5.0) + 10 * z - 300).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[10:30, 8:28, 5:15] = 1
    label[15:20, 12:18, 7:12] = 2
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10, 20, 30]
    save_nifti(image, affine, tmp_path / "img.nii.gz")
    save_nifti(label, affine, tmp_path / "lab.nii.gz")
    return {
        "image": str(tmp_path / "img.nii.gz"),
        "label": str(tmp_path / "lab.nii.gz"),
        "array": image,
        "label_array": label,
        "affine": affine,
    }
