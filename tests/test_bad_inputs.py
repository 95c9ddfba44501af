"""Every kind of bad input through the three doors a user opens: `medgen3d validate`, a
training entry (the bundle config's `split`) and `medgen3d seg-study`. Each must stop with a
message naming the bad file (`FILE: problem. fix`), and no input file may change."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.bundle import ConfigParser

from common.core.errors import find_data_error
from common.core.io import save_nifti
from common.data.datalists import write_datalist
from common.data.labels import load_label_set
from medgen3d.cli import main

SHAPE = (16, 16, 12)
AFFINE = np.diag([3.0, 3.0, 5.0, 1.0])
TRAIN = [  # the demo scale: a 32^3 grid at (10, 10, 5) mm
    REPO / "bundles" / "mask_diffusion" / "configs" / c
    for c in ("inference.yaml", "train.yaml", "demo.yaml")
]


def _volumes(affine=AFFINE, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, np.uint8)
    label[4:12, 4:12, 2:10] = 2
    label[6:9, 6:9, 3:9] = 1
    image = (label * 100.0 - 500.0).astype(np.float32)
    return image, label


def _good(root: Path) -> Path:
    """Two valid CT cases and their datalist under ``root``."""
    cases = []
    for i in range(2):
        image, label = _volumes()
        cases.append(
            {
                "image": save_nifti(image, AFFINE, root / "images" / f"c{i}.nii.gz"),
                "label": save_nifti(label, AFFINE, root / "labels" / f"c{i}.nii.gz"),
            }
        )
    return write_datalist(root / "datalist.json", cases, load_label_set("segthor"), "CT", "t")


def _edit(datalist: Path, change) -> None:
    doc = json.loads(datalist.read_text())
    change(doc)
    datalist.write_text(json.dumps(doc))


def _raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI whose sform is ``affine`` as given (save_nifti would refuse a degenerate one)."""
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, str(path))
    return path


def _both(root: Path, write) -> Path:
    """Replace case 0's image and label by what ``write(path, volume)`` makes; the label."""
    image, label = _volumes()
    write(root / "images" / "c0.nii.gz", image)
    return write(root / "labels" / "c0.nii.gz", label)


# name -> (make(root, datalist) -> (datalist to pass, file named), what it says of the file)
KINDS = {}


def kind(name: str, says: str):
    def register(make):
        KINDS[name] = (make, says)
        return make

    return register


# --- the datalist itself -----------------------------------------------------------------
@kind("datalist missing", "file not found")
def _(root, dl):
    dl.unlink()
    return dl, dl


@kind("datalist is a folder", "is a folder, not a file")
def _(root, dl):
    (root / "folder").mkdir()
    return root / "folder", root / "folder"


@kind("datalist is a symlink loop", "is a symbolic link loop")
def _(root, dl):
    os.symlink(root / "loop_b.json", root / "loop_a.json")
    os.symlink(root / "loop_a.json", root / "loop_b.json")
    return root / "loop_a.json", root / "loop_a.json"


@kind("datalist not JSON", "not valid JSON")
def _(root, dl):
    dl.write_text('{"training": [')
    return dl, dl


@kind("datalist binary", "is not text (a binary file?)")
def _(root, dl):
    dl.write_bytes(gzip.compress(dl.read_bytes()))
    return dl, dl


@kind("datalist UTF-16", "is UTF-16 text")
def _(root, dl):
    dl.write_bytes(dl.read_text().encode("utf-16"))
    return dl, dl


@kind("datalist a JSON list", "is not a JSON object")
def _(root, dl):
    dl.write_text("[]")
    return dl, dl


@kind("datalist without cases", "lists no cases")
def _(root, dl):
    _edit(dl, lambda d: d.update(training=[]))
    return dl, dl


@kind("'training' not a list", "'training' is not a list")
def _(root, dl):
    _edit(dl, lambda d: d.update(training={"image": "x"}))
    return dl, dl


@kind("no 'labels'", "declares no 'labels'")
def _(root, dl):
    _edit(dl, lambda d: d.pop("labels"))
    return dl, dl


@kind("'labels' a list", "'labels' is a list")
def _(root, dl):
    _edit(dl, lambda d: d.update(labels=["background", "esophagus"]))
    return dl, dl


@kind("'labels' with a gap", "invalid 'labels' block")
def _(root, dl):
    _edit(dl, lambda d: d.update(labels={"0": "background", "2": "heart"}))
    return dl, dl


