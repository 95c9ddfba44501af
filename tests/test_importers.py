"""import_dataset: each layout on a tiny fake tree; errors for incomplete or missing sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core.errors import DataError
from common.data.datalists import datalist_label_set, datalist_modality, read_datalist
from common.data.importers import LAYOUTS, import_dataset


def _vol(path: Path, value: int = 1) -> Path:
    """An 8x8x4 volume at ``path`` (NIfTI or MGZ by extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((8, 8, 4), value, np.uint8)
    img = (
        nib.MGHImage(data, np.eye(4)) if path.suffix == ".mgz" else nib.Nifti1Image(data, np.eye(4))
    )
    nib.save(img, str(path))
    return path


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _pairs(datalist: Path, src: Path) -> list[tuple[str, str, str]]:
    """``(case, image, label)`` per entry, paths relative to ``src``."""
    doc = read_datalist(datalist)
    return [
        (e["case"], os.path.relpath(e["image"], src), os.path.relpath(e["label"], src))
        for e in doc["training"]
    ]


def _raw_entries(datalist: Path) -> list[dict]:
    return json.loads(datalist.read_text())["training"]


@pytest.mark.parametrize("with_train", [True, False])
def test_segthor(tmp_path, with_train):
    src = tmp_path / "SegTHOR"
    root = src / "train" if with_train else src
    for n in ("02", "01", "10"):
        _vol(root / f"Patient_{n}" / f"Patient_{n}.nii.gz")
        _vol(root / f"Patient_{n}" / "GT.nii.gz")
    before = _tree(src)
    out = import_dataset("segthor", src, tmp_path / "out" / "datalist.json")
    assert _tree(src) == before  # sources untouched, nothing copied in
    prefix = "train/" if with_train else ""
    assert _pairs(out, src) == [
        (
            f"Patient_{n}",
            f"{prefix}Patient_{n}/Patient_{n}.nii.gz",
            f"{prefix}Patient_{n}/GT.nii.gz",
        )
        for n in ("01", "02", "10")
    ]
    assert all(not Path(e["image"]).is_absolute() for e in _raw_entries(out))
    doc = json.loads(out.read_text())
    assert datalist_label_set(doc).name == "segthor"
    assert datalist_modality(doc) == "CT"
    assert doc["labels"]["1"] == "esophagus"


def test_segthor_src_is_train_folder(tmp_path):
    _vol(tmp_path / "train" / "Patient_01" / "Patient_01.nii.gz")
    _vol(tmp_path / "train" / "Patient_01" / "GT.nii.gz")
    out = import_dataset("segthor", tmp_path / "train", tmp_path)
    assert out == tmp_path / "datalist.json"
    assert [c for c, _, _ in _pairs(out, tmp_path / "train")] == ["Patient_01"]


def test_structseg_numeric_order(tmp_path):
    for n in (10, 2, 1):
        _vol(tmp_path / "src" / str(n) / "data.nii.gz")
        _vol(tmp_path / "src" / str(n) / "label.nii.gz")
    (tmp_path / "src" / "notes").mkdir()  # non-numeric folders are not cases
    out = import_dataset("structseg", tmp_path / "src", tmp_path / "dl.json")
    assert _pairs(out, tmp_path / "src") == [
        (str(n), f"{n}/data.nii.gz", f"{n}/label.nii.gz") for n in (1, 2, 10)
    ]
    assert _raw_entries(out)[0]["image"] == "src/1/data.nii.gz"  # relative to the datalist
    assert datalist_label_set(json.loads(out.read_text())).name == "structseg"


def test_freesurfer(tmp_path):
    src = tmp_path / "subjects"
    _vol(src / "bert" / "mri" / "aseg.mgz")
    _vol(src / "bert" / "mri" / "T1.mgz")
    _vol(src / "bert" / "mri" / "norm.mgz")  # preferred over T1
    _vol(src / "ernie" / "aseg.nii.gz")  # no mri/ folder
    _vol(src / "ernie" / "brain.nii.gz")
    _vol(src / "fsaverage" / "mri" / "aseg.mgz")  # template subject, skipped
    (src / "scripts").mkdir()  # neither file: not a subject
    out = import_dataset("freesurfer", src, tmp_path / "dl.json")
    assert _pairs(out, src) == [
        ("bert", "bert/mri/norm.mgz", "bert/mri/aseg.mgz"),
        ("ernie", "ernie/brain.nii.gz", "ernie/aseg.nii.gz"),
    ]
    doc = json.loads(out.read_text())
    assert datalist_modality(doc) == "MRI"
    assert datalist_label_set(doc).source_map[42] == 2  # aseg codes map onto the label set


def test_folders_nnunet_suffix_and_yaml_label_set(tmp_path):
    src = tmp_path / "Task"
    _vol(src / "imagesTr" / "case_1_0000.nii.gz")
    _vol(src / "labelsTr" / "case_1.nii.gz")
    _vol(src / "imagesTr" / "case_2.nii.gz")
    _vol(src / "labelsTr" / "case_2.nii.gz")
    (src / "imagesTr" / "._case_1_0000.nii.gz").write_bytes(b"macOS junk")  # ignored
    yaml_path = tmp_path / "organs.yaml"
    yaml_path.write_text("name: organs\nlabels: {0: background, 1: liver}\n")
    out = import_dataset("folders", src, tmp_path / "dl.json", label_set=str(yaml_path))
    assert _pairs(out, src) == [
        ("case_1", "imagesTr/case_1_0000.nii.gz", "labelsTr/case_1.nii.gz"),
        ("case_2", "imagesTr/case_2.nii.gz", "labelsTr/case_2.nii.gz"),
    ]
    doc = json.loads(out.read_text())
    assert doc["labels"] == {"0": "background", "1": "liver"}
    assert doc["name"] == "Task"
    assert datalist_modality(doc) == "CT"


def test_folders_modality_and_builtin_label_set(tmp_path):
    _vol(tmp_path / "imagesTr" / "a.nii.gz")
    _vol(tmp_path / "labelsTr" / "a.nii.gz")
    out = import_dataset("folders", tmp_path, tmp_path, label_set="brain_tissue", modality="mri")
    doc = json.loads(out.read_text())
    assert datalist_modality(doc) == "MRI"
    assert datalist_label_set(doc).name == "brain_tissue"


def test_folders_needs_label_set(tmp_path):
    _vol(tmp_path / "imagesTr" / "a.nii.gz")
    _vol(tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(DataError, match="needs a label set.*--label_set"):
        import_dataset("folders", tmp_path, tmp_path / "dl.json")
    assert not (tmp_path / "dl.json").exists()


def test_missing_partners_are_errors(tmp_path):
    src = tmp_path / "Task"
    _vol(src / "imagesTr" / "a.nii.gz")
    _vol(src / "labelsTr" / "a.nii.gz")
    _vol(src / "imagesTr" / "b_0000.nii.gz")
    _vol(src / "labelsTr" / "c.nii.gz")
    with pytest.raises(DataError) as err:
        import_dataset("folders", src, tmp_path / "dl.json", label_set="segthor")
    msg = str(err.value)
    assert str(src) in msg and "2 case(s) lack an image or a label" in msg
    assert "b: no label (image imagesTr/b_0000.nii.gz)" in msg
    assert "c: no image (label labelsTr/c.nii.gz)" in msg
    assert not (tmp_path / "dl.json").exists()


def test_segthor_missing_gt(tmp_path):
    _vol(tmp_path / "Patient_01" / "Patient_01.nii.gz")
    with pytest.raises(DataError, match="Patient_01: no label"):
        import_dataset("segthor", tmp_path, tmp_path / "dl.json")


def test_nonexistent_src(tmp_path):
    with pytest.raises(DataError, match="source folder not found") as err:
        import_dataset("segthor", tmp_path / "nope", tmp_path / "dl.json")
    assert str(tmp_path / "nope") in str(err.value)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_no_cases_names_the_pattern(tmp_path, layout):
    with pytest.raises(DataError, match=r"no cases found \(looked for .+\)") as err:
        import_dataset(layout, tmp_path, tmp_path / "dl.json", label_set="segthor")
    assert LAYOUTS[layout].pattern in str(err.value)


def test_unknown_layout_and_modality(tmp_path):
    with pytest.raises(DataError, match="unknown layout.*segthor"):
        import_dataset("msd", tmp_path, tmp_path / "dl.json")
    with pytest.raises(DataError, match="modality 'PET' unknown"):
        import_dataset("segthor", tmp_path, tmp_path / "dl.json", modality="PET")
