"""validate_datalist/validate_case: one test per kind of bad input, on tiny volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.datalists import write_datalist
from common.data.importers import import_dataset
from common.data.labels import load_label_set
from common.data.validate import count_cases, format_report, validate_case, validate_datalist

SHAPE = (8, 8, 4)


def _save(path: Path, data, affine=None) -> Path:
    """Write ``data`` as NIfTI (or MGZ by extension) with ``affine`` (identity by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    cls = nib.MGHImage if path.suffix == ".mgz" else nib.Nifti1Image
    nib.save(cls(np.asarray(data), affine), str(path))
    return path


def _image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _label(value: int = 1, shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:5, 2:5, 1:3] = value
    return label


def _case(root: Path, name: str, image=None, label=None, suffix=".nii.gz") -> dict:
    """Image/label files ``root/{name}_img``/``_seg`` (valid unless given)."""
    return {
        "image": _save(root / f"{name}_img{suffix}", _image() if image is None else image),
        "label": _save(root / f"{name}_seg{suffix}", _label() if label is None else label),
        "case": name,
    }


def _datalist(root: Path, cases: list[dict], label_set: str = "segthor") -> Path:
    return write_datalist(root / "datalist.json", cases, load_label_set(label_set), "CT", "t")


def _only(problems, *fragments: str, file: Path | str):
    """Assert ``problems`` is one problem naming ``file`` and containing every fragment."""
    assert len(problems) == 1, [str(p) for p in problems]
    msg = str(problems[0])
    assert msg.startswith(f"{file}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return problems[0]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_valid_dataset(tmp_path):
    cases = [_case(tmp_path, "a"), _case(tmp_path, "b", label=_label(4))]
    dl = _datalist(tmp_path, cases)
    assert validate_datalist(dl) == []
    assert count_cases(dl) == 2
    assert format_report([], 2) == "all 2 cases valid"


def test_valid_mgz_and_4d_with_one_frame(tmp_path):
    mgz = _case(tmp_path, "m", suffix=".mgz")
    frame = _case(tmp_path, "f", image=_image()[..., None], label=_label()[..., None])
    assert validate_datalist(_datalist(tmp_path, [mgz, frame])) == []


def test_imported_dataset_is_valid(tmp_path):
    for n in (1, 2):
        _save(tmp_path / "src" / str(n) / "data.nii.gz", _image(n))
        _save(tmp_path / "src" / str(n) / "label.nii.gz", _label(6))
    dl = import_dataset("structseg", tmp_path / "src", tmp_path / "dl.json")
    assert validate_datalist(dl) == []


def test_files_unchanged(tmp_path):
    big = (16, 16, 16)
    cases = [_case(tmp_path, "a"), _case(tmp_path, "b", label=_label(9))]
    cases.append(_case(tmp_path, "t", image=_image(shape=big), label=_label(shape=big)))
    _truncate(cases[-1]["image"])
    cases.append({"image": cases[0]["image"]})
    dl = _datalist(tmp_path, cases)

    def snapshot():
        files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    before = snapshot()
    assert len(validate_datalist(dl)) == 3
    assert snapshot() == before


def test_unreadable_json(tmp_path):
    dl = tmp_path / "datalist.json"
    dl.write_text('{"training": [')
    _only(validate_datalist(dl), "not valid JSON", file=dl)
    assert count_cases(dl) == 0


def test_missing_datalist(tmp_path):
    _only(validate_datalist(tmp_path / "no.json"), "file not found", file=tmp_path / "no.json")


def test_no_labels_block(tmp_path):
    dl = _datalist(tmp_path, [_case(tmp_path, "a")])
    doc = json.loads(dl.read_text())
    del doc["labels"]
    dl.write_text(json.dumps(doc))
    _only(validate_datalist(dl), "declares no 'labels'", file=dl)


def test_no_cases(tmp_path):
    dl = _datalist(tmp_path, [])
    _only(validate_datalist(dl), "lists no cases", file=dl)
    assert format_report(validate_datalist(dl), 0).startswith("the datalist has problems:\n")


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ("a.nii.gz", "training[0] is not an object"),
        ({"image": "a.nii.gz"}, "training[0] has no 'label' path"),
        ({"image": "", "label": "a.nii.gz"}, "training[0] has no 'image' path"),
    ],
)
def test_bad_entry(tmp_path, entry, fragment):
    _save(tmp_path / "a.nii.gz", _label())
    dl = _datalist(tmp_path, [])
    dl.write_text(json.dumps({**json.loads(dl.read_text()), "training": [entry]}))
    problem = _only(validate_datalist(dl), fragment, file=dl)
    assert problem.case == "training[0]"