@kind("modality unknown", "modality 'PET' unknown")
def _(root, dl):
    _edit(dl, lambda d: d.update(modality={"0": "PET"}))
    return dl, dl


@kind("entry not an object", "training[0] is not an object")
def _(root, dl):
    _edit(dl, lambda d: d["training"].__setitem__(0, "images/c0.nii.gz"))
    return dl, dl


@kind("entry without a label path", "training[0] has no 'label' path")
def _(root, dl):
    _edit(dl, lambda d: d["training"][0].pop("label"))
    return dl, dl


# --- the files it lists ------------------------------------------------------------------
@kind("file missing", "file not found")
def _(root, dl):
    (root / "labels" / "c0.nii.gz").unlink()
    return dl, root / "labels" / "c0.nii.gz"


@kind("path relative to the working folder", "file not found; ")
def _(root, dl):
    _edit(dl, lambda d: d["training"][0].update(label=str(root / "labels" / "c0.nii.gz")[1:]))
    os.chdir("/")
    return dl, root / str(root / "labels" / "c0.nii.gz")[1:]


@kind("file is a folder", "is a folder, not a file")
def _(root, dl):
    path = root / "labels" / "c0.nii.gz"
    path.unlink()
    path.mkdir()
    return dl, path


@kind("file is a symlink loop", "is a symbolic link loop")
def _(root, dl):
    path = root / "labels" / "c0.nii.gz"
    path.unlink()
    os.symlink(path, path)
    return dl, path


@kind("file is a broken symlink", "is a broken symbolic link")
def _(root, dl):
    path = root / "labels" / "c0.nii.gz"
    path.unlink()
    os.symlink(root / "nowhere.nii.gz", path)
    return dl, path


@kind("file not NIfTI", "cannot be read as a NIfTI/MGZ volume")
def _(root, dl):
    (root / "labels" / "c0.nii.gz").write_bytes(b"not a volume")
    return dl, root / "labels" / "c0.nii.gz"


@kind("file truncated", "data cannot be read, the file is truncated")
def _(root, dl):
    path = root / "images" / "c0.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return dl, path


@kind("4D file", "is 4D with shape")
def _(root, dl):
    image, _ = _volumes()
    path = save_nifti(np.stack([image, image], -1), AFFINE, root / "images" / "c0.nii.gz")
    return dl, path


@kind("volume over max_voxels", "has 1073741824 voxels")
def _(root, dl):
    """A header claiming 1024^3 voxels (more than the default 512^3) and no data."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.uint8)
    header.set_sform(AFFINE, code=1)
    path = root / "images" / "c0.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return dl, path


@kind("spacing 50 mm", "voxel spacing (50, 50, 50) mm is implausible")
def _(root, dl):
    return dl, _both(root, lambda p, v: save_nifti(v, np.diag([50.0, 50, 50, 1]), p))


@kind("spacing 0.1 mm", "voxel spacing (0.1, 0.1, 0.1) mm is implausible")
def _(root, dl):
    return dl, _both(root, lambda p, v: save_nifti(v, np.diag([0.1, 0.1, 0.1, 1]), p))


@kind("spacing 0 mm", "voxel spacing (0, 0, 0) mm is zero")
def _(root, dl):
    return dl, _both(root, lambda p, v: _raw_nifti(p, v, np.diag([0.0, 0, 0, 1])))


@kind("NaN affine", "affine (voxel-to-world matrix) is not finite")
def _(root, dl):
    return dl, _both(root, lambda p, v: _raw_nifti(p, v, np.diag([np.nan, 3, 5, 1])))


@kind("image and label shapes differ", "shape (16, 16, 13) differs")
def _(root, dl):
    _, label = _volumes(shape=(16, 16, 13))
    return dl, save_nifti(label, AFFINE, root / "labels" / "c0.nii.gz")


@kind("image and label affines differ", "affine differs from the image's by up to 0.5")
def _(root, dl):
    _, label = _volumes()
    return dl, save_nifti(label, np.diag([3.0, 3.0, 5.5, 1]), root / "labels" / "c0.nii.gz")


@kind("label values outside the label set", "label values [9] are not in label set")
def _(root, dl):
    _, label = _volumes()
    label[0, 0, 0] = 9
    return dl, save_nifti(label, AFFINE, root / "labels" / "c0.nii.gz")


@kind("NaN voxels", "contains 1 NaN/inf voxels")
def _(root, dl):
    image, _ = _volumes()
    image[0, 0, 0] = np.nan
    return dl, save_nifti(image, AFFINE, root / "images" / "c0.nii.gz")


@kind("empty label", "label is empty")
def _(root, dl):
    return dl, save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, root / "labels" / "c0.nii.gz")


def _hashes(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file contents, link targets, folders."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path)] = "link " + os.readlink(path)
        elif path.is_dir():
            out[str(path)] = "folder"
        else:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def bad(request, tmp_path, monkeypatch):
    """``(datalist, named file, what the message says, root)`` of the kind ``request.param``;
    on teardown, asserts that nothing under ``root`` changed."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    make, says = KINDS[request.param]
    datalist, named = make(root, _good(root))
    before = _hashes(root)
    yield Path(datalist), f"{named}: {says}", root
    assert _hashes(root) == before, "an input file changed"


