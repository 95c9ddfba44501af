import json

import numpy as np
import pytest

from common.core.errors import DataError
from common.core.io import atomic_path, save_nifti
from common.data.datalists import (
    datalist_label_set,
    datalist_modality,
    read_datalist,
    write_datalist,
)
from common.data.labels import builtin_label_sets, load_label_set


def test_builtin_label_sets_load():
    assert {"segthor", "structseg", "freesurfer", "brain_tissue"} <= set(builtin_label_sets())
    seg = load_label_set("segthor")
    assert seg.names == ("background", "esophagus", "heart", "trachea", "aorta")
    assert seg.num_classes == 5 and seg.source_values == {0, 1, 2, 3, 4}
    ss = load_label_set("structseg")
    assert ss.names[1:3] == ("left_lung", "right_lung") and ss.num_classes == 7


def test_freesurfer_remap():
    fs = load_label_set("freesurfer")
    aseg = np.array([0, 2, 41, 3, 42, 4, 43, 17, 8])
    assert fs.remap(aseg).tolist() == [0, 3, 3, 2, 2, 1, 1, 4, 4]
    with pytest.raises(ValueError, match="999"):
        fs.remap(np.array([999]))


def test_unknown_label_set_names_the_choices(tmp_path):
    with pytest.raises(DataError, match="segthor"):
        load_label_set("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: {0: background, 2: gap}\n")
    with pytest.raises(DataError, match="bad.yaml"):
        load_label_set(bad)


def test_datalist_round_trip_relative_paths(tmp_path):
    save_nifti(np.zeros((2, 2, 2), np.int16), np.eye(4), tmp_path / "imgs" / "a.nii.gz")
    cases = [{"image": tmp_path / "imgs" / "a.nii.gz", "label": tmp_path / "imgs" / "a.nii.gz"}]
    path = write_datalist(
        tmp_path / "out" / "datalist.json", cases, load_label_set("segthor"), "CT", "x"
    )
    raw = json.loads(path.read_text())
    assert raw["training"][0]["image"] == "../imgs/a.nii.gz" and raw["numTraining"] == 1
    doc = read_datalist(path)
    assert doc["training"][0]["image"] == str(tmp_path / "imgs" / "a.nii.gz")
    assert datalist_label_set(doc) == load_label_set("segthor")
    assert datalist_modality(doc) == "CT"


def test_read_datalist_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_datalist(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_datalist(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(DataError, match="no training"):
        read_datalist(tmp_path / "empty.json")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_usual_permissions(tmp_path):
    with atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