def test_missing_file(tmp_path):
    case = _case(tmp_path, "a")
    case["label"] = tmp_path / "gone.nii.gz"
    _only(validate_datalist(_datalist(tmp_path, [case])), "file not found", file=case["label"])


def test_path_relative_to_cwd(tmp_path, monkeypatch):
    _case(tmp_path / "data", "a")
    dl = tmp_path / "lists" / "datalist.json"
    doc = {"labels": {"0": "background", "1": "x"}, "modality": {"0": "CT"}}
    doc["training"] = [{"image": "data/a_img.nii.gz", "label": "data/a_seg.nii.gz"}]
    dl.parent.mkdir()
    dl.write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    problems = validate_datalist(dl)
    assert len(problems) == 2
    for problem, name in zip(problems, ("a_img", "a_seg")):
        assert str(problem).startswith(f"{tmp_path / 'lists' / 'data' / name}.nii.gz: ")
        assert "paths are relative to the datalist's folder" in str(problem)


def test_truncated_nifti(tmp_path):
    case = _case(tmp_path, "a", image=_image(shape=(16, 16, 16)), label=_label(shape=(16, 16, 16)))
    _truncate(case["image"])
    problems = validate_datalist(_datalist(tmp_path, [case]))
    _only(problems, "data cannot be read, the file is truncated or corrupt", file=case["image"])


def test_unreadable_file(tmp_path):
    case = _case(tmp_path, "a")
    case["label"].write_bytes(b"not a volume")
    problems = validate_case(case["image"], case["label"], load_label_set("segthor"))
    _only(problems, "cannot be read as a NIfTI/MGZ volume", file=case["label"])


@pytest.mark.parametrize("shape, dims", [((8, 8), "2D"), ((8, 8, 4, 2), "4D")])
def test_not_3d(tmp_path, shape, dims):
    case = _case(tmp_path, "a", image=_image(shape=shape))
    problems = validate_case(case["image"], case["label"], load_label_set("segthor"))
    _only(problems, f"is {dims} with shape {shape}, not a 3D volume", file=case["image"])


def test_oversized_volume_refused_before_loading(tmp_path):
    case = _case(tmp_path, "a", image=_image(shape=(16, 16, 16)), label=_label(shape=(16, 16, 16)))
    _truncate(case["image"])  # reading its data would report truncation
    problems = validate_case(case["image"], case["label"], None, max_voxels=1000)
    assert len(problems) == 2
    for problem, file in zip(problems, (case["image"], case["label"])):
        assert str(problem).startswith(f"{file}: has 4096 voxels (shape (16, 16, 16)), more than")
        assert "max_voxels=1000" in str(problem)


def test_shape_mismatch(tmp_path):
    case = _case(tmp_path, "a", label=_label(shape=(8, 8, 5)))
    problems = validate_datalist(_datalist(tmp_path, [case]))
    _only(problems, "shape (8, 8, 5) differs from the image's (8, 8, 4)", file=case["label"])
    assert "resample the label onto the image grid" in str(problems[0])


def test_affine_mismatch_reports_max_difference(tmp_path):
    case = _case(tmp_path, "a")
    shifted = np.eye(4)
    shifted[:3, 3] = [0.0, 0.5, -0.25]
    _save(case["label"], _label(), affine=shifted)
    problems = validate_datalist(_datalist(tmp_path, [case]))
    _only(
        problems,
        "affine differs from the image's by up to 0.5",
        "tolerance 0.001",
        file=case["label"],
    )