def _validate(datalist: Path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--datalist", str(datalist)])
    return exit_.value.code, capsys.readouterr().err


def _seg_study(datalist: Path, root: Path, capsys) -> tuple[int, str]:
    out = root.parent / "study"
    with pytest.raises(SystemExit) as exit_:
        main(["seg-study", "--real", str(datalist), "--regimes", "E2-1", "--out", str(out)])
    assert not out.exists()  # stopped before writing anything
    return exit_.value.code, capsys.readouterr().err


def _training(datalist: Path, **values) -> str:
    parser = ConfigParser()
    parser.read_config([str(c) for c in TRAIN])
    parser.update({"datalist": str(datalist), **values})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("split")
    error = find_data_error(info.value)
    assert error is not None, repr(info.value)
    return str(error)


@pytest.mark.parametrize("bad", list(KINDS), indirect=True)
def test_validate_names_the_file(bad, capsys):
    datalist, says, _ = bad
    code, err = _validate(datalist, capsys)
    assert code == 1 and says in err, err


@pytest.mark.parametrize("bad", list(KINDS), indirect=True)
def test_training_entry_names_the_file(bad):
    datalist, says, _ = bad
    message = _training(datalist)
    assert message.startswith(f"{datalist}: ") and says in message, message


@pytest.mark.parametrize("bad", list(KINDS), indirect=True)
def test_seg_study_names_the_file(bad, capsys):
    datalist, says, root = bad
    code, err = _seg_study(datalist, root, capsys)
    assert code == 2 and err.startswith(f"error: {datalist}: ") and says in err, err


def test_training_refuses_a_volume_too_big_once_resampled(tmp_path):
    """32^3 voxels of 25 mm pass the header budget but not once resampled to the model grid's
    (10, 10, 5) mm: the training stops before loading anything."""
    datalist = _good(tmp_path)
    named = _both(
        tmp_path,
        lambda p, v: save_nifti(np.resize(v, (32, 32, 32)), np.diag([25.0, 25, 25, 1]), p),
    )
    before = _hashes(tmp_path)
    message = _training(datalist, max_voxels=500_000)
    assert f"{named}: would have 949104 voxels (shape (78, 78, 156)) after resampling" in message
    assert "to (10, 10, 5) mm, more than max_voxels=500000" in message
    assert _hashes(tmp_path) == before


def test_training_refuses_a_label_set_of_another_size(tmp_path):
    datalist = _good(tmp_path)
    message = _training(datalist, num_classes=3)
    assert message.startswith(f"{datalist}: label set 'segthor' has 5 classes")


def test_segmentation_ignores_a_killed_writers_hidden_temporary(tmp_path):
    """A folder of images to segment with a `.NAME.XXXX.tmp.nii.gz` left by a kill."""
    from common.seg.cases import image_cases

    image, _ = _volumes()
    good = save_nifti(image, AFFINE, tmp_path / "c0.nii.gz")
    (tmp_path / ".c1.nii.gz.k1ll3d.tmp.nii.gz").write_bytes(b"half a volume")
    assert image_cases(tmp_path) == [{"image": str(good)}]


def test_an_unreadable_checkpoint_to_start_from_names_the_file(tmp_path):
    from common.core.errors import DataError
    from common.core.io import start_from

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"^{ckpt}: cannot be read as a checkpoint"):
        start_from(torch.nn.Linear(2, 2), ckpt)


def test_a_checkpoint_path_that_is_a_link_loop_or_a_folder_says_so(tmp_path):
    from common.core.errors import DataError
    from common.core.io import load_weights

    os.symlink(tmp_path / "model.pt", tmp_path / "model.pt")
    with pytest.raises(DataError, match="model.pt: is a symbolic link loop"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(DataError, match=f"^{tmp_path}: is a folder, not a file"):
        load_weights(torch.nn.Linear(2, 2), tmp_path)
