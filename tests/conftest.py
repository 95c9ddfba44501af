"""Shared test helpers: tiny NIfTI pairs written in tmp folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.core.io import save_nifti


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


@pytest.fixture(scope="session")
def tiny_segthor_datalist(tmp_path_factory):
    """Four 40x40x24 CT cases with the four SegTHOR labels as tubes and a blob; a datalist."""
    from common.data.datalists import write_datalist
    from common.data.labels import load_label_set

    out = tmp_path_factory.mktemp("tiny_segthor")
    rng = np.random.default_rng(0)
    shape = (40, 40, 24)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cases = []
    for i in range(4):
        label = np.zeros(shape, np.uint8)
        r = 6 + rng.integers(0, 3) + 2 * np.sin(z / 5)
        label[((x - 20) ** 2 + (y - 20) ** 2 < r**2) & (z > 3) & (z < 20)] = 2
        label[((x - 12) ** 2 + (y - 22) ** 2 < 4) & (z > 2)] = 1
        label[((x - 28) ** 2 + (y - 18) ** 2 < 6) & (z > 8)] = 3
        label[((x - 20) ** 2 + (y - 30) ** 2 < 5) & (z < 22)] = 4
        image = (label.astype(np.float32) * 100 - 500 + rng.normal(0, 20, shape)).astype(np.int16)
        affine = np.diag([3.0, 3.0, 5.0, 1.0])
        save_nifti(image, affine, out / "imagesTr" / f"c{i}.nii.gz")
        save_nifti(label, affine, out / "labelsTr" / f"c{i}.nii.gz")
        cases.append(
            {"image": out / "imagesTr" / f"c{i}.nii.gz", "label": out / "labelsTr" / f"c{i}.nii.gz"}
        )
    return write_datalist(out / "datalist.json", cases, load_label_set("segthor"), "CT", "tiny")


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to thread contention on a busy machine
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