def test_affine_within_tolerance(tmp_path):
    case = _case(tmp_path, "a")
    _save(case["label"], _label(), affine=np.eye(4) + 1e-5)
    assert validate_datalist(_datalist(tmp_path, [case])) == []


def test_label_values_outside_label_set(tmp_path):
    label = _label()
    label[0, 0, 0], label[1, 1, 1] = 9, 7
    case = _case(tmp_path, "a", label=label)
    problems = validate_datalist(_datalist(tmp_path, [case]))
    _only(
        problems,
        "label values [7, 9] are not in label set 'segthor' (allowed: [0, 1, 2, 3, 4])",
        "add the values to the label set's source_map",
        file=case["label"],
    )


def test_freesurfer_source_map(tmp_path):
    aseg = _label(41).astype(np.int16)
    aseg[0, 0, 0] = 3
    good = _case(tmp_path, "good", label=aseg)
    aseg[1, 1, 1] = 1000
    bad = _case(tmp_path, "bad", label=aseg)
    fs = load_label_set("freesurfer")
    assert validate_case(good["image"], good["label"], fs) == []
    _only(validate_case(bad["image"], bad["label"], fs), "label values [1000]", file=bad["label"])


def test_nan_in_image(tmp_path):
    image = _image()
    image[0, 0, 0], image[1, 0, 0] = np.nan, np.inf
    case = _case(tmp_path, "a", image=image)
    problems = validate_datalist(_datalist(tmp_path, [case]))
    _only(problems, "contains 2 NaN/inf voxels", file=case["image"])


@pytest.mark.parametrize("label_set", ["segthor", "freesurfer"])
def test_empty_label(tmp_path, label_set):
    case = _case(tmp_path, "a", label=np.zeros(SHAPE, np.uint8))
    problems = validate_datalist(_datalist(tmp_path, [case], label_set))
    _only(problems, "label is empty: every voxel is background", file=case["label"])


def test_all_problems_reported(tmp_path):
    nan_image = _image()
    nan_image[0, 0, 0] = np.nan
    cases = [
        _case(tmp_path, "ok"),
        _case(tmp_path, "nan", image=nan_image, label=_label(8)),
        _case(tmp_path, "empty", label=np.zeros(SHAPE, np.uint8)),
    ]
    dl = _datalist(tmp_path, cases)
    problems = validate_datalist(dl)
    assert [p.case for p in problems] == ["training[1] (nan)"] * 2 + ["training[2] (empty)"]
    report = format_report(problems, count_cases(dl))
    lines = report.splitlines()
    assert lines[0] == "2 of 3 cases have problems:"
    assert lines[1].startswith(f"  [training[1] (nan)] {cases[1]['image']}: contains 1 NaN/inf")
    assert len(lines) == 4


@pytest.mark.parametrize("pixdim", [(2.0, 2.0, 5.0), (1.5, 0.7, 2.5), (0.5, 0.45, 1.0)])
def test_the_memory_guard_predicts_the_resampled_grid(smooth_ct_pair, pixdim):
    """The shape the guard computes from the header is what MONAI's Orientation + Spacing make
    (a flipped, anisotropic affine); a volume over budget once resampled is refused."""
    from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd

    from common.data.validate import _resampled_shape, _spacing

    path = Path(smooth_ct_pair["image"])
    img = nib.load(path)
    predicted = _resampled_shape(img.shape, img.affine, _spacing(path, img), pixdim)
    chain = Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            Orientationd("image", axcodes="RAS", labels=None),
            Spacingd("image", pixdim=pixdim),
        ]
    )
    assert predicted == tuple(chain({"image": str(path)})["image"].shape[1:])
    budget = max(int(np.prod(predicted)), int(np.prod(img.shape)))
    label = smooth_ct_pair["label"]
    assert validate_case(path, label, None, max_voxels=budget, pixdim=pixdim) == []
    if budget > np.prod(img.shape):  # upsampled: the resampled grid is what overflows
        problems = validate_case(path, label, None, max_voxels=budget - 1, pixdim=pixdim)
        assert str(problems[0]).startswith(
            f"{path}: would have {budget} voxels (shape {predicted}) after resampling to "
        )
